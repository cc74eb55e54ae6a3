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
"""

from __future__ import annotations

import numpy as np

from ..core import defaults
from ..core.errors import SaftError
from ..core.probe import fit_logistic
from ..core.subspace import Detector
from .calibrate import PROBE_C, balanced_weights

PLATT_C = 1e4  # Platt scaling fits two numbers on thousands of anchors: essentially unpenalised
MAX_CELL_ROWS = 20_000  # pseudo-labelled rows per class kept for the fit (evenly over their ranks): a k-dim
# logistic fit needs no more, and a million-row dataset then costs ~2 × 20,000 rows of memory, not 850,000


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
    anchor_logit = a @ w + b
    platt = fit_logistic(anchor_logit[:, None], ya, c=PLATT_C, sample_weight=balanced_weights(ya))
    slope = float(platt.coef[0])
    if slope <= 0:
        raise SaftError("adapt: the self-trained probe ranks the anchors backwards; score with --no-adapt")
    return det.with_(coef=slope * w, intercept=slope * b + platt.intercept, orientation=1, meta={
        **det.meta, "adapted": {"top": top, "bottom": bottom, "rounds": rounds, "rows": n, "platt_slope": round(slope, 4)}})


def spread_rows(idx: np.ndarray, most: int | None = None) -> np.ndarray:
    """At most ``most`` (default ``MAX_CELL_ROWS``) of ``idx`` (rows in rank order), evenly spaced over the
    ranks: deterministic."""
    most = MAX_CELL_ROWS if most is None else most
    if len(idx) <= most:
        return idx
    return idx[np.linspace(0, len(idx) - 1, most).round().astype(np.int64)]
