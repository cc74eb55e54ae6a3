"""Run SAFT over a dataset file: embed (through the cache), fit, score, threshold, write the scored file.

Three streaming passes, none holding more than a chunk of rows or the d×d statistics in memory:
1. embed every row not yet in the cache, validating the rows on the way (and accumulate fit statistics);
2. read embeddings back from the cache and score them (n floats and n digests are kept);
3. stream the input again and write it with the score columns appended, atomically.
Nothing here knows about Click, DuckDB or Great Expectations.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np

from .io.cache import ArrayFolder, EmbeddingCache, key_digests
from .embedding.embed import DEFAULT_MAX_TOKENS, DEFAULT_OVERLONG, EmbedConfig, Embedder, Tokenized
from .core.errors import SaftError
from .embedding.models import LoadedModel, load_model
from .io.readers import Dataset, check_text_types, open_dataset
from .embedding.rows import ColumnSpec, detect_columns, rows_from_frame
from .shards import Shard, first_row_id, shard_dataset
from .core import defaults
from .detect.anchors import USE_ANCHORS, anchor_rows, fit_default
from .core.subspace import Detector, MomentStats
from .core.threshold import DEFAULT_CONTAMINATION, ThresholdRule, resolve


OUTPUT_COLUMNS = ("row_id", "text_sha256", "harm_score", "harm_flag", "detector_id")


def refuse_reserved_columns(columns: list[str]) -> None:
    """The scored output appends OUTPUT_COLUMNS; an input column of the same name (DuckDB: any case) would
    be lost, so it is an error, before any work."""
    clash = [c for c in columns if str(c).lower() in OUTPUT_COLUMNS]
    if clash:
        raise SaftError(f"the input has column(s) {', '.join(map(repr, clash))}, which saft_gx writes "
                        f"({', '.join(OUTPUT_COLUMNS)}); rename or drop them first (nothing was written)")

Progress = Callable[[int], None]


@dataclass
class ColumnOptions:
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    messages: str | None = None

    def resolve(self, ds: Dataset) -> ColumnSpec:
        spec = detect_columns(ds.columns, prompt=self.prompt, response=self.response, text=self.text,
                              messages=self.messages)
        check_text_types(ds, [c for c in (spec.prompt, spec.response, spec.text) if c])
        return spec


def _null_progress(_n: int) -> None:
    pass


@dataclass
class EmbedSummary:
    rows: int = 0
    computed: int = 0
    truncated: int = 0  # rows embedded in this run that were over max_tokens and were cut
    seconds: float = 0.0


def embed_dataset(ds: Dataset, spec: ColumnSpec, embedder: Embedder, cache: EmbeddingCache, *,
                  stats: dict[int | tuple[int, ...], MomentStats] | None = None, progress: Progress = _null_progress,
                  frame_rows: int = 4096, flush_rows: int = 512) -> EmbedSummary:
    """Pass 1: make sure every row's embedding is in the cache; optionally accumulate fit statistics
    per layer, or per stack of layers read side by side (a tuple key), from the cached (float16-rounded) vectors,
    so fit and score see identical numbers.

    ``flush_rows`` bounds the work a kill can lose."""
    layers = embedder.config.layers
    summary = EmbedSummary()
    t0 = time.perf_counter()
    for first, n_rows, keys, missing, tokenized in _prepared_frames(ds, spec, embedder, cache, frame_rows):
        if len(missing):  # rows cached since the worker looked (duplicates of the previous frame's rows)
            keep = cache.missing([keys[i] for i in missing], layers)
            if not keep.all():
                missing, tokenized = missing[keep], [t for t, k in zip(tokenized, keep) if k]
        progress(n_rows - len(missing))
        summary.truncated += sum(t.truncated for t in tokenized)
        if len(missing):
            order = sorted(range(len(missing)), key=lambda j: -len(tokenized[j].ids))
            for start in range(0, len(order), flush_rows):
                part = order[start : start + flush_rows]
                vecs = embedder.embed_tokenized([tokenized[j] for j in part])
                part_keys = [keys[missing[j]] for j in part]
                for li, layer in enumerate(layers):
                    cache.layer(layer).put(part_keys, vecs[:, li, :])
                progress(len(part))
            summary.computed += len(missing)
        if stats is not None:
            for key, st in stats.items():
                st.update(stacked(cache, key, keys))
        summary.rows += n_rows
    if summary.rows == 0:
        raise SaftError(f"{ds.path}: the dataset has no rows")
    summary.seconds = time.perf_counter() - t0
    return summary


def _prepared_frames(ds: Dataset, spec: ColumnSpec, embedder: Embedder, cache: EmbeddingCache,
                     frame_rows: int) -> Iterator[tuple[int, int, list[str], np.ndarray, list[Tokenized]]]:
    """``(first_row_id, n_rows, keys, missing, tokenized)`` per frame: read, validated, looked up in the cache
    and tokenized (cache misses only) one frame ahead in a worker thread, so the model never waits for the
    tokenizer. Tokenizing a whole frame before its first forward pass also validates it before any model
    time is spent on it; an error in frame i+1 surfaces once frame i is embedded and cached."""
    layers = embedder.config.layers
    cache.missing([], layers)  # build the cache index here, not concurrently in the worker
    frames = iter(ds.frames(spec.columns, batch_rows=frame_rows))

    def prepare() -> tuple[int, int, list[str], np.ndarray, list[Tokenized]] | None:
        item = next(frames, None)
        if item is None:
            return None
        first, df = item
        rows = rows_from_frame(df, spec, first)
        keys = [r.content_key() for r in rows]
        missing = np.flatnonzero(cache.missing(keys, layers))
        tokenized = embedder.tokenize([rows[i] for i in missing], [first + int(i) for i in missing]) if len(missing) else []
        return first, len(rows), keys, missing, tokenized

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saft-tokenize") as pool:
        future = pool.submit(prepare)
        while (item := future.result()) is not None:
            future = pool.submit(prepare)
            yield item


def layer_tuple(layers: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layers),) if isinstance(layers, (int, np.integer)) else tuple(int(x) for x in layers)


def _side_by_side(caches: list, keys: list[str]) -> np.ndarray:
    """(m, d · len(caches)): each row's vectors from the layer caches, concatenated in order."""
    return caches[0].get(keys) if len(caches) == 1 else np.hstack([lc.get(keys) for lc in caches])


def stacked(cache: EmbeddingCache, layers: int | Sequence[int], keys: list[str]) -> np.ndarray:
    """(m, d · layers): the cached vectors of ``keys`` at ``layers``, side by side."""
    return _side_by_side([cache.layer(layer) for layer in layer_tuple(layers)], keys)


def cached_vectors(ds: Dataset, spec: ColumnSpec, cache: EmbeddingCache, layers: int | Sequence[int], *,
                   frame_rows: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
    """(content keys, (m, d) embeddings) of every frame of ``ds``, in row order, from the cache only; with
    several layers, each row's vectors side by side (m, d · layers), in the order given."""
    caches = [cache.layer(layer) for layer in layer_tuple(layers)]
    for first, df in ds.frames(spec.columns, batch_rows=frame_rows):
        keys = [r.content_key() for r in rows_from_frame(df, spec, first)]
        yield keys, _side_by_side(caches, keys)


def score_cached(ds: Dataset, spec: ColumnSpec, cache: EmbeddingCache, detector: Detector, layers: int | Sequence[int], *,
                 frame_rows: int = 4096, digests_to: BinaryIO | None = None) -> np.ndarray:
    """Pass 2: scores (n,) float64 of every row, from the cache only; with ``digests_to``, each row's 32-byte
    content digest is appended to that file (for pass 3), so only the scores — 8 bytes a row, which the
    threshold needs all of — stay in memory."""
    scores = []
    for keys, x in cached_vectors(ds, spec, cache, layers, frame_rows=frame_rows):
        scores.append(detector.score(x))
        if digests_to is not None:
            digests_to.write(key_digests(keys).tobytes())
    return np.concatenate(scores)


def coords_cached(ds: Dataset, spec: ColumnSpec, cache: EmbeddingCache, detector: Detector, layers: int | Sequence[int], *,
                  frame_rows: int = 4096) -> np.ndarray:
    """(n, k) float32 coordinates of every row in ``detector``'s subspace, from the cache only (for adapting
    the default probe to the data: 4·k bytes a row)."""
    return np.concatenate([detector.project(x).astype(np.float32)
                           for _keys, x in cached_vectors(ds, spec, cache, layers, frame_rows=frame_rows)])


def rows_cached(ds: Dataset, spec: ColumnSpec, cache: EmbeddingCache, layers: int | Sequence[int], idx: np.ndarray, *,
                frame_rows: int = 4096) -> np.ndarray:
    """(len(idx), d · layers) float32 vectors of the rows at positions ``idx`` of ``ds``, in that order, from the
    cache only (for adapting the default detector to a few thousand of the data's rows)."""
    idx = np.asarray(idx, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    wanted = idx[order]
    caches = [cache.layer(layer) for layer in layer_tuple(layers)]
    parts, offset = [], 0
    for first, df in ds.frames(spec.columns, batch_rows=frame_rows):
        lo, hi = np.searchsorted(wanted, [offset, offset + len(df)])
        if hi > lo:
            keys = [r.content_key() for r in rows_from_frame(df, spec, first)]
            parts.append(_side_by_side(caches, [keys[i - offset] for i in wanted[lo:hi]]))
        offset += len(df)
    if sum(len(p) for p in parts) != len(idx):
        raise SaftError(f"{ds.path}: row {wanted[-1]} asked for, {offset} rows in the file; was it changed during the run?")
    out = np.empty((len(idx), parts[0].shape[1] if parts else 0), dtype=np.float32)
    out[order] = np.concatenate(parts) if parts else out[:0]
    return out


def _changed_while_scored(ds: Dataset, rows_now: int | str, rows_scored: int) -> SaftError:
    return SaftError(f"{ds.path}: changed while it was being scored ({rows_now} rows now, {rows_scored} before)")


def write_scored(ds: Dataset, out_path: Path, scores: np.ndarray, flags: np.ndarray, digests: BinaryIO,
                 detector_id: str, *, frame_rows: int = 4096) -> Path:
    """Pass 3: the input's columns (exact types) plus OUTPUT_COLUMNS, written to a temp file and renamed.
    ``digests`` is read from its start: 32 bytes a row, as ``score_cached`` wrote them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    writer = None
    digests.seek(0)
    first = start = first_row_id(ds)  # a shard's rows keep their global ids
    try:
        for batch in ds.arrow_batches(batch_rows=frame_rows):
            table = pa.Table.from_batches([batch])
            table = table.drop_columns([c for c in OUTPUT_COLUMNS if c in table.column_names])
            n = table.num_rows
            raw = digests.read(32 * n)
            if len(raw) != 32 * n:  # more rows than the scoring pass saw
                raise _changed_while_scored(ds, f"at least {start - first + n}", len(scores))
            sl = slice(start - first, start - first + n)
            extra = {
                "row_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "text_sha256": pa.array([raw[i : i + 32].hex() for i in range(0, len(raw), 32)], type=pa.string()),
                "harm_score": pa.array(scores[sl], type=pa.float64()),
                "harm_flag": pa.array(flags[sl], type=pa.bool_()),
                "detector_id": pa.array([detector_id] * n, type=pa.string()),
            }
            for name, arr in extra.items():
                table = table.append_column(name, arr)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            else:
                table = table.cast(writer.schema)
            writer.write_table(table)
            start += n
        if writer is None:
            raise SaftError(f"{ds.path}: the dataset has no rows")
        writer.close()
        writer = None
        if start - first != len(scores):
            raise _changed_while_scored(ds, start - first, len(scores))
        os.replace(tmp, out_path)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
    return out_path


@dataclass
class ScoreResult:
    out_path: Path
    detector: Detector
    threshold: float
    threshold_rule: str
    rows: int
    flagged: int
    embed: EmbedSummary
    seconds: float
    source_sha256: str
    columns: ColumnSpec
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")


@dataclass
class EmbedOptions:
    model: str | None = None
    layer: int | None = None
    # several layers read side by side (a stacked detector from ``saft-gx calibrate``); None: ``layer`` alone
    layers: tuple[int, ...] | None = None
    token: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    overlong: str = DEFAULT_OVERLONG
    device: str | None = None
    dtype: str | None = None
    batch_tokens: int | None = None
    cache_dir: str | None = None
    # the unsupervised fit is directed by the built-in anchors; the default layer and token follow the mode
    # (saft_gx.core.defaults: the anchored detector's with them, plain SAFT's without)
    anchors: bool = USE_ANCHORS
    # with anchors, adapt their probe to the dataset by self-training (saft_gx.detect.adapt)
    adapt: bool = defaults.ADAPT


class Session:
    """A loaded model plus its cache: reuse one across calls to avoid reloading the model."""

    def __init__(self, opts: EmbedOptions, *, lm: LoadedModel | None = None, detector: Detector | None = None):
        meta = detector.meta if detector is not None else {}
        model_ref = opts.model or meta.get("model")
        self.lm = lm or load_model(model_ref, device=opts.device, dtype=opts.dtype, cache_dir=opts.cache_dir)
        r = resolve_options(opts, self.lm, detector)
        cfg_kwargs: dict[str, Any] = {}
        if opts.batch_tokens:
            cfg_kwargs["batch_tokens"] = opts.batch_tokens
        self.config = EmbedConfig(layers=r.layers, token=r.token, max_tokens=r.max_tokens, overlong=r.overlong, **cfg_kwargs)
        self.embedder = Embedder(self.lm, self.config)
        self.anchors = opts.anchors
        self.adapt = opts.adapt
        self.cache = EmbeddingCache(opts.cache_dir, model_fingerprint=self.lm.fingerprint, token=r.token,
                                    max_tokens=r.max_tokens, overlong=r.overlong, dim=self.lm.hidden_size)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    @property
    def layer(self) -> int:
        """The deepest layer read: the model runs up to it."""
        return max(self.config.layers)

    def detector_meta(self, ds: Dataset, spec: ColumnSpec) -> dict[str, Any]:
        return {
            **embedding_meta(self.lm, self.layers, self.config.token, self.config.max_tokens, self.config.overlong),
            "fitted_on": str(ds.path.name),
            "columns": spec.to_dict(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def embedding_meta(lm: LoadedModel, layers: Sequence[int], token: str, max_tokens: int, overlong: str) -> dict[str, Any]:
    """The detector metadata that says how rows were embedded (checked before a detector scores other rows);
    a stack that holds the default layer names it ``subspace_layer``: the default probe's subspace is that layer's
    (``anchors.subspace_columns``)."""
    layers = layer_tuple(layers)
    sub = defaults.layer_for(lm.num_layers)
    return {
        "model": lm.model_ref,
        "model_fingerprint": lm.fingerprint,
        "layer": max(layers),
        **({"layers": list(layers)} if len(layers) > 1 else {}),
        **({"subspace_layer": sub} if len(layers) > 1 and sub in layers else {}),
        "token": token,
        "max_tokens": max_tokens,
        "overlong": overlong,
    }


def resolve_options(opts: EmbedOptions, lm: LoadedModel, detector: Detector | None = None) -> EmbedOptions:
    """``opts`` with model, layer, token and truncation fixed: as given, else the detector's, else the defaults
    (checking the detector fits ``lm``). ``lm`` needs only its reference, fingerprint and shape, so a driver
    that never loads the weights (``spark_engine``) resolves exactly as a ``Session`` does."""
    meta = detector.meta if detector is not None else {}
    if detector is not None:
        check_detector_matches(detector, lm, opts)
    anchored = opts.anchors and detector is None
    # the default detector reads a stack of layers; --layer (or --no-anchors) reads one
    if opts.layers or meta.get("layers"):
        layers = layer_tuple(opts.layers or meta["layers"])
    elif opts.layer or meta.get("layer"):
        layers = (int(opts.layer or meta["layer"]),)
    else:
        layers = defaults.stack_for(lm.num_layers) if anchored else (defaults.layer_for(lm.num_layers, anchors=False),)
    layer = int(opts.layer or meta.get("layer") or max(layers))
    return replace(
        opts, model=lm.model_ref, layer=layer, layers=layers,
        token=opts.token or meta.get("token") or defaults.token_for(anchors=anchored),
        max_tokens=int(meta.get("max_tokens", opts.max_tokens)) if detector is not None else opts.max_tokens,
        overlong=meta.get("overlong", opts.overlong) if detector is not None else opts.overlong,
    )


def check_detector_matches(detector: Detector, lm: LoadedModel, opts: EmbedOptions) -> None:
    meta = detector.meta
    lm.refuse_other_model(meta, "the detector was fitted", "refit it or pass the matching --model")
    width = lm.hidden_size * len(meta.get("layers") or (1,))
    if detector.dim != width:
        raise SaftError(f"the detector has dimension {detector.dim}, the model's embedding {width}")
    for opt, key in ((opts.layer, "layer"), (opts.token, "token")):
        if opt is not None and meta.get(key) is not None and opt != meta[key]:
            raise SaftError(f"--{key} {opt}: the detector was fitted at {key} {meta[key]}; drop the option or refit")


def fit_stats(session: Session, ds: Dataset, spec: ColumnSpec, *,
              progress: Progress = _null_progress) -> tuple[MomentStats, EmbedSummary]:
    """Embed (through the cache) and return the fit statistics of ``ds``'s rows: one shard's share of a
    sharded fit, merged with the others by ``shards.merge_stats``."""
    stats = {session.layers: MomentStats(session.lm.hidden_size * len(session.layers))}
    summary = embed_dataset(ds, spec, session.embedder, session.cache, stats=stats, progress=progress)
    return stats[session.layers], summary


def fit(session: Session, ds: Dataset, spec: ColumnSpec, *, k: int | None = None, weighting: str | None = None,
        anchors: bool | None = None, progress: Progress = _null_progress) -> tuple[Detector, EmbedSummary]:
    """Unsupervised fit on ``ds``; directed by the built-in anchors unless ``anchors`` (default: the
    session's ``EmbedOptions.anchors``) is False (see ``anchors.fit_default``)."""
    anchors = session.anchors if anchors is None else anchors
    stats, summary = fit_stats(session, ds, spec, progress=progress)
    det = fit_with_session(session, stats, k=k, weighting=weighting, anchors=anchors, meta=session.detector_meta(ds, spec),
                           data_coords=lambda d: coords_cached(ds, spec, session.cache, d, session.layers),
                           data_rows=lambda idx: rows_cached(ds, spec, session.cache, session.layers, idx))
    return det, summary


def score_file(path: str | Path, out_path: str | Path, *, opts: EmbedOptions, columns: ColumnOptions,
               detector: Detector | None = None, k: int | None = None, weighting: str | None = None,
               anchors: bool | None = None, rule: ThresholdRule | None = None, session: Session | None = None,
               progress: Progress = _null_progress, shard: Shard | None = None) -> ScoreResult:
    """Score every row of ``path`` (or of one ``shard`` of it) and write ``out_path`` (parquet). Without a
    detector, fit one on the very rows being scored (unsupervised, as in the paper)."""
    t0 = time.perf_counter()
    ds = open_dataset(path)
    refuse_reserved_columns(ds.columns)
    if shard is not None:
        ds = shard_dataset(ds, shard)
    spec = columns.resolve(ds)
    if anchors is not None and anchors != opts.anchors:
        opts = replace(opts, anchors=anchors)  # the default layer / token follow the mode
    session = session or Session(opts, detector=detector)
    if detector is None:
        detector, summary = fit(session, ds, spec, k=k, weighting=weighting, anchors=anchors, progress=progress)
    else:
        summary = embed_dataset(ds, spec, session.embedder, session.cache, progress=progress)
    if rule is None and detector.threshold is None:
        rule = ThresholdRule("contamination", DEFAULT_CONTAMINATION)
    # the digests wait on disk between pass 2 and pass 3: in memory they would be 32 bytes a row
    with tempfile.TemporaryFile(prefix="saft-digests-") as digests:
        scores = score_cached(ds, spec, session.cache, detector, session.layers, digests_to=digests)
        if rule is not None:
            tau = resolve(rule, scores)
            rule_text = rule.describe()
            detector = detector.with_(threshold=tau, meta={**detector.meta, "threshold_rule": rule_text})
        else:
            tau = float(detector.threshold)  # type: ignore[arg-type]
            fitted_rule = detector.meta.get("threshold_rule")
            rule_text = f"from the detector: {fitted_rule}" if fitted_rule else "from the detector"
        flags = detector.flag(scores)
        out = write_scored(ds, Path(out_path), scores, flags, digests, detector.detector_id)
    return ScoreResult(out_path=out, detector=detector, threshold=tau, threshold_rule=rule_text, rows=len(scores),
                       flagged=int(flags.sum()), embed=summary, seconds=time.perf_counter() - t0,
                       source_sha256=ds.sha256(), columns=spec,
                       extra={"row_range": (first_row_id(ds), first_row_id(ds) + len(scores))})


# ---- in-memory use (Great Expectations metrics, notebooks): rows already in a DataFrame ----

_SESSIONS: dict[tuple, Session] = {}


def shared_session(opts: EmbedOptions, detector: Detector | None = None) -> Session:
    """One Session per (model, embedding settings) per process, so repeated calls load the model once."""
    meta = detector.meta if detector is not None else {}
    key = (opts.model or meta.get("model"), opts.layer or meta.get("layer"), opts.layers or tuple(meta.get("layers") or ()),
           opts.token or meta.get("token"),
           meta.get("max_tokens", opts.max_tokens), meta.get("overlong", opts.overlong), opts.device, opts.dtype,
           opts.cache_dir, opts.batch_tokens, opts.anchors and detector is None, opts.adapt)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session(opts, detector=detector)
    elif detector is not None:
        check_detector_matches(detector, _SESSIONS[key].lm, opts)
    return _SESSIONS[key]


def embed_rows(session: Session, rows: list, first_row_id: int = 0, flush_rows: int = 512) -> np.ndarray:
    """(n, d · layers) float32 embeddings of ``rows`` at the session's layers, computing only cache misses."""
    keys = [r.content_key() for r in rows]
    caches = [session.cache.layer(layer) for layer in session.layers]
    missing = np.flatnonzero(session.cache.missing(keys, session.layers))
    if len(missing):
        tokenized = session.embedder.tokenize([rows[i] for i in missing], [first_row_id + int(i) for i in missing])
        for start in range(0, len(missing), flush_rows):
            part = range(start, min(start + flush_rows, len(missing)))
            vecs = session.embedder.embed_tokenized([tokenized[j] for j in part])
            for li, lc in enumerate(caches):
                lc.put([keys[missing[j]] for j in part], vecs[:, li, :])
    return _side_by_side(caches, keys)


def score_frame(df: Any, *, columns: ColumnOptions | None = None, detector: Detector | None = None,
                opts: EmbedOptions | None = None, k: int | None = None, weighting: str | None = None,
                anchors: bool | None = None) -> tuple[np.ndarray, Detector]:
    """Harm scores of a pandas DataFrame's rows (same formatting, cache and detector as ``score``).
    Without a detector, one is fitted on these rows. Returns (scores, detector)."""
    opts = opts or EmbedOptions()
    columns = columns or ColumnOptions()
    spec = detect_columns([str(c) for c in df.columns], prompt=columns.prompt, response=columns.response,
                          text=columns.text, messages=columns.messages)
    rows = rows_from_frame(df, spec, 0)
    if not rows:
        raise SaftError("no rows to score")
    if anchors is not None and anchors != opts.anchors:
        opts = replace(opts, anchors=anchors)
    anchors = opts.anchors
    session = shared_session(opts, detector)
    x = embed_rows(session, rows)
    if detector is None:
        stats = MomentStats(x.shape[1]).update(x)
        meta = {**embedding_meta(session.lm, session.layers, session.config.token, session.config.max_tokens,
                                 session.config.overlong), "columns": spec.to_dict()}
        detector = fit_with_session(session, stats, k=k, weighting=weighting, anchors=anchors, meta=meta,
                                    data_coords=lambda d: d.project(x), data_rows=lambda idx: x[idx])
    return detector.score(x), detector


def embed_into_cache(embedder: Embedder, cache: EmbeddingCache, rows: list, flush_rows: int = 512) -> list[str]:
    """Make sure ``rows`` (e.g. the anchors) are in ``cache`` at every layer of ``embedder``; returns their keys."""
    keys = [r.content_key() for r in rows]
    missing = np.flatnonzero(cache.missing(keys, embedder.config.layers))
    if len(missing):
        tokenized = embedder.tokenize([rows[i] for i in missing], [int(i) for i in missing])
        order = sorted(range(len(missing)), key=lambda j: -len(tokenized[j].ids))
        for start in range(0, len(order), flush_rows):
            part = order[start : start + flush_rows]
            vecs = embedder.embed_tokenized([tokenized[j] for j in part])
            for li, layer in enumerate(embedder.config.layers):
                cache.layer(layer).put([keys[missing[j]] for j in part], vecs[:, li, :])
    return keys


def session_anchor_vectors(session: Session) -> np.ndarray:
    """The built-in anchors embedded by ``session`` (its model, layer, token position and cache), in anchor order;
    a separate Embedder, so the session's counters keep counting dataset rows only."""
    keys = embed_into_cache(Embedder(session.lm, session.config), session.cache, anchor_rows()[0])
    return stacked(session.cache, session.layers, keys)


def fit_with_session(session: Session, stats: MomentStats, *, k: int | None = None, weighting: str | None = None,
                     anchors: bool = USE_ANCHORS, meta: dict[str, Any] | None = None,
                     data_coords: Callable[[Detector], np.ndarray] | None = None,
                     data_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> Detector:
    """``anchors.fit_default`` with the anchors embedded like the data (``session_anchor_vectors``), adapted to
    the data through ``data_coords`` and ``data_rows`` unless the session's options say ``adapt=False``; the anchors' whole-state
    probes are kept in the session's cache folder (``anchor-probes/``), so a rerun does not fit them again."""
    return fit_default(stats, k=k, weighting=weighting, anchors=anchors, meta=meta,
                       anchor_vectors=lambda: session_anchor_vectors(session),
                       data_coords=data_coords, adapt=session.adapt,
                       probe_store=ArrayFolder(session.cache.folder / "anchor-probes"), data_rows=data_rows)
