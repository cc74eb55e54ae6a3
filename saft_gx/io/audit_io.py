"""Audited release gate, the files: read scored rows (a scored parquet or a DuckDB table), write the audit
sample for labelling (csv / jsonl), read it back with its labels, and check the labels against the scored
rows before ``saft_gx.core.audit`` bounds anything.

The audit file carries its own design: each row's stratum with the stratum's score range and size, so an
estimate needs only the scored rows and the file. A label is trusted only for the text it was given for:
``text_sha256`` must match the scored row, and the strata must hold as many rows as when the sample was
drawn (otherwise the data or the scores changed and the sample no longer describes them).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import audit
from ..core.errors import SaftError

# pipeline.OUTPUT_COLUMNS, repeated so reading scores does not import torch (a test keeps them equal)
SCORE_COLUMNS = ("row_id", "text_sha256", "harm_score", "harm_flag", "detector_id")
DESIGN_COLUMNS = ("stratum", "stratum_low", "stratum_high", "stratum_rows", "stratum_sampled", "inclusion_prob", "weight",
                  "detector_id")
REQUIRED = ("row_id", "text_sha256", "stratum", "stratum_low", "stratum_high", "stratum_rows", "label")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


# ---- scored rows ----

@dataclass
class Scored:
    """Scored rows of one detector: ``frame`` has SCORE_COLUMNS (plus the text columns when asked for)."""

    frame: pd.DataFrame
    detector_id: str
    source: str
    text_columns: list[str]


def read_scored(path: str | None = None, *, db: str | None = None, table: str | None = None, detector_id: str | None = None,
                with_text: bool = False) -> Scored:
    """A scored parquet (``saft-gx score --out``) or a DuckDB table (``--db``/``--table``), one detector's rows."""
    if (path is None) == (db is None):
        raise SaftError("give a scored parquet (SCORED) or --db with --table, not both")
    if db is not None:
        return _read_db(db, table, detector_id, with_text)
    p = Path(path)
    if not p.is_file():
        raise SaftError(f"{p}: no such file")
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(p).schema_arrow.names
    except Exception as e:
        raise SaftError(f"{p}: not a parquet file ({_first_line(e)}); give the scored parquet of saft-gx score --out") from None
    missing = [c for c in SCORE_COLUMNS if c not in names]
    if missing:
        raise SaftError(f"{p}: not a scored file (no {', '.join(missing)}); score it with saft-gx score --out FILE")
    texts = [c for c in names if c not in SCORE_COLUMNS]
    df = pd.read_parquet(p, columns=list(SCORE_COLUMNS) + (texts if with_text else []))
    return _one_detector(df, detector_id, str(p), texts)


def _read_db(db: str, table: str | None, detector_id: str | None, with_text: bool) -> Scored:
    from . import store

    if not table:
        raise SaftError("--db needs --table (the scored table)")
    con = store.connect(db, read_only=True)
    try:
        names = [r[0] for r in con.execute(f"DESCRIBE {store.quote(table)}").fetchall()]
    except Exception as e:
        con.close()
        raise SaftError(f"{db}: no table {table!r} ({_first_line(e)})") from None
    try:
        missing = [c for c in SCORE_COLUMNS if c not in names]
        if missing:
            raise SaftError(f"{db}: table {table!r} holds no scores (no {', '.join(missing)})")
        texts = [c for c in names if c not in SCORE_COLUMNS]
        cols = ", ".join(store.quote(c) for c in list(SCORE_COLUMNS) + (texts if with_text else []))
        where, args = ("WHERE detector_id = ?", [detector_id]) if detector_id else ("", [])
        df = con.execute(f"SELECT {cols} FROM {store.quote(table)} {where} ORDER BY row_id", args).df()
    finally:
        con.close()
    return _one_detector(df, detector_id, f"{db}:{table}", texts)


def _one_detector(df: pd.DataFrame, detector_id: str | None, source: str, texts: list[str]) -> Scored:
    ids = sorted(map(str, df["detector_id"].dropna().unique()))
    if detector_id is not None:
        df = df[df["detector_id"] == detector_id]
        ids = [detector_id] if len(df) else []
    if not ids:
        raise SaftError(f"{source}: no scored rows{f' of detector {detector_id}' if detector_id else ''}")
    if len(ids) > 1:
        raise SaftError(f"{source}: rows of {len(ids)} detectors ({', '.join(ids[:4])}); pick one with --detector-id")
    df = df.reset_index(drop=True)
    if df["row_id"].duplicated().any():
        raise SaftError(f"{source}: row_id {int(df['row_id'][df['row_id'].duplicated()].iloc[0])} appears twice")
    if df["harm_score"].isna().any():
        raise SaftError(f"{source}: {int(df['harm_score'].isna().sum())} row(s) have no harm_score; an audit needs every row scored")
    return Scored(df, ids[0], source, texts)


# ---- the audit file ----

def sample_frame(scored: Scored, sample: audit.Sample) -> pd.DataFrame:
    """The rows to label: ids, text, the design, and an empty ``label``. An existing ``label`` column of the
    data is left out: the labeller fills ``label``, blind to any earlier one."""
    df = scored.frame.iloc[sample.rows]
    texts = [c for c in scored.text_columns if c != "label"]
    out = df[["row_id", "text_sha256", *texts]].reset_index(drop=True).copy()
    for c in texts:  # lists (messages) and mappings as JSON text, so csv and jsonl hold the same thing
        if out[c].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).any():
            out[c] = out[c].map(_json_cell)
    lows, highs = sample.strata.lows(), sample.strata.highs
    h = sample.stratum
    out["stratum"] = h
    out["stratum_low"] = [_edge(x) for x in lows[h]]
    out["stratum_high"] = [_edge(x) for x in highs[h]]
    out["stratum_rows"] = sample.stratum_rows[h]
    out["stratum_sampled"] = sample.stratum_sampled[h]
    out["inclusion_prob"] = sample.inclusion_probability()
    out["weight"] = 1.0 / out["inclusion_prob"]
    out["detector_id"] = scored.detector_id
    out["label"] = None
    return out


def _json_cell(v: Any) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return json.dumps(v, ensure_ascii=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _edge(x: float) -> str | None:
    # repr round-trips a float exactly; an open end is empty
    return None if not np.isfinite(x) else repr(float(x))


def write_audit(df: pd.DataFrame, path: str | Path) -> Path:
    """csv or jsonl by the file's suffix, written to a temp file and renamed."""
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise SaftError(f"{p}: write the audit sample as .csv or .jsonl")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        os.replace(tmp, p)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return p


@dataclass
class AuditLabels:
    """A labelled audit sample: row ids, text digests and 0/1 labels, with the design it was drawn under."""

    row_id: np.ndarray
    text_sha256: np.ndarray
    labels: np.ndarray
    stratum: np.ndarray
    strata: audit.Strata
    stratum_rows: np.ndarray
    detector_id: str | None
    source: str
    frame: pd.DataFrame


def read_audit(path: str | Path) -> AuditLabels:
    """Read and check a labelled audit file (csv, jsonl or parquet). Every sampled row must carry a 0/1 label."""
    p = Path(path)
    if not p.is_file():
        raise SaftError(f"{p}: no such labels file")
    try:
        if p.suffix.lower() == ".csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        elif p.suffix.lower() in (".jsonl", ".json"):
            df = pd.read_json(p, lines=True, dtype=False)
        elif p.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            raise SaftError(f"{p}: unknown format {p.suffix!r}; use the .csv or .jsonl of saft-gx audit sample")
    except SaftError:
        raise
    except Exception as e:
        raise SaftError(f"{p}: unreadable ({_first_line(e)})") from None
    return parse_audit(df, str(p))


def parse_audit(df: pd.DataFrame, source: str) -> AuditLabels:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SaftError(f"{source}: not an audit sample (no {', '.join(missing)}); draw one with saft-gx audit sample")
    if len(df) == 0:
        raise SaftError(f"{source}: no labelled rows")
    row_id = _ints(df["row_id"], source, "row_id")
    if len(np.unique(row_id)) != len(row_id):
        raise SaftError(f"{source}: row_id {int(row_id[pd.Series(row_id).duplicated().to_numpy()][0])} is listed twice")
    labels = np.array([_label(v, source, int(r)) for v, r in zip(df["label"], row_id)], dtype=np.int8)
    stratum = _ints(df["stratum"], source, "stratum")
    design = pd.DataFrame({"stratum": stratum, "low": [_parse_edge(v, -np.inf, source) for v in df["stratum_low"]],
                           "high": [_parse_edge(v, np.inf, source) for v in df["stratum_high"]],
                           "rows": _ints(df["stratum_rows"], source, "stratum_rows")}).drop_duplicates()
    if design["stratum"].duplicated().any():
        raise SaftError(f"{source}: stratum {int(design['stratum'][design['stratum'].duplicated()].iloc[0])} "
                        "has two score ranges or sizes; the design columns were edited")
    design = design.sort_values("stratum")
    if list(design["stratum"]) != list(range(len(design))) or not np.array_equal(design["low"].to_numpy()[1:], design["high"].to_numpy()[:-1]) \
            or not np.isneginf(design["low"].iloc[0]) or not np.isposinf(design["high"].iloc[-1]):
        raise SaftError(f"{source}: the strata do not cover the score range (a stratum without a sampled row, or edited "
                        "design columns); draw the sample again with saft-gx audit sample")
    try:
        strata = audit.Strata(design["high"].to_numpy(dtype=np.float64), np.zeros(len(design), dtype=bool))
    except SaftError as e:
        raise SaftError(f"{source}: {e}") from None
    det = None
    if "detector_id" in df.columns:
        ids = {str(v) for v in df["detector_id"] if isinstance(v, str) and v}
        if len(ids) > 1:
            raise SaftError(f"{source}: rows from {len(ids)} detectors' samples; one audit file holds one sample")
        det = ids.pop() if ids else None
    return AuditLabels(row_id, df["text_sha256"].astype(str).to_numpy(), labels, stratum, strata,
                       design["rows"].to_numpy(dtype=np.int64), det, source, df)


def _ints(values: pd.Series, source: str, what: str) -> np.ndarray:
    try:
        return np.array([int(float(v)) if not isinstance(v, (int, np.integer)) else int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        raise SaftError(f"{source}: {what} must be integers") from None


def _parse_edge(v: Any, empty: float, source: str) -> float:
    if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return empty
    try:
        return float(v)
    except (TypeError, ValueError):
        raise SaftError(f"{source}: stratum bound {v!r} is not a number") from None


def _label(v: Any, source: str, row_id: int) -> int:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return int(v)
    if isinstance(v, float) and v in (0.0, 1.0):
        return int(v)
    if isinstance(v, str) and v.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(v))
    shown = "empty" if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and np.isnan(v)) else repr(v)
    raise SaftError(f"{source}: row_id {row_id}: label is {shown}, expected 0 (benign) or 1 (harmful); "
                    "label every sampled row (a skipped row would bias the estimate)")


# ---- checks and estimates ----

@dataclass
class Matched:
    """The labels placed on the scored rows: positions of the labelled rows, every row's stratum."""

    positions: np.ndarray
    strata_all: np.ndarray
    scores: np.ndarray
    labels: AuditLabels


def match(labels: AuditLabels, row_ids: np.ndarray, digests: np.ndarray, scores: np.ndarray, *,
          detector_id: str | None = None) -> Matched:
    """Place the labels on the scored rows; any sign that the rows or their scores changed is an error."""
    if labels.detector_id and detector_id and labels.detector_id != detector_id:
        raise SaftError(f"{labels.source}: the sample was drawn from detector {labels.detector_id}'s scores, these are "
                        f"detector {detector_id}'s; draw a new sample for this detector")
    row_ids = np.asarray(row_ids, dtype=np.int64)
    order = np.argsort(row_ids, kind="stable")
    at = np.searchsorted(row_ids[order], labels.row_id)
    at = np.minimum(at, len(order) - 1)
    found = row_ids[order][at] == labels.row_id
    if not found.all():
        bad = labels.row_id[~found]
        raise SaftError(f"{labels.source}: {len(bad)} labelled row_id(s) not among the scored rows, e.g. {int(bad[0])}")
    pos = order[at]
    digests = np.asarray(digests).astype(str)
    changed = np.flatnonzero(digests[pos] != labels.text_sha256)
    if len(changed):
        r = int(labels.row_id[changed[0]])
        raise SaftError(f"{labels.source}: row_id {r}: the row changed since it was sampled (text_sha256 differs); "
                        f"{len(changed)} label(s) are for text that is no longer there. Draw a new sample")
    scores = np.asarray(scores, dtype=np.float64)
    h = labels.strata.assign(scores)
    sizes = np.bincount(h, minlength=labels.strata.count)
    if not np.array_equal(sizes, labels.stratum_rows):
        s = int(np.flatnonzero(sizes != labels.stratum_rows)[0])
        raise SaftError(f"{labels.source}: stratum {s} holds {sizes[s]} scored rows, {labels.stratum_rows[s]} when the sample was "
                        "drawn; the rows or their scores changed (another dataset or detector?). Draw a new sample")
    moved = np.flatnonzero(h[pos] != labels.stratum)
    if len(moved):
        raise SaftError(f"{labels.source}: row_id {int(labels.row_id[moved[0]])} scores outside its stratum; the scores changed "
                        "since the sample was drawn (another detector?)")
    return Matched(pos, h, scores, labels)


def estimate(m: Matched, kept: np.ndarray, *, confidence: float = audit.DEFAULT_CONFIDENCE) -> audit.Estimate:
    kept = np.asarray(kept, dtype=bool)
    c = audit.cells(m.strata_all, kept, m.labels.stratum, kept[m.positions], m.labels.labels, m.labels.strata.count)
    return audit.estimate(c, confidence=confidence)


def target_threshold(m: Matched, max_rate: float, *, confidence: float = audit.DEFAULT_CONFIDENCE) -> tuple[float | None, Any]:
    if not 0.0 <= max_rate <= 1.0:
        raise SaftError(f"--target-residual {max_rate}: must be between 0 and 1")
    return audit.largest_threshold(m.scores, m.labels.strata, m.positions, m.labels.labels, max_rate, confidence=confidence)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["AuditLabels", "Matched", "Scored", "estimate", "match", "parse_audit", "read_audit", "read_scored", "sample_frame",
           "target_threshold", "write_audit"]
