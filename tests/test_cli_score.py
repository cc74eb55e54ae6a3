"""`saft-gx fit / score / query` end to end on real files, with the tiny model."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from saft_gx.core import defaults
from saft_gx import pipeline
from saft_gx.cli import cli

SAFT_COLUMNS = ["row_id", "text_sha256", "harm_score", "harm_flag", "detector_id"]


@pytest.fixture
def run(tiny_model_dir):
    def _run(*args, model=True):
        # plain SAFT: the built-in anchors (tests/test_anchors.py) would orient a random model's directions at random
        extra = ["--model", str(tiny_model_dir), "--no-anchors"] if model and args[0] in ("score", "fit") else []
        return CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)

    return _run


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_score_writes_parquet_and_duckdb(run, toy_parquet, tmp_path):
    db, out = tmp_path / "s.duckdb", tmp_path / "scored.parquet"
    r = run("score", str(toy_parquet), "--db", str(db), "--out", str(out), "--remove-fraction", "0.25", "--layer", "2")
    assert r.exit_code == 0, r.output
    assert "scored 12 rows" in r.output and "12 embedded, 0 from cache" in r.output
    df = pd.read_parquet(out)
    assert list(df.columns) == ["prompt", "response", "source", *SAFT_COLUMNS]
    assert df["row_id"].tolist() == list(range(12))
    assert df["harm_flag"].sum() == 3
    assert df["harm_score"].notna().all() and df["detector_id"].nunique() == 1
    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("select * from toy order by row_id").df()
    pd.testing.assert_frame_equal(stored[df.columns.tolist()], df, check_dtype=False)
    assert con.execute("select count(*) from saft_runs").fetchone()[0] == 1


def test_rescore_replaces_rows_and_hits_cache(run, toy_parquet, tmp_path):
    db = tmp_path / "s.duckdb"
    assert run("score", str(toy_parquet), "--db", str(db)).exit_code == 0
    r = run("score", str(toy_parquet), "--db", str(db))
    assert r.exit_code == 0 and "0 embedded, 12 from cache" in r.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("select count(*), count(distinct row_id) from toy").fetchone() == (12, 12)
    assert con.execute("select count(*) from saft_runs").fetchone()[0] == 2
    con.close()
    # the same detector with another threshold replaces its rows (τ is not part of detector_id) ...
    assert run("score", str(toy_parquet), "--db", str(db), "--threshold", "0").exit_code == 0
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("select count(distinct detector_id), count(*), count(*) filter (harm_flag) from toy"
                       ).fetchone() == (1, 12, 12)
    con.close()
    # ... another detector (other k) adds its own rows, keyed by detector_id
    assert run("score", str(toy_parquet), "--db", str(db), "--k", "2").exit_code == 0
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("select count(distinct detector_id), count(*) from toy").fetchone() == (2, 24)


def test_cache_hit_means_zero_model_calls(tiny_model_dir, toy_parquet, tmp_path):
    opts = pipeline.EmbedOptions(model=str(tiny_model_dir))
    s1 = pipeline.Session(opts)
    pipeline.score_file(toy_parquet, tmp_path / "a.parquet", opts=opts, columns=pipeline.ColumnOptions(), session=s1)
    assert s1.embedder.rows_embedded == 12
    s2 = pipeline.Session(opts)
    r = pipeline.score_file(toy_parquet, tmp_path / "b.parquet", opts=opts, columns=pipeline.ColumnOptions(), session=s2)
    assert s2.embedder.forward_calls == 0 and r.embed.computed == 0
    assert pd.read_parquet(tmp_path / "a.parquet").equals(pd.read_parquet(tmp_path / "b.parquet"))


def test_fit_then_score_other_file_with_detector(run, toy_parquet, tmp_path):
    det = tmp_path / "det"
    r = run("fit", str(toy_parquet), "-o", str(det), "--k", "2", "--contamination", "0.2")
    assert r.exit_code == 0, r.output
    meta = json.loads((det / "detector.json").read_text())
    assert meta["k"] == 2 and meta["n"] == 12 and meta["threshold"] is not None
    assert meta["layer"] == defaults.layer_for(4, anchors=False)  # this test runs plain SAFT (--no-anchors)
    other = tmp_path / "other.parquet"
    pd.read_parquet(toy_parquet).iloc[:5].to_parquet(other)
    out = tmp_path / "o.parquet"
    r = run("score", str(other), "--detector", str(det), "--no-db", "--out", str(out), model=False)
    assert r.exit_code == 0, r.output
    assert "5 rows" in r.output and "from the detector" in r.output
    scored = pd.read_parquet(out)
    assert (scored["harm_flag"] == (scored["harm_score"] > meta["threshold"])).all()


def test_detector_from_another_model_is_refused(run, toy_parquet, tmp_path, tiny_model_dir):
    det = tmp_path / "det"
    assert run("fit", str(toy_parquet), "-o", str(det)).exit_code == 0
    meta = json.loads((det / "detector.json").read_text())
    meta["model_fingerprint"] = "0" * 64
    (det / "detector.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(cli, ["score", str(toy_parquet), "--detector", str(det), "--model", str(tiny_model_dir)])
    assert r.exit_code == 1 and "was fitted on model" in r.output


@pytest.mark.parametrize("key", ["layer", "token"])
def test_detector_at_another_layer_or_token_is_refused(run, toy_parquet, tmp_path, tiny_model_dir, key):
    """The fingerprint is left valid, so only the layer (or token) check can refuse: removing it fails this."""
    det = tmp_path / "det"
    assert run("fit", str(toy_parquet), "-o", str(det)).exit_code == 0
    meta = json.loads((det / "detector.json").read_text())
    other = str(meta["layer"] % 4 + 1) if key == "layer" else ("last" if meta["token"] != "last" else "mean")
    args = ["score", str(toy_parquet), "--detector", str(det), "--model", str(tiny_model_dir), "--no-db",
            "--out", str(tmp_path / "o.parquet")]
    assert CliRunner().invoke(cli, args).exit_code == 0  # the same detector, unchanged options: accepted
    r = CliRunner().invoke(cli, [*args, f"--{key}", other])
    assert r.exit_code == 1 and f"the detector was fitted at {key} {meta[key]}" in r.output, r.output


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_other_formats(run, toy_parquet, tmp_path, fmt):
    df = pd.read_parquet(toy_parquet)
    path = tmp_path / f"t.{fmt}"
    df.to_json(path, orient="records", lines=True) if fmt == "jsonl" else df.to_csv(path, index=False)
    out = tmp_path / "o.parquet"
    r = run("score", str(path), "--no-db", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert len(pd.read_parquet(out)) == 12


def test_messages_and_text_columns(run, tmp_path):
    msgs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(6)]
    p = tmp_path / "m.parquet"
    pd.DataFrame({"messages": msgs}).to_parquet(p)
    assert run("score", str(p), "--no-db", "--out", str(tmp_path / "m_out.parquet")).exit_code == 0
    p = tmp_path / "t.parquet"
    pd.DataFrame({"text": [f"plain text {i}" for i in range(6)]}).to_parquet(p)
    assert run("score", str(p), "--no-db", "--out", str(tmp_path / "t_out.parquet")).exit_code == 0


def test_query_read_only_formats(run, toy_parquet, tmp_path):
    db = tmp_path / "s.duckdb"
    assert run("score", str(toy_parquet), "--db", str(db)).exit_code == 0
    r = run("query", "select harm_flag, count(*) as n from toy group by 1 order by 1", "--db", str(db), "--json")
    assert json.loads(r.output) == [{"harm_flag": False, "n": 11}, {"harm_flag": True, "n": 1}]
    r = run("query", "select count(*) as n from toy", "--db", str(db), "--csv")
    assert r.output == "n\n12\n"
    r = run("query", "select count(*) as n from toy", "--db", str(db))
    assert r.output.split() == ["n", "12"]
    r = CliRunner().invoke(cli, ["query", "delete from toy", "--db", str(db)])
    assert r.exit_code == 1 and "read-only" in r.output.lower()


# ---- bad input: one clear line, non-zero exit, nothing existing touched ----

def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    def pq_file(name, df):
        p = tmp_path / name
        df.to_parquet(p)
        return p

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    return {
        "missing file": (tmp_path / "nope.parquet", [], "no such file"),
        "broken parquet": (broken, [], "not a readable parquet file"),
        "missing columns": (pq_file("a.parquet", pd.DataFrame({"x": ["a"], "y": ["b"]})), [], "no row columns found"),
        "ambiguous": (pq_file("b.parquet", pd.DataFrame({"prompt": ["a"], "question": ["a"], "response": ["b"]})), [],
                      "ambiguous prompt column"),
        "null cell": (pq_file("c.parquet", pd.DataFrame({"prompt": ["a", None], "response": ["b", "c"]})), [],
                      "row 1: column 'prompt' is null"),
        "wrong type": (pq_file("d.parquet", pd.DataFrame({"prompt": ["a", "b"], "response": [1, 2]})), [],
                       "column 'response' has type int64, expected text"),
        "empty text": (pq_file("e.parquet", pd.DataFrame({"prompt": ["a", "b"], "response": ["b", ""]})), [],
                       "row 1: column 'response' is empty"),
        "overlong, refused on request": (pq_file("f.parquet", pd.DataFrame({"prompt": ["a", "long " * 1500],
                                                                          "response": ["b", "c"]})),
                                         ["--overlong", "error"], "row 1: its prompt is .* tokens, over --max-tokens 1024"),
        "bad layer": (pq_file("g.parquet", pd.DataFrame({"prompt": ["a", "b"], "response": ["b", "c"]})),
                      ["--layer", "9"], "this model has layers 1..4"),
        "missing override": (pq_file("h.parquet", pd.DataFrame({"prompt": ["a"], "response": ["b"]})),
                             ["--prompt-column", "q"], "column 'q' not found"),
    }


def test_bad_inputs_fail_cleanly_and_touch_nothing(tiny_model_dir, toy_parquet, tmp_path):
    import re

    db, out = tmp_path / "keep.duckdb", tmp_path / "keep.parquet"
    runner = CliRunner()
    ok = runner.invoke(cli, ["score", str(toy_parquet), "--db", str(db), "--out", str(out), "--model", str(tiny_model_dir)])
    assert ok.exit_code == 0
    before = (_sha(db), _sha(out))
    for name, (path, extra, msg) in _bad_inputs(tmp_path).items():
        r = runner.invoke(cli, ["score", str(path), "--db", str(db), "--out", str(out), "--table", "toy",
                                "--model", str(tiny_model_dir), *extra])
        assert r.exit_code == 1, (name, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, r.output)
        assert re.search(msg, lines[0]), (name, lines[0])
        assert "Traceback" not in r.output
        assert (_sha(db), _sha(out)) == before, name


def test_long_real_rows_are_truncated_by_default_and_recorded(tiny_model_dir, tmp_path):
    """Real chat rows exceed any cap: by default they are cut (a one-line notice counts them) and the run
    finishes; the choice is recorded in the detector."""
    rows = pd.DataFrame({"prompt": ["short question", "long " * 1500, "another question", "x " * 900],
                         "response": ["a", "b", "long answer " * 800, "d"]})
    path = tmp_path / "long.parquet"
    rows.to_parquet(path)
    r = CliRunner().invoke(cli, ["score", str(path), "--no-db", "--out", str(tmp_path / "o.parquet"), "--model",
                                 str(tiny_model_dir), "--save-detector", str(tmp_path / "det"), "--max-tokens", "256"])
    assert r.exit_code == 0, r.output
    # prompt-end (the default) runs prompts only: the long answer of row 2 is never embedded, two prompts are cut
    assert "note: 2 rows were over --max-tokens 256 and were truncated (prompts lost their middle" in r.output
    meta = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert (meta["overlong"], meta["max_tokens"], meta["token"]) == ("truncate", 256, "prompt-end")
    assert len(pd.read_parquet(tmp_path / "o.parquet")) == 4


def test_table_with_another_schema(run, toy_parquet, tmp_path):
    db = tmp_path / "s.duckdb"
    con = duckdb.connect(str(db))
    con.execute("create table toy (a int)")
    con.close()
    r = run("score", str(toy_parquet), "--db", str(db))
    assert r.exit_code == 1 and "exists with another schema" in r.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("select count(*) from toy").fetchone()[0] == 0
    assert not con.execute("select count(*) from information_schema.tables where table_name='saft_runs'").fetchone()[0]


def test_real_subprocess(tiny_model_dir, toy_parquet, tmp_path):
    exe = Path(sys.executable).with_name("saft-gx")
    out = tmp_path / "o.parquet"
    p = subprocess.run([str(exe), "score", str(toy_parquet), "--model", str(tiny_model_dir), "--db",
                        str(tmp_path / "x.duckdb"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert pq.read_metadata(out).num_rows == 12
    bad = subprocess.run([str(exe), "score", str(tmp_path / "missing.parquet")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == f"Error: {tmp_path / 'missing.parquet'}: no such file"


def test_duckdb_load_runs_under_a_memory_limit(tmp_path, monkeypatch):
    """DuckDB keeps written blocks until its memory limit (default 80 % of RAM), so an unbounded load grows
    with the row count; the load connection is capped (SAFT_GX_DUCKDB_MEMORY_LIMIT) and the data still lands."""
    import pandas as pd

    from saft_gx.io import store

    seen = []
    real_connect = store.connect

    def spy(*args, **kwargs):
        con = real_connect(*args, **kwargs)
        seen.append(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        return con

    monkeypatch.setattr(store, "connect", spy)
    monkeypatch.setattr(store, "LOAD_MEMORY_LIMIT", "48MB")
    src = tmp_path / "scored.parquet"
    pd.DataFrame({"row_id": range(5000), "text": ["x" * 200] * 5000, "detector_id": "d"}).to_parquet(src)
    assert store.store_scored_parquet(tmp_path / "s.duckdb", "t", src, detector_id="d", run={}) == 5000
    assert seen and seen[0].startswith("4") and "MiB" in seen[0]  # 48 MB = 45.7 MiB, DuckDB's notation


@pytest.mark.parametrize("scored_rows", [8, 14])
def test_input_that_changed_between_passes_is_refused(toy_parquet, tmp_path, scored_rows):
    """Pass 3 re-reads the input; if it now has more or fewer rows than pass 2 scored, nothing is written."""
    import tempfile

    import numpy as np

    from saft_gx.core.errors import SaftError
    from saft_gx.pipeline import write_scored
    from saft_gx.io.readers import open_dataset

    out = tmp_path / "scored.parquet"
    with tempfile.TemporaryFile() as digests:
        digests.write(bytes(32 * scored_rows))
        with pytest.raises(SaftError, match="changed while it was being scored"):
            write_scored(open_dataset(toy_parquet), out, np.zeros(scored_rows), np.zeros(scored_rows, bool), digests, "d")
    assert not out.exists() and list(tmp_path.glob(".scored.parquet.*")) == []
