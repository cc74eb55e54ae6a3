"""A row's score lent by its nearest neighbours in the dataset (the last step of the default detector).

Harmful rows of one dataset resemble one another more than they resemble the benign rows around them, and the
default's linear score ranks each row alone. The mean score of a row's nearest rows in the data says which crowd
it sits in. Two shapes:

- *down only* (the default's): a row whose neighbours score below the data's median (``centre``) is lowered by
  ``weight`` × the gap; no row is raised. A suspicious row among suspicious rows keeps its probability exactly,
  so τ and the release gate mean what they meant; a middling row among ordinary rows sinks below the harmful
  ones, which is where the ranking gains.
- *both ways* (``down_only`` False): every row moves by ``weight`` × (its neighbours' mean − ``centre``).

Measured in tests/bench/detection.py (README "Detection quality").

Neighbours are found among a fixed sample of the data's rows (the *reference*, stored in the detector), by
cosine similarity in the data's top ``m`` principal directions, whitened (each direction in its own standard
deviations, so no single direction of large variance decides closeness). A row that is itself in the reference
finds its own copy first; one identical copy is skipped, so a row never lends its score to itself.
Pure: NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import SaftError

SAME_ROW = 1 - 1e-6  # cosine similarity at which a reference row is taken to be the row itself
_CHUNK = 4096  # rows per block: a block's similarity matrix is CHUNK × reference rows


@dataclass(frozen=True)
class Neighbours:
    """basis: (m, d) whitened principal directions of the data (rows of basis applied to x − μ).
    reference: (r, m) unit vectors of the reference rows in that basis.
    values: (r,) the reference rows' linear scores (before any intercept).
    k: neighbours averaged; weight: what their mean adds to a row's logit, per unit of score above ``centre``;
    down_only: only lower rows (a mean above ``centre`` adds nothing)."""

    basis: np.ndarray
    reference: np.ndarray
    values: np.ndarray
    k: int
    weight: float
    centre: float = 0.0
    down_only: bool = False

    def __post_init__(self) -> None:
        m = self.basis.shape[0] if self.basis.ndim == 2 else -1
        if self.basis.ndim != 2 or self.reference.shape != (len(self.values), m):
            raise SaftError(f"neighbours: basis {self.basis.shape}, reference {self.reference.shape} and "
                            f"values {self.values.shape} do not fit together")
        if not 1 <= self.k < len(self.values):
            raise SaftError(f"neighbours: k={self.k} needs more than k reference rows (got {len(self.values)})")

    @classmethod
    def fit(cls, basis: np.ndarray, centred_rows: np.ndarray, values: np.ndarray, *, k: int,
            weight: float = 1.0, centre: float = 0.0, down_only: bool = False) -> "Neighbours":
        """From the whitened principal directions ``basis`` (m, d), the reference rows ``centred_rows`` (r, d)
        (x − μ) and their linear scores ``values`` (r,)."""
        basis = np.asarray(basis, dtype=np.float64)
        return cls(basis=basis, reference=_unit(np.asarray(centred_rows, dtype=np.float64) @ basis.T),
                   values=np.asarray(values, dtype=np.float64), k=k, weight=weight, centre=float(centre),
                   down_only=bool(down_only))

    def with_weight(self, weight: float) -> "Neighbours":
        return replace(self, weight=weight)

    def mean_value(self, centred: np.ndarray) -> np.ndarray:
        """(n,) mean of ``values`` over each row's k nearest reference rows (one identical copy skipped)."""
        x = np.asarray(centred, dtype=np.float64)
        out = np.empty(len(x))
        k = self.k
        for start in range(0, len(x), _CHUNK):
            sims = _unit(x[start:start + _CHUNK] @ self.basis.T) @ self.reference.T
            near = np.argpartition(-sims, k, axis=1)[:, : k + 1]  # the k + 1 closest, unordered
            near_sims = np.take_along_axis(sims, near, axis=1)
            order = np.argsort(-near_sims, axis=1, kind="stable")
            near = np.take_along_axis(near, order, axis=1)
            itself = np.take_along_axis(near_sims, order[:, :1], axis=1)[:, 0] >= SAME_ROW
            chosen = np.where(itself[:, None], near[:, 1:], near[:, :k])
            out[start:start + len(sims)] = self.values[chosen].mean(axis=1)
        return out

    def lift(self, centred: np.ndarray) -> np.ndarray:
        """(n,) what the neighbours add to each row's logit (≤ 0 everywhere when ``down_only``)."""
        gap = self.mean_value(centred) - self.centre
        return self.weight * (np.minimum(gap, 0.0) if self.down_only else gap)


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
