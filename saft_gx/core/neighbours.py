"""A row's score lent by its nearest neighbours in the dataset (the last step of the default detector).

Harmful rows of one dataset resemble one another more than they resemble the benign rows around them, and the
default's linear score ranks each row alone. Adding the mean score of a row's nearest rows in the data lifts
a harmful row whose neighbours are harmful too, and pulls an odd benign row towards its ordinary neighbours
(fewer clean rows over τ). Measured in tests/bench/detection.py (README "Detection quality").

Neighbours are found among a fixed sample of the data's rows (the *reference*, stored in the detector), by
cosine similarity in the data's top ``m`` principal directions, whitened (each direction in its own standard
deviations, so no single direction of large variance decides closeness). A row that is itself in the reference
finds its own copy first; one identical copy is skipped, so a row never lends its score to itself.
Pure: NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SaftError

SAME_ROW = 1 - 1e-6  # cosine similarity at which a reference row is taken to be the row itself
_CHUNK = 4096  # rows per block: a block's similarity matrix is CHUNK × reference rows


@dataclass(frozen=True)
class Neighbours:
    """basis: (m, d) whitened principal directions of the data (rows of basis applied to x − μ).
    reference: (r, m) unit vectors of the reference rows in that basis.
    values: (r,) the reference rows' linear scores (before any intercept).
    k: neighbours averaged; weight: what their mean adds to a row's logit, per unit of score."""

    basis: np.ndarray
    reference: np.ndarray
    values: np.ndarray
    k: int
    weight: float

    def __post_init__(self) -> None:
        m = self.basis.shape[0] if self.basis.ndim == 2 else -1
        if self.basis.ndim != 2 or self.reference.shape != (len(self.values), m):
            raise SaftError(f"neighbours: basis {self.basis.shape}, reference {self.reference.shape} and "
                            f"values {self.values.shape} do not fit together")
        if not 1 <= self.k < len(self.values):
            raise SaftError(f"neighbours: k={self.k} needs more than k reference rows (got {len(self.values)})")

    @classmethod
    def fit(cls, basis: np.ndarray, centred_rows: np.ndarray, values: np.ndarray, *, k: int,
            weight: float = 1.0) -> "Neighbours":
        """From the whitened principal directions ``basis`` (m, d), the reference rows ``centred_rows`` (r, d)
        (x − μ) and their linear scores ``values`` (r,)."""
        basis = np.asarray(basis, dtype=np.float64)
        return cls(basis=basis, reference=_unit(np.asarray(centred_rows, dtype=np.float64) @ basis.T),
                   values=np.asarray(values, dtype=np.float64), k=k, weight=weight)

    def with_weight(self, weight: float) -> "Neighbours":
        return Neighbours(self.basis, self.reference, self.values, self.k, weight)

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
        """(n,) what the neighbours add to each row's logit."""
        return self.weight * self.mean_value(centred)


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
