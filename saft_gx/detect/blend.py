"""Blending the default probe with a second view of the anchors: a probe on the whole hidden state.

The default probe reads the data's top-k SAFT subspace (32 directions), which adapts to the dataset but sees
only the directions in which the data varies most (of one layer, when the vectors are a stack). A logistic probe fitted on the anchors over every dimension
of the hidden state sees harm the subspace misses, but knows nothing of the dataset. Each is weaker alone; their
errors differ, so the blend ranks better than either (measured in tests/bench/detection.py, README "Detection
quality"). The two logits are put in the data's standard deviations (wᵀΣw, Σ the data's covariance) and
averaged; both are linear in the hidden state, so the blend is one direction. Its probability is set by Platt
scaling on the anchors, with the full probe's share scored out of fold (1,728 weights — three layers of 576 — fitted on 2,739 anchors
separate those anchors far better than any new row, which would make the probability overconfident).

The whole-state probes (one on every anchor, one per fold) depend on the anchors alone, not on the data, and
are the costly part of fitting the default (six Newton fits in 1,728 dimensions: tens of seconds on a CPU), so
they are kept by a hash of the anchors' vectors and labels: in this process, and in ``store`` (the embedding
cache's folder, through the pipeline) so a second run on the same model skips them.
Pure: NumPy only; ``store`` is any object with ``load(key)`` / ``save(key, arrays)``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple, Protocol

import numpy as np

from ..core import defaults
from ..core.errors import SaftError
from ..core.probe import fit_logistic
from ..core.subspace import Detector, MomentStats
from .adapt import platt_on_anchors
from .calibrate import balanced_weights, one_direction, per_data_sd, stratified_folds

FOLDS = 5
_MEMO_SIZE = 4  # anchor sets kept in this process (one per model × layers in use: a benchmark loops over one)
_memo: "OrderedDict[str, AnchorProbes]" = OrderedDict()


class ArrayStore(Protocol):
    def load(self, key: str) -> dict[str, np.ndarray] | None: ...

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None: ...


class AnchorProbes(NamedTuple):
    """Logistic probes on the anchors' whole vectors: ``coef`` fitted on all of them, ``fold_coef[f]`` on all but
    fold ``f`` of ``fold_of`` (for out-of-fold scores). Intercepts are not kept: the blend re-centres on the data."""

    coef: np.ndarray
    fold_coef: np.ndarray
    fold_of: np.ndarray


def anchor_probes(anchor_x: np.ndarray, anchor_y: np.ndarray, c: float, store: ArrayStore | None = None) -> AnchorProbes:
    """The whole-state probes on ``anchor_x`` (n, d) with labels ``anchor_y``, from this process's memo, then
    ``store``, else fitted (and kept in both)."""
    x = np.ascontiguousarray(anchor_x, dtype=np.float64)
    ya = np.asarray(anchor_y).astype(np.int8)
    h = hashlib.sha256(f"anchor-probes-v1 c={c!r} folds={FOLDS} shape={x.shape}".encode())
    h.update(x.tobytes())
    h.update(ya.tobytes())
    key = h.hexdigest()
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key]
    got = store.load(key) if store is not None else None
    if got is not None and {"coef", "fold_coef", "fold_of"} <= set(got) and got["coef"].shape == (x.shape[1],):
        probes = AnchorProbes(got["coef"], got["fold_coef"], got["fold_of"])
    else:
        def fit(rows: np.ndarray) -> np.ndarray:
            return fit_logistic(x[rows], ya[rows], c=c, sample_weight=balanced_weights(ya[rows])).coef

        fold_of = stratified_folds(ya.astype(bool), FOLDS)
        probes = AnchorProbes(fit(np.ones(len(ya), dtype=bool)), np.stack([fit(fold_of != f) for f in range(FOLDS)]),
                              fold_of)
        if store is not None:
            store.save(key, probes._asdict())
    _memo[key] = probes
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return probes


def blend_full_probe(det: Detector, stats: MomentStats, anchor_x: np.ndarray, anchor_y: np.ndarray, *,
                     weight: float = defaults.BLEND_WEIGHT, c: float = defaults.BLEND_C,
                     store: ArrayStore | None = None) -> Detector:
    """``det`` (the default logistic probe in the data's subspace, adapted or not) blended with a logistic probe
    on every dimension of the anchors' vectors ``anchor_x`` (labels ``anchor_y``): logit ∝ (1 − weight)·z(det) +
    weight·z(full probe), recalibrated on the anchors. Returns a one-direction logistic detector on the same
    vectors; ``meta["blend"]`` records the settings and ``meta["subspace_k"]`` the subspace's size. ``store`` keeps
    the anchors' whole-state probes between runs (``anchor_probes``)."""
    if det.form != "linear" or det.link != "logistic":
        raise SaftError("only the default logistic probe can be blended")
    if not 0 <= weight <= 1:
        raise SaftError(f"blend weight {weight}: must be between 0 and 1")
    ya = np.asarray(anchor_y).astype(np.int8)
    xa = np.asarray(anchor_x, dtype=np.float64) - det.mean
    if xa.ndim != 2 or xa.shape != (len(ya), det.dim):
        raise SaftError(f"expected ({len(ya)}, {det.dim}) anchor vectors, got {xa.shape}")
    cov = stats.covariance()
    probes = anchor_probes(anchor_x, ya, c, store)
    w_sub = per_data_sd(det.direction(), cov)
    w = (1 - weight) * w_sub + weight * per_data_sd(probes.coef, cov)
    held_out = np.empty(len(ya))
    for f in range(FOLDS):
        test = probes.fold_of == f
        held_out[test] = xa[test] @ per_data_sd(probes.fold_coef[f], cov)
    anchor_scores = (1 - weight) * (xa @ w_sub) + weight * held_out
    slope, intercept = platt_on_anchors(anchor_scores, ya)
    return one_direction(det, w, scale=slope, intercept=intercept, link="logistic",
                         meta={**det.meta, "subspace_k": det.k,
                               "blend": {"full_probe_weight": weight, "c": c, "platt_slope": round(slope, 4)}})
