import numpy as np
import pytest

from saft_gx import Detector, MomentStats, SaftError


def _data(n=400, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(3, 0.5, d) + 10.0  # large mean: tests centring
    return x


def test_streamed_shards_equal_one_shot_svd():
    x = _data()
    one = MomentStats(12).update(x)
    shards = [MomentStats(12).update(part) for part in np.array_split(x, 7)]
    merged = shards[0]
    for s in shards[1:]:
        merged = merged.merge(s)
    assert merged.n == 400
    np.testing.assert_allclose(merged.outer, one.outer, rtol=1e-12)

    det = Detector.fit(merged, k=3)
    z = x - x.mean(axis=0)
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(det.singular_values, sv[:3], rtol=1e-8)
    # same subspace, up to sign per direction
    np.testing.assert_allclose(np.abs(det.components @ vt[:3].T), np.eye(3), atol=1e-8)
    expected = ((z @ vt[:3].T) ** 2).mean(axis=1)
    np.testing.assert_allclose(det.score(x), expected, rtol=1e-8)


def test_outliers_along_top_direction_score_highest():
    rng = np.random.default_rng(1)
    benign = rng.normal(size=(270, 8))
    harmful = rng.normal(size=(30, 8)) + np.r_[6.0, np.zeros(7)]
    x = np.vstack([benign, harmful])
    det = Detector.fit(MomentStats(8).update(x), k=1)
    s = det.score(x)
    assert s[270:].min() > np.quantile(s[:270], 0.9)


def test_sigma_weighting_and_orientation():
    x = _data()
    det = Detector.fit(MomentStats(12).update(x), k=2, weighting="sigma")
    z = (x - x.mean(0)) @ det.components.T
    w = det.singular_values / det.singular_values.sum()
    np.testing.assert_allclose(det.score(x), (z**2) @ w, rtol=1e-10)
    flipped = det.with_(orientation=-1)
    np.testing.assert_allclose(flipped.score(x), -det.score(x))


def test_save_load_roundtrip_without_pickle(tmp_path):
    x = _data()
    det = Detector.fit(MomentStats(12).update(x), k=2, meta={"layer": 5, "model_fingerprint": "abc"}).with_(threshold=1.5)
    det.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["detector.json", "detector.safetensors"]
    back = Detector.load(tmp_path / "det")
    assert back.detector_id == det.detector_id
    assert back.threshold == 1.5 and back.meta["layer"] == 5 and back.meta["n"] == 400
    np.testing.assert_array_equal(back.score(x), det.score(x))


def test_detector_id_changes_with_layer_not_threshold():
    det = Detector.fit(MomentStats(12).update(_data()), k=1, meta={"layer": 3})
    assert det.detector_id == det.with_(threshold=2.0).detector_id  # τ is a setting of the run, not the detector
    assert det.detector_id != det.with_(meta={"layer": 4}).detector_id


def test_refit_is_bit_identical():
    x = _data()
    a = Detector.fit(MomentStats(12).update(x), k=3)
    b = Detector.fit(MomentStats(12).update(x[::-1]), k=3)
    np.testing.assert_allclose(a.components, b.components, atol=1e-10)


@pytest.mark.parametrize("k,n", [(0, 10), (13, 100), (5, 5)])
def test_bad_k(k, n):
    with pytest.raises(SaftError):
        Detector.fit(MomentStats(12).update(_data(n=n)), k=k)


def test_non_finite_vectors_rejected():
    x = _data(n=5)
    x[2, 3] = np.inf
    with pytest.raises(SaftError, match="non-finite"):
        MomentStats(12).update(x)


def test_unreadable_detector(tmp_path):
    (tmp_path / "detector.json").write_text("{not json")
    (tmp_path / "detector.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SaftError, match="unreadable"):
        Detector.load(tmp_path)
    with pytest.raises(SaftError, match="expected detector.json"):
        Detector.load(tmp_path / "missing")
