"""A ridge-regularised logistic probe: pure NumPy, no I/O.

The default detector fits it on the built-in anchors' embeddings projected into the data's own SAFT
subspace, so the direction adapts to the dataset (the subspace) while its scale and threshold come from
labelled rows (a probability, which transfers between datasets where a data-relative quantile does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SaftError


@dataclass(frozen=True)
class LogisticFit:
    """``p(harmful | x) = σ(x · coef + intercept)`` on the raw (unstandardised) inputs."""

    coef: np.ndarray
    intercept: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept

    def prob(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.logit(x))


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, c: float = 0.1, sample_weight: np.ndarray | None = None,
                 max_iter: int = 50, tol: float = 1e-8) -> LogisticFit:
    """L2-penalised logistic regression by Newton's method on standardised inputs.

    Minimises Σ wᵢ·logloss(yᵢ, xᵢβ + b) / Σwᵢ · n + ‖β‖² / (2c) (scikit-learn's ``C = c`` convention, features
    scaled to unit variance first so one ``c`` suits every layer); the intercept is not penalised. The result is
    mapped back to the raw inputs. Newton converges in ~10 steps here (convex). With more dimensions than rows
    (a probe on a whole hidden state from 100 labels) the solution lies in the span of the rows (representer
    theorem), so it is found exactly in an orthonormal basis of that span: an n×n problem instead of d×d."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise SaftError(f"expected (n, d) inputs and n labels, got {x.shape} and {y.shape}")
    if y.min() == y.max():
        raise SaftError("labels hold only one class; need both harmful (1) and benign (0) rows")
    if c <= 0:
        raise SaftError(f"c={c}: the inverse regularisation strength must be positive")
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w = w * len(y) / w.sum()
    mu = np.average(x, axis=0, weights=w)
    sd = np.sqrt(np.average((x - mu) ** 2, axis=0, weights=w))
    sd[sd < 1e-12] = 1.0
    zf = (x - mu) / sd
    basis = None
    if zf.shape[1] > zf.shape[0]:
        basis, r = np.linalg.qr(zf.T)  # (d, n) orthonormal columns; zf = r.T @ basis.T, and ‖basis·γ‖ = ‖γ‖
        zf = r.T
    z = np.hstack([zf, np.ones((len(y), 1))])
    d = z.shape[1]
    reg = np.full(d, 1.0 / c)
    reg[-1] = 0.0  # no penalty on the intercept
    beta = np.zeros(d)
    for _ in range(max_iter):
        p = sigmoid(z @ beta)
        grad = z.T @ (w * (p - y)) + reg * beta
        hess = (z * (w * p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < tol:
            break
    coef = (beta[:-1] if basis is None else basis @ beta[:-1]) / sd
    return LogisticFit(coef=coef, intercept=float(beta[-1] - mu @ coef))
