"""`--shard i/n`: n machines split one dataset, their statistics merge into one detector, their scores into
one table — and the result equals an unsharded run."""

import json

import duckdb
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx.detect.anchors import anchor_rows
from saft_gx.cli import cli
from saft_gx.core.errors import SaftError
from saft_gx.io.readers import open_dataset
from saft_gx.shards import Shard, load_stats, shard_dataset
from saft_gx.core.subspace import Detector

N = 30


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(1)
    words = np.array("alpha beta gamma delta river stone cloud paper music table window garden".split())
    df = pd.DataFrame({
        "prompt": [" ".join(rng.choice(words, 2 + i % 5)) + f" #{i}" for i in range(N)],
        "response": [" ".join(rng.choice(words, 3 + i % 7)) for i in range(N)],
        "n": np.arange(N, dtype=np.int32),
    })
    path = tmp_path / "rows.parquet"
    df.to_parquet(path, row_group_size=7)
    return path


@pytest.fixture
def run(tiny_model_dir):
    def _run(*args):
        extra = ["--model", str(tiny_model_dir), "--layer", "2"] if args[0] in ("fit", "score") else []
        return CliRunner().invoke(cli, [*map(str, args), *extra], catch_exceptions=False)

    return _run


def test_shard_bounds_cover_every_row_once():
    for total in (0, 1, 7, 30, 1001):
        for n in (1, 2, 3, 7, 8):
            ranges = [Shard(i, n).bounds(total) for i in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_specs(text):
    with pytest.raises(SaftError, match="--shard"):
        Shard.parse(text)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_sharded_frames_keep_global_row_ids(data, tmp_path, fmt):
    path = data
    if fmt == "jsonl":
        path = tmp_path / "rows.jsonl"
        pd.read_parquet(data).to_json(path, orient="records", lines=True)
    full = pd.read_parquet(data)
    seen = []
    for i in range(4):
        ds = shard_dataset(open_dataset(path), Shard(i, 4))
        lo, hi = Shard(i, 4).bounds(N)
        assert (ds.start, ds.stop, ds.num_rows) == (lo, hi, hi - lo)
        for first, df in ds.frames(["prompt", "n"], batch_rows=4):  # batches straddle row groups and shards
            assert df["n"].tolist() == list(range(first, first + len(df)))
            seen.extend(df["n"].tolist())
        batches = list(ds.arrow_batches(batch_rows=5))
        assert sum(b.num_rows for b in batches) == hi - lo
        assert batches[0].column("prompt")[0].as_py() == full["prompt"][lo]
    assert seen == list(range(N))


def test_sharded_fit_merge_score_equals_unsharded_run(run, data, tmp_path):
    n = 3
    for i in range(n):
        r = run("fit", data, "--shard", f"{i}/{n}", "--stats-out", tmp_path / f"stats_{i}")
        assert r.exit_code == 0, r.output
        lo, hi = Shard(i, n).bounds(N)
        assert f"rows {lo}..{hi - 1} (shard {i}/{n})" in r.output
        stats, meta, anchors = load_stats(tmp_path / f"stats_{i}")
        assert stats.n == hi - lo and meta["shard"] == f"{i}/{n}" and meta["layer"] == 2 and anchors.shape == (len(anchor_rows()[1]), 32)
    assert not list(tmp_path.glob("stats_0/*.pkl"))
    r = run("merge-stats", *[tmp_path / f"stats_{i}" for i in range(n)], "-o", tmp_path / "det", "--threshold", "0.5")
    assert r.exit_code == 0, r.output
    assert f"({N} rows)" in r.output
    merged = Detector.load(tmp_path / "det")

    r = run("fit", data, "-o", tmp_path / "full_det", "--threshold", "0.5")
    assert r.exit_code == 0, r.output
    full = Detector.load(tmp_path / "full_det")
    np.testing.assert_allclose(merged.mean, full.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged.components, full.components, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(merged.singular_values, full.singular_values, rtol=1e-9)

    # each machine scores its shard from its cache, into one table; a re-run replaces only its own range
    db = tmp_path / "s.duckdb"
    for i in (0, 1, 2, 1):
        r = run("score", data, "--shard", f"{i}/{n}", "--detector", tmp_path / "det", "--db", db, "--table", "rows")
        assert r.exit_code == 0, r.output
        assert "0 embedded" in r.output and "τ from this shard" not in r.output
    r = run("score", data, "--detector", tmp_path / "det", "--no-db", "--out", tmp_path / "whole.parquet")
    assert r.exit_code == 0, r.output
    whole = pd.read_parquet(tmp_path / "whole.parquet")
    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("select * from rows order by row_id").df()
    assert con.execute("select count(*), count(distinct row_id), count(distinct detector_id) from rows").fetchone() == (N, N, 1)
    assert stored["row_id"].tolist() == list(range(N)) and stored["n"].tolist() == list(range(N))
    assert stored["text_sha256"].tolist() == whole["text_sha256"].tolist()
    np.testing.assert_allclose(stored["harm_score"], whole["harm_score"], rtol=1e-9)
    assert stored["detector_id"][0] == whole["detector_id"][0] == merged.detector_id


def test_merge_refuses_mismatched_duplicate_or_missing_shards(run, data, tmp_path):
    assert run("fit", data, "--shard", "0/2", "--stats-out", tmp_path / "a").exit_code == 0
    assert run("fit", data, "--shard", "1/2", "--stats-out", tmp_path / "b").exit_code == 0
    r = run("merge-stats", tmp_path / "a", "-o", tmp_path / "d")
    assert r.exit_code == 1 and "shards 1/2 are missing" in r.output
    assert run("merge-stats", tmp_path / "a", "--partial", "-o", tmp_path / "d").exit_code == 0
    r = run("merge-stats", tmp_path / "a", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "d")
    assert r.exit_code == 1 and "count its rows twice" in r.output
    meta = json.loads((tmp_path / "b" / "stats.json").read_text())
    meta["layer"] = 3
    (tmp_path / "b" / "stats.json").write_text(json.dumps(meta))
    r = run("merge-stats", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "d")
    assert r.exit_code == 1 and "embedded differently (layer 3 vs 2)" in r.output


def test_shard_errors_name_global_row_ids(run, data, tmp_path):
    df = pd.read_parquet(data)
    df.loc[23, "response"] = None
    bad = tmp_path / "bad.parquet"
    df.to_parquet(bad, row_group_size=7)
    r = run("fit", bad, "--shard", "2/3", "--stats-out", tmp_path / "s")
    assert r.exit_code == 1 and "row 23:" in r.output
    r = run("fit", bad, "--shard", "0/3", "--stats-out", tmp_path / "s")
    assert r.exit_code == 0
    r = run("fit", data, "--shard", "3/3", "--stats-out", tmp_path / "s")
    assert r.exit_code == 2 and "0 <= i < n" in r.output
    r = run("fit", data)
    assert r.exit_code == 1 and "--stats-out" in r.output
