import numpy as np

from saft_gx.cache import EmbeddingCache


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
