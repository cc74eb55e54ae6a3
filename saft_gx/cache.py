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


def _digest(key: str) -> bytes:
    return bytes.fromhex(key)


class LayerCache:
    """Embeddings of one (model, token, layer); ``put`` appends a shard, ``get`` reads by key."""

    def __init__(self, folder: Path, dim: int):
        self.folder = folder
        self.dim = dim
        self._index: dict[bytes, tuple[int, int]] | None = None
        self._shards: list[Path] = []
        self._mmaps: dict[int, np.ndarray] = {}

    def _load_index(self) -> dict[bytes, tuple[int, int]]:
        if self._index is None:
            self._index = {}
            if self.folder.exists():
                for keys_path in sorted(self.folder.glob("*.keys.npy")):
                    self._add_shard(keys_path)
        return self._index

    def _add_shard(self, keys_path: Path) -> None:
        assert self._index is not None
        keys = np.load(keys_path, allow_pickle=False)
        s = len(self._shards)
        self._shards.append(keys_path)
        for row, k in enumerate(keys):
            self._index.setdefault(k.tobytes(), (s, row))

    def __len__(self) -> int:
        return len(self._load_index())

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        index = self._load_index()
        return np.fromiter((_digest(k) in index for k in keys), dtype=bool, count=len(keys))

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
        digests = np.frombuffer(b"".join(_digest(k) for k in keys), dtype=np.uint8).reshape(len(keys), 32)
        atomic_write(emb_path, lambda p: _save_npy(p, vectors.astype(np.float16)))
        atomic_write(keys_path, lambda p: _save_npy(p, digests))
        if self._index is not None:
            self._add_shard(keys_path)

    def _emb(self, shard: int) -> np.ndarray:
        if shard not in self._mmaps:
            keys_path = self._shards[shard]
            emb_path = keys_path.with_name(keys_path.name.replace(".keys.npy", ".emb.npy"))
            self._mmaps[shard] = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        return self._mmaps[shard]

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """float32 (n, d) for keys that are all present (KeyError otherwise)."""
        index = self._load_index()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for i, k in enumerate(keys):
            s, r = index[_digest(k)]
            dst, src = by_shard.setdefault(s, ([], []))
            dst.append(i)
            src.append(r)
        for s, (dst, src) in by_shard.items():
            out[dst] = self._emb(s)[src]
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
