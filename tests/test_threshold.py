import numpy as np
import pytest

from saft_gx.core.errors import SaftError
from saft_gx.core.threshold import (ThresholdRule, best_f1_threshold, fpr_threshold, recall_threshold, resolve,
                               rule_from_options, top_fraction_threshold)


def test_remove_fraction_flags_exactly_that_many():
    s = np.random.default_rng(0).normal(size=1000)
    for q in (0.0, 0.1, 0.25, 1.0):
        tau = top_fraction_threshold(s, q)
        assert (s > tau).sum() == round(q * 1000)


def test_rules():
    s = np.arange(10.0)
    assert resolve(ThresholdRule("value", 4.5), s) == 4.5
    assert (s > resolve(ThresholdRule("contamination", 0.3), s)).sum() == 3
    assert rule_from_options(None, None, None) is None
    with pytest.raises(SaftError, match="only one"):
        rule_from_options(1.0, 0.1, None)
    with pytest.raises(SaftError, match="between 0 and 1"):
        rule_from_options(None, 1.5, None)


def test_best_f1_separable():
    s = np.r_[np.zeros(90), np.ones(10) * 5]
    y = np.r_[np.zeros(90), np.ones(10)]
    tau, f1 = best_f1_threshold(s, y)
    assert f1 == 1.0 and 0 < tau < 5


def test_fpr_and_recall_targets():
    rng = np.random.default_rng(0)
    s = np.r_[rng.normal(size=500), rng.normal(size=100) + 3]
    y = np.r_[np.zeros(500), np.ones(100)]
    tau = fpr_threshold(s, y, 0.05)
    assert (s[:500] > tau).mean() <= 0.05
    tau = recall_threshold(s, y, 0.9)
    assert (s[500:] > tau).mean() >= 0.9


def test_one_class_labels_rejected():
    with pytest.raises(SaftError, match="one class"):
        best_f1_threshold(np.arange(5.0), np.ones(5))
