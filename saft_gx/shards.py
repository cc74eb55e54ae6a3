"""Split one dataset over n machines (``--shard i/n``) and merge their fit statistics into one detector.

A shard is a *contiguous range of global row ids*: with N rows, shard i of n (0 ≤ i < n) holds rows
``[i·N // n, (i+1)·N // n)``. Contiguous ranges let each machine read only its own parquet row groups, keep
the row ids in error messages and in the output global (row 5,000,123 is row 5,000,123 on every machine),
and make each shard's rows in DuckDB one ``row_id`` range. Shards hold equal numbers of *rows*, not of
tokens: a file sorted by length gives unequal run times, so shuffle such a file once before splitting it.

The fit side of a sharded run: every machine runs ``saft-gx fit data.parquet --shard i/n --stats-out
stats_i/`` (its embeddings land in its own cache, its statistics n, Σx, Σxxᵀ in ``stats_i/``); then
``saft-gx merge-stats stats_*/ -o detector/`` sums them (exactly: the sums are associative) and fits one
detector; then every machine scores its shard from its cache with ``saft-gx score data.parquet --shard i/n
--detector detector/``. Statistics are safetensors + JSON, never pickle.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from .core.errors import SaftError
from .io.readers import Dataset, first_line
from .core.subspace import Detector, MomentStats, atomic_write

STATS_TENSORS = "stats.safetensors"
STATS_META = "stats.json"
# statistics merge only when these describe the same embedding
EMBEDDING_KEYS = ("model_fingerprint", "layer", "layers", "token", "max_tokens", "overlong")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): a contiguous range of global row ids."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m:
            raise SaftError(f"--shard {text!r}: expected i/n, e.g. 0/4 (shards are numbered from 0)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or index >= count:
            raise SaftError(f"--shard {text}: need 0 <= i < n (shards are numbered 0..n-1)")
        return cls(index, count)

    def bounds(self, num_rows: int) -> tuple[int, int]:
        """Global row ids ``[start, stop)`` of this shard in a dataset of ``num_rows`` rows."""
        return self.index * num_rows // self.count, (self.index + 1) * num_rows // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class ShardedDataset(Dataset):
    """The rows ``[start, stop)`` of a dataset file; ``frames`` yields *global* first row ids, so every
    downstream error message and output ``row_id`` names the row's position in the whole file."""

    shard: Shard = Shard(0, 1)
    start: int = 0
    stop: int = 0

    @property
    def first_row_id(self) -> int:
        return self.start

    def frames(self, columns: list[str] | None = None, batch_rows: int = 4096) -> Iterator[tuple[int, pd.DataFrame]]:
        if self.fmt != "parquet":
            for first, df in super().frames(columns, batch_rows):
                lo, hi = max(first, self.start), min(first + len(df), self.stop)
                if lo < hi:
                    yield lo, df.iloc[lo - first : hi - first].reset_index(drop=True)
                if first + len(df) >= self.stop:
                    return
            return
        pos = self.start
        try:
            for batch in self._parquet_batches(columns, batch_rows):
                df = batch.to_pandas()
                yield pos, df
                pos += len(df)
        except SaftError:
            raise
        except Exception as e:
            raise SaftError(f"{self.path}: unreadable after row {pos} ({first_line(e)})") from None

    def arrow_batches(self, batch_rows: int = 4096) -> Iterator[Any]:
        if self.fmt == "parquet":
            yield from self._parquet_batches(None, batch_rows)
            return
        import pyarrow as pa

        for _, df in self.frames(batch_rows=batch_rows):
            yield pa.RecordBatch.from_pandas(df, preserve_index=False)

    def _parquet_batches(self, columns: list[str] | None, batch_rows: int) -> Iterator[Any]:
        """Record batches of rows ``[start, stop)``, reading only the row groups that overlap them."""
        from .io.readers import open_parquet

        pf = open_parquet(self.path)
        groups, offset, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < self.stop and offset + n > self.start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return
        pos = first
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns, row_groups=groups):
            lo, hi = max(pos, self.start), min(pos + batch.num_rows, self.stop)
            if lo < hi:
                yield batch.slice(lo - pos, hi - lo)
            pos += batch.num_rows
            if pos >= self.stop:
                return


def count_rows(ds: Dataset) -> int:
    """Rows in the file: from the parquet footer, or one streaming pass over a jsonl / csv file."""
    if ds.num_rows is not None:
        return int(ds.num_rows)
    return sum(len(df) for _, df in ds.frames(ds.columns[:1]))


def shard_dataset(ds: Dataset, shard: Shard) -> ShardedDataset:
    total = count_rows(ds)
    start, stop = shard.bounds(total)
    if start == stop:
        raise SaftError(f"--shard {shard}: the dataset has only {total} rows, so this shard is empty; use fewer shards")
    return ShardedDataset(ds.path, ds.fmt, ds.columns, stop - start, shard=shard, start=start, stop=stop)


def first_row_id(ds: Dataset) -> int:
    """Global row id of the dataset's first row: 0, or a shard's start."""
    return ds.start if isinstance(ds, ShardedDataset) else 0


# ---- fit statistics on disk ----

def save_stats(folder: str | os.PathLike[str], stats: MomentStats, meta: dict[str, Any], *,
               anchors: np.ndarray | None = None) -> Path:
    """``stats.safetensors`` (n, Σx, Σxxᵀ in float64, and the built-in anchors' vectors at the same embedding,
    so ``merge-stats`` can direct the detector without a model) and ``stats.json`` (the embedding and the rows)."""
    from safetensors.numpy import save_file

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in stats.to_arrays().items()}
    if anchors is not None:
        arrays["anchors"] = np.ascontiguousarray(anchors, dtype=np.float32)
    atomic_write(d / STATS_TENSORS, lambda p: save_file(arrays, str(p)))
    body = {**meta, "n": stats.n, "dim": stats.dim}
    atomic_write(d / STATS_META, lambda p: p.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n"))
    return d


def load_stats(folder: str | os.PathLike[str]) -> tuple[MomentStats, dict[str, Any], np.ndarray | None]:
    """(statistics, metadata, anchor vectors or None) of a folder written by ``save_stats``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    d = Path(folder)
    if d.is_file():
        d = d.parent
    meta_path, tensor_path = d / STATS_META, d / STATS_TENSORS
    if not meta_path.exists() or not tensor_path.exists():
        raise SaftError(f"{folder}: expected {STATS_META} and {STATS_TENSORS} (written by `saft-gx fit --stats-out`)")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = load_file(str(tensor_path))
        stats = MomentStats.from_arrays(arrays)
    except (json.JSONDecodeError, SafetensorError, OSError, KeyError) as e:
        raise SaftError(f"{folder}: unreadable statistics ({first_line(e)})") from None
    if stats.n != meta.get("n"):
        raise SaftError(f"{folder}: {STATS_META} says n={meta.get('n')} but the tensors hold n={stats.n}")
    return stats, meta, arrays.get("anchors")


def merge_stats(folders: Sequence[str | os.PathLike[str]], *,
                partial: bool = False) -> tuple[MomentStats, list[dict[str, Any]], np.ndarray | None]:
    """Sum the statistics of several folders; returns (sum, each folder's metadata, anchor vectors). Refuses
    statistics of different embeddings (model, layer, token, truncation), the same shard twice, and —
    unless ``partial`` — an incomplete set of shards."""
    if not folders:
        raise SaftError("no statistics folders given")
    loaded = [(str(f), *load_stats(f)) for f in folders]
    first_name, total, first_meta, anchors = loaded[0]
    metas = [first_meta]
    for name, stats, meta, _anchors in loaded[1:]:
        for key in EMBEDDING_KEYS:
            if meta.get(key) != first_meta.get(key):
                raise SaftError(
                    f"{name} and {first_name} were embedded differently ({key} {meta.get(key)!r} vs "
                    f"{first_meta.get(key)!r}); only statistics of the same model, layer and token merge"
                )
        if stats.dim != total.dim:
            raise SaftError(f"{name} has dimension {stats.dim}, {first_name} {total.dim}")
        total = total.merge(stats)
        metas.append(meta)
    seen: dict[tuple[Any, Any], str] = {}
    by_source: dict[Any, set[int]] = {}
    for (name, _s, meta, _a) in loaded:
        key = (meta.get("source_sha256"), meta.get("shard"))
        if key in seen:
            what = f"shard {meta.get('shard')} of {meta.get('source')}" if meta.get("shard") else str(meta.get("source"))
            raise SaftError(f"{name} and {seen[key]} both hold {what}: merging them would count its rows twice")
        seen[key] = name
        if meta.get("shard"):
            shard = Shard.parse(meta["shard"])
            by_source.setdefault((meta.get("source_sha256"), meta.get("source"), shard.count), set()).add(shard.index)
    if not partial:
        for (_sha, source, count), have in by_source.items():
            missing = sorted(set(range(count)) - have)
            if missing:
                raise SaftError(
                    f"{source}: shards {', '.join(f'{i}/{count}' for i in missing)} are missing; "
                    "merge all of them, or pass --partial to fit on the shards given"
                )
    if anchors is None:
        anchors = next((a for _n, _s, _m, a in loaded if a is not None), None)
    return total, metas, anchors


def detector_from_stats(stats: MomentStats, metas: list[dict[str, Any]], *, k: int | None = None,
                        weighting: str | None = None, anchors: bool = True, anchor_vectors: np.ndarray | None = None,
                        threshold: float | None = None, adapt: bool = False) -> Detector:
    """One detector from merged statistics, fitted as ``saft-gx fit`` fits one (``anchors.fit_default``);
    its metadata is the shared embedding plus where it came from."""
    from .detect.anchors import fit_default

    first = metas[0]
    sources = sorted({str(m.get("source")) for m in metas})
    meta = {key: first[key] for key in ("model", *EMBEDDING_KEYS, "subspace_layer", "columns") if key in first}
    meta.update({
        "fitted_on": sources[0] if len(sources) == 1 else sources,
        "shards": len(metas),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    if anchors and anchor_vectors is None:
        raise SaftError("these statistics hold no anchor vectors (written by an older saft-gx?); pass --no-anchors")
    det = fit_default(stats, k=k, weighting=weighting, anchors=anchors, meta=meta,
                      anchor_vectors=lambda: anchor_vectors, adapt=adapt)
    return det.with_(threshold=threshold) if threshold is not None else det
