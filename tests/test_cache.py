import numpy as np

from saft_gx.io.cache import EmbeddingCache


def test_put_get_roundtrip_and_persistence(tmp_path):
    c = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=4)
    keys = [f"{i:064x}" for i in range(5)]
    v = np.arange(20, dtype=np.float32).reshape(5, 4) / 3
    c.layer(3).put(keys[:3], v[:3])
    c.layer(3).put(keys[3:], v[3:])
    assert c.missing(keys + ["a" * 64], [3]).tolist() == [False] * 5 + [True]
    assert c.missing(keys, [4]).all()
    again = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=4)
    got = again.layer(3).get([keys[4], keys[0]])
    np.testing.assert_array_equal(got, v[[4, 0]].astype(np.float16).astype(np.float32))


def test_half_written_shard_is_ignored(tmp_path):
    c = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    c.layer(1).put(["0" * 64], np.ones((1, 2)))
    folder = c.layer(1).folder
    # a killed writer leaves an embeddings file without its keys file (or a temp file)
    (folder / "dead.emb.npy").write_bytes(b"partial")
    (folder / ".x.keys.npy.123.tmp").write_bytes(b"partial")
    fresh = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    assert len(fresh.layer(1)) == 1


def test_namespaces_do_not_mix(tmp_path):
    a = EmbeddingCache(tmp_path, model_fingerprint="a" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    b = EmbeddingCache(tmp_path, model_fingerprint="b" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    a.layer(1).put(["0" * 64], np.ones((1, 2)))
    assert b.missing(["0" * 64], [1]).all()


def test_index_matches_a_dict_over_many_puts_duplicates_and_reopen(tmp_path, monkeypatch):
    """The sorted-run index answers like a plain dict: first write of a key wins, across merges and reopens,
    and reads are right when shards have been unmapped (more shards than MAX_OPEN_SHARDS)."""
    from saft_gx.io.cache import LayerCache

    monkeypatch.setattr(LayerCache, "MAX_OPEN_SHARDS", 3)
    rng = np.random.default_rng(0)
    c = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=3)
    layer = c.layer(2)
    assert not layer.contains(["0" * 64]).any()  # builds the (empty) index, which puts then extend
    ref: dict[str, np.ndarray] = {}
    for size in [1, 7, 7, 30, 2, 64, 5, 5, 5, 100, 3]:
        ids = rng.integers(0, 150, size=size)  # collisions with earlier puts and within a put
        keys = [f"{i:064x}" for i in ids]
        vecs = rng.normal(size=(size, 3)).astype(np.float16).astype(np.float32)
        layer.put(keys, vecs)
        for k, v in zip(keys, vecs):
            ref.setdefault(k, v)
    assert len(layer._runs) < 11  # merged, not one run per put
    probe = list(ref) + [f"{i:064x}" for i in range(150, 160)]
    rng.shuffle(probe)
    for cache in (c, EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10,
                                    overlong="error", dim=3)):
        lc = cache.layer(2)
        np.testing.assert_array_equal(lc.contains(probe), [k in ref for k in probe])
        present = [k for k in probe if k in ref]
        got = lc.get(present)
        assert len(lc._open) <= 3
        if cache is c:  # the reopened cache reads shards in file-name order, so "first" differs between them
            np.testing.assert_array_equal(got, np.stack([ref[k] for k in present]))
        assert len(lc) == len(ref)
    try:
        layer.get([probe[0], "e" * 64])
    except KeyError as e:
        assert "e" * 64 in str(e)
    else:
        raise AssertionError("a missing key must raise KeyError")


def test_keys_sharing_their_first_8_bytes_are_told_apart(tmp_path):
    """The index searches 64-bit key prefixes; rows whose digests share a prefix must still each get their own
    vector (the full digest in the shard's keys file decides), and one that only shares the prefix is absent."""
    c = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    layer = c.layer(0)
    layer.contains([])  # build the index, so puts extend it
    same = ["ab" * 8 + f"{i:048x}" for i in range(6)]
    for i in range(0, 6, 2):  # in three shards, so the collisions span runs and merged runs
        layer.put(same[i:i + 2], np.array([[i, 0], [i + 1, 0]], dtype=np.float32))
    stranger = "ab" * 8 + "f" * 48
    assert layer.contains(same + [stranger]).tolist() == [True] * 6 + [False]
    np.testing.assert_array_equal(layer.get(same[::-1])[:, 0], np.arange(6)[::-1])
    fresh = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    np.testing.assert_array_equal(fresh.layer(0).get(same)[:, 0], np.arange(6))
    assert len(fresh.layer(0)) == 6


def test_lookups_in_another_thread_while_putting(tmp_path, monkeypatch):
    """The pipeline looks keys up in its tokenizer thread while the main thread puts and gets. Here the main
    thread evicts a memory map exactly between the lookup thread's "is it open?" and its use of it (the
    interleaving is forced, not hoped for): without the cache's lock that raised KeyError in the thread."""
    import threading
    from collections import OrderedDict

    from saft_gx.io.cache import LayerCache

    monkeypatch.setattr(LayerCache, "MAX_OPEN_SHARDS", 1)
    c = EmbeddingCache(tmp_path, model_fingerprint="f" * 64, token="last", max_tokens=10, overlong="error", dim=2)
    lc = c.layer(1)
    a, b = [f"{i:064x}" for i in range(4)], [f"{i:064x}" for i in range(4, 8)]
    lc.contains([])
    lc.put(a, np.zeros((4, 2)))
    assert lc.contains(a).all()  # shard a's keys are now the one open map
    paused, evicted, errors = threading.Event(), threading.Event(), []

    class PauseAfterMembershipCheck(OrderedDict):
        def __contains__(self, key):
            hit = super().__contains__(key)
            if hit and threading.current_thread() is reader and not paused.is_set():
                paused.set()
                evicted.wait(timeout=1)  # with the lock, the main thread cannot evict until this lookup ends
            return hit

    lc._open = PauseAfterMembershipCheck(lc._open)

    def lookup() -> None:
        try:
            assert lc.contains(a).all()
        except Exception as e:  # noqa: BLE001 - any failure in the thread is the finding
            errors.append(repr(e))

    reader = threading.Thread(target=lookup)
    reader.start()
    assert paused.wait(timeout=5)
    lc.put(b, np.ones((4, 2)))
    np.testing.assert_array_equal(lc.get(b), np.ones((4, 2)))  # opens shard b's maps, evicting shard a's
    evicted.set()
    reader.join()
    assert errors == []
