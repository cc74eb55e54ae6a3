"""A run killed with SIGKILL resumes from the cache and ends with exactly the rows of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd


def _score(args, cache, **kw):
    exe = Path(sys.executable).with_name("saft-gx")
    env = {**os.environ, "SAFT_GX_CACHE": str(cache)}
    return subprocess.Popen([str(exe), "score", *map(str, args), "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    n = 12000
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta river stone cloud paper music table window garden".split())
    df = pd.DataFrame({
        "prompt": [" ".join(rng.choice(words, 3 + i % 7)) + f" #{i}" for i in range(n)],
        "response": [" ".join(rng.choice(words, 2 + i % 11)) for i in range(n)],
    })
    data = tmp_path / "big.parquet"
    df.to_parquet(data, row_group_size=2000)
    common = [data, "--model", tiny_model_dir, "--layer", "2"]

    cache = tmp_path / "cache_killed"
    db = tmp_path / "killed.duckdb"
    proc = _score([*common, "--db", db, "--out", tmp_path / "killed.parquet"], cache)
    # Wait on the run's own progress (two finished cache chunks), not on the clock: a loaded machine only
    # makes this slower. The loop ends when the marker appears or the process exits by itself.
    while proc.poll() is None:
        if len(list(cache.rglob("*.keys.npy"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make the data bigger"
    assert not (tmp_path / "killed.parquet").exists()
    done_before = sum(np.load(p).shape[0] for p in cache.rglob("*.keys.npy"))
    assert 0 < done_before < n

    resumed = _score([*common, "--db", db, "--out", tmp_path / "killed.parquet"], cache)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"{n - done_before} embedded, {done_before} from cache" in out

    clean = _score([*common, "--db", tmp_path / "clean.duckdb", "--out", tmp_path / "clean.parquet"], tmp_path / "c2")
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err

    a = pd.read_parquet(tmp_path / "killed.parquet")
    b = pd.read_parquet(tmp_path / "clean.parquet")
    assert a["row_id"].tolist() == b["row_id"].tolist() == list(range(n))
    assert a["text_sha256"].tolist() == b["text_sha256"].tolist()
    np.testing.assert_allclose(a["harm_score"], b["harm_score"], rtol=1e-3, atol=1e-6)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("select count(*), count(distinct row_id) from big").fetchone() == (n, n)
