"""On-disk embedding cache, keyed by row content × model × layer × token position.

Layout: ``<root>/<model fingerprint[:16]>/<token>-max<max_tokens>-<overlong>/layer<L>/`` holding shards of
two ``.npy`` files: ``<id>.emb.npy`` (n×d float16) and ``<id>.keys.npy`` (n×32 uint8 sha256 digests).
The keys file is renamed into place last, so a shard exists only once both files are complete: a run
killed half way leaves whole shards behind and resumes from them. Shards are memory-mapped on read, so
the cache can be far larger than RAM. Only ``np.load(allow_pickle=False)`` is ever used.
"""

from __future__ import annotations

import os
import threading
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..core.paths import default_cache_dir
from ..core.subspace import atomic_write


def key_digests(keys: Sequence[str]) -> np.ndarray:
    """Hex sha256 keys → (n, 32) uint8 digests."""
    return np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(len(keys), 32)


def _prefix(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each digest as a big-endian uint64: sorts like the digest, compares as a number."""
    return np.ascontiguousarray(digests[:, :8]).view(">u8").reshape(len(digests)).astype(np.uint64)


class _Run:
    """One sorted run of the key index: 64-bit key prefixes and where each row lives (shard, row in shard).
    Equal prefixes keep insertion order (older first); duplicates and prefix collisions are both kept and
    told apart by the full digest in the shard's keys file."""

    __slots__ = ("prefix", "shard", "row")

    def __init__(self, prefix: np.ndarray, shard: np.ndarray, row: np.ndarray):
        self.prefix, self.shard, self.row = prefix, shard, row

    @classmethod
    def of_shard(cls, digests: np.ndarray, shard: int) -> "_Run":
        prefix = _prefix(digests)
        order = np.argsort(prefix, kind="stable")
        return cls(prefix[order], np.full(len(order), shard, dtype=np.int32), order.astype(np.int32))

    def merge(self, newer: "_Run") -> "_Run":
        """Both runs in one, without sorting again: each newer entry goes after the older ones with its prefix.
        Besides the result, only a mask and the newer run's positions are allocated."""
        n = len(self.prefix) + len(newer.prefix)
        at = np.searchsorted(self.prefix, newer.prefix, side="right") + np.arange(len(newer.prefix))
        older = np.ones(n, dtype=bool)
        older[at] = False
        parts = []
        for a, b in ((self.prefix, newer.prefix), (self.shard, newer.shard), (self.row, newer.row)):
            out = np.empty(n, dtype=a.dtype)
            out[older], out[at] = a, b
            parts.append(out)
        return _Run(*parts)


class LayerCache:
    """Embeddings of one (model, token, layer); ``put`` appends a shard, ``get`` reads by key.

    The key index is a few sorted runs of (64-bit key prefix, shard, row): 16 bytes per row and no Python
    object per row, searched by bisection; a prefix hit is confirmed against the full digest in the shard's
    keys file. Each ``put`` adds a small run and runs are merged like a binary counter (a run absorbs the
    next when it is at most twice its size), so there are O(log n) runs and each row is merged O(log n)
    times. At most ``MAX_OPEN_SHARDS`` shards stay open: mapped pages count towards the process's resident
    set, and reading a million-row cache must not make it resident.
    """

    MAX_OPEN_SHARDS = 16

    def __init__(self, folder: Path, dim: int):
        self.folder = folder
        self.dim = dim
        self._runs: list[_Run] | None = None
        self._shards: list[Path] = []
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        # the pipeline looks keys up in a tokenizer thread while the main thread puts and gets
        self._lock = threading.RLock()

    def _index(self) -> list[_Run]:
        if self._runs is None:
            self._runs = []
            if self.folder.exists():
                for keys_path in sorted(self.folder.glob("*.keys.npy")):
                    self._add_shard(keys_path, np.load(keys_path, allow_pickle=False))
        return self._runs

    def _add_shard(self, keys_path: Path, digests: np.ndarray) -> None:
        assert self._runs is not None
        self._shards.append(keys_path)
        self._runs.append(_Run.of_shard(np.asarray(digests, dtype=np.uint8).reshape(-1, 32), len(self._shards) - 1))
        while len(self._runs) > 1 and len(self._runs[-2].prefix) <= 2 * len(self._runs[-1].prefix):
            newer = self._runs.pop()
            self._runs[-1] = self._runs[-1].merge(newer)

    def _shard_array(self, shard: int, kind: str) -> np.ndarray:
        """The shard's ``keys`` (n×32 uint8) or ``emb`` (n×d float16) array, memory-mapped, least recently used
        closed first."""
        if (shard, kind) in self._open:
            self._open.move_to_end((shard, kind))
        else:
            keys_path = self._shards[shard]
            path = keys_path if kind == "keys" else keys_path.with_name(keys_path.name.replace(".keys.npy", ".emb.npy"))
            self._open[(shard, kind)] = np.load(path, mmap_mode="r", allow_pickle=False)
            if len(self._open) > self.MAX_OPEN_SHARDS:
                self._open.popitem(last=False)  # unmapped once no array refers to it
        return self._open[(shard, kind)]

    def _gather(self, kind: str, shard: np.ndarray, row: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[i] = the ``kind`` array of shard[i] at row[i], reading each shard once."""
        order = np.argsort(shard, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1):
            if len(group):
                out[group] = self._shard_array(int(shard[group[0]]), kind)[row[group]]
        return out

    def _locate(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) per key; shard −1 where the key is absent. Older runs and entries win."""
        q = key_digests(keys)
        qp = _prefix(q)
        shard = np.full(len(q), -1, dtype=np.int32)
        row = np.zeros(len(q), dtype=np.int32)
        for run in self._index():
            lo = np.searchsorted(run.prefix, qp, side="left")
            hi = np.searchsorted(run.prefix, qp, side="right")
            t = 0
            while True:  # the t-th entry with the query's prefix: almost always only t = 0 exists
                cand = np.flatnonzero((shard < 0) & (lo + t < hi))
                if len(cand) == 0:
                    break
                at = lo[cand] + t
                s, r = run.shard[at], run.row[at]
                full = self._gather("keys", s, r, np.empty((len(cand), 32), dtype=np.uint8))
                ok = (full == q[cand]).all(axis=1)
                shard[cand[ok]], row[cand[ok]] = s[ok], r[ok]
                t += 1
        return shard, row

    def __len__(self) -> int:
        """Distinct keys (reads every keys file: for tests and diagnostics)."""
        with self._lock:
            self._index()
        if not self._shards:
            return 0
        every = np.concatenate([np.load(p, allow_pickle=False) for p in self._shards])
        return len(np.unique(every.view("V32").reshape(len(every))))

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        with self._lock:
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
        digests = key_digests(keys)
        atomic_write(emb_path, lambda p: _save_npy(p, vectors.astype(np.float16)))
        atomic_write(keys_path, lambda p: _save_npy(p, digests))
        with self._lock:
            if self._runs is not None:
                self._add_shard(keys_path, digests)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """float32 (n, d) for keys that are all present (KeyError otherwise)."""
        with self._lock:
            shard, row = self._locate(keys)
            if (shard < 0).any():
                raise KeyError(keys[int(np.flatnonzero(shard < 0)[0])])
            return self._gather("emb", shard, row, np.empty((len(keys), self.dim), dtype=np.float32))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


class ArrayFolder:
    """Small named sets of arrays kept as ``<key>.npz`` in one folder (e.g. the anchors' fitted probes, beside
    their embeddings): written atomically, read with ``allow_pickle=False``; a missing or unreadable file is a miss."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.folder / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                return {name: z[name] for name in z.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, or damaged on disk
            return None

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        def write(path: Path) -> None:
            with open(path, "wb") as fh:  # a file object: np.savez would add ".npz" to the temporary name
                np.savez(fh, **arrays)

        atomic_write(self.folder / f"{key}.npz", write)


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
