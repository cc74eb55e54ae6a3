"""Adapting the anchors' probe to the dataset (saft_gx/detect/adapt.py): self-training, then Platt scaling on
the anchors. Synthetic vectors whose harmful rows lie along a direction the anchors only half show."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx import MomentStats, SaftError
from saft_gx.core import defaults
from saft_gx.core.metrics import auroc
from saft_gx.detect.adapt import adapt_probe, adapt_whole_state
from saft_gx.detect.anchors import fit_default


@pytest.fixture(autouse=True)
def _subspace_probe_alone(monkeypatch):
    """These tests are about adaptation: the blend that follows it (saft_gx/detect/blend.py) is off here and
    tested in test_anchors.py."""
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.0)


def _shifted(seed, n=1000, lam=0.1):
    """Data: harm shifts dims 0 and 1 (mostly 1). Anchors: harm shifts dim 0 only — written by others, they
    show the harm from a different angle than the data does."""
    rng = np.random.default_rng(seed)
    scale = np.r_[np.full(8, 1.0), np.full(8, 0.3)]
    y = (rng.random(n) < lam).astype(int)
    x = rng.normal(size=(n, 16)) * scale
    x[y == 1, 0] += 1.5
    x[y == 1, 1] += 3.0
    ya = np.r_[np.ones(200), np.zeros(200)].astype(int)
    xa = rng.normal(size=(400, 16)) * scale
    xa[ya == 1, 0] += 3.0
    return x, y, xa, ya


def _fit(x, xa, ya, **kw):
    return fit_default(MomentStats(16).update(x), k=8, anchor_vectors=lambda: xa, anchor_labels=ya, **kw)


def test_adapting_to_the_data_ranks_its_harmful_rows_better_and_keeps_tau_a_probability():
    gains, clean_flagged = [], []
    for seed in range(3):
        x, y, xa, ya = _shifted(seed)
        before = _fit(x, xa, ya, adapt=False)
        after = _fit(x, xa, ya, data_coords=lambda d: d.project(x))
        assert before.meta["adapted"] is False and before.meta["adapted_why_not"] == "--no-adapt"
        assert after.meta["adapted"]["rows"] == 1000 and after.meta["adapted"]["top"] == defaults.ADAPT_TOP
        assert after.k == before.k and np.allclose(after.components, before.components)  # same subspace, new weights
        assert after.threshold == defaults.PROBABILITY_THRESHOLD and after.link == "logistic"
        gains.append(auroc(after.score(x), y) - auroc(before.score(x), y))
        xc, _, _, _ = _shifted(seed + 10, lam=0.0)
        clean = _fit(xc, xa, ya, data_coords=lambda d: d.project(xc))
        clean_flagged.append(clean.flag(clean.score(xc)).mean())
    assert min(gains) > 0.005 and np.mean(gains) > 0.015  # measured: +0.030, +0.026, +0.011
    # a clean set's own top 5 % were taught as harmful, yet the anchors' Platt scaling keeps them below τ
    assert max(clean_flagged) < 0.04


def test_small_datasets_and_other_variants_keep_the_anchors_probe():
    x, y, xa, ya = _shifted(0, n=defaults.ADAPT_MIN_ROWS - 1)
    det = _fit(x, xa, ya, data_coords=lambda d: d.project(x))
    assert det.meta["adapted"] is False and f"fewer than {defaults.ADAPT_MIN_ROWS}" in det.meta["adapted_why_not"]
    sq = _fit(x, xa, ya, weighting="whiten", data_coords=lambda d: d.project(x))
    assert sq.meta["adapted"] is False and "variant saft-whiten" in sq.meta["adapted_why_not"]
    merged = _fit(x, xa, ya)  # statistics alone (merge-stats): no pass over the rows to adapt with
    assert merged.meta["adapted"] is False and "statistics alone" in merged.meta["adapted_why_not"]
    with pytest.raises(SaftError, match="only a logistic probe"):
        adapt_probe(sq, sq.project(x), sq.project(xa), ya)
    probe = _fit(x, xa, ya, adapt=False)
    with pytest.raises(SaftError, match="coordinates"):
        adapt_probe(probe, x, probe.project(xa), ya)


def test_adapt_is_deterministic_and_uses_the_top_and_bottom_of_the_ranking(monkeypatch):
    x, y, xa, ya = _shifted(1)
    a = _fit(x, xa, ya, data_coords=lambda d: d.project(x))
    b = _fit(x, xa, ya, data_coords=lambda d: d.project(x))
    assert a.detector_id == b.detector_id
    # the middle of the ranking never teaches the probe: moving those rows does not change the result
    probe = _fit(x, xa, ya, adapt=False)
    d = probe.project(x)
    s = d @ probe.coef + probe.intercept
    order = np.argsort(s, kind="stable")
    one = adapt_probe(probe, d, probe.project(xa), ya, rounds=1)
    mid = order[int(0.8 * len(d)) + 5]
    d2 = d.copy()
    d2[mid] = d[order[int(0.8 * len(d)) + 10]] * 1.0001  # another middle row's place, still in the middle
    assert np.allclose(adapt_probe(probe, d2, probe.project(xa), ya, rounds=1).coef, one.coef)
    d3 = d.copy()
    d3[order[-1]] = d[order[0]]  # the most suspicious row replaced by the least: the harmful pseudo-set changes
    assert not np.allclose(adapt_probe(probe, d3, probe.project(xa), ya, rounds=1).coef, one.coef)


def test_score_cli_adapts_by_default_and_no_adapt_turns_it_off(tiny_model_dir, tmp_path):
    from saft_gx.cli import cli

    rng = np.random.default_rng(0)
    words = "river stone cloud paper music table window garden lamp chair".split()
    n = defaults.ADAPT_MIN_ROWS + 40
    df = pd.DataFrame({"prompt": [" ".join(rng.choice(words, 3 + i % 5)) + f" {i}" for i in range(n)],
                       "response": [" ".join(rng.choice(words, 4)) for _ in range(n)]})
    data = tmp_path / "rows.parquet"
    df.to_parquet(data)
    common = ["fit", str(data), "--model", str(tiny_model_dir), "--layer", "2", "--cache-dir", str(tmp_path / "c")]
    r = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "d1")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"probe (built-in anchors, adapted to {n} rows)" in r.output
    r = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "d0"), "--no-adapt"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "probe (built-in anchors; not adapted: --no-adapt)" in r.output
    import json

    m1 = json.loads((tmp_path / "d1" / "detector.json").read_text())
    m0 = json.loads((tmp_path / "d0" / "detector.json").read_text())
    assert m1["adapted"]["rows"] == n and m0["adapted"] is False and m0["adapted_why_not"] == "--no-adapt"


def test_large_datasets_fit_on_an_even_spread_of_each_pseudo_class(monkeypatch):
    import saft_gx.detect.adapt as adapt

    x, y, xa, ya = _shifted(2, n=4000)
    probe = _fit(x, xa, ya, adapt=False)
    full = adapt_probe(probe, probe.project(x), probe.project(xa), ya)
    monkeypatch.setattr(adapt, "MAX_CELL_ROWS", 100)  # 3,200 benign and 200 harmful pseudo-rows → 100 each
    capped = adapt_probe(probe, probe.project(x).astype(np.float32), probe.project(xa), ya)
    assert not np.allclose(capped.coef, full.coef)  # the cap is in effect ...
    assert abs(auroc(capped.score(x), y) - auroc(full.score(x), y)) < 0.02  # ... and ranks about as well
    assert adapt.spread_rows(np.arange(10), 4).tolist() == [0, 3, 6, 9]


def _domain_shifted(seed, n=1000, lam=0.1):
    """The anchors' harmful rows carry a style (dim 2) besides the harm (dim 0); half of this dataset's rows,
    benign or not, carry that style too. A probe on the anchors alone reads the style as harm; the data's benign
    rows show it is not. The style is the data's top direction, so the subspace probe (k = 1) cannot see past it."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < lam).astype(int)
    x = rng.normal(size=(n, 16))
    x[:, 2] += 2.5 * rng.integers(0, 2, n)
    x[y == 1, 0] += 2.5
    ya = np.r_[np.ones(200), np.zeros(200)].astype(int)
    xa = rng.normal(size=(400, 16))
    xa[ya == 1, 0] += 2.5
    xa[ya == 1, 2] += 2.5
    return x, y, xa, ya


def _fit1(x, xa, ya, **kw):
    return fit_default(MomentStats(16).update(x), k=1, anchor_vectors=lambda: xa, anchor_labels=ya, **kw)


def test_the_blend_is_adapted_to_the_datas_benign_rows_in_the_whole_state(monkeypatch):
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.5)
    monkeypatch.setattr(defaults, "NEIGHBOURS", False)  # this step alone (the neighbours: tests/test_neighbours.py)
    gains, clean_flagged = [], []
    for seed in range(3):
        x, y, xa, ya = _domain_shifted(seed)
        asked = []

        def rows(idx):
            asked.append(np.asarray(idx))
            return x[idx]

        kw = dict(data_coords=lambda d: d.project(x))
        blend_only = _fit1(x, xa, ya, **kw)
        adapted = _fit1(x, xa, ya, **kw, data_rows=rows)
        assert blend_only.meta["adapted_whole"] is False and "blend" in blend_only.meta
        assert adapted.meta["adapted_whole"]["rows"] == 800 and adapted.k == 1 and adapted.link == "logistic"
        assert adapted.threshold == defaults.PROBABILITY_THRESHOLD
        # only the blend's least suspicious 80 % were asked for: benign by assumption, never a top row
        (idx,) = asked
        rank = np.argsort(np.argsort(blend_only.score(x)))
        assert len(idx) == 800 and rank[idx].max() < 800
        gains.append(auroc(adapted.score(x), y) - auroc(blend_only.score(x), y))
        xc, _, _, _ = _domain_shifted(seed + 10, lam=0.0)
        clean = [_fit1(xc, xa, ya, data_coords=lambda d: d.project(xc), **more) for more in ({}, {"data_rows": lambda idx: xc[idx]})]
        clean_flagged.append([d.flag(d.score(xc)).mean() for d in clean])
    assert min(gains) > 0.02, gains  # the style no longer counts as harm
    # no row is taught as harmful, so a clean set is flagged less, not more: measured 13-20 % → 8-12 % here,
    # where the anchors' style makes the blend flag many clean rows
    assert all(adapted < 0.75 * blend for blend, adapted in clean_flagged), clean_flagged


def test_whole_state_adaptation_asks_for_at_most_its_cap_of_rows_and_needs_the_blend(monkeypatch):
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.5)
    x, y, xa, ya = _domain_shifted(3, n=3000)
    blend = _fit1(x, xa, ya, data_coords=lambda d: d.project(x))
    asked = []
    capped = adapt_whole_state(blend, MomentStats(16).update(x), blend.project(x)[:, 0],
                               lambda idx: asked.append(idx) or x[idx], xa, ya, most=300)
    assert len(asked[0]) == 300 and capped.meta["adapted_whole"]["rows"] == 300 and (np.diff(asked[0]) > 0).all()
    assert auroc(capped.score(x), y) > auroc(blend.score(x), y) + 0.02
    with pytest.raises(SaftError, match="one-direction"):
        adapt_whole_state(_fit(x, xa, ya, anchors=False), MomentStats(16).update(x), np.zeros(3000),
                          lambda idx: x[idx], xa, ya)
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.0)  # no blend: nothing to adapt in the whole state
    alone = _fit1(x, xa, ya, data_coords=lambda d: d.project(x), data_rows=lambda idx: pytest.fail("asked for rows"))
    assert "adapted_whole" not in alone.meta
