"""saft-gx filter: counts, τ, manifest, atomic output folder, DuckDB source, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx.train import splits
from saft_gx.io import store
from saft_gx.cli import cli
from saft_gx.core.errors import SaftError
from saft_gx.core.threshold import ThresholdRule


def _scored(tmp_path, n=10, detector="det-a", name="scored.parquet"):
    df = pd.DataFrame({
        "prompt": [f"question {i}" for i in range(n)],
        "response": [f"answer {i}" for i in range(n)],
        "row_id": np.arange(n, dtype=np.int64),
        "text_sha256": [f"{i:064x}" for i in range(n)],
        "harm_score": np.arange(n, dtype=np.float64)[::-1].copy(),  # row 0 has the highest score
        "harm_flag": [i < 2 for i in range(n)],  # as stored at scoring time: the top 2
        "detector_id": [detector] * n,
    })
    path = tmp_path / name
    df.to_parquet(path)
    return path, df


def test_remove_fraction_counts_and_manifest(tmp_path):
    src, df = _scored(tmp_path)
    out = tmp_path / "split"
    r = splits.filter_scored(src, out, rule=ThresholdRule("remove_fraction", 0.3))
    kept, removed = pd.read_parquet(out / "kept.parquet"), pd.read_parquet(out / "removed.parquet")
    assert (r.kept, r.removed) == (7, 3)
    assert sorted(removed.row_id) == [0, 1, 2]  # the three highest scores
    assert sorted(kept.row_id) == list(range(3, 10))
    assert not kept.harm_flag.any() and removed.harm_flag.all()
    assert removed.removal_reason.iloc[0] == "harm_score 9 > τ 6"
    assert "removal_reason" not in kept.columns
    assert list(kept.columns) == list(df.columns)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rows"], m["kept"], m["removed"]) == (10, 7, 3)
    assert m["threshold"] == 6.0 and m["threshold_rule"] == "remove the top 30.0%"
    assert m["detector_id"] == "det-a"
    assert m["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["created_at"].startswith("20")
    assert m["files"]["kept.parquet"]["sha256"] == hashlib.sha256((out / "kept.parquet").read_bytes()).hexdigest()


def test_threshold_and_stored_flags(tmp_path):
    src, _ = _scored(tmp_path)
    r = splits.filter_scored(src, tmp_path / "a", rule=ThresholdRule("value", 4.5))
    assert (r.kept, r.removed, r.threshold) == (5, 5, 4.5)
    r = splits.filter_scored(src, tmp_path / "b")  # no rule: the stored harm_flag decides
    assert (r.kept, r.removed, r.threshold) == (8, 2, None)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["threshold_rule"] == "harm_flag as scored"


def test_nothing_removed_still_writes_an_empty_removed_split(tmp_path):
    src, _ = _scored(tmp_path)
    r = splits.filter_scored(src, tmp_path / "s", rule=ThresholdRule("value", 100.0))
    assert (r.kept, r.removed) == (10, 0)
    removed = pd.read_parquet(tmp_path / "s" / "removed.parquet")
    assert len(removed) == 0 and "removal_reason" in removed.columns


def test_refuses_to_overwrite_without_force(tmp_path):
    src, _ = _scored(tmp_path)
    out = tmp_path / "split"
    splits.filter_scored(src, out, rule=ThresholdRule("value", 4.5))
    with pytest.raises(SaftError, match="--force"):
        splits.filter_scored(src, out, rule=ThresholdRule("value", 1.5))
    assert json.loads((out / "manifest.json").read_text())["removed"] == 5  # untouched
    r = splits.filter_scored(src, out, rule=ThresholdRule("value", 1.5), force=True)
    assert r.removed == 8 and json.loads((out / "manifest.json").read_text())["removed"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.parquet", "split"]  # no temp folders left


def test_a_failure_half_way_leaves_nothing_half_written(tmp_path, monkeypatch):
    src, _ = _scored(tmp_path)
    out = tmp_path / "split"

    def boom(*_a, **_k):
        raise KeyboardInterrupt  # killed after kept/removed were written, before the manifest

    monkeypatch.setattr(splits, "_write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        splits.filter_scored(src, out, rule=ThresholdRule("value", 4.5))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.parquet"]

    monkeypatch.undo()
    splits.filter_scored(src, out, rule=ThresholdRule("value", 4.5))
    monkeypatch.setattr(splits, "_write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        splits.filter_scored(src, out, rule=ThresholdRule("value", 1.5), force=True)
    assert json.loads((out / "manifest.json").read_text())["removed"] == 5  # the old split, whole
    assert len(pd.read_parquet(out / "removed.parquet")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.parquet", "split"]


def test_bad_input_gives_clear_errors(tmp_path):
    src, df = _scored(tmp_path)
    with pytest.raises(SaftError, match="all 10 rows would be removed"):
        splits.filter_scored(src, tmp_path / "x", rule=ThresholdRule("remove_fraction", 1.0))
    assert not (tmp_path / "x").exists()
    bare = tmp_path / "bare.parquet"
    df.drop(columns=["harm_score"]).to_parquet(bare)
    with pytest.raises(SaftError, match="missing column.*harm_score.*saft-gx score"):
        splits.filter_scored(bare, tmp_path / "y")
    with pytest.raises(SaftError, match="no such file"):
        splits.filter_scored(tmp_path / "nope.parquet", tmp_path / "y")
    with pytest.raises(SaftError, match="holds the source"):
        splits.filter_scored(src, tmp_path, rule=ThresholdRule("value", 4.5), force=True)
    with pytest.raises(SaftError, match="not both"):
        splits.filter_scored(src, tmp_path / "z", db=tmp_path / "d.duckdb", table="t")


def test_several_detectors_need_a_choice(tmp_path):
    _, a = _scored(tmp_path, detector="det-a", name="a.parquet")
    _, b = _scored(tmp_path, detector="det-b", name="b.parquet")
    both = tmp_path / "both.parquet"
    pd.concat([a, b.assign(harm_score=b.harm_score + 100)]).to_parquet(both)
    with pytest.raises(SaftError, match="2 detectors.*--detector-id"):
        splits.filter_scored(both, tmp_path / "s")
    r = splits.filter_scored(both, tmp_path / "s", detector_id="det-b", rule=ThresholdRule("value", 104.5))
    assert (r.rows, r.removed) == (10, 5)
    assert set(pd.read_parquet(tmp_path / "s" / "kept.parquet").detector_id) == {"det-b"}


def test_from_duckdb_table(tmp_path):
    src, _ = _scored(tmp_path)
    db = tmp_path / "s.duckdb"
    store.store_scored_parquet(db, "toy", src, detector_id="det-a", run={
        "source": "/data/toy.jsonl", "source_sha256": "ab" * 32, "rows": 10, "flagged": 2, "threshold": 7.5,
        "threshold_rule": "contamination 20.0%"})
    r = splits.filter_scored(None, tmp_path / "s", db=db, table="toy")  # stored flags and τ
    assert (r.kept, r.removed, r.threshold) == (8, 2, 7.5)
    m = r.manifest
    assert m["source"]["sha256"] == "ab" * 32 and m["source"]["scored_dataset"] == "/data/toy.jsonl"
    assert m["threshold_rule"] == "contamination 20.0% (as scored)"
    r = splits.filter_scored(None, tmp_path / "s2", db=db, table="toy", rule=ThresholdRule("remove_fraction", 0.5))
    assert sorted(pd.read_parquet(tmp_path / "s2" / "removed.parquet").row_id) == [0, 1, 2, 3, 4]
    with pytest.raises(SaftError, match="no table 'nope'.*toy"):
        splits.filter_scored(None, tmp_path / "s3", db=db, table="nope")


def test_cli_filter(tmp_path):
    src, _ = _scored(tmp_path)
    out = tmp_path / "split"
    runner = CliRunner()
    res = runner.invoke(cli, ["filter", str(src), "--out-dir", str(out), "--contamination", "0.2"])
    assert res.exit_code == 0, res.output
    assert "kept 8, removed 2 (20.0%)" in res.output
    res = runner.invoke(cli, ["filter", str(src), "--out-dir", str(out), "--threshold", "1"])
    assert res.exit_code == 1 and "pass --force" in res.output
    res = runner.invoke(cli, ["filter", str(src), "--out-dir", str(out), "--threshold", "1", "--contamination", "0.2"])
    assert res.exit_code == 1 and "only one of" in res.output
