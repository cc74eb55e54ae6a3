import numpy as np
import pytest

from saft_gx.core.metrics import auroc, precision_recall_f1


def test_auroc_known_values():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1])) == 0.5
    # 1 of 4 pairs misordered
    assert auroc(np.array([0.1, 0.6, 0.5, 0.9]), np.array([0, 0, 1, 1])) == 0.75


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, size=200).astype(float)
    y = rng.integers(0, 2, size=200)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(pairwise)


def test_prf():
    assert precision_recall_f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == (0.5, 0.5, 0.5)
