"""An HTML report of a scored dataset: score histograms with τ, ROC and precision/recall curves, AUROC by
layer, and the highest-scoring rows.

Input is a scored parquet file (``saft-gx score --out``) or a DuckDB table (``saft-gx score --db``), plus
labels when there are any (a labels file or a label column). Plots are PNG files beside ``index.html``,
drawn with matplotlib's Agg backend (``pip install 'saft-gx[report]'``).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import SaftError
from .core.metrics import auroc, precision_recall_f1

TEXT_COLUMNS = ("prompt", "instruction", "question", "query", "input", "response", "output", "answer", "completion",
                "text", "messages")
PLOTS = {
    "hist_flag": "Score histogram by flag",
    "hist_label": "Score histogram by label",
    "roc": "ROC curve",
    "pr": "Precision / recall curve",
    "auroc_by_layer": "AUROC by layer",
}


@dataclass
class ReportData:
    """Everything the page shows. ``labels`` is None when no row is labelled; else 0/1 with -1 = unknown."""

    scores: np.ndarray
    flags: np.ndarray
    top_rows: Any  # pandas DataFrame: the highest-scoring rows, display columns only
    threshold: float | None = None
    threshold_source: str = ""
    labels: np.ndarray | None = None
    by_layer: dict[str, dict[int, float]] | None = None
    by_layer_source: str = ""
    title: str = "saft-gx report"
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> np.ndarray:
        return np.zeros(len(self.scores), bool) if self.labels is None else self.labels >= 0


# ---- loading ----

class _FrameSource:
    """The small part of ``readers.Dataset`` that label matching needs, over an in-memory DataFrame."""

    def __init__(self, df: Any, name: str):
        self.df, self.columns, self.num_rows, self.path = df, [str(c) for c in df.columns], len(df), Path(name)

    def frames(self, columns: list[str] | None = None, batch_rows: int = 0):
        yield 0, self.df[columns] if columns else self.df


def _labels_for(df: Any, name: str, labels_path: str | None, label_column: str, id_column: str | None) -> np.ndarray | None:
    from .labelled import labels_from_file, parse_labels

    if labels_path:
        # the scored rows are in row_id order, all of them, so positions are the input's row ids
        src = _FrameSource(df.drop(columns=["row_id"]) if "row_id" in df.columns else df, name)
        lab = labels_from_file(labels_path, src, id_column=id_column, label_column=label_column)
        out = np.full(len(df), -1, dtype=np.int8)
        out[lab.rows] = lab.labels
        return out
    if label_column in df.columns:
        vals = df[label_column].tolist()
        known = [i for i, v in enumerate(vals) if not (v is None or (isinstance(v, float) and np.isnan(v)))]
        out = np.full(len(df), -1, dtype=np.int8)
        if known:
            out[known] = parse_labels([vals[i] for i in known], f"{name}: row")
            return out
    return None


def _display_columns(columns: list[str]) -> list[str]:
    lower = {c.lower(): c for c in columns}
    return [lower[c] for c in TEXT_COLUMNS if c in lower]


def load_parquet(path: str | Path, *, labels_path: str | None = None, label_column: str = "label",
                 id_column: str | None = None, top: int = 20) -> ReportData:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SaftError(f"{path}: no such file")
    names = pq.ParquetFile(path).schema_arrow.names
    for col in ("harm_score", "harm_flag"):
        if col not in names:
            raise SaftError(f"{path}: no {col} column; is this the output of `saft-gx score --out`?")
    keep = [c for c in ("row_id", "harm_score", "harm_flag", "detector_id", "id", label_column, id_column) if c and c in names]
    df = pq.read_table(path, columns=list(dict.fromkeys(keep))).to_pandas()
    if "detector_id" in df.columns and df["detector_id"].nunique() > 1:
        raise SaftError(f"{path}: holds scores of several detectors; report one at a time")
    labels = _labels_for(df, path.name, labels_path, label_column, id_column)
    scores = df["harm_score"].to_numpy(np.float64)
    order = np.argsort(-scores, kind="stable")[:top]
    shown = _display_columns(names)
    full = pq.read_table(path, columns=shown).to_pandas().iloc[order] if shown else df.iloc[order][[]]
    full.insert(0, "harm_score", scores[order])
    full.insert(0, "row_id", df["row_id"].to_numpy()[order] if "row_id" in df.columns else order)
    if labels is not None:
        full["label"] = [("?" if v < 0 else int(v)) for v in labels[order]]
    data = ReportData(scores=scores, flags=df["harm_flag"].to_numpy(bool), top_rows=full, labels=labels,
                      title=f"saft-gx report: {path.name}")
    data.facts["detector_id"] = df["detector_id"].iloc[0] if "detector_id" in df.columns and len(df) else None
    return data


def load_duckdb(db: str | Path, table: str, *, detector_id: str | None = None, labels_path: str | None = None,
                label_column: str = "label", id_column: str | None = None, top: int = 20) -> ReportData:
    from .io import store

    con = store.connect(db, read_only=True)
    try:
        if not store.IDENT.match(table):
            raise SaftError(f"--table {table!r}: use letters, digits and underscores")
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if table not in tables:
            raise SaftError(f"{db}: no table {table!r} (it has: {', '.join(sorted(tables - {'saft_runs', 'saft_schema'})) or 'none'})")
        names = [r[0] for r in con.execute(f"DESCRIBE {store.quote(table)}").fetchall()]
        runs = con.execute("SELECT detector_id, layer, token, k, threshold, threshold_rule, run_at FROM saft_runs "
                           "WHERE table_name = ? ORDER BY run_at", [table]).fetchall() if "saft_runs" in tables else []
        ids = [r[0] for r in con.execute(f"SELECT DISTINCT detector_id FROM {store.quote(table)}").fetchall()]
        if detector_id is None:
            # the most recent run's detector
            detector_id = runs[-1][0] if runs else (ids[0] if len(ids) == 1 else None)
            if detector_id is None:
                raise SaftError(f"table {table!r} holds several detectors ({', '.join(ids)}); pick one with --detector-id")
        if detector_id not in ids:
            raise SaftError(f"table {table!r} has no rows of detector {detector_id!r} (it has: {', '.join(ids)})")
        keep = [c for c in ("row_id", "harm_score", "harm_flag", "id", label_column, id_column) if c and c in names]
        q = lambda cols: f"SELECT {', '.join(map(store.quote, cols))} FROM {store.quote(table)} WHERE detector_id = ? ORDER BY row_id"
        df = con.execute(q(list(dict.fromkeys(keep))), [detector_id]).df()
        shown = _display_columns(names)
        top_df = con.execute(f"SELECT row_id, harm_score{''.join(', ' + store.quote(c) for c in shown)} FROM "
                             f"{store.quote(table)} WHERE detector_id = ? ORDER BY harm_score DESC, row_id LIMIT ?",
                             [detector_id, top]).df()
        # AUROC by layer needs labels and one detector per layer: every detector of this table, if any
        per_detector = {}
        for did in ids:
            if did != detector_id:
                per_detector[did] = con.execute(q(["row_id", "harm_score"]), [did]).df()
    finally:
        con.close()
    labels = _labels_for(df, f"table {table}", labels_path, label_column, id_column)
    data = ReportData(scores=df["harm_score"].to_numpy(np.float64), flags=df["harm_flag"].to_numpy(bool), top_rows=top_df,
                      labels=labels, title=f"saft-gx report: {Path(db).name} / {table}")
    data.facts["detector_id"] = detector_id
    run = [r for r in runs if r[0] == detector_id]
    if run:
        _, layer, token, k, thr, rule, _ = run[-1]
        data.threshold, data.threshold_source = float(thr), f"the run's rule ({rule})"
        data.facts.update({"layer": layer, "token": token, "k": k})
    if labels is not None:
        pos = {int(r): i for i, r in enumerate(df["row_id"].tolist())}
        data.top_rows["label"] = [("?" if labels[pos[int(r)]] < 0 else int(labels[pos[int(r)]])) for r in top_df["row_id"]]
        layer_of = {r[0]: (r[2], r[1]) for r in runs}
        if per_detector and detector_id in layer_of:
            by: dict[str, dict[int, float]] = {}
            mask = labels >= 0
            if mask.any() and len(set(labels[mask].tolist())) == 2:
                for did, d in [(detector_id, df), *per_detector.items()]:
                    if did not in layer_of or len(d) != len(df):
                        continue
                    tok, layer = layer_of[did]
                    by.setdefault(str(tok), {})[int(layer)] = auroc(d["harm_score"].to_numpy()[mask], labels[mask])
                if sum(len(v) for v in by.values()) > 1:
                    data.by_layer, data.by_layer_source = by, "AUROC on the labelled rows, one stored detector per layer"
    return data


def add_detector(data: ReportData, directory: str | Path) -> None:
    """τ, layer and the calibration's out-of-fold AUROC by layer from a saved detector."""
    meta = json.loads((Path(directory) / "detector.json").read_text()) if (Path(directory) / "detector.json").exists() else None
    if meta is None:
        raise SaftError(f"--detector {directory}: no detector.json there")
    if data.facts.get("detector_id") and meta.get("detector_id") and meta["detector_id"] != data.facts["detector_id"]:
        raise SaftError(f"--detector {directory} is detector {meta['detector_id']}, but the scores are from "
                        f"{data.facts['detector_id']}")
    if meta.get("threshold") is not None:
        data.threshold, data.threshold_source = float(meta["threshold"]), "the detector"
    for key in ("layer", "layers", "token", "k", "variant", "form"):
        if meta.get(key) is not None:
            data.facts[key] = meta[key]
    cal = meta.get("calibration")
    if cal:
        data.facts["calibration"] = {k: cal[k] for k in ("variant", "k", "cv_auroc", "threshold_rule") if k in cal}
    if cal and any(cal.get("auroc_by_layer", {}).values()):
        data.by_layer = {tok: {int(layer): float(a) for layer, a in d.items()} for tok, d in cal["auroc_by_layer"].items()}
        data.by_layer_source = (f"out-of-fold AUROC on {cal.get('labelled_rows')} labelled rows during calibration "
                                "(best variant and k per layer)")
    if meta.get("anchors"):
        data.facts["anchors"] = meta["anchors"]


def infer_threshold(data: ReportData) -> None:
    """Without a stored τ: flags are ``score > τ``, so τ lies between the highest kept and lowest flagged score."""
    if data.threshold is not None:
        return
    kept = data.scores[~data.flags]
    if len(kept):
        data.threshold, data.threshold_source = float(kept.max()), "inferred from the flags (highest unflagged score)"


# ---- drawing ----

def _curves(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.argsort(-scores, kind="stable")
    ys = y[order].astype(bool)
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    tpr = np.r_[0, tp / max(ys.sum(), 1)]
    fpr = np.r_[0, fp / max((~ys).sum(), 1)]
    precision = tp / np.arange(1, len(ys) + 1)
    return fpr, tpr, tpr[1:], precision


def _hist(ax: Any, groups: list[tuple[str, np.ndarray, str]], tau: float | None, all_scores: np.ndarray) -> None:
    lo, hi = float(np.min(all_scores)), float(np.max(all_scores))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    for name, s, color in groups:
        if len(s):
            ax.hist(s, bins=bins, alpha=0.55, label=f"{name} ({len(s)})", color=color)
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", linewidth=1.5, label=f"τ = {tau:.4g}")
    ax.set_xlabel("harm score")
    ax.set_ylabel("rows")
    ax.legend()


def write_report(data: ReportData, out_dir: str | Path, *, top: int = 20) -> Path:
    """Write ``index.html`` and one PNG per plot into ``out_dir``; returns the HTML path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SaftError("the report needs matplotlib: pip install 'saft-gx[report]'") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infer_threshold(data)
    s, tau = data.scores, data.threshold
    made: dict[str, str] = {}
    notes: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made[name] = f"{name}.png"

    fig, ax = plt.subplots(figsize=(7, 4))
    _hist(ax, [("kept", s[~data.flags], "tab:blue"), ("flagged", s[data.flags], "tab:red")], tau, s)
    ax.set_title("Scores by flag")
    save(fig, "hist_flag")

    lab = data.labelled
    metrics: dict[str, Any] = {}
    y = data.labels
    if y is not None and lab.any() and len(set(y[lab].tolist())) == 2:
        sl, yl = s[lab], y[lab].astype(bool)
        fig, ax = plt.subplots(figsize=(7, 4))
        groups = [("benign (label 0)", sl[~yl], "tab:green"), ("harmful (label 1)", sl[yl], "tab:red")]
        if (~lab).any():
            groups.insert(0, ("unlabelled", s[~lab], "lightgrey"))
        _hist(ax, groups, tau, s)
        ax.set_title("Scores by label")
        save(fig, "hist_label")
        a = auroc(sl, yl)
        fpr, tpr, rec, prec = _curves(sl, yl)
        p, r, f1 = precision_recall_f1(data.flags[lab], yl)
        metrics = {"labelled rows": int(lab.sum()), "harmful among them": int(yl.sum()), "AUROC": round(a, 4),
                   "precision at τ": round(p, 4), "recall at τ": round(r, 4), "F1 at τ": round(f1, 4),
                   "false-positive rate at τ": round(float(data.flags[lab][~yl].mean()), 4)}
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr, color="tab:red", label=f"harm score (AUROC {a:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        fl = data.flags[lab]
        ax.scatter([fl[~yl].mean()], [fl[yl].mean()], color="black", zorder=3, label="τ")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate (recall)")
        ax.set_title("ROC")
        ax.legend(loc="lower right")
        save(fig, "roc")
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(rec, prec, color="tab:purple")
        ax.axhline(yl.mean(), color="grey", linestyle=":", label=f"base rate {yl.mean():.2f}")
        ax.scatter([r], [p], color="black", zorder=3, label="τ")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_title("Precision / recall")
        ax.legend(loc="lower left")
        save(fig, "pr")
    else:
        for name in ("hist_label", "roc", "pr"):
            notes[name] = "needs labels of both classes (--labels, or a label column)"

    if data.by_layer:
        fig, ax = plt.subplots(figsize=(7, 4))
        for tok, d in sorted(data.by_layer.items()):
            layers = sorted(d)
            ax.plot(layers, [d[layer] for layer in layers], marker="o", label=f"token {tok}")
        if data.facts.get("layer") is not None:
            ax.axvline(int(data.facts["layer"]), color="black", linestyle="--", linewidth=1, label="chosen layer")
        ax.axhline(0.5, color="grey", linestyle=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("AUROC")
        ax.set_title("AUROC by layer")
        ax.legend()
        save(fig, "auroc_by_layer")
    elif data.facts.get("layers"):
        notes["auroc_by_layer"] = (f"the detector reads layers {'+'.join(map(str, data.facts['layers']))} side by side; "
                                   "its calibration compared no single layers (saft-gx calibrate --layers all does)")
    else:
        notes["auroc_by_layer"] = ("needs a calibrated detector (--detector), or labels and one stored detector per "
                                   "layer in the DuckDB table")

    page = _html(data, made, notes, metrics, top)
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _cell(v: Any, limit: int = 300) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    text = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
    if len(text) > limit:
        text = text[:limit] + " …"
    return html.escape(text)


def _html(data: ReportData, made: dict[str, str], notes: dict[str, str], metrics: dict[str, Any], top: int) -> str:
    e = html.escape
    n, f = len(data.scores), int(data.flags.sum())
    facts = {"rows": n, "flagged": f"{f} ({f / n:.1%})" if n else 0,
             "τ": f"{data.threshold:.6g} ({data.threshold_source})" if data.threshold is not None else "unknown",
             **{k: v for k, v in data.facts.items() if v is not None}, **metrics}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(data.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}"
        "img{max-width:100%;border:1px solid #eee;margin:.5em 0}.note{color:#777}</style></head><body>",
        f"<h1>{e(data.title)}</h1>",
        "<p>Rows with harm score &gt; τ are flagged. Scores come from an unsupervised subspace, oriented by labels "
        "or the built-in anchors: flagged rows are candidates for review, not verdicts, and false positives happen.</p>",
        "<h2>Summary</h2><table>",
        *[f"<tr><th>{e(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in facts.items()],
        "</table>",
    ]
    for name, title in PLOTS.items():
        parts.append(f"<h2>{e(title)}</h2>")
        if name in made:
            extra = f"<p class='note'>{e(data.by_layer_source)}</p>" if name == "auroc_by_layer" else ""
            parts.append(f"<img src='{made[name]}' alt='{e(title)}'>{extra}")
        else:
            parts.append(f"<p class='note'>Not drawn: {e(notes.get(name, ''))}.</p>")
    rows = data.top_rows.head(top)
    parts.append(f"<h2>Top {len(rows)} rows by harm score</h2><table><tr>")
    parts += [f"<th>{e(str(c))}</th>" for c in rows.columns]
    parts.append("</tr>")
    for _, r in rows.iterrows():
        parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r.tolist()) + "</tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)
