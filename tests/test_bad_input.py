"""Adversarial and careless use of the real `saft-gx` console script (issue 12): each case runs as a
subprocess and must end in one line of error (or do the safe thing), with no traceback, and leave every
file that existed before byte-identical unless the case says it replaces it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd
import pytest

from saft_gx.io import store

EXE = Path(sys.executable).with_name("saft-gx")
ROWS = [("How do I bake bread?", "Mix flour, water and salt, then bake."),
        ("What is the capital of France?", "Paris."),
        ("Name a prime number.", "Seven."),
        ("Write a haiku.", "Leaves fall / the wind hums / cold night"),
        ("How many legs does a spider have?", "Eight."),
        ("Suggest a cat name.", "Pebble.")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[Path, str]:
    return {p: _sha(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _toy(path: Path, n: int = 12, **extra) -> Path:
    df = pd.DataFrame([ROWS[i % len(ROWS)] for i in range(n)], columns=["prompt", "response"])
    df["response"] = [r + f" ({i})" for i, r in enumerate(df["response"])]
    for k, v in extra.items():
        df[k] = v
    df.to_parquet(path)
    return path


def _scored_db(db: Path, table: str = "toy", n: int = 10) -> Path:
    """A scored table as `saft-gx score --db` writes it, without running a model."""
    src = db.parent / f".{table}-src.parquet"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(n)], "response": [f"r{i}" for i in range(n)],
                  "row_id": range(n), "text_sha256": ["0" * 64] * n, "harm_score": [float(i) for i in range(n)],
                  "harm_flag": [i >= n - 2 for i in range(n)], "detector_id": ["det"] * n}).to_parquet(src)
    store.store_scored_parquet(db, table, src, detector_id="det", run={"threshold": n - 2.5, "threshold_rule": "τ"})
    src.unlink()
    return db


@dataclass
class Case:
    """``setup(work, model)`` makes the files and returns the command's arguments (after ``saft-gx``)."""

    setup: Callable[[Path, str], list[str]]
    rc: int
    message: str  # in stderr when rc != 0, else in stdout
    changes: tuple[str, ...] = ()  # pre-existing files (relative to work) the case may replace
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    cwd: str = "."


def _score(*args: str) -> Callable[[Path, str], list[str]]:
    return lambda w, m: ["score", *[a.format(w=w) for a in args], "--model", m, "--no-anchors"]


# ---- the cases ----

def _out_is_db(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    _scored_db(w / "s.duckdb")
    return ["score", str(w / "toy.parquet"), "--db", str(w / "s.duckdb"), "--out", str(w / "s.duckdb"), "--model", m,
            "--no-anchors"]


def _out_is_db_through_dotdot_and_symlink(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    _scored_db(w / "s.duckdb")
    (w / "sub").mkdir()
    (w / "link.duckdb").symlink_to(w / "s.duckdb")
    return ["score", str(w / "toy.parquet"), "--db", str(w / "sub" / ".." / "s.duckdb"), "--out", str(w / "link.duckdb"),
            "--model", m, "--no-anchors"]


def _save_detector_over_db(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    (w / "det").mkdir()
    _scored_db(w / "det" / "detector.json")  # careless, but it is the user's database
    return ["score", str(w / "toy.parquet"), "--db", str(w / "det" / "detector.json"), "--save-detector", str(w / "det"),
            "--model", m, "--no-anchors"]


def _filter_out_dir_holds_db(w: Path, m: str) -> list[str]:
    _scored_db(w / "scores.duckdb")
    return ["filter", "--db", str(w / "scores.duckdb"), "--table", "toy", "--detector-id", "det", "--out-dir", str(w),
            "--force"]


def _filter_force_keeps_other_files(w: Path, m: str) -> list[str]:
    _scored_db(w / "scores.duckdb")
    (w / "split").mkdir()
    (w / "split" / "notes.txt").write_text("mine\n")
    (w / "split" / "kept.parquet").write_bytes(b"old split")
    return ["filter", "--db", str(w / "scores.duckdb"), "--table", "toy", "--out-dir", str(w / "split"), "--force"]


def _check_split(w: Path, p: subprocess.CompletedProcess) -> None:
    folder = w / "split" if (w / "split").exists() else w / "here"
    assert len(pd.read_parquet(folder / "kept.parquet")) == 8
    assert json.loads((folder / "manifest.json").read_text())["removed"] == 2


def _filter_out_dir_dot(w: Path, m: str) -> list[str]:
    _scored_db(w / "scores.duckdb")
    (w / "here").mkdir()
    (w / "here" / "notes.txt").write_text("mine\n")
    return ["filter", "--db", str(w / "scores.duckdb"), "--table", "toy", "--out-dir", ".", "--force"]


def _query(sql: str, *extra: str) -> Callable[[Path, str], list[str]]:
    def setup(w: Path, m: str) -> list[str]:
        _scored_db(w / "s.duckdb")
        _scored_db(w / "other.duckdb")
        (w / "x.csv").write_text("a,b\n1,2\n")
        return ["query", sql.format(w=w), "--db", str(w / "s.duckdb"), *extra]

    return setup


def _no_file(name: str) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(w: Path, p: subprocess.CompletedProcess) -> None:
        assert not (w / name).exists()

    return check


def _db_is_parquet(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    _toy(w / "scores.parquet")
    return ["score", str(w / "toy.parquet"), "--db", str(w / "scores.parquet"), "--model", m, "--no-anchors"]


def _reserved_column(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet", harm_score=[0.5] * 12)
    return ["score", str(w / "toy.parquet"), "--no-db", "--out", str(w / "o.parquet"), "--model", m, "--no-anchors"]


def _reserved_column_other_case(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet", Row_ID=list(range(12)))
    return ["score", str(w / "toy.parquet"), "--db", str(w / "s.duckdb"), "--model", m, "--no-anchors"]


N_LONG = 4200  # over the 4,096-row read chunk


def _csv_empty_until_late(w: Path, m: str) -> list[str]:
    df = pd.DataFrame([ROWS[i % len(ROWS)] for i in range(N_LONG)], columns=["prompt", "response"])
    df["note"] = [None] * 4100 + ["late"] * (N_LONG - 4100)
    df.to_csv(w / "long.csv", index=False)
    return ["score", str(w / "long.csv"), "--no-db", "--out", str(w / "o.parquet"), "--model", m, "--no-anchors"]


def _jsonl_int_then_float(w: Path, m: str) -> list[str]:
    with open(w / "long.jsonl", "w") as f:
        for i in range(N_LONG):
            p, r = ROWS[i % len(ROWS)]
            f.write(json.dumps({"prompt": p, "response": r, "n": i if i < 4096 else i + 0.5}) + "\n")
    return ["score", str(w / "long.jsonl"), "--no-db", "--out", str(w / "o.parquet"), "--model", m, "--no-anchors"]


def _check_long(column: str, value) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(w: Path, p: subprocess.CompletedProcess) -> None:
        df = pd.read_parquet(w / "o.parquet")
        assert len(df) == N_LONG and df[column].iloc[-1] == value

    return check


def _jsonl_int_then_text(w: Path, m: str) -> list[str]:
    with open(w / "long.jsonl", "w") as f:
        for i in range(N_LONG):
            p, r = ROWS[i % len(ROWS)]
            f.write(json.dumps({"prompt": p, "response": r, "n": i if i < 4096 else f"n{i}"}) + "\n")
    return ["score", str(w / "long.jsonl"), "--no-db", "--out", str(w / "o.parquet"), "--model", m, "--no-anchors"]


def _bad_jsonl_line_10(w: Path, m: str) -> list[str]:
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in ROWS * 2]
    lines[9] = '{"prompt": "broken", "response": '
    (w / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return ["score", str(w / "bad.jsonl"), "--no-db", "--out", str(w / "o.parquet"), "--model", m, "--no-anchors"]


def _rethreshold(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    first = subprocess.run([str(EXE), "score", str(w / "toy.parquet"), "--db", str(w / "s.duckdb"), "--model", m,
                            "--no-anchors", "--contamination", "0.1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    return ["score", str(w / "toy.parquet"), "--db", str(w / "s.duckdb"), "--model", m, "--no-anchors",
            "--contamination", "0.3"]


def _check_rethreshold(w: Path, p: subprocess.CompletedProcess) -> None:
    con = duckdb.connect(str(w / "s.duckdb"), read_only=True)
    try:  # one row per input row, flagged at the latest τ
        assert con.execute("select count(*), count(distinct row_id), count(*) filter (harm_flag) from toy"
                           ).fetchone() == (12, 12, 4)
    finally:
        con.close()


def _table_other_case(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    first = subprocess.run([str(EXE), "score", str(w / "toy.parquet"), "--db", str(w / "s.duckdb"), "--table", "base20",
                            "--model", m, "--no-anchors", "--k", "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    return ["score", str(w / "toy.parquet"), "--db", str(w / "s.duckdb"), "--table", "BASE20", "--model", m,
            "--no-anchors"]


def _check_other_case(w: Path, p: subprocess.CompletedProcess) -> None:
    con = duckdb.connect(str(w / "s.duckdb"), read_only=True)
    try:
        assert con.execute("select count(distinct detector_id), count(*) from base20").fetchone() == (2, 24)
    finally:
        con.close()


def _folder_as_dataset(w: Path, m: str) -> list[str]:
    (w / "data.parquet").mkdir()
    return ["score", str(w / "data.parquet"), "--no-db", "--out", str(w / "o.parquet"), "--model", m, "--no-anchors"]


def _param_true(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    fit = subprocess.run([str(EXE), "fit", str(w / "toy.parquet"), "-o", str(w / "det"), "--model", m, "--no-anchors",
                          "--k", "2"], capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr
    (w / "suite.json").write_text(json.dumps({"name": "s", "expectations": [{
        "type": "expect_column_harm_flag_fraction_to_be_at_most",
        "kwargs": {"column": "prompt", "response_column": "response", "model": m, "detector": str(w / "det"),
                   "max_fraction": {"$PARAMETER": "max"}}}]}))
    return ["validate", str(w / "toy.parquet"), "--suite", str(w / "suite.json"), "--param", "max=true"]


def _umask_score(w: Path, m: str) -> list[str]:
    _toy(w / "toy.parquet")
    return ["score", str(w / "toy.parquet"), "--no-db", "--out", str(w / "o.parquet"), "--save-detector",
            str(w / "det"), "--model", m, "--no-anchors"]


def _check_modes_score(w: Path, p: subprocess.CompletedProcess) -> None:
    for f in (w / "o.parquet", w / "det" / "detector.json", w / "det" / "detector.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _umask_filter(w: Path, m: str) -> list[str]:
    _scored_db(w / "scores.duckdb")
    return ["filter", "--db", str(w / "scores.duckdb"), "--table", "toy", "--out-dir", str(w / "split")]


def _check_modes_filter(w: Path, p: subprocess.CompletedProcess) -> None:
    assert stat.S_IMODE((w / "split").stat().st_mode) == 0o755
    for name in ("kept.parquet", "removed.parquet", "manifest.json"):
        assert stat.S_IMODE((w / "split" / name).stat().st_mode) == 0o644, name


ONE_LINE = r"^Error: "
CASES: dict[str, Case] = {
    # 1. an output over an input or another output: refused before any work
    "1 --out is --db": Case(_out_is_db, 1, "--db .* is the same file as --out"),
    "1 --out is --db through .. and a symlink": Case(_out_is_db_through_dotdot_and_symlink, 1, "is the same file as --out"),
    "1 --save-detector over --db": Case(_save_detector_over_db, 1, r"is the same file as --save-detector .* \(detector.json in it\)"),
    # 2. filter --force never deletes what it did not write
    "2 --out-dir holds the source database": Case(_filter_out_dir_holds_db, 1, "holds the source scores.duckdb"),
    "2 --force keeps other files": Case(_filter_force_keeps_other_files, 0, "kept 8, removed 2",
                                        changes=("split/kept.parquet",), check=_check_split),
    # 3. query reads its database and nothing else
    "3 query copy to a file": Case(_query("copy (select 1) to '{w}/leak.csv'"), 1, "disabled by configuration",
                                   check=_no_file("leak.csv")),
    "3 query export database": Case(_query("export database '{w}/dump'"), 1, "disabled by configuration",
                                    check=_no_file("dump")),
    "3 query read_csv": Case(_query("select * from read_csv('/etc/passwd')"), 1, "disabled by configuration"),
    "3 query read_text": Case(_query("select * from read_text('{w}/x.csv')"), 1, "disabled by configuration"),
    "3 query attach and drop": Case(_query("attach '{w}/other.duckdb' as o (READ_WRITE); drop table o.toy"), 1,
                                    "disabled by configuration"),
    "3 query install": Case(_query("install httpfs"), 1, "disabled by configuration"),
    "3 query set": Case(_query("set enable_external_access = true; select * from read_csv('{w}/x.csv')"), 1,
                        "configuration has been locked"),
    "3 query every statement's result": Case(_query("select 41 as a; select 42 as b", "--csv"), 0, "a\n41\n\nb\n42\n"),
    "3 query --allow-files reads": Case(_query("select b from read_csv('{w}/x.csv')", "--allow-files", "--csv"), 0,
                                        "b\n2\n"),
    "3 query --allow-files never writes": Case(_query("copy (select 1) to '{w}/leak.csv'", "--allow-files"), 1,
                                               "COPY statements are refused", check=_no_file("leak.csv")),
    # 4. a write target that is not a DuckDB database
    "4 --db is a parquet": Case(_db_is_parquet, 1, "scores.parquet: not a DuckDB database"),
    # 5. the user's columns are never overwritten
    "5 input has harm_score": Case(_reserved_column, 1, "the input has column\\(s\\) 'harm_score'",
                                   check=_no_file("o.parquet")),
    "5 input has Row_ID": Case(_reserved_column_other_case, 1, "'Row_ID'", check=_no_file("s.duckdb")),
    # 6. types that change after the first chunk
    "6 csv column empty until row 4,100": Case(_csv_empty_until_late, 0, "scored 4200 rows",
                                               check=_check_long("note", "late")),
    "6 jsonl int then float": Case(_jsonl_int_then_float, 0, "scored 4200 rows", check=_check_long("n", 4199.5)),
    "6 jsonl int then text": Case(_jsonl_int_then_text, 1, "column 'n' holds values of different types",
                                  check=_no_file("o.parquet")),
    # 7. τ is not part of the detector: re-thresholding replaces the rows
    "7 rethreshold replaces rows": Case(_rethreshold, 0, "flagged 4", changes=("s.duckdb",), check=_check_rethreshold),
    # 9. smaller ones
    "9 --table in another case": Case(_table_other_case, 0, "table BASE20", changes=("s.duckdb",),
                                      check=_check_other_case),
    "9 boolean max_fraction": Case(_param_true, 2, "max_fraction=True: expected a number"),
    "9 folder as DATASET": Case(_folder_as_dataset, 1, "is a folder"),
    "9 bad jsonl line 10": Case(_bad_jsonl_line_10, 1, "bad.jsonl: line 10 is not valid JSON"),
    "9 filter --out-dir . --force": Case(_filter_out_dir_dot, 0, "kept 8, removed 2", cwd="here", check=_check_split),
    # Also: outputs get the user's umask
    "umask score": Case(_umask_score, 0, "wrote", check=_check_modes_score),
    "umask filter": Case(_umask_filter, 0, "kept 8", check=_check_modes_filter),
}


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    def umask_022() -> None:
        os.umask(0o022)

    return subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          preexec_fn=umask_022, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_model_dir):
    import re

    case = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    args = case.setup(work, str(tiny_model_dir))
    before = _files(work)
    p = _run(args, work / case.cwd)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == case.rc, (p.returncode, p.stdout, p.stderr)
    if case.rc == 1:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(ONE_LINE, lines[0]), p.stderr
        assert re.search(case.message, lines[0]), lines[0]
    elif case.rc == 0:
        assert case.message in p.stdout, p.stdout
    else:
        assert re.search(case.message, p.stdout + p.stderr), p.stdout + p.stderr
    after = _files(work)
    for path, digest in before.items():
        if str(path.relative_to(work)) in case.changes:
            continue
        assert after.get(path) == digest, f"{path} changed or vanished"
    leftovers = [p.name for p in work.rglob(".saft-*")]
    assert not leftovers, leftovers
    if case.check:
        case.check(work, p)


def test_locked_database_is_found_before_any_embedding(tmp_path, tiny_model_dir):
    """9: the write target is opened before the model runs, so a locked database costs no work."""
    _toy(tmp_path / "toy.parquet")
    db = _scored_db(tmp_path / "s.duckdb")
    before = _sha(db)
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(600)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = _run(["score", str(tmp_path / "toy.parquet"), "--db", str(db), "--model", str(tiny_model_dir),
                  "--no-anchors"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().startswith("Error: ") and "in use by another process" in p.stderr
    assert "embedded" not in p.stdout
    cache = Path(os.environ["SAFT_GX_CACHE"])
    assert not cache.exists() or not any(f.is_file() for f in cache.rglob("*")), "the model ran before the lock check"
    assert _sha(db) == before


def test_killed_run_leaves_no_temp_files_after_the_next_run(tmp_path, tiny_model_dir):
    """8: a run killed with SIGKILL leaves its temp beside --out; the next run removes it."""
    _toy(tmp_path / "toy.parquet")
    (tmp_path / "out").mkdir()
    args = [str(EXE), "score", str(tmp_path / "toy.parquet"), "--no-db", "--out", str(tmp_path / "out" / "o.parquet"),
            "--model", str(tiny_model_dir), "--no-anchors"]
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "out").glob(".saft-*")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert list((tmp_path / "out").glob(".saft-*")), "the run ended before it could be killed"
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["o.parquet"]
