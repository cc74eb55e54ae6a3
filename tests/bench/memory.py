"""Flat memory: peak RSS of a whole `saft-gx score` run (embed → cache → fit statistics → score from the
cache → parquet → DuckDB) at 10 k and 100 k rows (and 1 M with --sizes). Not part of the default test run.

Each size runs in a fresh process with an empty cache, doing what `saft-gx score DATA --db --out` does
(``pipeline.score_file`` then ``store.store_scored_parquet``); its peak resident set (VmHWM) is read after
the pipeline and again after the DuckDB load. The model is the 4-layer tiny random Llama of the tests
(SmolLM2's tokenizer): the memory that could grow with the row count is the pipeline's, not the model's.
What is O(n) by design, and small: the cache's key index (16 bytes a row) and the scores (8 bytes a row: the
threshold needs them all). DuckDB's load is capped by SAFT_GX_DUCKDB_MEMORY_LIMIT.

    python tests/bench/memory.py [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import synthetic_frame  # noqa: E402

from saft_gx.testing import tiny_model_folder  # noqa: E402


def _peak_mib() -> float:
    """This process's peak resident set so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(n: int, data: Path, model: Path, work: Path) -> None:
    """What `saft-gx score DATA --db --out` runs (pipeline.score_file, then store.store_scored_parquet), with
    the peak RSS read after the pipeline and again after the DuckDB load."""
    from saft_gx import pipeline
    from saft_gx.io import store

    out = work / f"scored{n}.parquet"
    r = pipeline.score_file(data, out, opts=pipeline.EmbedOptions(model=str(model), layer=2, device="cpu"),
                            columns=pipeline.ColumnOptions())
    after_pipeline = _peak_mib()
    store.store_scored_parquet(work / f"s{n}.duckdb", "rows", out, detector_id=r.detector.detector_id,
                               run={"rows": r.rows})
    print(json.dumps({"pipeline": after_pipeline, "total": _peak_mib(), "rows": r.rows, "embedded": r.embed.computed,
                      "seconds": r.seconds}))


def run_one(n: int, model: Path, work: Path) -> dict:
    """Peak RSS (MiB) after the pipeline and after the DuckDB load, of one fresh process on n rows."""
    data = work / f"rows{n}.parquet"
    # Lengths are capped where the smallest size already reaches the cap (~1 % of rows at 10 k): uncapped, a
    # larger sample of a heavy-tailed length distribution has longer rows, hence larger activations, and the
    # benchmark would measure the longest row, not the row count.
    synthetic_frame(n, seed=n, prompt_words=8, response_words=12, max_prompt_words=40,
                    max_response_words=80).to_parquet(data, row_group_size=4096)
    env = {**os.environ, "SAFT_GX_CACHE": str(work / f"cache{n}")}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(n), str(data), str(model), str(work)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run on {n} rows failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--child", nargs=4, metavar=("N", "DATA", "MODEL", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, data, model, work = args.child
        child(int(n), Path(data), Path(model), Path(work))
        return
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = "?"
    print(f"tiny random Llama (4 layers, d=32), CPU; 1-min load average {load} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="saft-mem-") as tmp:
        work = Path(tmp)
        model = tiny_model_folder(work / "tiny-llama")
        res = []
        for n in args.sizes:
            r = run_one(n, model, work)
            res.append(r)
            print(f"{n:>9,d} rows  peak RSS {r['pipeline']:7.1f} MiB after embed/fit/score/parquet, {r['total']:7.1f} MiB "
                  f"after the DuckDB load  ({r['embedded']:,d} rows embedded, {r['wall']:.0f} s)", flush=True)
    for a, b in zip(res, res[1:]):
        grow = [(b[k] - a[k]) * 2**20 / (b["rows"] - a["rows"]) for k in ("pipeline", "total")]
        print(f"{a['rows']:,d} → {b['rows']:,d} rows: peak RSS ×{b['pipeline'] / a['pipeline']:.3f} pipeline, "
              f"×{b['total'] / a['total']:.3f} with DuckDB; {grow[0]:.0f} / {grow[1]:.0f} bytes per added row")

if __name__ == "__main__":
    main()
