import numpy as np
import pytest
import torch

from saft_gx.embedding.embed import EmbedConfig, Embedder
from saft_gx.core.errors import SaftError
from saft_gx.embedding.rows import Row, format_row

ROWS = [Row(messages=(("user", f"question number {i} " * (1 + i % 5)), ("assistant", "an answer " * (1 + i % 3))))
        for i in range(12)]


def _reference(lm, row, layer, pos=None):
    text, _ = format_row(lm.tokenizer, row)
    enc = lm.tokenizer([text], add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        hs = lm.model(**enc, output_hidden_states=True).hidden_states
    return hs[layer][0, -1 if pos is None else pos].numpy()


def test_stops_at_layer_and_matches_full_forward(tiny_lm):
    emb = Embedder(tiny_lm, EmbedConfig(layers=(1, 3), token="last", batch_tokens=64))
    vecs = emb.embed(ROWS)
    assert vecs.shape == (12, 2, 32)
    assert emb.forward_calls > 1  # the small token budget forced several length-sorted batches
    for i in (0, 7, 11):
        np.testing.assert_allclose(vecs[i, 0], _reference(tiny_lm, ROWS[i], 1), atol=1e-4)
        np.testing.assert_allclose(vecs[i, 1], _reference(tiny_lm, ROWS[i], 3), atol=1e-4)


def test_batching_does_not_change_vectors(tiny_lm):
    big = Embedder(tiny_lm, EmbedConfig(layers=(2,), batch_tokens=100000)).embed(ROWS)
    single = np.stack([Embedder(tiny_lm, EmbedConfig(layers=(2,))).embed([r])[0] for r in ROWS])
    np.testing.assert_allclose(big, single, atol=1e-4)


def test_prompt_end_is_the_assistant_header(tiny_lm):
    emb = Embedder(tiny_lm, EmbedConfig(layers=(2,), token="prompt-end"))
    row = ROWS[3]
    [t] = emb.tokenize([row], [0])
    text, head = format_row(tiny_lm.tokenizer, row)
    head_ids = tiny_lm.tokenizer(text[:head], add_special_tokens=False)["input_ids"]
    full_ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    # only the prompt runs: the tokens after prompt-end cannot change its state in a causal model
    assert t.position == len(head_ids) - 1 == len(t.ids) - 1 < len(full_ids) - 1
    assert t.ids == full_ids[: t.position + 1]
    np.testing.assert_allclose(emb.embed([row])[0, 0], _reference(tiny_lm, row, 2, t.position), atol=1e-4)
    # the response does not influence the prompt-end vector (causal attention)
    other = Row(messages=(row.messages[0], ("assistant", "something else entirely")))
    np.testing.assert_allclose(emb.embed([other])[0, 0], emb.embed([row])[0, 0], atol=1e-5)


def test_overlong_rows(tiny_lm):
    long_row = [Row(messages=(("user", "word " * 300), ("assistant", "ok")))]
    with pytest.raises(SaftError, match=r"row 0: the row is \d+ tokens, over --max-tokens 64"):
        Embedder(tiny_lm, EmbedConfig(layers=(1,), max_tokens=64, overlong="error")).tokenize(long_row, [0])
    # truncation is the default: a long real row never stops a run
    [t] = Embedder(tiny_lm, EmbedConfig(layers=(1,), max_tokens=64)).tokenize(long_row, [0])
    assert len(t.ids) == 64 and t.position == 63 and t.truncated


def test_overlong_prompt_keeps_its_start_and_end(tiny_lm):
    """An over-long prompt loses its middle: the request's opening and its last words (and the assistant header,
    whose state is read) survive."""
    prompt = "Please help. " + "filler text " * 300 + "Now the actual question at the very end?"
    row = Row(messages=(("user", prompt), ("assistant", "ok")))
    with pytest.raises(SaftError, match=r"its prompt is \d+ tokens, over --max-tokens 64"):
        Embedder(tiny_lm, EmbedConfig(layers=(1,), max_tokens=64, overlong="error", token="prompt-end")).tokenize([row], [0])
    emb = Embedder(tiny_lm, EmbedConfig(layers=(1,), max_tokens=128, token="prompt-end"))
    [t] = emb.tokenize([row], [0])
    text, head = format_row(tiny_lm.tokenizer, row)
    full = tiny_lm.tokenizer(text[:head], add_special_tokens=False)["input_ids"]
    assert t.truncated and len(t.ids) == 128 and t.position == 127
    assert t.ids[:32] == full[:32] and t.ids[32:] == full[-96:]  # 25 % head (chat header + opening), 75 % tail
    decoded = tiny_lm.tokenizer.decode(t.ids)
    assert "Please help" in decoded and "actual question at the very end?" in decoded
    [short] = emb.tokenize([Row(messages=(("user", "hi"), ("assistant", "ok")))], [0])
    assert not short.truncated


def test_bad_layer(tiny_lm):
    with pytest.raises(SaftError, match="layers 1..4"):
        Embedder(tiny_lm, EmbedConfig(layers=(5,)))


def test_mean_pooling_and_plain_text(tiny_lm):
    emb = Embedder(tiny_lm, EmbedConfig(layers=(4,), token="mean"))
    v = emb.embed([Row(text="just some text"), ROWS[0]])
    assert v.shape == (2, 1, 32) and np.isfinite(v).all()
    # a plain-text row has no answer: its prompt-end is its last token (the whole text is the request)
    pe = Embedder(tiny_lm, EmbedConfig(layers=(4,), token="prompt-end"))
    last = Embedder(tiny_lm, EmbedConfig(layers=(4,), token="last"))
    [t] = pe.tokenize([Row(text="just some text")], [0])
    assert t.position == len(t.ids) - 1
    np.testing.assert_allclose(pe.embed([Row(text="just some text")]), last.embed([Row(text="just some text")]), atol=1e-5)


def _hidden_states(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("token", ["mean", "last", "prompt-end"])
def test_pooling_matches_full_forward(tiny_lm, token):
    """Each pooling reads what it says from the model's own hidden states over the row's tokens: replacing
    the mean by the first or last token, or moving the read position, fails this. Rows of different lengths
    share padded batches, so padding must not leak into the mean."""
    emb = Embedder(tiny_lm, EmbedConfig(layers=(1, 3), token=token, batch_tokens=4096))
    rows = ROWS[:6]
    vecs = emb.embed(rows)
    assert emb.forward_calls == 1  # one padded batch of rows of several lengths
    for i, t in enumerate(emb.tokenize(rows, range(len(rows)))):
        hs = _hidden_states(tiny_lm, t.ids)
        for j, layer in enumerate((1, 3)):
            h = hs[layer][0].numpy()
            want = h.mean(0) if token == "mean" else h[t.position]
            np.testing.assert_allclose(vecs[i, j], want, atol=1e-4)
            if token == "mean":  # the test can tell the mean from either end token
                assert not np.allclose(want, h[0], atol=1e-3) and not np.allclose(want, h[-1], atol=1e-3)
        if token == "last":
            assert t.position == len(t.ids) - 1


def test_last_layer_is_the_block_output_before_the_final_norm(tiny_lm):
    """Layer L is the output of decoder block L at every depth, the last included. transformers'
    ``hidden_states[num_layers]`` has the model's final norm applied on top, so at L = num_layers the two
    differ by exactly that norm (docs/methods.md, "Which hidden state")."""
    n = tiny_lm.num_layers
    emb = Embedder(tiny_lm, EmbedConfig(layers=(n,), token="last"))
    row = ROWS[4]
    [t] = emb.tokenize([row], [0])
    v = emb.embed([row])[0, 0]
    hs = _hidden_states(tiny_lm, t.ids)
    assert len(hs) == n + 1
    assert not np.allclose(v, hs[n][0, -1].numpy(), atol=1e-3)
    with torch.inference_mode():
        normed = tiny_lm.model.model.norm(torch.tensor(v)[None])[0].numpy()
    np.testing.assert_allclose(normed, hs[n][0, -1].numpy(), atol=1e-4)
