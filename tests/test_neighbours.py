"""A row's score moved by its nearest data rows' scores (core/neighbours.py, adapt.lend_neighbours). The default
lowers only the rows whose neighbours score below the data's median; "both ways" (Platt-scaled again) is measured,
not the default."""

import json
from dataclasses import replace

import numpy as np
import pytest

from saft_gx import MomentStats, SaftError
from saft_gx.core import defaults
from saft_gx.core.metrics import auroc
from saft_gx.core.neighbours import Neighbours
from saft_gx.core.subspace import Detector
from saft_gx.detect.adapt import lend_neighbours
from saft_gx.detect.anchors import fit_default


def _ring(values, k=2):
    """Six reference rows on the unit circle at 0°, 10°, 20°, 90°, 180°, 270° (basis = the identity)."""
    ang = np.deg2rad([0, 10, 20, 90, 180, 270])
    ref = np.c_[np.cos(ang), np.sin(ang)]
    return Neighbours(np.eye(2), ref, np.asarray(values, dtype=float), k=k, weight=1.0), ref


def test_a_row_takes_the_mean_of_its_k_nearest_reference_rows_and_never_its_own_copy():
    nb, ref = _ring([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    # a reference row skips itself: 0° → 10°, 20°; 10° → 0°, 20°
    assert nb.mean_value(ref[:2]) == pytest.approx([3.0, 2.5])
    # a new row at 5° has 0° and 10° nearest; one at 135°, 90° and 180° (45° away each)
    new = np.array([[np.cos(np.deg2rad(5)), np.sin(np.deg2rad(5))], [np.cos(np.deg2rad(135)), np.sin(np.deg2rad(135))]])
    assert nb.mean_value(new) == pytest.approx([1.5, 12.0])
    # only the direction counts (cosine), and the weight scales what is added to the logit
    assert nb.mean_value(5 * ref[:2]) == pytest.approx([3.0, 2.5])
    assert nb.with_weight(2.0).lift(ref[:1]) == pytest.approx([6.0])
    # down only, centred at 4: the 0° row (neighbours' mean 3) sinks by 2 × 1; the 135° row (mean 12) stays put
    down = Neighbours(nb.basis, ref, nb.values, k=2, weight=2.0, centre=4.0, down_only=True)
    assert down.lift(np.vstack([ref[:1], new[1:]])) == pytest.approx([-2.0, 0.0])
    both = Neighbours(nb.basis, ref, nb.values, k=2, weight=2.0, centre=4.0)
    assert both.lift(np.vstack([ref[:1], new[1:]])) == pytest.approx([-2.0, 16.0])


def test_a_duplicate_of_a_row_counts_as_its_neighbour_once():
    nb, ref = _ring([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    twin = Neighbours(nb.basis, np.vstack([ref, ref[:1]]), np.r_[nb.values, 1.0], k=2, weight=1.0)
    # the row at 0° finds two identical copies: one is itself, the other a neighbour (then 10°), not 10° and 20°
    assert twin.mean_value(ref[:1]) == pytest.approx([(1.0 + 2.0) / 2])


def test_shapes_and_k_are_checked():
    with pytest.raises(SaftError, match="do not fit together"):
        Neighbours(np.eye(2), np.ones((3, 3)), np.ones(3), k=1, weight=1.0)
    with pytest.raises(SaftError, match="k=3"):
        Neighbours(np.eye(2), np.ones((3, 2)), np.ones(3), k=3, weight=1.0)


def _clustered(seed, n=800, lam=0.1):
    """Harm is dim 0, weak in every row; the harmful rows also share a second trait (dims 3–5) the anchors do not
    have: alone each harmful row looks only a little suspicious, together they form a cluster."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < lam).astype(int)
    x = rng.normal(size=(n, 16))
    x[y == 1, 0] += 1.2
    x[y == 1, 3:6] += 2.0
    ya = np.r_[np.ones(200), np.zeros(200)].astype(int)
    xa = rng.normal(size=(400, 16))
    xa[ya == 1, 0] += 2.5
    return x, y, xa, ya


def _plain_and_lent(monkeypatch, seed, down_only):
    x, y, xa, ya = _clustered(seed)
    xa_before = xa.copy()
    kw = dict(k=1, anchor_vectors=lambda: xa, anchor_labels=ya, data_coords=lambda d: d.project(x),
              data_rows=lambda idx: x[idx])
    monkeypatch.setattr(defaults, "NEIGHBOURS", False)
    plain = fit_default(MomentStats(16).update(x), **kw)
    monkeypatch.setattr(defaults, "NEIGHBOURS", True)
    monkeypatch.setattr(defaults, "NEIGHBOURS_DOWN_ONLY", down_only)
    lent = fit_default(MomentStats(16).update(x), **kw)
    np.testing.assert_array_equal(xa, xa_before)  # the caller's anchors are not centred in place
    assert plain.neighbours is None and plain.meta["neighbours"] is False
    return x, y, plain, lent


def test_by_default_rows_among_low_scoring_neighbours_sink_and_no_row_rises(monkeypatch):
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.5)
    gains = []
    for seed in range(3):
        x, y, plain, lent = _plain_and_lent(monkeypatch, seed, down_only=True)
        near = lent.meta["neighbours"]
        assert near == {"dims": 16, "k": defaults.NEIGHBOURS_K, "weight": defaults.NEIGHBOURS_WEIGHT, "rows": 800,
                        "down_only": True, "centre": near["centre"]}
        # the same probe, nothing re-scaled: its own logit's median is the centre
        assert lent.intercept == plain.intercept and np.array_equal(lent.coef, plain.coef)
        assert near["centre"] == pytest.approx(np.median((x - lent.mean) @ lent.direction()), abs=1e-4)
        s, s0 = lent.score(x), plain.score(x)
        assert (s <= s0).all()
        up = lent.neighbours.mean_value(x - lent.mean) >= lent.neighbours.centre
        assert 0.2 < up.mean() < 0.8 and np.array_equal(s[up], s0[up])  # among suspicious rows: untouched
        assert (s[~up] < s0[~up]).all()
        gains.append(auroc(s, y) - auroc(s0, y))
    assert min(gains) > 0.001, gains  # measured 0.0016–0.0035 (on the devset: −0.002 to +0.02, README)


def test_both_ways_ranks_a_cluster_higher_and_is_scaled_again_on_the_anchors(monkeypatch):
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.5)
    gains = []
    for seed in range(3):
        x, y, plain, lent = _plain_and_lent(monkeypatch, seed, down_only=False)
        assert lent.meta["neighbours"] == {"dims": 16, "k": defaults.NEIGHBOURS_K, "weight": defaults.NEIGHBOURS_WEIGHT,
                                           "rows": 800, "platt_slope": lent.meta["neighbours"]["platt_slope"]}
        assert lent.meta["neighbours"]["platt_slope"] > 0 and lent.threshold == defaults.PROBABILITY_THRESHOLD
        assert not lent.neighbours.down_only and lent.neighbours.centre == 0.0
        s = lent.score(x)
        assert ((s > 0) & (s < 1)).all()  # still a probability
        gains.append(auroc(s, y) - auroc(plain.score(x), y))
    assert min(gains) > 0.015, gains  # measured 0.019–0.027


def test_the_reference_is_an_even_sample_of_at_most_its_cap_of_rows():
    x, y, xa, ya = _clustered(0, n=900)
    det = fit_default(MomentStats(16).update(x), k=1, anchor_vectors=lambda: xa, anchor_labels=ya,
                      data_coords=lambda d: d.project(x), data_rows=lambda idx: x[idx])
    asked = []

    def rows(idx):
        asked.append(np.asarray(idx))
        return x[idx]

    s = det.project(x)[:, 0]
    lent = lend_neighbours(det, MomentStats(16).update(x), s, rows, xa, ya, most=300)
    (idx,) = asked
    assert len(idx) == 300 and lent.neighbours.reference.shape == (300, 16)
    ranks = np.argsort(np.argsort(s))[idx]
    assert ranks.min() == 0 and ranks.max() == 899  # from the least to the most suspicious row
    with pytest.raises(SaftError, match="too few"):
        lend_neighbours(det, MomentStats(16).update(x), s[:10], rows, xa, ya)


def test_a_detector_with_neighbours_survives_save_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "NEIGHBOURS", True)
    x, y, xa, ya = _clustered(1)
    det = fit_default(MomentStats(16).update(x), k=1, anchor_vectors=lambda: xa, anchor_labels=ya,
                      data_coords=lambda d: d.project(x), data_rows=lambda idx: x[idx])
    back = Detector.load(det.save(tmp_path / "det"))
    np.testing.assert_array_equal(back.score(x), det.score(x))
    assert back.detector_id == det.detector_id != det.with_(neighbours=None).detector_id
    saved = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert saved["neighbours_k"] == defaults.NEIGHBOURS_K and saved["neighbours_down_only"] is True
    assert saved["neighbours_centre"] == det.neighbours.centre != 0.0
    moved = det.with_(neighbours=replace(det.neighbours, centre=det.neighbours.centre + 1.0))
    assert moved.detector_id != det.detector_id  # the centre changes scores, so it is part of the identity
    # a detector.json that names neighbours whose tensors are gone is a one-line error, not a silent plain score
    from safetensors.numpy import load_file, save_file

    t = load_file(str(tmp_path / "det" / "detector.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith("neighbours")}, str(tmp_path / "det" / "detector.safetensors"))
    with pytest.raises(SaftError, match="names neighbours but 'neighbours_basis' is missing"):
        Detector.load(tmp_path / "det")


def test_the_cli_line_says_what_the_neighbours_did():
    from saft_gx.cli.score import anchors_phrase

    meta = {"anchors": "built-in", "adapted": {"rows": 600}, "blend": {"full_probe_weight": 0.5},
            "adapted_whole": {"rows": 480}, "neighbours": {"k": 15, "rows": 600, "down_only": True}}
    assert anchors_phrase(meta) == (" (built-in anchors, adapted to 600 rows; blended with a whole-state probe, adapted "
                                    "to 480 of the rows; rows whose 15 nearest rows (of 600) score low lowered)")
    both = {**meta, "neighbours": {"k": 15, "rows": 600, "platt_slope": 0.3}}
    assert anchors_phrase(both).endswith("; each row lent its 15 nearest rows' scores (of 600))")
    assert "nearest" not in anchors_phrase({**meta, "neighbours": False})


def test_a_new_direction_drops_the_neighbours_lent_under_the_old_one(monkeypatch):
    from saft_gx.detect.calibrate import one_direction

    monkeypatch.setattr(defaults, "NEIGHBOURS", True)
    x, y, xa, ya = _clustered(2)
    det = fit_default(MomentStats(16).update(x), k=1, anchor_vectors=lambda: xa, anchor_labels=ya,
                      data_coords=lambda d: d.project(x), data_rows=lambda idx: x[idx])
    assert det.neighbours is not None
    assert one_direction(det, np.ones(16), link="logistic").neighbours is None


def test_fit_default_reads_the_rows_once_and_refuses_a_step_asking_for_others(monkeypatch):
    import saft_gx.detect.anchors as anchors_mod

    monkeypatch.setattr(defaults, "NEIGHBOURS", True)
    x, y, xa, ya = _clustered(3, n=700)
    calls = []

    def rows(idx):
        calls.append(len(idx))
        return x[idx]

    kw = dict(k=1, anchor_vectors=lambda: xa, anchor_labels=ya, data_coords=lambda d: d.project(x), data_rows=rows)
    fit_default(MomentStats(16).update(x), **kw)
    assert calls == [700]  # both steps from one read: the reference (all 700) holds the benign 560
    monkeypatch.setattr(anchors_mod, "reference_rows", lambda s: np.arange(5))
    with pytest.raises(SaftError, match="asked for rows that were not read"):
        fit_default(MomentStats(16).update(x), **kw)
