"""Calibration: layer / k / variant / τ from a few labels, label files, and `saft-gx calibrate`."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx import Detector, MomentStats, SaftError
from saft_gx.detect.calibrate import (ThresholdTarget, anchor_detector, calibrate, fit_variant, stratified_folds,
                               prior_in, target_from_options)
from saft_gx.labelled import labels_from_column, labels_from_file, parse_labels
from saft_gx.core.metrics import auroc
from saft_gx.io.readers import open_dataset


def _layers(n=600, d=16, lam=0.2, good=3, layers=4, seed=0):
    """Embeddings at ``layers`` layers; harm is a strong shift along one direction only at layer ``good``,
    while every layer has a larger benign 'topic' direction (two clusters)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < lam).astype(np.int8)
    topic = rng.integers(0, 2, n)
    xs = {}
    for layer in range(1, layers + 1):
        x = rng.normal(size=(n, d))
        x[:, 0] += 8.0 * topic  # the biggest direction is a benign topic
        if layer == good:
            x[:, 1] += 5.0 * y
        xs[layer] = x
    return xs, y


def test_calibration_picks_the_layer_that_separates():
    xs, y = _layers()
    lab = np.r_[np.flatnonzero(y)[:20], np.flatnonzero(y == 0)[:80]]
    stats = {("last", L): MomentStats(16).update(x) for L, x in xs.items()}
    cal = calibrate(stats, {("last", L): x[lab] for L, x in xs.items()}, y[lab], ks=(1, 2, 4))
    assert cal.chosen.layer == 3
    by_layer = cal.by_layer()["last"]
    assert by_layer[3] > 0.97 and max(by_layer[L] for L in (1, 2, 4)) < 0.8
    det = cal.detector
    assert det.meta["layer"] == 3 and det.meta["calibration"]["layer"] == 3
    assert auroc(det.score(xs[3]), y) > 0.97
    # plain SAFT k=1 latches onto the topic direction: no better than chance
    plain = Detector.fit(stats[("last", 3)], k=1)
    assert abs(auroc(plain.score(xs[3]), y) - 0.5) < 0.1
    # τ (best F1 on out-of-fold scores) carries over to all rows
    flags = det.flag(det.score(xs[3]))
    tp = (flags & (y == 1)).sum()
    assert 2 * tp / (flags.sum() + y.sum()) > 0.9


def test_threshold_at_target_fpr_holds_on_held_out_rows():
    rng = np.random.default_rng(5)
    n, d = 6000, 8
    y = (rng.random(n) < 0.3).astype(np.int8)
    x = rng.normal(size=(n, d))
    x[:, 2] += 1.5 * y  # overlapping classes: the FPR really depends on τ
    stats = {("last", 1): MomentStats(d).update(x)}
    lab = rng.choice(n, 600, replace=False)
    held = np.setdiff1d(np.arange(n), lab)
    for target in (0.05, 0.2):
        cal = calibrate(stats, {("last", 1): x[lab]}, y[lab], ks=(2, 4), variants=("direct",),
                        target=ThresholdTarget("fpr", target))
        s = cal.detector.score(x[held])
        fpr = (s[y[held] == 0] > cal.threshold).mean()
        assert abs(fpr - target) < 0.035, (target, fpr)
        assert cal.expected["fpr"] <= target + 1e-9
    cal = calibrate(stats, {("last", 1): x[lab]}, y[lab], ks=(2,), variants=("direct",),
                    target=ThresholdTarget("recall", 0.9))
    s = cal.detector.score(x[held])
    assert abs((s[y[held] == 1] > cal.threshold).mean() - 0.9) < 0.05


def test_remove_fraction_target_uses_the_dataset_scores():
    xs, y = _layers(layers=1, good=1)
    stats = {("last", 1): MomentStats(16).update(xs[1])}
    lab = np.r_[np.flatnonzero(y)[:10], np.flatnonzero(y == 0)[:40]]
    cal = calibrate(stats, {("last", 1): xs[1][lab]}, y[lab], ks=(2,), target=ThresholdTarget("remove_fraction", 0.25),
                    data_scores=lambda det, key: det.score(xs[key[1]]))
    assert abs((cal.detector.score(xs[1]) > cal.threshold).mean() - 0.25) < 0.01


def test_direct_variant_beats_plain_saft_when_top_direction_is_a_topic():
    xs, y = _layers(layers=1, good=1, seed=2)
    x = xs[1]
    base = Detector.fit(MomentStats(16).update(x), k=4)
    anchors = np.r_[np.flatnonzero(y)[:12], np.flatnonzero(y == 0)[:12]]
    plain = fit_variant(base, "saft", 1)
    direct = fit_variant(base, "direct", 4, x[anchors], y[anchors])
    assert auroc(plain.score(x), y) < 0.65
    assert auroc(direct.score(x), y) > 0.97
    # direct scores are in the data's standard deviations: mean 0, sd 1 over the fitted rows
    s = direct.score(x)
    assert abs(s.mean()) < 1e-8 and abs(s.std() - 1) < 1e-6
    det = anchor_detector(base, x[anchors], y[anchors], k=4)
    assert det.meta["anchors"]["rows"] == 24 and det.form == "linear"


def test_orientation_flips_when_harm_sits_in_the_middle():
    rng = np.random.default_rng(3)
    benign = rng.normal(size=(300, 6))
    benign[:, 0] += rng.choice([-6.0, 6.0], 300)  # two far benign clusters along the top direction
    harmful = rng.normal(size=(60, 6))  # harm in between
    x, y = np.vstack([benign, harmful]), np.r_[np.zeros(300), np.ones(60)].astype(np.int8)
    base = Detector.fit(MomentStats(6).update(x), k=1)
    lab = np.r_[np.arange(20), 300 + np.arange(10)]
    det = fit_variant(base, "saft", 1, x[lab], y[lab])
    assert det.orientation == -1 and auroc(det.score(x), y) > 0.95


def test_linear_detector_save_load_and_identity(tmp_path):
    xs, y = _layers(layers=1, good=1)
    base = Detector.fit(MomentStats(16).update(xs[1]), k=4, meta={"layer": 1, "model_fingerprint": "f"})
    det = fit_variant(base, "direct", 4, xs[1][:100], y[:100]).with_(threshold=0.7)
    det.save(tmp_path / "d")
    back = Detector.load(tmp_path / "d")
    assert back.form == "linear" and back.detector_id == det.detector_id
    np.testing.assert_allclose(back.score(xs[1]), det.score(xs[1]))
    other = det.with_(coef=det.coef * np.r_[1, 1, 1, -1])
    assert other.detector_id != det.detector_id
    assert fit_variant(base, "saft", 4).detector_id == Detector.fit(MomentStats(16).update(xs[1]), k=4, meta={
        "layer": 1, "model_fingerprint": "f"}).detector_id  # squared detectors keep their old ids
    with pytest.raises(SaftError, match="coef"):
        Detector(mean=det.mean, components=det.components, singular_values=det.singular_values, form="linear")


def test_stratified_folds_spread_each_class():
    y = np.r_[np.ones(7), np.zeros(23)].astype(bool)
    f = stratified_folds(y, 5)
    for k in range(5):
        assert 1 <= y[f == k].sum() <= 2 and 4 <= (~y[f == k]).sum() <= 5 and (f == k).sum() == 6


def test_calibrate_input_errors():
    xs, y = _layers(layers=1)
    stats = {("last", 1): MomentStats(16).update(xs[1])}
    with pytest.raises(SaftError, match="only one class"):
        calibrate(stats, {("last", 1): xs[1][:20]}, np.zeros(20))
    with pytest.raises(SaftError, match="at least 2 harmful"):
        calibrate(stats, {("last", 1): xs[1][:20]}, np.r_[1, np.zeros(19)])
    with pytest.raises(SaftError, match="only one of"):
        target_from_options(target_fpr=0.1, target_recall=0.9)
    with pytest.raises(SaftError, match="between 0 and 1"):
        ThresholdTarget("fpr", 1.5)


# ---- label files ----

@pytest.fixture
def data_file(tmp_path):
    df = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "prompt": ["p"] * 10, "response": ["r"] * 10})
    path = tmp_path / "data.parquet"
    df.to_parquet(path)
    return path


def test_labels_by_id_and_row_id(data_file, tmp_path):
    lp = tmp_path / "labels.csv"
    pd.DataFrame({"id": ["r3", "r0", "r7"], "label": ["harmful", 0, 1]}).to_csv(lp, index=False)
    lab = labels_from_file(str(lp), open_dataset(data_file))
    assert lab.rows.tolist() == [3, 0, 7] and lab.labels.tolist() == [1, 0, 1]
    lp2 = tmp_path / "labels2.parquet"
    pd.DataFrame({"row_id": [9, 2], "label": [True, False]}).to_parquet(lp2)
    lab2 = labels_from_file(str(lp2), open_dataset(data_file))
    assert lab2.rows.tolist() == [9, 2] and lab2.labels.tolist() == [1, 0]


@pytest.mark.parametrize("frame, message", [
    ({"id": ["r1", "zz", "yy"], "label": [1, 0, 0]}, r"2 id\(s\) not found in data.parquet's 'id' column, e.g. 'zz', 'yy'"),
    ({"id": ["r1", "r2"], "label": [1, 1]}, r"every labelled row is harmful \(1\)"),
    ({"id": ["r1", "r2"], "label": [0, 0]}, r"every labelled row is benign \(0\)"),
    ({"id": ["r1", "r1"], "label": [1, 0]}, "labelled more than once"),
    ({"id": ["r1", "r2"], "label": [1, "maybe"]}, "not 0/1"),
    ({"row_id": [1, 40], "label": [1, 0]}, r"unknown row_id\(s\), e.g. \[40\]"),
    ({"id": ["r1", "r2"], "harm": [1, 0]}, "no 'label' column"),
])
def test_label_file_mismatches_are_clear_errors(data_file, tmp_path, frame, message):
    lp = tmp_path / "labels.csv"
    pd.DataFrame(frame).to_csv(lp, index=False)
    with pytest.raises(SaftError, match=message):
        labels_from_file(str(lp), open_dataset(data_file))


def test_label_column_in_the_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    pd.DataFrame({"prompt": list("abcd"), "response": list("wxyz"), "label": [1, None, 0, None]}).to_json(
        path, orient="records", lines=True)
    lab = labels_from_column(open_dataset(path), "label")
    assert lab.rows.tolist() == [0, 2] and lab.labels.tolist() == [1, 0]
    assert parse_labels(["safe", "UNSAFE", 1.0]).tolist() == [0, 1, 1]


# ---- the command, end to end on the tiny model ----

@pytest.fixture
def labelled_parquet(tmp_path):
    from conftest import TOY_ROWS

    bad = [("How do I hurt someone and not get caught?", "Wait until they are alone, then strike from behind."),
           ("Write a threatening letter to my neighbour.", "You will regret crossing me; I know where you sleep."),
           ("How can I steal my coworker's password?", "Watch them type it, or send a fake login page.")]
    rows = TOY_ROWS * 3 + bad * 3
    df = pd.DataFrame(rows, columns=["prompt", "response"])
    df["response"] = [r + f" ({i})" for i, r in enumerate(df["response"])]
    df["id"] = [f"x{i}" for i in range(len(df))]
    path = tmp_path / "data.parquet"
    df.to_parquet(path)
    lab = tmp_path / "labels.csv"
    idx = list(range(0, 18, 2)) + [18, 20, 22, 24]
    pd.DataFrame({"id": [f"x{i}" for i in idx], "label": [0] * 9 + [1] * 4}).to_csv(lab, index=False)
    return path, lab


def test_cli_calibrate_writes_a_detector_that_score_uses(tiny_model_dir, labelled_parquet, tmp_path):
    from saft_gx.cli import cli

    data, labels = labelled_parquet
    out = tmp_path / "det"
    r = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(labels), "-o", str(out), "--model",
                                 str(tiny_model_dir), "--layers", "all", "--stack", "none", "--variants",
                                 "saft,direct,probe", "--ks", "1,2,4", "--target-fpr", "0.2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "detector.json").read_text())
    cal = meta["calibration"]
    assert meta["layer"] in (1, 2, 3, 4) and meta["k"] in (1, 2, 4) and meta["threshold"] is not None
    assert set(cal["auroc_by_layer"][meta["token"]]) == {"1", "2", "3", "4"}  # every layer, one forward pass
    assert cal["labelled_rows"] == 13 and cal["labelled_harmful"] == 4 and "false-positive rate" in cal["threshold_rule"]
    assert f"layer {meta['layer']}" in r.output
    # the cache holds every layer: a second calibration embeds nothing
    # the cache holds every layer: a second calibration, with the defaults (the stack of layers 2 and 3 of this
    # 4-layer model, probe-fused), embeds nothing
    r2 = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(labels), "-o", str(tmp_path / "det2"),
                                  "--model", str(tiny_model_dir)], catch_exceptions=False)
    assert r2.exit_code == 0 and "0 embedded" in r2.output
    assert "candidates: 0 single layer(s) + stack 2+3 x probe-fused" in r2.output
    meta2 = json.loads((tmp_path / "det2" / "detector.json").read_text())
    assert meta2["layers"] == [2, 3] and meta2["variant"] == "probe-fused"
    # ... and `score --detector` uses the calibrated layer and τ
    scored = tmp_path / "scored.parquet"
    r3 = CliRunner().invoke(cli, ["score", str(data), "--detector", str(out), "--no-db", "--out", str(scored), "--model",
                                  str(tiny_model_dir)], catch_exceptions=False)
    assert r3.exit_code == 0, r3.output
    df = pd.read_parquet(scored)
    assert (df["harm_flag"] == (df["harm_score"] > meta["threshold"])).all()
    assert f"layer {meta['layer']}" in r3.output


def test_cli_calibrate_label_errors_are_one_line(tiny_model_dir, labelled_parquet, tmp_path):
    from saft_gx.cli import cli

    data, _ = labelled_parquet
    lab = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["x1", "nope"], "label": [0, 1]}).to_csv(lab, index=False)
    r = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(lab), "-o", str(tmp_path / "d"), "--model",
                                 str(tiny_model_dir)])
    assert r.exit_code == 1 and "not found" in r.output and "Traceback" not in r.output


def test_probe_full_reads_harm_outside_the_top_k_subspace():
    """Harm along a low-variance dimension that no top-k direction reaches: only the full-space probe, fitted on
    the user's rows alone, finds it — and calibrate's search chooses it by out-of-fold AUROC."""
    rng = np.random.default_rng(3)
    n, d = 600, 40
    y = (rng.random(n) < 0.2).astype(np.int8)
    x = rng.normal(size=(n, d)) * np.r_[np.full(8, 6.0), np.full(d - 8, 0.5)]
    x[:, 20] += 1.6 * y  # 3.2 of its own standard deviations, far below the top-8 directions' variance
    lab = rng.choice(n, 100, replace=False)
    rest = np.setdiff1d(np.arange(n), lab)
    stats = {("last", 1): MomentStats(d).update(x)}
    xa = rng.normal(size=(60, d))  # anchors that know nothing of dimension 20: the full probe must ignore them
    ya = np.r_[np.ones(30), np.zeros(30)].astype(np.int8)
    cal = calibrate(stats, {("last", 1): x[lab]}, y[lab], anchors={("last", 1): xa}, anchor_labels=ya, ks=(2, 8),
                    variants=("probe", "probe-full"))
    assert cal.chosen.variant == "probe-full" and cal.chosen.k == d
    det = cal.detector
    assert det.k == 1 and det.link == "logistic" and np.abs(det.components[0]).argmax() == 20
    assert auroc(det.score(x[rest]), y[rest]) > 0.85  # measured 0.90 (the dimension alone: 0.99)
    sub = fit_variant(Detector.fit(stats[("last", 1)], k=8), "probe", 8, x[lab], y[lab])
    assert auroc(sub.score(x[rest]), y[rest]) < 0.7


def test_a_stack_of_layers_reads_harm_split_across_layers():
    """Harm shows weakly at layer 1 along one dimension and at layer 2 along another: each layer alone separates
    the classes only partly, the two read side by side (a stack) separate them better — and the search picks the
    stack, recording both layers for `score --detector`."""
    rng = np.random.default_rng(5)
    n, d = 600, 12
    y = (rng.random(n) < 0.2).astype(np.int8)
    xs = {1: rng.normal(size=(n, d)), 2: rng.normal(size=(n, d))}
    xs[1][:, 3] += 1.3 * y
    xs[2][:, 7] += 1.3 * y
    xs[(1, 2)] = np.hstack([xs[1], xs[2]])
    lab = rng.choice(n, 150, replace=False)
    rest = np.setdiff1d(np.arange(n), lab)
    stats = {("last", key): MomentStats(x.shape[1]).update(x) for key, x in xs.items()}
    cal = calibrate(stats, {("last", key): x[lab] for key, x in xs.items()}, y[lab], variants=("probe-full",),
                    meta={"layers": [9, 9]})  # a stale "layers" in the session's meta is replaced
    assert cal.chosen.layer == (1, 2)
    det = cal.detector
    assert det.dim == 2 * d and det.meta["layer"] == 2 and det.meta["layers"] == [1, 2]
    stacked = auroc(det.score(xs[(1, 2)][rest]), y[rest])
    single = max(cal.by_layer()["last"].values())
    assert stacked > 0.85 and single < 0.8  # measured 0.91 held out; best single layer 0.77 out of fold
    assert set(cal.summary()["auroc_by_stack"]) == {"last 1+2"}


def test_probe_fused_blends_the_default_detectors_direction_with_the_labels():
    """With few labels the full probe is noisy; a prior direction (the default detector's, fitted without labels)
    steadies it. The blend is one direction: 0.25·z(prior) + 0.75·z(probe-full), z in the data's standard deviations."""
    rng = np.random.default_rng(8)
    n, d = 800, 60
    y = (rng.random(n) < 0.15).astype(np.int8)
    x = rng.normal(size=(n, d))
    x[:, 0] += 2.0 * y
    prior = np.zeros(d)
    prior[0], prior[1] = 1.0, 0.5  # knows the harmful dimension, with an error
    lab = rng.choice(n, 60, replace=False)
    rest = np.setdiff1d(np.arange(n), lab)
    st = MomentStats(d).update(x)
    base = Detector.fit(st, k=4)
    fused = fit_variant(base, "probe-fused", d, x[lab], y[lab], prior=prior, data_cov=st.covariance())
    full = fit_variant(base, "probe-full", d, x[lab], y[lab])
    assert auroc(fused.score(x[rest]), y[rest]) > auroc(full.score(x[rest]), y[rest]) + 0.05  # measured 0.77 vs 0.68

    def z(s):
        return (s - s.mean()) / s.std()

    logit = np.log(full.score(x)) - np.log1p(-full.score(x))
    np.testing.assert_allclose(fused.score(x), 0.25 * z(x @ prior) + 0.75 * z(logit), atol=1e-6)
    with pytest.raises(SaftError, match="default detector's direction"):
        fit_variant(base, "probe-fused", d, x[lab], y[lab])


def test_cli_calibrate_stack_is_scored_from_both_layers(tiny_model_dir, labelled_parquet, tmp_path):
    """`calibrate --stack 2,3,4`: the detector reads layers 2, 3 and 4 side by side; `score --detector` and the in-memory
    path (GX) read the same two layers from the cache and agree."""
    from saft_gx.cli import cli
    from saft_gx.pipeline import EmbedOptions, score_frame

    data, labels = labelled_parquet
    out = tmp_path / "det"
    # layer 4 alone has no prior (the default detector reads layers 2+3), so the stack is the only candidate
    r = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(labels), "-o", str(out), "--model",
                                 str(tiny_model_dir), "--layers", "4", "--stack", "2,3,4", "--variants", "probe-fused"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "stack 2+3+4" in r.output and "chosen: layer 2+3+4" in r.output
    meta = json.loads((out / "detector.json").read_text())
    assert meta["layers"] == [2, 3, 4] and meta["layer"] == 4 and meta["dim"] == 96 and meta["variant"] == "probe-fused"
    assert "subspace_layer" not in meta  # the default detector's; a calibrated one reads every layer it names
    scored = tmp_path / "scored.parquet"
    r2 = CliRunner().invoke(cli, ["score", str(data), "--detector", str(out), "--no-db", "--out", str(scored),
                                  "--model", str(tiny_model_dir)], catch_exceptions=False)
    assert r2.exit_code == 0 and "0 embedded" in r2.output and "layers 2+3+4, token" in r2.output, r2.output
    df = pd.read_parquet(scored)
    det = Detector.load(out)
    again, _ = score_frame(df[["prompt", "response"]], detector=det, opts=EmbedOptions(model=str(tiny_model_dir)))
    np.testing.assert_allclose(again, df["harm_score"], rtol=1e-9)
    assert df["harm_score"].std() > 0
    rep = tmp_path / "rep"
    r4 = CliRunner().invoke(cli, ["report", "--scored", str(scored), "--labels", str(labels), "--detector", str(out),
                                  "-o", str(rep)], catch_exceptions=False)
    assert r4.exit_code == 0, r4.output
    assert "reads layers 2+3+4 side by side" in (rep / "index.html").read_text()
    r5 = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(labels), "-o", str(tmp_path / "plain"),
                                  "--model", str(tiny_model_dir), "--no-anchors"], catch_exceptions=False)
    assert r5.exit_code == 0 and "stack 2+3 x probe-full" in r5.output, r5.output  # no anchors: nothing to blend
    bad = tmp_path / "bad"
    r3 = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(labels), "-o", str(bad), "--model",
                                  str(tiny_model_dir), "--stack", "3"])
    assert r3.exit_code == 1 and "at least two layers" in r3.output


def test_prior_in_places_the_default_direction_block_by_block():
    """probe-fused's prior (the default detector's direction, over its own layers) in a candidate's space: each
    layer's block where the candidate reads it, zeros elsewhere; no prior for a candidate missing one of them."""
    w = np.arange(1.0, 7.0)  # layers 2 and 3, three dimensions each
    np.testing.assert_array_equal(prior_in((2, 3), w, (2, 3)), w)
    np.testing.assert_array_equal(prior_in((1, 2, 3), w, (2, 3)), np.r_[np.zeros(3), w])
    np.testing.assert_array_equal(prior_in((3, 2), w, (2, 3)), np.r_[w[3:], w[:3]])
    assert prior_in(2, w, (2, 3)) is None and prior_in((2, 4), w, (2, 3)) is None
    np.testing.assert_array_equal(prior_in((2, 4), w[:3], 2), np.r_[w[:3], np.zeros(3)])
