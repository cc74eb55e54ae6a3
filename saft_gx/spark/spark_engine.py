"""``saft-gx score --engine spark``: the same SAFT run, spread over a Spark cluster.

Four Spark steps over one parquet file, then the same DuckDB load as the local engine:
1. **embed** — the file read by Spark with each row's position in the file as ``row_id`` (parquet's
   ``_metadata.row_index``), range-partitioned by ``row_id`` and embedded by ``mapInPandas``. Each Python
   worker loads the model once (``pipeline.shared_session``) and embeds through its own machine's cache, so
   a re-run on the same machines embeds nothing again. Rows are validated exactly as locally, and errors
   name global row ids. Output: ``row_id, text_sha256, emb`` (float16 bytes) written as parquet under
   the work folder — the second pass reads that, never the model.
2. **fit** — per-partition statistics (n, Σx, Σxxᵀ) from ``mapInPandas``, merged by ``treeAggregate``
   into one ``MomentStats`` on the driver; the detector is fitted there (a d×d eigendecomposition).
3. **score** — ``mapInPandas`` over the embeddings with the detector shipped in the closure; a quantile
   threshold is found by Spark (sort, ``offset``), not by collecting the scores.
4. **write** — the input's columns joined with the score columns, sorted by ``row_id`` and written as
   parquet, then concatenated by the driver into the output file that ``store.store_scored_parquet`` loads.

pyspark is imported lazily (``pip install 'saft-gx[spark]'``). Workers must run this venv's Python: the
driver sets ``PYSPARK_PYTHON`` to ``sys.executable`` unless it is already set. The driver reads the model's
config and fingerprint but never loads its weights; every executor checks it loaded the same model. See
docs/spark.md for running on a real cluster (spark-submit, one model per executor, GPUs).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.errors import SaftError
from ..embedding.models import LoadedModel
from ..detect.anchors import USE_ANCHORS, anchor_rows, fit_default
from ..pipeline import (DEFAULT_CONTAMINATION, embedding_meta, OUTPUT_COLUMNS, ColumnOptions, EmbedOptions, EmbedSummary, ScoreResult,
                       resolve_options)
from ..io.readers import open_dataset
from ..embedding.rows import ColumnSpec
from ..core.subspace import Detector, MomentStats
from ..core.threshold import ThresholdRule

ROWS_PER_PARTITION = 20_000  # bounds the work a lost task repeats; more partitions than cores balance load


def spark_session(master: str | None = None, app_name: str = "saft-gx",
                  conf: dict[str, str] | None = None) -> tuple[Any, bool]:
    """(the active SparkSession or a new one, whether it is new). ``master``: e.g. ``local[2]``; default:
    spark-submit's, else ``local[*]``. Arrow is switched on; workers run this interpreter unless
    PYSPARK_PYTHON says otherwise."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SaftError("--engine spark needs pyspark: pip install 'saft-gx[spark]'") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName(app_name).config("spark.sql.execution.arrow.pyspark.enabled", "true")
    if master:
        builder = builder.master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate(), True


# ---- the driver's view of the model (config and fingerprint, no weights) ----

def describe_model(model_ref: str | None) -> LoadedModel:
    """A ``LoadedModel`` without weights: reference, fingerprint, layer count and width, as the executors
    will load it. Enough to resolve options and check a detector, on a driver with no room for the model."""
    from transformers import AutoConfig

    from ..embedding.models import hub_snapshot, resolve, fingerprint_path

    ref, folder, gguf = resolve(model_ref)
    if folder is None:
        folder = hub_snapshot(ref)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        cfg = AutoConfig.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise SaftError(f"--model {model_ref}: cannot read its config ({str(e).splitlines()[0]})") from None
    return LoadedModel(model=None, tokenizer=None, model_ref=ref,
                       fingerprint=fingerprint_path(folder / gguf if gguf else folder),
                       num_layers=int(cfg.num_hidden_layers), hidden_size=int(cfg.hidden_size), device="", dtype=None)


# ---- executor side (shipped in closures; imports happen on the worker) ----

def executor_session(opts: EmbedOptions, fingerprint: str) -> Any:
    """One model per Python worker process (workers are reused across tasks): on the GPU Spark assigned to
    this task if any, with as many torch threads as the task has CPUs."""
    from dataclasses import replace

    import torch
    from pyspark import TaskContext

    from ..pipeline import shared_session

    ctx = TaskContext.get()
    if ctx is not None:
        gpus = ctx.resources().get("gpu")
        if gpus is not None and gpus.addresses and opts.device in (None, "", "auto"):
            opts = replace(opts, device=f"cuda:{gpus.addresses[0]}")
        torch.set_num_threads(max(1, ctx.cpus()))
    session = shared_session(opts)
    if session.lm.fingerprint != fingerprint:
        raise SaftError(
            f"an executor loaded {opts.model!r} with fingerprint {session.lm.fingerprint[:12]}, the driver saw "
            f"{fingerprint[:12]}: every machine needs the same model files"
        )
    return session


def _contiguous_runs(row_ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of ``row_ids`` in which ids go up by one (for global ids in errors)."""
    breaks = np.flatnonzero(np.diff(row_ids) != 1) + 1
    edges = [0, *breaks.tolist(), len(row_ids)]
    return list(zip(edges[:-1], edges[1:]))


def embed_fn(opts: EmbedOptions, spec: ColumnSpec, fingerprint: str, computed: Any):
    def embed(frames: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from ..pipeline import embed_rows
        from ..embedding.rows import rows_from_frame

        session = executor_session(opts, fingerprint)
        for df in frames:
            ids = df["row_id"].to_numpy(dtype=np.int64)
            for lo, hi in _contiguous_runs(ids):
                part = df.iloc[lo:hi].reset_index(drop=True)
                rows = rows_from_frame(part, spec, int(ids[lo]))
                keys = [r.content_key() for r in rows]
                before = int(session.cache.missing(keys, session.layers).sum())
                vecs = embed_rows(session, rows, int(ids[lo])).astype(np.float16)
                computed.add(before)
                yield pd.DataFrame({"row_id": ids[lo:hi], "text_sha256": keys,
                                    "emb": [v.tobytes() for v in vecs]})

    return embed


def _stats_fn(dim: int):
    def partial(frames: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        stats = MomentStats(dim)
        for df in frames:
            if len(df):
                stats.update(_vectors(df, dim))
        yield pd.DataFrame({"n": [stats.n], "sum": [stats.sum.tobytes()], "outer": [stats.outer.tobytes()]})

    return partial


def score_fn(detector: Detector):
    def score(frames: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for df in frames:
            if len(df):
                yield pd.DataFrame({"row_id": df["row_id"], "text_sha256": df["text_sha256"],
                                    "harm_score": detector.score(_vectors(df, detector.dim))})

    return score


def coords_fn(detector: Detector):
    def coords(frames: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for df in frames:
            if len(df):
                c = detector.project(_vectors(df, detector.dim)).astype(np.float32)
                yield pd.DataFrame({"row_id": df["row_id"], "coords": [r.tobytes() for r in c]})

    return coords


def collect_coords(emb: Any, detector: Detector) -> np.ndarray:
    """(n, k) float32 coordinates of every row in ``detector``'s subspace, in row order, on the driver
    (4·k bytes a row: what adapting the default probe to the data needs)."""
    got = emb.mapInPandas(coords_fn(detector), "row_id long, coords binary").toPandas().sort_values("row_id")
    return np.frombuffer(b"".join(got["coords"]), dtype=np.float32).reshape(len(got), detector.k)


def collect_rows(emb: Any, idx: np.ndarray, dim: int) -> np.ndarray:
    """(len(idx), dim) float32 vectors of the rows at positions ``idx`` of the row-id order (the order of
    ``collect_coords``), on the driver: the few thousand rows the default detector is adapted to."""
    from pyspark.sql import functions as F

    ids = np.sort(emb.select("row_id").toPandas()["row_id"].to_numpy(dtype=np.int64))
    wanted = ids[np.asarray(idx, dtype=np.int64)]
    got = emb.where(F.col("row_id").isin([int(i) for i in np.unique(wanted)])).select("row_id", "emb").toPandas()
    vecs = _vectors(got, dim)
    where = {int(r): i for i, r in enumerate(got["row_id"].to_numpy(dtype=np.int64))}
    return vecs[[where[int(r)] for r in wanted]]


def _vectors(df: Any, dim: int) -> np.ndarray:
    """float32 (n, d) from the float16 bytes column, exactly as the local cache hands them out."""
    return np.frombuffer(b"".join(df["emb"]), dtype=np.float16).reshape(len(df), dim).astype(np.float32)


# ---- driver ----

@contextmanager
def worker_errors() -> Iterator[None]:
    """A ``SaftError`` raised on an executor reaches the driver inside a Java stack trace: re-raise it as
    the one-line ``SaftError`` the CLI prints (the row id in it is global)."""
    try:
        yield
    except SaftError:
        raise
    except Exception as e:
        text = str(e)
        m = re.search(r"(?:saft_gx\.errors\.)?SaftError: (.+)", text)
        if m is None or type(e).__module__.split(".")[0] not in ("pyspark", "py4j"):
            raise
        raise SaftError(m.group(1).strip()) from None


def anchor_vectors(spark: Any, opts: EmbedOptions, fingerprint: str, dim: int) -> np.ndarray:
    """The built-in anchors embedded by an executor (the driver has no model), in anchor order."""
    import pandas as pd

    rows, _labels = anchor_rows()
    frame = pd.DataFrame({"row_id": np.arange(len(rows), dtype=np.int64),
                          "prompt": [r.messages[0][1] for r in rows], "response": [r.messages[-1][1] for r in rows]})
    spec = ColumnSpec(prompt="prompt", response="response")
    ignored = spark.sparkContext.accumulator(0)
    out = spark.createDataFrame(frame).coalesce(1) \
        .mapInPandas(embed_fn(opts, spec, fingerprint, ignored), "row_id long, text_sha256 string, emb binary").toPandas()
    return _vectors(out.sort_values("row_id"), dim)


def stats_tree_aggregate(emb: Any, dim: int) -> MomentStats:
    def seq(acc: MomentStats, row: Any) -> MomentStats:
        part = MomentStats(dim, int(row["n"]), np.frombuffer(row["sum"], dtype=np.float64).copy(),
                           np.frombuffer(row["outer"], dtype=np.float64).reshape(dim, dim).copy())
        return acc.merge(part)

    partials = emb.mapInPandas(_stats_fn(dim), "n long, sum binary, outer binary").rdd
    depth = max(2, math.ceil(math.log2(max(partials.getNumPartitions(), 2)) / 2))
    return partials.treeAggregate(MomentStats(dim), seq, lambda a, b: a.merge(b), depth=depth)


def _spark_threshold(scores: Any, rule: ThresholdRule, n: int) -> float:
    """``threshold.resolve`` computed by Spark: τ = the (m+1)-th largest score, m = round(fraction·n)."""
    from pyspark.sql import functions as F

    if rule.kind == "value":
        return rule.value
    m = int(round(rule.value * n))
    if m >= n:
        return float(np.nextafter(scores.agg(F.min("harm_score")).first()[0], -np.inf))
    return float(scores.orderBy(F.desc("harm_score")).offset(m).limit(1).first()["harm_score"])


def _concat_parquet(folder: Path, out_path: Path) -> None:
    """The part files of a sorted Spark write, in order, as one parquet file (streamed, row group by row group)."""
    import pyarrow.parquet as pq

    parts = sorted(folder.glob("part-*.parquet"))
    writer = None
    try:
        for part in parts:
            pf = pq.ParquetFile(part)
            for g in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(g)
                if writer is None:
                    writer = pq.ParquetWriter(out_path, table.schema)
                writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise SaftError(f"{folder}: Spark wrote no rows")


def score_file(path: str | Path, out_path: str | Path, *, opts: EmbedOptions, columns: ColumnOptions,
               detector: Detector | None = None, k: int | None = None, weighting: str | None = None,
               anchors: bool = USE_ANCHORS, rule: ThresholdRule | None = None, master: str | None = None,
               work_dir: str | None = None, spark: Any = None) -> ScoreResult:
    """``pipeline.score_file`` on Spark: same arguments, same output file, same scores (up to BLAS
    summation order). ``spark``: an existing session (otherwise one is made, and stopped at the end)."""
    t0 = time.perf_counter()
    ds = open_dataset(path)
    if ds.fmt != "parquet":
        raise SaftError(f"{ds.path}: --engine spark reads parquet files; convert it first "
                        "(pandas: pd.read_json(path, lines=True).to_parquet(...))")
    spec = columns.resolve(ds)
    lm = describe_model(opts.model or (detector.meta.get("model") if detector is not None else None))
    ropts = resolve_options(opts, lm, detector)
    dim = lm.hidden_size * len(ropts.layers)  # the default reads several layers side by side
    own_session = False
    if spark is None:
        spark, own_session = spark_session(master)
    from pyspark.sql import functions as F

    work = Path(work_dir) if work_dir else Path(out_path).resolve().parent
    work = work / f".saft-spark-{uuid.uuid4().hex[:12]}"
    try:
        with worker_errors():
            sc = spark.sparkContext
            n = int(ds.num_rows or 0)
            raw = spark.read.parquet(str(ds.path.resolve()))
            # the input's own columns (earlier score columns dropped, as locally) and each row's position in the file
            keep = [c for c in raw.columns if c not in OUTPUT_COLUMNS]
            source = raw.select(*[F.col(f"`{c}`") for c in keep], F.col("_metadata.row_index").alias("row_id"))
            parts = max(sc.defaultParallelism, math.ceil(n / ROWS_PER_PARTITION))
            computed = sc.accumulator(0)
            text = source.select("row_id", *[F.col(f"`{c}`") for c in spec.columns]).repartitionByRange(parts, "row_id")
            emb_schema = "row_id long, text_sha256 string, emb binary"
            text.mapInPandas(embed_fn(ropts, spec, lm.fingerprint, computed), emb_schema) \
                .write.mode("overwrite").parquet(str(work / "embeddings"))
            emb = spark.read.parquet(str(work / "embeddings"))
            t_embed = time.perf_counter() - t0

            if detector is None:
                stats = stats_tree_aggregate(emb, dim)
                meta = {**embedding_meta(lm, ropts.layers, ropts.token, ropts.max_tokens, ropts.overlong),
                        "fitted_on": ds.path.name, "columns": spec.to_dict(), "engine": "spark"}
                detector = fit_default(stats, k=k, weighting=weighting, anchors=anchors, meta=meta,
                                       anchor_vectors=lambda: anchor_vectors(spark, ropts, lm.fingerprint, dim),
                                       data_coords=lambda d: collect_coords(emb, d), adapt=ropts.adapt,
                                       data_rows=lambda idx: collect_rows(emb, idx, dim))
            scores = emb.mapInPandas(score_fn(detector), "row_id long, text_sha256 string, harm_score double").cache()
            rows = scores.count()
            if rows != n:
                raise SaftError(f"{ds.path}: {n} rows in the file, {rows} scored; was it changed during the run?")
            if rule is None and detector.threshold is None:
                rule = ThresholdRule("contamination", DEFAULT_CONTAMINATION)
            if rule is not None:
                tau = _spark_threshold(scores, rule, rows)
                rule_text = rule.describe()
                detector = detector.with_(threshold=tau)
            else:
                tau = float(detector.threshold)  # type: ignore[arg-type]
                rule_text = f"τ = {tau:g} (from the detector)"

            scored = (source.join(scores, "row_id")
                      .withColumn("harm_flag", F.col("harm_score") > F.lit(tau))
                      .withColumn("detector_id", F.lit(detector.detector_id))
                      .select(*[F.col(f"`{c}`") for c in keep], *OUTPUT_COLUMNS)
                      .orderBy("row_id"))
            scored.write.mode("overwrite").parquet(str(work / "scored"))
            flagged = int(scores.filter(F.col("harm_score") > F.lit(tau)).count())
            scores.unpersist()
            _concat_parquet(work / "scored", Path(out_path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if own_session:
            spark.stop()
    summary = EmbedSummary(rows=rows, computed=int(computed.value), seconds=t_embed)
    return ScoreResult(out_path=Path(out_path), detector=detector, threshold=tau, threshold_rule=rule_text, rows=rows,
                       flagged=flagged, embed=summary, seconds=time.perf_counter() - t0, source_sha256=ds.sha256(),
                       columns=spec, extra={"engine": "spark", "partitions": parts})


__all__ = ["describe_model", "resolve_options", "score_file", "spark_session"]
