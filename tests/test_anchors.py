"""The built-in anchors: the shipped file, the default fit that uses them, and `--no-anchors`."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx import Detector, MomentStats, SaftError
from saft_gx.core import defaults
from saft_gx.detect.anchors import ANCHORS_LICENSE, anchor_rows, fit_default, load_anchor_records
from saft_gx.core.metrics import auroc

ROOT = Path(__file__).resolve().parents[1]


def test_anchor_file_is_shipped_varied_and_disjoint_from_the_benchmark():
    recs = load_anchor_records()
    n, harmful = len(recs), sum(r["label"] for r in recs)
    assert n >= 1500 and 0.4 < harmful / n < 0.6 and ANCHORS_LICENSE == "CC0-1.0"
    assert len({r["prompt"] for r in recs}) == n and all(r["prompt"].strip() and r["response"].strip() for r in recs)
    for label in (0, 1):  # both classes carry every framing, long rows and other languages: none reveals the label
        cls = [r for r in recs if r["label"] == label]
        assert {"plain", "roleplay", "fiction", "hypothetical", "translation", "long_context"} <= {r["framing"] for r in cls}
        assert sum(r["lang"] != "en" for r in cls) / len(cls) > 0.08
        assert sum(len(r["prompt"]) > 1000 for r in cls) >= 25 and sum(len(r["prompt"]) < 100 for r in cls) >= 100
        assert len({r["category"] for r in cls}) >= 10
    rows, y = anchor_rows()
    assert len(rows) == n and y.tolist() == [r["label"] for r in recs]
    assert rows[0].messages == (("user", recs[0]["prompt"]), ("assistant", recs[0]["response"]))
    src = ROOT / "data_src"
    if src.exists():  # never an evaluation row of the detection benchmark
        bench = set()
        for name in ("harmful_pool", "benign_pool", "harmful_disguised", "benign_long"):
            bench |= {json.loads(line)["prompt"] for line in (src / f"{name}.jsonl").read_text().splitlines() if line}
        assert not bench & {r["prompt"] for r in recs}


def _topic_data(seed=0, n=400, d=24):
    """The top direction is a benign topic; harm is a smaller shift along another direction."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    x = rng.normal(size=(n, d))
    x[:, 0] += 7.0 * rng.integers(0, 2, n)
    x[:, 3] += 4.0 * y
    ya = np.r_[np.ones(24), np.zeros(24)].astype(int)
    xa = rng.normal(size=(48, d))
    xa[:, 0] += 7.0 * rng.integers(0, 2, 48)
    xa[:, 3] += 4.0 * ya
    return x, y, xa


def test_default_fit_is_a_probability_from_the_anchors_inside_the_data_subspace(monkeypatch):
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.0)  # the subspace probe alone (the blend: the next test)
    x, y, xa = _topic_data()
    ya = np.r_[np.ones(24), np.zeros(24)].astype(int)
    stats = MomentStats(x.shape[1]).update(x)
    det = fit_default(stats, anchor_vectors=lambda: xa, meta={"layer": 2}, anchor_labels=ya)
    plain = fit_default(stats, anchors=False)
    assert det.form == "linear" and det.link == "logistic" and det.k == 24  # defaults.K, capped at the dimension
    assert det.meta["anchors"]["rows"] == 48 and det.meta["layer"] == 2 and det.meta["variant"] == "probe"
    assert plain.form == "squared" and plain.k == defaults.PLAIN_K and plain.meta["anchors"] is None
    # τ is a probability, the same on every dataset: not fitted to this data's score distribution
    assert det.threshold == defaults.PROBABILITY_THRESHOLD and plain.threshold is None
    p = det.score(x)
    assert 0 <= p.min() and p.max() <= 1
    assert p[y == 1].mean() - p[y == 0].mean() > 0.3
    # 48 anchors under a strong ridge give cautious probabilities: at τ = 0.9 nothing benign is flagged
    assert not det.flag(p)[y == 0].any() and (p[y == 1] > 0.5).mean() > 0.85 and (p[y == 0] > 0.5).mean() < 0.15
    assert auroc(fit_default(stats, k=1, anchors=False).score(x), y) < 0.65  # plain SAFT k=1 finds the topic
    assert auroc(p, y) > 0.95
    # the probe lives in the data's subspace: with k=1 (the topic direction only) it cannot see the harm
    assert auroc(fit_default(stats, k=1, anchor_vectors=lambda: xa, anchor_labels=ya).score(x), y) < 0.65
    # a named weighting keeps the squared SAFT score, oriented by the anchors
    sq = fit_default(stats, k=4, weighting="whiten", anchor_vectors=lambda: xa, anchor_labels=ya)
    assert sq.form == "squared" and sq.weighting == "whiten" and sq.meta["variant"] == "saft-whiten"
    # k is capped by the rows when not given
    small = MomentStats(x.shape[1]).update(x[:9])
    assert fit_default(small, anchor_vectors=lambda: xa, anchor_labels=ya).k == 8


def test_default_fit_blends_a_probe_on_the_whole_state(monkeypatch):
    """The default blends the subspace probe with a probe on every dimension fitted on the anchors: harm outside
    the data's top directions, invisible to the subspace probe, is seen by the blend. One direction, a probability."""
    x, y, xa = _topic_data()
    ya = np.r_[np.ones(24), np.zeros(24)].astype(int)
    stats = MomentStats(x.shape[1]).update(x)
    det = fit_default(stats, k=1, anchor_vectors=lambda: xa, anchor_labels=ya)
    assert det.k == 1 and det.form == "linear" and det.link == "logistic" and det.meta["subspace_k"] == 1
    assert det.meta["blend"]["full_probe_weight"] == defaults.BLEND_WEIGHT == 0.5
    p = det.score(x)
    assert 0 <= p.min() and p.max() <= 1 and det.threshold == defaults.PROBABILITY_THRESHOLD
    assert auroc(p, y) > 0.8  # measured 0.84; the subspace probe alone (k = 1: the topic) below 0.65
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.0)
    alone = fit_default(stats, k=1, anchor_vectors=lambda: xa, anchor_labels=ya)
    assert "blend" not in alone.meta and auroc(alone.score(x), y) < 0.65


def test_default_fit_on_a_stack_takes_the_subspace_from_one_layer(monkeypatch):
    """Vectors that are two layers side by side (``meta["layers"]``): the subspace probe reads only the block of
    ``meta["subspace_layer"]`` — exactly the detector fitted on that layer alone —, the blend reads both blocks."""
    x, y, xa = _topic_data()
    ya = np.r_[np.ones(24), np.zeros(24)].astype(int)
    rng = np.random.default_rng(5)
    other, other_a = rng.normal(size=x.shape) * 4.0, rng.normal(size=xa.shape) * 4.0  # a noisier second layer
    wide, wide_a = np.hstack([other, x]), np.hstack([other_a, xa])
    meta = {"layers": [1, 2], "subspace_layer": 2}
    st = MomentStats(wide.shape[1]).update(wide)
    assert np.allclose(st.columns(24, 48).outer, MomentStats(24).update(x).outer)
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.0)
    alone = fit_default(MomentStats(24).update(x), k=4, anchor_vectors=lambda: xa, anchor_labels=ya)
    stacked = fit_default(st, k=4, anchor_vectors=lambda: wide_a, anchor_labels=ya, meta=meta)
    assert stacked.dim == 48 and not stacked.components[:, :24].any()
    np.testing.assert_allclose(stacked.score(wide), alone.score(x), rtol=1e-9)
    # the whole-stack fit would take its top directions from the noisier layer and lose the harm
    whole = fit_default(st, k=4, anchor_vectors=lambda: wide_a, anchor_labels=ya)
    assert auroc(whole.score(wide), y) < auroc(stacked.score(wide), y) - 0.2
    monkeypatch.setattr(defaults, "BLEND_WEIGHT", 0.5)
    blended = fit_default(st, k=4, anchor_vectors=lambda: wide_a, anchor_labels=ya, meta=meta)
    assert blended.direction()[:24].any() and blended.meta["subspace_k"] == 4  # the blend reads both layers
    with pytest.raises(SaftError, match="subspace layer 3"):
        fit_default(st, anchor_vectors=lambda: wide_a, anchor_labels=ya, meta={"layers": [1, 2], "subspace_layer": 3})


def test_the_anchors_whole_state_probes_are_kept_between_runs(tmp_path, monkeypatch):
    """The blend's whole-state probes depend on the anchors only: a second fit (another process: the memo is
    emptied) reads them from the store instead of fitting them, and gives the same detector; a file cut short is
    a miss, fitted again, never an error."""
    from saft_gx.detect import blend
    from saft_gx.io.cache import ArrayFolder

    x, y, xa = _topic_data()
    ya = np.r_[np.ones(24), np.zeros(24)].astype(int)
    stats = MomentStats(x.shape[1]).update(x)
    store = ArrayFolder(tmp_path / "anchor-probes")
    blend._memo.clear()
    first = fit_default(stats, anchor_vectors=lambda: xa, anchor_labels=ya, probe_store=store)
    (saved,) = (tmp_path / "anchor-probes").glob("*.npz")
    blend._memo.clear()
    real_fit = blend.fit_logistic  # blend.py fits only the whole-state probes (Platt: adapt.platt_on_anchors)
    monkeypatch.setattr(blend, "fit_logistic", lambda *a, **kw: pytest.fail("a whole-state probe was fitted again"))
    again = fit_default(stats, anchor_vectors=lambda: xa, anchor_labels=ya, probe_store=store)
    np.testing.assert_allclose(again.score(x), first.score(x), rtol=1e-12)
    monkeypatch.setattr(blend, "fit_logistic", real_fit)
    blend._memo.clear()
    saved.write_bytes(saved.read_bytes()[:100])  # a crash mid-write leaves no such file (atomic), but a disk can
    refit = fit_default(stats, anchor_vectors=lambda: xa, anchor_labels=ya, probe_store=store)
    np.testing.assert_allclose(refit.score(x), first.score(x), rtol=1e-9)
    assert store.load(saved.stem)["fold_coef"].shape == (blend.FOLDS, x.shape[1])  # and written back whole
    # other anchors (labels here) are another key: never the stored probes of different anchors
    other = fit_default(stats, anchor_vectors=lambda: xa, anchor_labels=1 - ya, probe_store=store)
    assert len(list((tmp_path / "anchor-probes").glob("*.npz"))) == 2 and auroc(other.score(x), y) < 0.5


def test_fit_adapts_the_blend_to_the_datas_own_rows_read_back_from_the_cache(tiny_model_dir, tmp_path):
    """`saft-gx fit` on enough rows adapts the blend to the data's least suspicious 80 % (detector.json
    ``adapted_whole``), reading those rows' vectors back from the cache by position (``pipeline.rows_cached``:
    any order, across frames, the very vectors the scoring pass reads)."""
    from saft_gx import pipeline
    from saft_gx.cli import cli
    from saft_gx.io.cache import EmbeddingCache
    from saft_gx.io.readers import open_dataset
    from saft_gx.embedding.models import fingerprint_path

    rng = np.random.default_rng(1)
    words = "river stone cloud paper music table window garden lamp chair".split()
    n = defaults.ADAPT_MIN_ROWS + 40
    data = tmp_path / "rows.parquet"
    pd.DataFrame({"prompt": [" ".join(rng.choice(words, 3 + i % 5)) + f" {i}" for i in range(n)],
                  "response": [" ".join(rng.choice(words, 4)) for _ in range(n)]}).to_parquet(data)
    cache_dir = tmp_path / "c"
    r = CliRunner().invoke(cli, ["fit", str(data), "--model", str(tiny_model_dir), "--layer", "2", "--cache-dir",
                                 str(cache_dir), "-o", str(tmp_path / "d")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "d" / "detector.json").read_text())
    assert meta["adapted"]["rows"] == n and meta["adapted_whole"]["rows"] == round(defaults.ADAPT_WHOLE_BOTTOM * n)
    assert meta["adapted_whole"]["weight"] == defaults.ADAPT_WHOLE_WEIGHT
    assert f"blended with a whole-state probe, adapted to {round(defaults.ADAPT_WHOLE_BOTTOM * n)} of the rows" in r.output
    ds = open_dataset(data)
    spec = pipeline.ColumnOptions().resolve(ds)
    cache = EmbeddingCache(cache_dir, model_fingerprint=fingerprint_path(tiny_model_dir), token=meta["token"],
                           max_tokens=meta["max_tokens"], overlong=meta["overlong"], dim=32)
    every = np.concatenate([x for _k, x in pipeline.cached_vectors(ds, spec, cache, 2, frame_rows=100)])
    idx = np.array([537, 3, 250, 99, 100, 0, 250])  # unsorted, a repeat, rows either side of a frame edge
    np.testing.assert_array_equal(pipeline.rows_cached(ds, spec, cache, 2, idx, frame_rows=100), every[idx])
    assert every.shape == (n, 32) and pipeline.rows_cached(ds, spec, cache, 2, idx[:0]).shape[0] == 0
    with pytest.raises(SaftError, match=f"row {n} asked for, {n} rows in the file"):
        pipeline.rows_cached(ds, spec, cache, 2, np.array([5, n]))


def test_score_uses_anchors_by_default_and_no_anchors_turns_them_off(tiny_model_dir, toy_parquet, tmp_path):
    from saft_gx.cli import cli

    run = lambda *a: CliRunner().invoke(cli, ["score", str(toy_parquet), "--no-db", "--model", str(tiny_model_dir), *a],
                                        catch_exceptions=False)
    r = run("--out", str(tmp_path / "a.parquet"), "--save-detector", str(tmp_path / "da"))
    assert r.exit_code == 0, r.output
    assert "k=11, probe (built-in anchors; not adapted: 12 rows, fewer than 500; blended with a whole-state probe)" in r.output
    meta = json.loads((tmp_path / "da" / "detector.json").read_text())
    n_anchors = len(load_anchor_records())
    assert meta["form"] == "linear" and meta["anchors"]["rows"] == n_anchors and meta["subspace_k"] == 11  # k ≤ 12 − 1
    det = Detector.load(tmp_path / "da")
    assert det.k == 1 and det.coef is not None and det.coef.shape == (1,)  # blended: one direction
    # the default layer and token follow the mode: the anchored defaults here, plain SAFT's with --no-anchors
    # (anchored: a stack of layers read side by side, the probe's subspace from the default layer among them)
    assert (meta["layers"], meta["subspace_layer"], meta["token"]) == ([2, 3], defaults.layer_for(4), defaults.TOKEN)
    assert defaults.stack_for(4) == (2, 3) and meta["layer"] == 3 and det.dim == 2 * 32  # two layers of 32
    assert f"probability of harm > {defaults.PROBABILITY_THRESHOLD:g}" in r.output

    r = run("--out", str(tmp_path / "b.parquet"), "--save-detector", str(tmp_path / "db"), "--no-anchors")
    assert r.exit_code == 0, r.output
    meta_b = json.loads((tmp_path / "db" / "detector.json").read_text())
    assert meta_b["form"] == "squared" and meta_b["k"] == defaults.PLAIN_K and meta_b["anchors"] is None
    assert "built-in anchors" not in r.output
    assert (meta_b["layer"], meta_b["token"]) == (defaults.layer_for(4, anchors=False), defaults.PLAIN_TOKEN)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert a["detector_id"].iloc[0] != b["detector_id"].iloc[0]
    assert not np.allclose(a["harm_score"], b["harm_score"])


def test_anchor_embeddings_go_through_the_cache(tiny_model_dir, toy_parquet, tmp_path):
    from saft_gx import pipeline

    opts = pipeline.EmbedOptions(model=str(tiny_model_dir), layer=3)
    s1 = pipeline.Session(opts)
    r1 = pipeline.score_file(toy_parquet, tmp_path / "a.parquet", opts=opts, columns=pipeline.ColumnOptions(), session=s1)
    assert len(s1.cache.layer(3)) == 12 + len(load_anchor_records())  # the dataset's rows and the anchors
    s2 = pipeline.Session(opts)
    r2 = pipeline.score_file(toy_parquet, tmp_path / "b.parquet", opts=opts, columns=pipeline.ColumnOptions(), session=s2)
    assert s2.embedder.forward_calls == 0 and r1.detector.detector_id == r2.detector.detector_id


@pytest.mark.parametrize("frame_anchors", [True, False])
def test_score_frame_default_matches_anchors_option(tiny_model_dir, frame_anchors):
    from saft_gx import pipeline
    from conftest import TOY_ROWS

    df = pd.DataFrame(TOY_ROWS * 2, columns=["prompt", "response"])
    df["response"] = [r + f" {i}" for i, r in enumerate(df["response"])]
    scores, det = pipeline.score_frame(df, opts=pipeline.EmbedOptions(model=str(tiny_model_dir), layer=2),
                                       anchors=frame_anchors)
    assert len(scores) == 12 and (det.form == "linear") == frame_anchors
