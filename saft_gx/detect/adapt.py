"""Adapting the anchors' probe to the dataset being scored: self-training, then recalibration on the anchors.

The built-in anchors are written by the team; real requests differ from them in style and topic, so a probe
fitted on the anchors alone ranks a real dataset's rows less well than it ranks held-out anchors. The data
itself carries the missing information: its harmful rows resemble one another. Self-training uses it without
labels: the probe's most suspicious rows (top ``top``, 5 %) are taken as harmful and its least suspicious
(bottom ``bottom``, 80 %) as benign, and the probe is refitted on the anchors plus those rows, each of the four
(anchors / data) × (harmful / benign) cells weighing the same; twice. The middle of the ranking is left out,
so the rows the probe is unsure about do not teach it. The refitted probe's probabilities are then
recalibrated on the anchors alone (a one-dimensional logistic fit, Platt scaling): its ranking comes from the
data, its scale still from labelled rows, so τ keeps its meaning and a clean dataset, whose top 5 % are benign,
is not pushed above τ by its own pseudo-labels. Measured in tests/bench/detection.py (README "Detection
quality"). Pure: NumPy only; the caller provides the data's coordinates in the probe's subspace.

``adapt_whole_state`` adapts the blended detector (``blend.py``) the same way in the whole hidden state, but with
benign rows only: the blend's least suspicious 80 % of the rows join the anchors as benign, and a probe on every
dimension is refitted (its three cells — anchors harmful, anchors benign, data benign — weigh the same). It
learns what this dataset's ordinary rows look like, which the anchors cannot know; no row is taken as harmful,
so a clean dataset's top rows are not taught to be harmful (taking the top 5 % as harmful too ranked better
but flagged 4–5 % of clean rows). The caller provides the vectors of the rows it asks for (at most
``defaults.ADAPT_WHOLE_ROWS``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..core import defaults
from ..core.errors import SaftError
from ..core.neighbours import Neighbours
from ..core.probe import fit_logistic
from ..core.subspace import Detector, MomentStats
from .calibrate import PROBE_C, balanced_weights, one_direction, per_data_sd

PLATT_C = 1e4  # Platt scaling fits two numbers on thousands of anchors: essentially unpenalised
MAX_CELL_ROWS = 20_000  # pseudo-labelled rows per class kept for the fit (evenly over their ranks): a k-dim
# logistic fit needs no more, and a million-row dataset then costs ~2 × 20,000 rows of memory, not 850,000


def platt_on_anchors(anchor_scores: np.ndarray, anchor_labels: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of Platt scaling: the anchors' labels regressed on their scores (one feature, classes
    weighed the same). A detector's probability keeps its scale from labelled rows this way."""
    ya = np.asarray(anchor_labels).astype(np.int8)
    fit = fit_logistic(np.asarray(anchor_scores, dtype=np.float64)[:, None], ya, c=PLATT_C,
                       sample_weight=balanced_weights(ya))
    return float(fit.coef[0]), fit.intercept


def adapt_probe(det: Detector, data_coords: np.ndarray, anchor_coords: np.ndarray, anchor_labels: np.ndarray, *,
                top: float = defaults.ADAPT_TOP, bottom: float = defaults.ADAPT_BOTTOM,
                rounds: int = defaults.ADAPT_ROUNDS, c: float = PROBE_C) -> Detector:
    """The logistic probe ``det`` (form ``linear``, link ``logistic``) refitted by self-training on the data.

    data_coords: (n, k) coordinates of the dataset's rows in ``det``'s subspace (``det.project``).
    anchor_coords / anchor_labels: the same for the labelled anchors the probe was fitted on.
    Returns a detector of the same subspace with new weights; ``meta["adapted"]`` records the settings."""
    if det.form != "linear" or det.link != "logistic":
        raise SaftError("only a logistic probe (the default detector) can be adapted to the data")
    d = np.asarray(data_coords)  # float32 from the pipeline; rows are converted only where they are used
    a = np.asarray(anchor_coords, dtype=np.float64)
    ya = np.asarray(anchor_labels).astype(np.int8)
    if d.ndim != 2 or a.ndim != 2 or d.shape[1] != det.k or a.shape[1] != det.k or len(a) != len(ya):
        raise SaftError(f"expected (n, {det.k}) coordinates for the data and the anchors, got {d.shape} and {a.shape}")
    if not (0 < top < bottom <= 1 - top) or rounds < 1:
        raise SaftError(f"adapt: need 0 < top < bottom ≤ 1 − top and rounds ≥ 1 (got {top}, {bottom}, {rounds})")
    n = len(d)
    n_top, n_bottom = max(1, int(round(top * n))), int(round(bottom * n))
    if n_top + n_bottom > n or n_bottom < 1:
        raise SaftError(f"adapt: {n} rows are too few to split into {top:.0%} harmful and {bottom:.0%} benign")
    w = np.asarray(det.coef, dtype=np.float64) * det.orientation
    b = float(det.intercept)
    for _ in range(rounds):
        order = np.argsort(d @ w + b, kind="stable")
        hi, lo = spread_rows(order[n - n_top:]), spread_rows(order[:n_bottom])
        x = np.vstack([a, d[hi], d[lo]]).astype(np.float64)
        y = np.r_[ya, np.ones(len(hi), dtype=np.int8), np.zeros(len(lo), dtype=np.int8)]
        groups = np.r_[np.zeros(len(ya), dtype=np.int64), np.ones(len(hi) + len(lo), dtype=np.int64)]
        fit = fit_logistic(x, y, c=c, sample_weight=balanced_weights(y, groups))
        w, b = fit.coef, fit.intercept
    slope, intercept = platt_on_anchors(a @ w + b, ya)
    if slope <= 0:
        raise SaftError("adapt: the self-trained probe ranks the anchors backwards; score with --no-adapt")
    return det.with_(coef=slope * w, intercept=slope * b + intercept, orientation=1, meta={
        **det.meta, "adapted": {"top": top, "bottom": bottom, "rounds": rounds, "rows": n, "platt_slope": round(slope, 4)}})


def spread_rows(idx: np.ndarray, most: int | None = None) -> np.ndarray:
    """At most ``most`` (default ``MAX_CELL_ROWS``) of ``idx`` (rows in rank order), evenly spaced over the
    ranks: deterministic."""
    most = MAX_CELL_ROWS if most is None else most
    if len(idx) <= most:
        return idx
    return idx[np.linspace(0, len(idx) - 1, most).round().astype(np.int64)]


def adapt_whole_state(det: Detector, stats: MomentStats, data_scores: np.ndarray,
                      data_rows: Callable[[np.ndarray], np.ndarray], anchor_x: np.ndarray, anchor_y: np.ndarray, *,
                      bottom: float = defaults.ADAPT_WHOLE_BOTTOM, c: float = defaults.ADAPT_WHOLE_C,
                      weight: float = defaults.ADAPT_WHOLE_WEIGHT, most: int = defaults.ADAPT_WHOLE_ROWS) -> Detector:
    """The one-direction logistic detector ``det`` (the blend) adapted to the data's benign rows.

    data_scores: (n,) any increasing function of ``det``'s score on every row (its coordinate, ``det.project``).
    data_rows(idx): the (m, d) vectors of rows ``idx`` (at most ``most`` of them).
    anchor_x / anchor_y: the anchors' vectors and labels. Returns a one-direction logistic detector: the blend's
    direction + ``weight`` × the refitted probe's (each in the data's standard deviations), Platt-scaled on the
    anchors; ``meta["adapted_whole"]`` records the settings."""
    if det.form != "linear" or det.link != "logistic" or det.k != 1:
        raise SaftError("only the blended one-direction probe can be adapted in the whole state")
    lo = benign_rows(data_scores, bottom, most)
    xd, xa, ya = _rows_and_anchors(det, lo, data_rows, anchor_x, anchor_y)
    y = np.r_[ya, np.zeros(len(lo), dtype=np.int8)]
    groups = np.r_[np.zeros(len(ya), dtype=np.int64), np.ones(len(lo), dtype=np.int64)]
    refit = fit_logistic(np.vstack([xa, xd]), y, c=c, sample_weight=balanced_weights(y, groups)).coef
    cov = stats.covariance()
    w = per_data_sd(det.direction(), cov) + weight * per_data_sd(refit, cov)
    slope, intercept = platt_on_anchors((xa - det.mean) @ w, ya)
    if slope <= 0:
        raise SaftError("adapt: the refitted probe ranks the anchors backwards; score with --no-adapt")
    return one_direction(det, w, scale=slope, intercept=intercept, link="logistic", meta={
        **det.meta, "adapted_whole": {"bottom": bottom, "c": c, "weight": weight, "rows": len(lo),
                                      "platt_slope": round(slope, 4)}})


def _rows_and_anchors(det: Detector, idx: np.ndarray, data_rows: Callable[[np.ndarray], np.ndarray],
                      anchor_x: np.ndarray, anchor_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The data rows ``idx`` and the anchors as float64 (n, ``det.dim``) arrays, and the anchors' labels."""
    xd = np.asarray(data_rows(idx), dtype=np.float64)
    xa = np.asarray(anchor_x, dtype=np.float64)
    ya = np.asarray(anchor_y).astype(np.int8)
    if xd.shape != (len(idx), det.dim) or xa.shape != (len(ya), det.dim):
        raise SaftError(f"expected ({len(idx)}, {det.dim}) data rows and ({len(ya)}, {det.dim}) anchors, "
                        f"got {xd.shape} and {xa.shape}")
    return xd, xa, ya


def benign_rows(data_scores: np.ndarray, bottom: float = defaults.ADAPT_WHOLE_BOTTOM,
                most: int = defaults.ADAPT_WHOLE_ROWS) -> np.ndarray:
    """The rows ``adapt_whole_state`` reads (sorted positions): at most ``most`` of the ``bottom`` share of rows
    with the lowest ``data_scores``, evenly over their ranks."""
    s = np.asarray(data_scores).reshape(-1)
    n_bottom = int(round(bottom * len(s)))
    if not 0 < bottom < 1 or n_bottom < 1:
        raise SaftError(f"adapt: {len(s)} rows are too few to take the bottom {bottom:.0%} as benign")
    return np.sort(spread_rows(np.argsort(s, kind="stable")[:n_bottom], most))


def reference_rows(data_scores: np.ndarray, most: int = defaults.NEIGHBOURS_ROWS) -> np.ndarray:
    """The rows ``lend_neighbours`` keeps as the reference (sorted positions): at most ``most``, evenly over the
    ranks of ``data_scores``, so the sample holds harmful and benign rows in the data's own proportion."""
    return np.sort(spread_rows(np.argsort(np.asarray(data_scores).reshape(-1), kind="stable"), most))


def lend_neighbours(det: Detector, stats: MomentStats, data_scores: np.ndarray,
                    data_rows: Callable[[np.ndarray], np.ndarray], anchor_x: np.ndarray, anchor_y: np.ndarray, *,
                    dims: int = defaults.NEIGHBOURS_DIMS, k: int = defaults.NEIGHBOURS_K,
                    weight: float = defaults.NEIGHBOURS_WEIGHT, most: int = defaults.NEIGHBOURS_ROWS,
                    down_only: bool = defaults.NEIGHBOURS_DOWN_ONLY) -> Detector:
    """The one-direction logistic detector ``det`` with each row's logit moved by the mean score of its ``k``
    nearest rows among a reference sample of the data (``core.neighbours``).

    down_only (the default's): a row whose neighbours' mean logit is below the reference's median is lowered by
    ``weight`` × the gap, in ``det``'s own calibrated logit; nothing else changes, so no row rises and the
    probabilities of rows among suspicious rows stay as they were. Otherwise: every row moves by ``weight`` × its
    neighbours' mean, Platt-scaled again on the anchors (whose neighbours are looked up among the same data rows).

    data_scores: (n,) any increasing function of ``det``'s score on every row (to spread the sample over ranks).
    data_rows(idx): the (m, d) vectors of rows ``idx`` (at most ``most`` of them). ``meta["neighbours"]`` records
    the settings."""
    if det.form != "linear" or det.link != "logistic" or det.k != 1:
        raise SaftError("only the blended one-direction probe can lend its rows' neighbours")
    ref = reference_rows(data_scores, most)
    if len(ref) <= k:
        raise SaftError(f"neighbours: {len(ref)} rows are too few for {k} neighbours each")
    xr, xa, ya = _rows_and_anchors(det, ref, data_rows, anchor_x, anchor_y)
    w = det.direction()  # logit = ⟨x − μ, w⟩ + intercept
    xr = xr - det.mean
    pcs = Detector.fit(stats, k=min(dims, det.dim))  # the data's top principal directions, σ_j = sqrt(n·λ_j)
    sd = np.maximum(pcs.singular_values / np.sqrt(stats.n), 1e-12 * max(float(pcs.singular_values.max()), 1e-300))
    values = xr @ w
    # the reference is spread evenly over the data's ranks, so its median is the data's
    centre = float(np.median(values)) if down_only else 0.0
    nb = Neighbours.fit(pcs.components / sd[:, None], xr, values, k=k, centre=centre,  # whitened: each in its sd
                        down_only=down_only)
    settings = {"dims": nb.basis.shape[0], "k": k, "weight": weight, "rows": len(ref)}
    if down_only:
        return det.with_(neighbours=nb.with_weight(weight), meta={
            **det.meta, "neighbours": {**settings, "down_only": True, "centre": round(centre, 4)}})
    xa = xa - det.mean  # a new array: the caller's anchors stay as they are
    slope, intercept = platt_on_anchors(xa @ w + weight * nb.mean_value(xa), ya)
    if slope <= 0:
        raise SaftError("neighbours: the smoothed score ranks the anchors backwards; score with --no-adapt")
    return det.with_(coef=slope * np.asarray(det.coef, dtype=np.float64), intercept=intercept,
                     neighbours=nb.with_weight(slope * weight), meta={
                         **det.meta, "neighbours": {**settings, "platt_slope": round(slope, 4)}})
