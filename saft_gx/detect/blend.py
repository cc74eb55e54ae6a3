"""Blending the default probe with a second view of the anchors: a probe on the whole hidden state.

The default probe reads the data's top-k SAFT subspace (32 directions), which adapts to the dataset but sees
only the directions in which the data varies most (of one layer, when the vectors are a stack). A logistic probe fitted on the anchors over every dimension
of the hidden state sees harm the subspace misses, but knows nothing of the dataset. Each is weaker alone; their
errors differ, so the blend ranks better than either (measured in tests/bench/detection.py, README "Detection
quality"). The two logits are put in the data's standard deviations (wᵀΣw, Σ the data's covariance) and
averaged; both are linear in the hidden state, so the blend is one direction. Its probability is set by Platt
scaling on the anchors, with the full probe's share scored out of fold (1,728 weights — three layers of 576 — fitted on 2,739 anchors
separate those anchors far better than any new row, which would make the probability overconfident).
Pure: NumPy only.
"""

from __future__ import annotations

import numpy as np

from ..core import defaults
from ..core.errors import SaftError
from ..core.probe import fit_logistic
from ..core.subspace import Detector, MomentStats
from .adapt import PLATT_C
from .calibrate import balanced_weights, one_direction, per_data_sd, stratified_folds

FOLDS = 5


def blend_full_probe(det: Detector, stats: MomentStats, anchor_x: np.ndarray, anchor_y: np.ndarray, *,
                     weight: float = defaults.BLEND_WEIGHT, c: float = defaults.BLEND_C) -> Detector:
    """``det`` (the default logistic probe in the data's subspace, adapted or not) blended with a logistic probe
    on every dimension of the anchors' vectors ``anchor_x`` (labels ``anchor_y``): logit ∝ (1 − weight)·z(det) +
    weight·z(full probe), recalibrated on the anchors. Returns a one-direction logistic detector on the same
    vectors; ``meta["blend"]`` records the settings and ``meta["subspace_k"]`` the subspace's size."""
    if det.form != "linear" or det.link != "logistic":
        raise SaftError("only the default logistic probe can be blended")
    if not 0 <= weight <= 1:
        raise SaftError(f"blend weight {weight}: must be between 0 and 1")
    ya = np.asarray(anchor_y).astype(np.int8)
    xa = np.asarray(anchor_x, dtype=np.float64) - det.mean
    if xa.ndim != 2 or xa.shape != (len(ya), det.dim):
        raise SaftError(f"expected ({len(ya)}, {det.dim}) anchor vectors, got {xa.shape}")
    cov = stats.covariance()

    def full_probe(rows: np.ndarray) -> np.ndarray:
        return per_data_sd(fit_logistic(xa[rows], ya[rows], c=c, sample_weight=balanced_weights(ya[rows])).coef, cov)

    w_sub = per_data_sd(det.direction(), cov)
    w = (1 - weight) * w_sub + weight * full_probe(np.ones(len(ya), dtype=bool))
    fold_of = stratified_folds(ya.astype(bool), FOLDS)
    held_out = np.empty(len(ya))
    for f in range(FOLDS):
        test = fold_of == f
        held_out[test] = xa[test] @ full_probe(~test)
    anchor_scores = (1 - weight) * (xa @ w_sub) + weight * held_out
    platt = fit_logistic(anchor_scores[:, None], ya, c=PLATT_C, sample_weight=balanced_weights(ya))
    slope = float(platt.coef[0])
    return one_direction(det, w, scale=slope, intercept=platt.intercept, link="logistic",
                         meta={**det.meta, "subspace_k": det.k,
                               "blend": {"full_probe_weight": weight, "c": c, "platt_slope": round(slope, 4)}})
