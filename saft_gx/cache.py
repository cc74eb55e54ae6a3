"""On-disk embedding cache, keyed by row content × model × layer × token position.

Layout: ``<root>/<model fingerprint[:16]>/<token>-max<max_tokens>-<overlong>/layer<L>/`` holding shards of
two ``.npy`` files: ``<id>.emb.npy`` (n×d float16) and ``<id>.keys.npy`` (n×32 uint8 sha256 digests).
The keys file is renamed into place last, so a shard exists only once both files are complete: a run
killed half way leaves whole shards behind and resumes from them. Shards are memory-mapped on read, so
the cache can be far larger than RAM. Only ``np.load(allow_pickle=False)`` is ever used.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .subspace import atomic_write


def default_cache_dir() -> Path:
    env = os.environ.get("SAFT_GX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saft_gx"


def _digests(keys: Sequence[str]) -> np.ndarray:
    """Hex sha256 keys → (n,) ``S32`` digests: fixed-width bytes that numpy sorts and binary-searches."""
    return np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype="S32")


class _Run:
    """One sorted run of the key index: unique digests and where each row lives (shard, row in shard)."""

    __slots__ = ("keys", "shard", "row")

    def __init__(self, keys: np.ndarray, shard: np.ndarray, row: np.ndarray):
        self.keys, self.shard, self.row = keys, shard, row

    @classmethod
    def build(cls, keys: np.ndarray, shard: np.ndarray, row: np.ndarray) -> "_Run":
        """Sorted and deduplicated; of equal keys the first given wins (the stable sort keeps it first)."""
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        keep = order[first]
        return cls(keys[first], shard[keep], row[keep])

    @classmethod
    def merge(cls, older: "_Run", newer: "_Run") -> "_Run":
        return cls.build(np.concatenate([older.keys, newer.keys]), np.concatenate([older.shard, newer.shard]),
                         np.concatenate([older.row, newer.row]))

    def find(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, position in this run) of the digests ``q``."""
        if len(self.keys) == 0:
            return np.zeros(len(q), dtype=bool), np.zeros(len(q), dtype=np.intp)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[pos] == q, pos


class LayerCache:
    """Embeddings of one (model, token, layer); ``put`` appends a shard, ``get`` reads by key.

    The key index is a few sorted numpy runs (32-byte digest + shard + row: 40 bytes per row, no Python
    object per row), searched by bisection. Each ``put`` adds a small run and runs are merged like a
    binary counter (a run absorbs the next when it is no more than twice its size), so there are O(log n)
    runs and building the index over n rows costs O(n log² n) comparisons in numpy, not Python.
    At most ``MAX_OPEN_SHARDS`` embedding shards stay memory-mapped: mapped pages count towards the
    process's resident set, and a million-row cache must not become resident just because it was read.
    """

    MAX_OPEN_SHARDS = 16

    def __init__(self, folder: Path, dim: int):
        self.folder = folder
        self.dim = dim
        self._runs: list[_Run] | None = None
        self._shards: list[Path] = []
        self._mmaps: OrderedDict[int, np.ndarray] = OrderedDict()

    def _index(self) -> list[_Run]:
        if self._runs is None:
            self._runs = []
            if self.folder.exists():
                for keys_path in sorted(self.folder.glob("*.keys.npy")):
                    self._add_shard(keys_path, np.load(keys_path, allow_pickle=False))
        return self._runs

    def _add_shard(self, keys_path: Path, digests: np.ndarray) -> None:
        assert self._runs is not None
        s = len(self._shards)
        self._shards.append(keys_path)
        n = len(digests)
        keys = np.ascontiguousarray(digests, dtype=np.uint8).reshape(n, 32).view("S32").reshape(n)
        self._runs.append(_Run.build(keys, np.full(n, s, dtype=np.int32), np.arange(n, dtype=np.int32)))
        while len(self._runs) > 1 and len(self._runs[-2].keys) <= 2 * len(self._runs[-1].keys):
            newer = self._runs.pop()
            self._runs[-1] = _Run.merge(self._runs[-1], newer)

    def _locate(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) per key; shard −1 where the key is absent. Older runs win, as in ``_Run.build``."""
        q = _digests(keys)
        shard = np.full(len(q), -1, dtype=np.int32)
        row = np.zeros(len(q), dtype=np.int32)
        for run in self._index():
            hit, pos = run.find(q)
            hit &= shard < 0
            shard[hit], row[hit] = run.shard[pos[hit]], run.row[pos[hit]]
        return shard, row

    def __len__(self) -> int:
        runs = self._index()
        if len(runs) > 1:  # runs may share keys (the same row put twice): count after merging them all
            merged = runs[0]
            for run in runs[1:]:
                merged = _Run.merge(merged, run)
            runs[:] = [merged]
        return len(runs[0].keys) if runs else 0

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        return self._locate(keys)[0] >= 0

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        vectors = np.asarray(vectors)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected ({len(keys)}, {self.dim}) vectors, got {vectors.shape}")
        self.folder.mkdir(parents=True, exist_ok=True)
        sid = uuid.uuid4().hex
        emb_path = self.folder / f"{sid}.emb.npy"
        keys_path = self.folder / f"{sid}.keys.npy"
        digests = _digests(keys).view(np.uint8).reshape(len(keys), 32)
        atomic_write(emb_path, lambda p: _save_npy(p, vectors.astype(np.float16)))
        atomic_write(keys_path, lambda p: _save_npy(p, digests))
        if self._runs is not None:
            self._add_shard(keys_path, digests)

    def _emb(self, shard: int) -> np.ndarray:
        if shard in self._mmaps:
            self._mmaps.move_to_end(shard)
        else:
            keys_path = self._shards[shard]
            emb_path = keys_path.with_name(keys_path.name.replace(".keys.npy", ".emb.npy"))
            self._mmaps[shard] = np.load(emb_path, mmap_mode="r", allow_pickle=False)
            if len(self._mmaps) > self.MAX_OPEN_SHARDS:
                self._mmaps.popitem(last=False)  # unmapped once no array refers to it
        return self._mmaps[shard]

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """float32 (n, d) for keys that are all present (KeyError otherwise)."""
        shard, row = self._locate(keys)
        if (shard < 0).any():
            raise KeyError(keys[int(np.flatnonzero(shard < 0)[0])])
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for group in np.split(order, bounds):
            if len(group):
                out[group] = self._emb(int(shard[group[0]]))[row[group]]
        return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


class EmbeddingCache:
    """All layers of one (model, token position, truncation) setting."""

    def __init__(self, root: str | os.PathLike[str] | None, *, model_fingerprint: str, token: str,
                 max_tokens: int, overlong: str, dim: int):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.folder = self.root / model_fingerprint[:16] / f"{token}-max{max_tokens}-{overlong}"
        self.dim = dim
        self._layers: dict[int, LayerCache] = {}

    def layer(self, layer: int) -> LayerCache:
        if layer not in self._layers:
            self._layers[layer] = LayerCache(self.folder / f"layer{layer}", self.dim)
        return self._layers[layer]

    def missing(self, keys: Sequence[str], layers: Iterable[int]) -> np.ndarray:
        """True where any of ``layers`` lacks the key."""
        miss = np.zeros(len(keys), dtype=bool)
        for layer in layers:
            miss |= ~self.layer(layer).contains(keys)
        return miss
