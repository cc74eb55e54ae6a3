"""Calibration: choose layer, token position, k, scoring variant, orientation and τ from a few labels.

Plain SAFT is unsupervised, and its top directions can be a topic (cooking vs code) rather than harm. A
few labelled rows — the user's, or the built-in anchors (``saft_gx.anchors``) — settle what unsupervised
statistics cannot: which layer separates, whether "far out" means harmful, and which direction *inside*
the unsupervised subspace is the harmful one.

Variants (each is a ``Detector`` option; the subspace itself is always fitted on the unlabelled data):

- ``saft``: the paper's score, mean squared projection on the top-k directions, oriented by the labels;
- ``saft-sigma`` / ``saft-whiten``: the same with σ-weighted or whitened (Mahalanobis) directions;
- ``direct``: a signed direction inside the top-k subspace: w_j = Δ_j / (λ_j + α·λ̄), where Δ is the
  difference of the labelled harmful and benign means in the subspace's coordinates and λ_j the data's
  variance along v_j (LDA with the data's covariance, shrunk towards the mean difference). Scaled so the
  data's scores have mean 0 and standard deviation 1: a score is "data standard deviations towards harm".

Candidates are compared by the AUROC of out-of-fold scores on the labelled rows (stratified folds; the
anchors, when added, only ever train). τ is chosen on the same out-of-fold scores, so it is not fitted to
the rows it is judged on. Everything here is NumPy over arrays; reading label files is at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .errors import SaftError
from .metrics import auroc, precision_recall_f1
from .subspace import Detector, MomentStats
from .threshold import best_f1_threshold, fpr_threshold, recall_threshold, top_fraction_threshold

VARIANTS = ("saft", "saft-sigma", "saft-whiten", "direct")
DEFAULT_VARIANTS = VARIANTS
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SHRINK = 0.1  # α in w_j = Δ_j / (λ_j + α·λ̄); measured in tests/bench/detection.py
DEFAULT_FOLDS = 5
TARGETS = ("f1", "fpr", "recall", "remove_fraction")
ANCHOR_THRESHOLD_RULE = "best F1 on the built-in anchors (out of fold)"

Key = tuple[str, int]  # (token position, layer)


# ---- the variants ----

def top(det: Detector, k: int) -> Detector:
    """The detector restricted to its first ``k`` directions (squared, unweighted, unoriented)."""
    if k > det.k:
        raise SaftError(f"k={k}: the fitted subspace has only {det.k} directions")
    return det.with_(components=det.components[:k], singular_values=det.singular_values[:k], weighting="none",
                     form="squared", coef=None, orientation=1, threshold=None)


def direct_coef(det: Detector, x: np.ndarray, y: np.ndarray, *, groups: np.ndarray | None = None,
                shrink: float = DEFAULT_SHRINK) -> np.ndarray:
    """Signed weights of the ``direct`` variant from labelled vectors ``x`` (m, d) and labels ``y``.

    ``groups`` names the source of each row (the user's labels, the built-in anchors). The class-mean
    difference is taken *within* each source and averaged (weights n₁n₀/(n₁+n₀)), so a difference between
    the sources — anchors are short chat rows, a dataset may be long documents — never leaks into the
    direction just because the sources hold different shares of harmful rows."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise SaftError("labels hold only one class; need both harmful (1) and benign (0) rows")
    p = (np.asarray(x, dtype=np.float64) - det.mean) @ det.components.T
    g = np.zeros(len(y), dtype=np.int64) if groups is None else np.asarray(groups)
    delta, total = np.zeros(p.shape[1]), 0.0
    for grp in np.unique(g):
        m = g == grp
        n1, n0 = int((y & m).sum()), int((~y & m).sum())
        if n1 and n0:
            wgt = n1 * n0 / (n1 + n0)
            delta += wgt * (p[y & m].mean(axis=0) - p[~y & m].mean(axis=0))
            total += wgt
    if total == 0:  # no source holds both classes: fall back to the pooled means
        delta, total = p[y].mean(axis=0) - p[~y].mean(axis=0), 1.0
    delta /= total
    n = max(int(det.meta.get("n", 1)), 1)
    lam = det.singular_values**2 / n  # the data's variance along each direction
    w = delta / (lam + shrink * max(float(lam.mean()), 1e-300))
    scale = float(np.sqrt(np.sum(w**2 * lam)))
    return w / scale if scale > 0 else w


def fit_variant(base: Detector, variant: str, k: int, x: np.ndarray | None = None, y: np.ndarray | None = None, *,
                groups: np.ndarray | None = None, shrink: float = DEFAULT_SHRINK) -> Detector:
    """The ``variant`` detector on the first ``k`` directions of ``base`` (fitted unsupervised on the data),
    oriented / directed by the labelled vectors ``x`` with labels ``y`` (1 = harmful) when given."""
    det = top(base, k)
    if variant == "direct":
        if x is None or y is None:
            raise SaftError("the direct variant needs labelled rows or the built-in anchors")
        return det.with_(form="linear", coef=direct_coef(det, x, y, groups=groups, shrink=shrink))
    weighting = {"saft": "none", "saft-sigma": "sigma", "saft-whiten": "whiten"}.get(variant)
    if weighting is None:
        raise SaftError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    det = det.with_(weighting=weighting)
    if x is not None and y is not None:
        det = orient(det, x, y)
    return det


def orient(det: Detector, x: np.ndarray, y: np.ndarray) -> Detector:
    """Flip the detector when the labelled harmful rows score *lower* than the benign ones."""
    a = auroc(det.with_(orientation=1).score(x), y)
    return det.with_(orientation=1 if a >= 0.5 else -1)


def _stack(x: np.ndarray, y: np.ndarray, xe: np.ndarray | None,
           ye: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The user's labelled rows (group 0) and the extra ones, the anchors (group 1)."""
    if xe is None or ye is None or len(ye) == 0:
        return x, y, np.zeros(len(y), dtype=np.int64)
    return np.vstack([x, xe]), np.r_[y, ye], np.r_[np.zeros(len(y), dtype=np.int64), np.ones(len(ye), dtype=np.int64)]


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every row, each class spread evenly over the folds."""
    y = np.asarray(y).astype(bool)
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    offset = 0
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(y == cls))
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return out


def oof_scores(base: Detector, variant: str, k: int, x: np.ndarray, y: np.ndarray, *, fold_of: np.ndarray,
               x_extra: np.ndarray | None = None, y_extra: np.ndarray | None = None,
               shrink: float = DEFAULT_SHRINK) -> np.ndarray:
    """Out-of-fold scores of the labelled rows: each fold scored by a detector directed/oriented without it.
    Scores of different folds share one scale (squared variants only change orientation; ``direct`` scores
    are in data standard deviations)."""
    s = np.empty(len(y), dtype=np.float64)
    for f in np.unique(fold_of):
        test = fold_of == f
        xt, yt, gt = _stack(x[~test], y[~test], x_extra, y_extra)
        if yt.all() or not yt.any():
            raise SaftError("a calibration fold holds only one class; label more rows of the rarer class")
        s[test] = fit_variant(base, variant, k, xt, yt, groups=gt, shrink=shrink).score(x[test])
    return s


def dprime(scores: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y).astype(bool)
    a, b = scores[y], scores[~y]
    sd = np.sqrt((a.var() + b.var()) / 2)
    return float((a.mean() - b.mean()) / sd) if sd > 0 else float("inf") * np.sign(a.mean() - b.mean())


# ---- thresholds ----

@dataclass(frozen=True)
class ThresholdTarget:
    """How τ is chosen: ``f1`` (best F1 on the labelled rows), ``fpr`` (at most this false-positive rate on
    the labelled benign rows), ``recall`` (at least this recall on the labelled harmful rows) or
    ``remove_fraction`` (flag this fraction of the dataset)."""

    kind: str = "f1"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGETS:
            raise SaftError(f"threshold target {self.kind!r}: choose one of {', '.join(TARGETS)}")
        if self.kind != "f1" and (self.value is None or not 0.0 <= self.value <= 1.0):
            raise SaftError(f"--target-{self.kind.replace('_', '-')} must be between 0 and 1")

    def describe(self) -> str:
        if self.kind == "f1":
            return "best F1 on the labelled rows"
        v = float(self.value)  # type: ignore[arg-type]
        return {"fpr": f"false-positive rate ≤ {v:.1%} on the labelled rows",
                "recall": f"recall ≥ {v:.1%} on the labelled rows",
                "remove_fraction": f"remove the top {v:.1%} of the dataset"}[self.kind]


def target_from_options(target_fpr: float | None = None, target_recall: float | None = None,
                        remove_fraction: float | None = None) -> ThresholdTarget:
    given = [(k, v) for k, v in (("fpr", target_fpr), ("recall", target_recall), ("remove_fraction", remove_fraction))
             if v is not None]
    if len(given) > 1:
        raise SaftError("give only one of --target-fpr, --target-recall, --remove-fraction (default: best F1)")
    return ThresholdTarget(*given[0]) if given else ThresholdTarget("f1")


def choose_threshold(target: ThresholdTarget, scores: np.ndarray, labels: np.ndarray,
                     data_scores: np.ndarray | None = None) -> float:
    if target.kind == "f1":
        return best_f1_threshold(scores, labels)[0]
    if target.kind == "fpr":
        return fpr_threshold(scores, labels, float(target.value))
    if target.kind == "recall":
        return recall_threshold(scores, labels, float(target.value))
    if data_scores is None:
        raise SaftError("--remove-fraction needs the dataset's scores")
    return top_fraction_threshold(data_scores, float(target.value))


def rates(scores: np.ndarray, labels: np.ndarray, tau: float) -> dict[str, float]:
    y = np.asarray(labels).astype(bool)
    flags = np.asarray(scores) > tau
    p, r, f1 = precision_recall_f1(flags, y)
    fpr = float(flags[~y].mean()) if (~y).any() else float("nan")
    return {"precision": p, "recall": r, "f1": f1, "fpr": fpr}


# ---- the search ----

@dataclass(frozen=True)
class Trial:
    token: str
    layer: int
    variant: str
    k: int
    auroc: float
    dprime: float

    def rank(self) -> tuple:
        # AUROC first (rounded: differences in the 4th digit are one row in a hundred labels), then the
        # separation margin, then the simpler detector
        return (round(self.auroc, 3), round(self.dprime, 2), -self.k)


@dataclass
class Calibration:
    detector: Detector
    chosen: Trial
    trials: list[Trial]
    oof: np.ndarray  # out-of-fold scores of the labelled rows under the chosen candidate
    labels: np.ndarray
    threshold: float
    target: ThresholdTarget
    expected: dict[str, float] = field(default_factory=dict)  # precision/recall/F1/FPR of the oof scores at τ

    def by_layer(self) -> dict[str, dict[int, float]]:
        """Best out-of-fold AUROC per token position and layer (over variants and k)."""
        out: dict[str, dict[int, float]] = {}
        for t in self.trials:
            d = out.setdefault(t.token, {})
            d[t.layer] = max(d.get(t.layer, 0.0), t.auroc)
        return out

    def summary(self) -> dict[str, Any]:
        c = self.chosen
        y = np.asarray(self.labels).astype(bool)
        return {
            "labelled_rows": int(len(y)), "labelled_harmful": int(y.sum()),
            "token": c.token, "layer": c.layer, "variant": c.variant, "k": c.k,
            "cv_auroc": round(c.auroc, 4), "threshold_rule": self.target.describe(),
            "expected_at_threshold": {k: round(v, 4) for k, v in self.expected.items()},
            "auroc_by_layer": {tok: {str(layer): round(a, 4) for layer, a in sorted(d.items())}
                               for tok, d in self.by_layer().items()},
        }


def calibrate(stats: Mapping[Key, MomentStats], labelled: Mapping[Key, np.ndarray], labels: np.ndarray, *,
              anchors: Mapping[Key, np.ndarray] | None = None, anchor_labels: np.ndarray | None = None,
              ks: tuple[int, ...] = DEFAULT_KS, variants: tuple[str, ...] = DEFAULT_VARIANTS,
              target: ThresholdTarget = ThresholdTarget(), folds: int = DEFAULT_FOLDS, seed: int = 0,
              shrink: float = DEFAULT_SHRINK, meta: Mapping[str, Any] | None = None,
              data_scores: Callable[[Detector, Key], np.ndarray] | None = None) -> Calibration:
    """Search every (token, layer) in ``stats`` × ``variants`` × ``ks`` and return the best detector.

    stats: unlabelled statistics of the whole dataset per (token, layer); the subspaces are fitted on them.
    labelled: (m, d) vectors of the labelled rows per (token, layer), in the order of ``labels``.
    anchors / anchor_labels: extra labelled vectors (the built-in anchors) used only for training the
        orientation / direction, never for judging a candidate or choosing τ.
    data_scores: scores of the whole dataset under a detector, needed only for ``remove_fraction``.
    """
    y = np.asarray(labels).astype(np.int8)
    yb = y.astype(bool)
    if y.ndim != 1 or len(y) == 0:
        raise SaftError("no labelled rows")
    if yb.all() or not yb.any():
        raise SaftError("labels hold only one class; need both harmful (1) and benign (0) rows")
    minority = int(min(yb.sum(), (~yb).sum()))
    if minority < 2:
        raise SaftError(f"only {minority} labelled row of one class; label at least 2 harmful and 2 benign rows")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SaftError(f"variant {bad[0]!r}: choose from {', '.join(VARIANTS)}")
    if not stats:
        raise SaftError("no candidate layers")
    fold_of = stratified_folds(yb, min(folds, minority), seed)
    ya = None if anchor_labels is None else np.asarray(anchor_labels).astype(np.int8)

    trials: list[Trial] = []
    bases: dict[Key, Detector] = {}
    best: tuple[tuple, Trial, np.ndarray] | None = None
    for key in sorted(stats, key=lambda kk: (kk[0], kk[1])):
        st = stats[key]
        kmax = min(max(ks), st.dim, st.n - 1)
        base = Detector.fit(st, k=kmax)
        bases[key] = base
        x = np.asarray(labelled[key], dtype=np.float64)
        if x.shape[0] != len(y):
            raise SaftError(f"{len(y)} labels but {x.shape[0]} labelled vectors at {key}")
        xa = None if anchors is None else np.asarray(anchors[key], dtype=np.float64)
        for variant in variants:
            for k in sorted({min(k, kmax) for k in ks}):
                s = oof_scores(base, variant, k, x, y, fold_of=fold_of, x_extra=xa, y_extra=ya, shrink=shrink)
                t = Trial(key[0], key[1], variant, k, auroc(s, y), dprime(s, y))
                trials.append(t)
                if best is None or t.rank() > best[0]:
                    best = (t.rank(), t, s)
    assert best is not None
    _, chosen, oof = best
    key = (chosen.token, chosen.layer)
    xa = None if anchors is None else np.asarray(anchors[key], dtype=np.float64)
    xt, yt, gt = _stack(np.asarray(labelled[key], dtype=np.float64), y, xa, ya)
    det = fit_variant(bases[key], chosen.variant, chosen.k, xt, yt, groups=gt, shrink=shrink)
    if chosen.variant != "direct" and det.orientation != fit_variant(bases[key], chosen.variant, chosen.k, labelled[key], y).orientation:
        # the anchors and the user's labels disagree on the orientation: the user's rows win
        det = det.with_(orientation=-det.orientation)
    tau = choose_threshold(target, oof, y, data_scores(det, key) if target.kind == "remove_fraction" and data_scores else None)
    cal = Calibration(detector=det, chosen=chosen, trials=trials, oof=oof, labels=y, threshold=tau, target=target,
                      expected=rates(oof, y, tau))
    m = dict(meta or {})
    m.update({"layer": chosen.layer, "token": chosen.token, "variant": chosen.variant,
              "threshold_rule": f"{target.describe()} (saft-gx calibrate)",
              "calibration": {**cal.summary(), "anchors_added": anchors is not None, "folds": int(fold_of.max() + 1),
                              "shrink": shrink}})
    cal.detector = det.with_(threshold=tau, meta={**det.meta, **m})
    return cal


def anchor_detector(base: Detector, x_anchor: np.ndarray, y_anchor: np.ndarray, *, variant: str = "direct", k: int,
                    shrink: float = DEFAULT_SHRINK, folds: int = DEFAULT_FOLDS) -> Detector:
    """The default detector without user labels: the unsupervised subspace of the data, oriented and
    directed by the built-in anchors, with τ = best F1 on the anchors' *out-of-fold* scores (in-sample
    scores of a direction fitted on the same 48 rows overstate the gap between the classes).
    Records what the anchors chose in ``meta["anchors"]``."""
    k = min(k, base.k)
    y = np.asarray(y_anchor).astype(np.int8)
    det = fit_variant(base, variant, k, x_anchor, y, shrink=shrink)
    fold_of = stratified_folds(y.astype(bool), min(folds, int(min(y.sum(), (1 - y).sum()))))
    oof = oof_scores(base, variant, k, np.asarray(x_anchor, dtype=np.float64), y, fold_of=fold_of, shrink=shrink)
    tau, _ = best_f1_threshold(oof, y)
    return det.with_(threshold=tau, meta={
        **det.meta, "variant": variant, "threshold_rule": ANCHOR_THRESHOLD_RULE,
        "anchors": {"rows": int(len(y)), "harmful": int(y.sum()), "variant": variant, "k": int(k),
                    "anchor_auroc_out_of_fold": round(float(auroc(oof, y)), 4)}})


# ---- labels from files ----

LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "harmful": 1, "benign": 0, "unsafe": 1, "safe": 0,
               "yes": 1, "no": 0}


def parse_labels(values: Any, what: str = "label") -> np.ndarray:
    """0/1 labels from ints, bools or words (harmful/benign, unsafe/safe, true/false, yes/no)."""
    out = np.empty(len(values), dtype=np.int8)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            raise SaftError(f"{what} {i}: empty label; drop the row or label it 0 (benign) or 1 (harmful)")
        key = str(int(v)) if isinstance(v, (bool, np.bool_, int, np.integer)) or (isinstance(v, float) and v.is_integer()) \
            else str(v).strip().lower()
        if key not in LABEL_WORDS:
            raise SaftError(f"{what} {i}: label {v!r} is not 0/1, true/false or harmful/benign")
        out[i] = LABEL_WORDS[key]
    return out


@dataclass
class Labels:
    """Labelled rows of a dataset: 0-based row positions and 0/1 labels (1 = harmful)."""

    rows: np.ndarray
    labels: np.ndarray
    source: str

    def check_two_classes(self) -> None:
        if self.labels.all() or not self.labels.any():
            cls = "harmful (1)" if self.labels.all() else "benign (0)"
            raise SaftError(f"{self.source}: every labelled row is {cls}; label both harmful and benign rows")


def read_table(path: str) -> Any:
    import pandas as pd

    from .readers import open_dataset

    ds = open_dataset(path)
    return pd.concat([df for _, df in ds.frames()], ignore_index=True)


def labels_from_file(labels_path: str, dataset: Any, *, id_column: str | None = None,
                     label_column: str = "label") -> Labels:
    """Match a labels file (``id,label``, or ``row_id,label``) to the rows of ``dataset`` (a readers.Dataset).

    The id column is ``--id-column``, else ``id`` when both files have it, else ``row_id`` (0-based row
    positions of the dataset). Unknown or repeated ids, empty labels and a single class are errors."""
    lab = read_table(labels_path)
    if label_column not in lab.columns:
        raise SaftError(f"{labels_path}: no {label_column!r} column (it has: {', '.join(map(str, lab.columns))})")
    if id_column is None:
        if "id" in lab.columns and "id" in dataset.columns:
            id_column = "id"
        elif "row_id" in lab.columns:
            id_column = "row_id"
        elif "id" in lab.columns:
            id_column = "row_id"
            lab = lab.rename(columns={"id": "row_id"})
        else:
            raise SaftError(f"{labels_path}: need an id column (id, row_id or --id-column) beside {label_column!r}")
    if id_column not in lab.columns:
        raise SaftError(f"{labels_path}: no {id_column!r} column (it has: {', '.join(map(str, lab.columns))})")
    y = parse_labels(lab[label_column].tolist(), f"{labels_path}: row")
    ids = lab[id_column].tolist()
    dup = lab[id_column][lab[id_column].duplicated()].tolist()
    if dup:
        raise SaftError(f"{labels_path}: id {dup[0]!r} is labelled more than once")
    if id_column == "row_id" and id_column not in dataset.columns:
        try:
            pos = np.array([int(i) for i in ids], dtype=np.int64)
        except (TypeError, ValueError):
            raise SaftError(f"{labels_path}: row_id values must be integers (0-based row positions)") from None
        n = dataset.num_rows if dataset.num_rows is not None else sum(len(df) for _, df in dataset.frames([dataset.columns[0]]))
        unknown = [int(p) for p in pos if not 0 <= p < n]
        if unknown:
            raise SaftError(f"{labels_path}: {len(unknown)} unknown row_id(s), e.g. {unknown[:3]}; "
                            f"{dataset.path.name} has rows 0..{n - 1}")
    else:
        if id_column not in dataset.columns:
            raise SaftError(f"{dataset.path.name} has no {id_column!r} column to match the labels' ids against")
        want = {_norm_id(i): j for j, i in enumerate(ids)}
        pos = np.full(len(ids), -1, dtype=np.int64)
        for first, df in dataset.frames([id_column]):
            for r, v in enumerate(df[id_column].tolist()):
                j = want.get(_norm_id(v))
                if j is not None:
                    if pos[j] >= 0:
                        raise SaftError(f"{dataset.path.name}: id {v!r} appears on more than one row")
                    pos[j] = first + r
        unknown = [ids[j] for j in np.flatnonzero(pos < 0)]
        if unknown:
            raise SaftError(f"{labels_path}: {len(unknown)} id(s) not found in {dataset.path.name}'s {id_column!r} "
                            f"column, e.g. {', '.join(map(repr, unknown[:3]))}")
    out = Labels(rows=pos, labels=y, source=str(labels_path))
    out.check_two_classes()
    return out


def labels_from_column(dataset: Any, label_column: str) -> Labels:
    """Labelled rows of a dataset with its own label column (empty cells = unlabelled)."""
    if label_column not in dataset.columns:
        raise SaftError(f"{dataset.path.name}: no {label_column!r} column")
    rows, vals = [], []
    for first, df in dataset.frames([label_column]):
        for r, v in enumerate(df[label_column].tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
                continue
            rows.append(first + r)
            vals.append(v)
    if not rows:
        raise SaftError(f"{dataset.path.name}: the {label_column!r} column is empty")
    out = Labels(rows=np.array(rows, dtype=np.int64), labels=parse_labels(vals, f"{dataset.path.name}: labelled row"),
                 source=f"{dataset.path.name}:{label_column}")
    out.check_two_classes()
    return out


def _norm_id(v: Any) -> Any:
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return str(v)


# ---- a dataset on disk: embed every candidate layer in one pass, through the cache ----

def embed_into_cache(embedder: Any, cache: Any, rows: list, flush_rows: int = 512) -> list[str]:
    """Make sure ``rows`` (e.g. the anchors) are in ``cache`` at every layer of ``embedder``; returns their keys."""
    keys = [r.content_key() for r in rows]
    missing = np.flatnonzero(cache.missing(keys, embedder.config.layers))
    if len(missing):
        tokenized = embedder.tokenize([rows[i] for i in missing], [int(i) for i in missing])
        for start in range(0, len(missing), flush_rows):
            part = list(range(start, min(start + flush_rows, len(missing))))
            vecs = embedder.embed_tokenized([tokenized[j] for j in part])
            for li, layer in enumerate(embedder.config.layers):
                cache.layer(layer).put([keys[missing[j]] for j in part], vecs[:, li, :])
    return keys


def row_keys_at(ds: Any, spec: Any, positions: np.ndarray) -> list[str]:
    """Content keys of the dataset's rows at 0-based ``positions`` (in that order), streaming the file."""
    from .rows import rows_from_frame

    want = {int(p): i for i, p in enumerate(positions)}
    keys: list[str | None] = [None] * len(positions)
    for first, df in ds.frames(spec.columns):
        hit = [p for p in range(first, first + len(df)) if p in want]
        if hit:
            rows = rows_from_frame(df.iloc[[p - first for p in hit]], spec, hit[0])
            for p, r in zip(hit, rows):
                keys[want[p]] = r.content_key()
    if any(k is None for k in keys):
        raise SaftError("some labelled rows are past the end of the dataset")
    return keys  # type: ignore[return-value]


def calibrate_dataset(session: Any, ds: Any, spec: Any, labels: Labels, *, layers: list[int], tokens: list[str],
                      ks: tuple[int, ...] = DEFAULT_KS, variants: tuple[str, ...] = DEFAULT_VARIANTS,
                      anchors: bool = True, target: ThresholdTarget = ThresholdTarget(), folds: int = DEFAULT_FOLDS,
                      progress: Callable[[int | None, str], Any] | None = None) -> tuple[Calibration, Any]:
    """Embed ``ds`` once per token position, capturing every layer up to the deepest candidate in one forward
    pass (cached per layer), then ``calibrate`` over ``layers`` × ``tokens``. Returns (calibration, embed summary)."""
    from . import pipeline
    from .anchors import anchor_rows
    from .cache import EmbeddingCache
    from .embed import EmbedConfig, Embedder

    lm, base_cfg = session.lm, session.config
    captured = tuple(range(1, max(layers) + 1))
    stats: dict[Key, MomentStats] = {}
    labelled: dict[Key, np.ndarray] = {}
    anchor_x: dict[Key, np.ndarray] = {}
    caches: dict[str, Any] = {}
    total = pipeline.EmbedSummary()
    lab_rows = labels.rows
    ya = None
    for token in tokens:
        cfg = EmbedConfig(layers=captured, token=token, max_tokens=base_cfg.max_tokens, overlong=base_cfg.overlong,
                          batch_tokens=base_cfg.batch_tokens, max_batch_rows=base_cfg.max_batch_rows)
        embedder = Embedder(lm, cfg)
        cache = EmbeddingCache(session.cache.root, model_fingerprint=lm.fingerprint, token=token,
                               max_tokens=cfg.max_tokens, overlong=cfg.overlong, dim=lm.hidden_size)
        caches[token] = cache
        st = {layer: MomentStats(lm.hidden_size) for layer in captured}
        bar = progress(ds.num_rows, f"embedding ({token})") if progress else None
        try:
            summary = pipeline.embed_dataset(ds, spec, embedder, cache, stats=st, progress=bar or (lambda n: None))
        finally:
            if bar is not None:
                bar.close()
        total.rows, total.computed = total.rows + summary.rows, total.computed + summary.computed
        if int(lab_rows.max()) >= summary.rows:
            raise SaftError(f"labelled row {int(lab_rows.max())} is past the end of the dataset ({summary.rows} rows)")
        keys = row_keys_at(ds, spec, lab_rows)
        if anchors:
            rows_a, ya = anchor_rows()
            akeys = embed_into_cache(embedder, cache, rows_a)
        for layer in layers:
            stats[(token, layer)] = st[layer]
            labelled[(token, layer)] = cache.layer(layer).get(keys)
            if anchors:
                anchor_x[(token, layer)] = cache.layer(layer).get(akeys)
    meta = session.detector_meta(ds, spec)
    meta["labels"] = labels.source

    def data_scores(det: Detector, key: Key) -> np.ndarray:
        return pipeline.score_cached(ds, spec, caches[key[0]], det, key[1])

    cal = calibrate(stats, labelled, labels.labels, anchors=anchor_x if anchors else None, anchor_labels=ya, ks=ks,
                    variants=variants, target=target, folds=folds, meta=meta, data_scores=data_scores)
    return cal, total
