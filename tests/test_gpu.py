"""The CUDA path of the embedder: bf16, SDPA without a mask, pinned host memory and one-batch-late read-back
give the vectors of a plain full forward pass. Skipped without a CUDA device (see conftest.py)."""

import numpy as np
import pytest

from saft_gx.embedding.embed import EmbedConfig, Embedder
from saft_gx.embedding.rows import Row, format_row

ROWS = [Row(messages=(("user", f"question {i} " + "about rivers " * (1 + i % 9)), ("assistant", "stones " * (1 + i % 13))))
        for i in range(40)]


@pytest.mark.gpu
def test_cuda_bf16_embeddings_match_a_full_forward(tiny_model_dir):
    import torch

    from saft_gx.embedding.models import load_model

    lm = load_model(str(tiny_model_dir), device="cuda")
    assert lm.dtype == torch.bfloat16 and lm.model.config._attn_implementation == "sdpa"
    emb = Embedder(lm, EmbedConfig(layers=(2, 3), batch_tokens=512))  # several batches: the read-back pipeline runs
    vecs = emb.embed(ROWS)
    assert emb.forward_calls > 2
    for i in (0, 13, 39):
        text, _ = format_row(lm.tokenizer, ROWS[i])
        enc = lm.tokenizer([text], add_special_tokens=False, return_tensors="pt").to("cuda")
        with torch.inference_mode():
            hs = lm.model(**enc, output_hidden_states=True).hidden_states
        for j, layer in enumerate((2, 3)):
            ref = hs[layer][0, -1].float().cpu().numpy()
            np.testing.assert_allclose(vecs[i, j], ref, atol=0.05 * float(np.abs(ref).max()))
