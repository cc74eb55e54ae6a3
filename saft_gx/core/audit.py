"""Audited release gate, the statistics: a stratified sample by harm score, and bounds on the harmful rate
of the rows that ship, valid whatever the detector's quality (NumPy and SciPy only; no I/O).

Design. The rows are cut into strata by score: the kept rows (score ≤ τ) at quantiles ``KEPT_QUANTILES``
of their scores (far below τ ... just below τ), the removed rows at ``REMOVED_QUANTILES``; τ is an edge.
Each stratum h of N_h rows gets n_h draws without replacement: at least ``MIN_PER_STRATUM``, a
``REMOVED_SHARE`` of the budget above τ (where harm is likely; it makes recall and precision estimable),
and the rest below τ in proportion to N_h, the stratum just below τ (the detector's near misses) counted
twice. Proportional allocation below τ keeps the bound on the kept rows close to that of a simple random
sample when no harm is found (the bound then grows with the largest N_h / n_h).

Estimation. At the estimate's τ each stratum splits into a kept and a removed cell c (N_c rows, n_c of
them labelled, x_c harmful); given n_c, the labelled rows of a cell are a simple random sample of it, so
the cells can be combined even when τ is not a stratum edge. The harmful count of a domain, Σ N_c p_c, is
a weighted sum of the cells' counts x_c with weights N_c / n_c; its bounds are Fay and Feuer's gamma
interval for such sums (Stat. Med. 1997; the standard for age-adjusted rates), which treats x_c as Poisson
— conservative for binomial and hypergeometric counts, whose variance is smaller — and stays valid with
x_c = 0 (the upper bound then is the largest weight times the exact Poisson bound, 3.0 at 95 %). A fully
labelled cell is known exactly; a cell with no labelled row counts as [0, all harmful]. Recall's bounds
combine bounds on the removed and the kept harmful counts at 1 − α/2 each (a union bound).
There is no closed proof that the gamma interval keeps its level for every design:
``tests/bench/audit_coverage.py`` measures it by simulation (finite populations, sampling without
replacement, the code below) and the test suite checks a few settings.

``upper`` is a one-sided upper bound at ``confidence``, ``lower`` a one-sided lower bound at
``confidence``; together they are a two-sided interval at 1 − 2 (1 − confidence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SaftError

DEFAULT_CONFIDENCE = 0.95
KEPT_QUANTILES = (0.5, 0.8, 0.95)
REMOVED_QUANTILES = (0.5,)
REMOVED_SHARE = 0.15
MIN_PER_STRATUM = 5
ALLOCATION_POWER = 1.0
NEAR_TAU_BOOST = 2.0
EDGE_TOLERANCE = 1e-9


# ---- strata and sampling ----

@dataclass(frozen=True)
class Strata:
    """Score strata: stratum h holds the rows with ``highs[h-1] < score <= highs[h]`` (highs[-1] = +inf).
    ``removed[h]``: the stratum lies above the sampling τ."""

    highs: np.ndarray
    removed: np.ndarray

    def __post_init__(self) -> None:
        h = np.asarray(self.highs, dtype=np.float64)
        if len(h) == 0 or not np.isposinf(h[-1]) or np.any(np.diff(h) <= 0):
            raise SaftError("strata: the score ranges must increase and the last must be open-ended")

    @property
    def count(self) -> int:
        return len(self.highs)

    def lows(self) -> np.ndarray:
        return np.concatenate([[-np.inf], self.highs[:-1]])

    def assign(self, scores: np.ndarray) -> np.ndarray:
        """The stratum of each score. An edge is a row's score; a recomputation of that score that differs in
        the last bits (another batch size in the matrix product) stays on the edge's side."""
        inner = self.highs[:-1]
        return np.searchsorted(inner + EDGE_TOLERANCE * np.maximum(1.0, np.abs(inner)), _finite(scores), side="left")


def make_strata(scores: np.ndarray, removed: np.ndarray, *, kept_quantiles: tuple[float, ...] = KEPT_QUANTILES,
                removed_quantiles: tuple[float, ...] = REMOVED_QUANTILES) -> Strata:
    """Strata over the score range, with τ (between the kept and the removed rows) as one edge."""
    scores = _finite(scores)
    removed = np.asarray(removed, dtype=bool)
    kept_s, rem_s = scores[~removed], scores[removed]
    if len(kept_s) and len(rem_s) and kept_s.max() >= rem_s.min():
        raise SaftError("the removed rows must all score above the kept ones (harm_flag disagrees with harm_score)")
    highs: list[float] = []
    flags: list[bool] = []
    for part, qs, is_removed in ((kept_s, kept_quantiles, False), (rem_s, removed_quantiles, True)):
        if len(part):
            # each cut is a score of the part, so every stratum holds at least that row
            cuts = sorted({float(np.quantile(part, q, method="higher")) for q in qs} | {float(part.max())})
            highs += cuts
            flags += [is_removed] * len(cuts)
    highs[-1] = np.inf
    return Strata(np.array(highs), np.array(flags))


def allocate(sizes: np.ndarray, removed: np.ndarray, n: int, *, removed_share: float = REMOVED_SHARE,
             min_per_stratum: int = MIN_PER_STRATUM, power: float = ALLOCATION_POWER) -> np.ndarray:
    """Draws per stratum: every stratum min(N_h, min_per_stratum) (fewer when n is short), then
    ``removed_share`` of n above τ and the rest below, each part in proportion to N_h ** power (the stratum
    just below τ counted ``NEAR_TAU_BOOST`` times), capped at N_h."""
    sizes = np.asarray(sizes, dtype=np.int64)
    removed = np.asarray(removed, dtype=bool)
    if n < 1:
        raise SaftError(f"-n {n}: sample at least one row")
    if n >= sizes.sum():
        return sizes.copy()
    if n < len(sizes):
        raise SaftError(f"-n {n}: the scores fall into {len(sizes)} strata; sample at least one row from each")
    out = np.minimum(sizes, max(1, min(min_per_stratum, n // len(sizes))))
    share = {True: removed_share if removed.any() and (~removed).any() else float(removed.all()),
             False: 1.0 - removed_share if removed.any() and (~removed).any() else float((~removed).all())}
    weight = sizes.astype(np.float64) ** power
    top_kept = np.flatnonzero(~removed)
    if len(top_kept) > 1:  # the stratum just below τ holds the detector's near misses
        weight[top_kept[-1]] *= NEAR_TAU_BOOST
    left = n - int(out.sum())
    targets = {g: share[g] * n for g in (True, False)}
    for g in (True, False):
        idx = np.flatnonzero(removed == g)
        extra = max(0.0, min(targets[g] - out[idx].sum(), left))
        ideal = targets[g] * weight[idx] / weight[idx].sum()  # what each stratum would get without the floors
        out[idx] += _spread(sizes[idx] - out[idx], np.maximum(ideal - out[idx], 0.0) + 1e-9 * weight[idx], int(round(extra)))
        left = n - int(out.sum())
    if left > 0:  # a part was full (all its rows drawn): the rest goes wherever rows are left
        out += _spread(sizes - out, weight, left)
    return out


def _spread(room: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """k draws over strata in proportion to weight, none beyond room (largest remainders)."""
    add = np.zeros(len(room), dtype=np.int64)
    k = min(k, int(room.sum()))
    while k > 0:
        open_ = room - add > 0
        w = np.where(open_, weight, 0.0)
        ideal = k * w / w.sum()
        step = np.minimum(np.floor(ideal).astype(np.int64), room - add)
        if step.sum() == 0:
            step[np.argmax(np.where(open_, ideal, -1.0))] = 1
        add += step
        k -= int(step.sum())
    return add


@dataclass(frozen=True)
class Sample:
    """The rows drawn (positions into the scored rows), their strata, and the design."""

    rows: np.ndarray
    stratum: np.ndarray
    strata: Strata
    stratum_rows: np.ndarray
    stratum_sampled: np.ndarray

    def inclusion_probability(self) -> np.ndarray:
        return self.stratum_sampled[self.stratum] / self.stratum_rows[self.stratum]


def draw_sample(scores: np.ndarray, removed: np.ndarray, n: int, *, seed: int = 0, removed_share: float = REMOVED_SHARE,
                min_per_stratum: int = MIN_PER_STRATUM, power: float = ALLOCATION_POWER) -> Sample:
    """A stratified random sample of n rows (all rows when n ≥ their number), reproducible from ``seed``."""
    strata = make_strata(scores, removed)
    h = strata.assign(scores)
    sizes = np.bincount(h, minlength=strata.count)
    alloc = allocate(sizes, strata.removed, n, removed_share=removed_share, min_per_stratum=min_per_stratum, power=power)
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(np.flatnonzero(h == s), size=int(alloc[s]), replace=False)) for s in range(strata.count)]
    picked = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return Sample(picked, h[picked], strata, sizes, alloc)


# ---- estimation ----

@dataclass(frozen=True)
class Cells:
    """Per stratum × (kept, removed): rows, labelled rows, harmful labelled rows; arrays of shape (H, 2)."""

    rows: np.ndarray
    labelled: np.ndarray
    harmful: np.ndarray


def cells(strata_all: np.ndarray, kept_all: np.ndarray, strata_labelled: np.ndarray, kept_labelled: np.ndarray,
          labels: np.ndarray, n_strata: int) -> Cells:
    def table(h: np.ndarray, kept: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        idx = np.asarray(h, dtype=np.int64) * 2 + (~np.asarray(kept, dtype=bool)).astype(np.int64)
        return np.bincount(idx, weights=w, minlength=2 * n_strata).reshape(n_strata, 2).round().astype(np.int64)

    y = np.asarray(labels, dtype=np.float64)
    return Cells(table(strata_all, kept_all), table(strata_labelled, kept_labelled),
                 table(strata_labelled, kept_labelled, y))


@dataclass(frozen=True)
class Bound:
    rate: float | None
    lower: float
    upper: float
    rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rate": _r(self.rate), "lower": _r(self.lower), "upper": _r(self.upper), "rows": self.rows}


@dataclass(frozen=True)
class Estimate:
    kept: Bound
    removed: Bound
    all: Bound
    recall: Bound
    precision: Bound
    confidence: float
    labels: int
    harmful_labels: int

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name).to_dict() for name in ("kept", "removed", "all", "recall", "precision")}
        return {**out, "confidence": self.confidence, "labels": self.labels, "harmful_labels": self.harmful_labels}


def _r(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _gamma_bounds(n: np.ndarray, x: np.ndarray, big: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(estimate, lower, upper) of the harmful row count Σ N_c p_c over some cells, each bound one-sided at
    1 − alpha: Fay and Feuer's gamma interval for a weighted sum of Poisson counts (x_c with weight N_c / n_c),
    which holds for binomial counts too (their variance is smaller). Fully labelled cells are known exactly;
    unlabelled ones count as [0, all harmful]."""
    from scipy.stats import gamma

    n, x, big = (np.asarray(a, dtype=np.float64).ravel() for a in (n, x, big))
    exact = (n == big) & (big > 0)
    unknown = (n == 0) & (big > 0)
    est_part = (n > 0) & ~exact
    w = np.divide(big, n, out=np.zeros_like(big), where=n > 0)
    known = float(x[exact].sum())
    y = float((w * x)[est_part].sum())
    v = float((w * w * x)[est_part].sum())
    w_max = float(w[est_part].max()) if est_part.any() else 0.0
    lower = float(gamma.ppf(alpha, y * y / v, scale=v / y)) if y > 0 else 0.0
    upper = float(gamma.ppf(1.0 - alpha, (y + w_max) ** 2 / (v + w_max**2), scale=(v + w_max**2) / (y + w_max))) if w_max > 0 else 0.0
    return known + y, known + lower, known + upper + float(big[unknown].sum())


def estimate(c: Cells, *, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Point estimates and one-sided bounds (each at ``confidence``) of the harmful rate of the kept, removed
    and all rows, the filter's recall (harmful rows removed / harmful rows) and precision (= removed rate).
    Recall's bounds combine a bound on the removed and one on the kept harmful rows, each at 1 − α/2 (a
    union bound, so the ratio's bound keeps its level)."""
    if not 0.5 < confidence < 1.0:
        raise SaftError(f"--confidence {confidence}: must be between 0.5 and 1")
    alpha = 1.0 - confidence
    n, x, big = c.labelled.astype(np.float64), c.harmful.astype(np.float64), c.rows.astype(np.float64)
    est = _point_rates(c) * big

    def rate(cols: list[int]) -> Bound:
        rows = int(big[:, cols].sum())
        if rows == 0:
            return Bound(None, 0.0, 1.0, 0)
        _, lo, up = _gamma_bounds(n[:, cols], x[:, cols], big[:, cols], alpha)
        point = float(est[:, cols].sum()) / rows
        return Bound(point, max(0.0, min(lo / rows, point)), min(1.0, max(up / rows, point)), rows)

    _, kept_lo, kept_up = _gamma_bounds(n[:, 0], x[:, 0], big[:, 0], alpha / 2)
    _, rem_lo, rem_up = _gamma_bounds(n[:, 1], x[:, 1], big[:, 1], alpha / 2)
    kept_up, rem_up = min(kept_up, big[:, 0].sum()), min(rem_up, big[:, 1].sum())
    t_rem, t_all = float(est[:, 1].sum()), float(est.sum())
    recall_est = t_rem / t_all if t_all > 0 else None
    recall_lo = rem_lo / (rem_lo + kept_up) if rem_lo + kept_up > 0 else 0.0
    recall_up = rem_up / (rem_up + kept_lo) if rem_up + kept_lo > 0 else 1.0
    if recall_est is not None:
        recall_lo, recall_up = min(recall_lo, recall_est), max(recall_up, recall_est)
    removed = rate([1])
    return Estimate(kept=rate([0]), removed=removed, all=rate([0, 1]), recall=Bound(recall_est, recall_lo, recall_up, None),
                    precision=removed, confidence=confidence, labels=int(c.labelled.sum()),
                    harmful_labels=int(c.harmful.sum()))


def _point_rates(c: Cells) -> np.ndarray:
    """x_c / n_c; a cell without labelled rows borrows its stratum's rate (the bounds do not: [0, 1])."""
    n, x = c.labelled.astype(np.float64), c.harmful.astype(np.float64)
    stratum = np.divide(x.sum(axis=1), n.sum(axis=1), out=np.zeros(len(n)), where=n.sum(axis=1) > 0)
    return np.where(n > 0, np.divide(x, n, out=np.zeros_like(x), where=n > 0), stratum[:, None])


def srs_upper(labelled_kept: int, harmful_kept: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Clopper–Pearson upper bound from a simple random sample (the comparison for the stratified bound)."""
    from scipy.stats import beta

    if labelled_kept == 0 or harmful_kept >= labelled_kept:
        return 1.0
    return float(beta.ppf(confidence, harmful_kept + 1, labelled_kept - harmful_kept))


# ---- choosing τ ----

def largest_threshold(scores: np.ndarray, strata: Strata, labelled: np.ndarray, labels: np.ndarray, max_rate: float, *,
                      confidence: float = DEFAULT_CONFIDENCE, grid: int = 200) -> tuple[float | None, Estimate | None]:
    """The largest τ (among the labelled rows' scores, the scores just below them, the strata edges and a
    quantile grid) whose upper bound on the kept rows' harmful rate is ≤ ``max_rate``; (None, None) if none.

    The bound at the chosen τ is computed from the same labels that chose it: it is exact for a τ fixed in
    advance and slightly optimistic for a searched one."""
    scores = _finite(scores)
    order = np.sort(scores)
    ls = scores[labelled]
    below = order[np.maximum(np.searchsorted(order, ls, side="left") - 1, 0)]
    edges = strata.highs[np.isfinite(strata.highs)]
    qs = np.quantile(order, np.linspace(0, 1, grid + 1), method="lower")
    candidates = np.unique(np.concatenate([ls, below, edges, qs, order[-1:]]))[::-1]
    h_all, h_lab = strata.assign(scores), strata.assign(ls)
    sizes = np.bincount(h_all, minlength=strata.count)
    by_stratum = [np.sort(scores[h_all == h]) for h in range(strata.count)]  # kept rows per stratum by bisection
    for tau in candidates:
        kept_rows = np.array([np.searchsorted(v, tau, side="right") for v in by_stratum])
        lab = cells(h_lab, ls <= tau, h_lab, ls <= tau, labels, strata.count)
        c = Cells(np.stack([kept_rows, sizes - kept_rows], axis=1), lab.labelled, lab.harmful)
        est = estimate(c, confidence=confidence)
        if est.kept.rows and est.kept.upper <= max_rate:
            return float(tau), est
    return None, None


def _finite(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        raise SaftError(f"{len(bad)} row(s) have no finite harm score (e.g. position {int(bad[0])}); "
                        "an audit needs a score for every row")
    return s


__all__ = ["Bound", "Cells", "DEFAULT_CONFIDENCE", "Estimate", "Sample", "Strata", "allocate", "cells", "draw_sample",
           "estimate", "largest_threshold", "make_strata", "srs_upper"]
