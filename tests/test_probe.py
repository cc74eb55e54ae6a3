"""The ridge logistic probe (saft_gx/core/probe.py): its result is the optimum of the stated objective."""

import numpy as np
import pytest

from saft_gx import SaftError
from saft_gx.core.probe import fit_logistic, sigmoid


def _objective_gradient(x, y, w, c, coef, intercept):
    """Gradient of Σ wᵢ·logloss + ‖β‖²/(2c) in the standardised coordinates the probe penalises."""
    w = w * len(y) / w.sum()
    mu = np.average(x, axis=0, weights=w)
    sd = np.sqrt(np.average((x - mu) ** 2, axis=0, weights=w))
    z = (x - mu) / sd
    beta = coef * sd  # the standardised weights
    p = sigmoid(x @ coef + intercept)
    g_beta = z.T @ (w * (p - y)) + beta / c
    g_b = np.sum(w * (p - y))
    return g_beta, g_b


@pytest.mark.parametrize("n,d", [(200, 12), (40, 300)])  # fewer dimensions than rows, and many more
def test_fit_is_the_optimum_of_the_penalised_objective(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d) + rng.normal(size=d)
    y = (x[:, 0] / x[:, 0].std() + rng.normal(size=n) > 0.3).astype(float)
    w = rng.uniform(0.5, 2, n)
    for c in (0.01, 1.0):
        fit = fit_logistic(x, y, c=c, sample_weight=w)
        g_beta, g_b = _objective_gradient(x, y, w, c, fit.coef, fit.intercept)
        assert np.abs(g_beta).max() < 1e-6 and abs(g_b) < 1e-6
        assert 0 < fit.prob(x).mean() < 1 and np.corrcoef(fit.logit(x), x[:, 0])[0, 1] > 0.3


def test_errors():
    with pytest.raises(SaftError, match="one class"):
        fit_logistic(np.ones((4, 2)), np.ones(4))
    with pytest.raises(SaftError, match="positive"):
        fit_logistic(np.eye(4), np.array([0, 1, 0, 1]), c=0)
