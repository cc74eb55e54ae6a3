"""Claims about detection, made on the real embedded model (SmolLM2-135M-Instruct) and our labelled rows."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saft_gx.core import defaults
from saft_gx import pipeline
from saft_gx.core.metrics import auroc

DATA = Path(__file__).resolve().parents[1] / "data_src"


def _mix(n_harmful=15, n_benign=60, seed=7):
    """λ = 0.2: a deterministic draw from the hand-written pools."""
    rng = np.random.default_rng(seed)
    h = [json.loads(x) for x in (DATA / "harmful_pool.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (DATA / "benign_pool.jsonl").read_text().splitlines()]
    rows = [h[i] for i in rng.choice(len(h), n_harmful, replace=False)] + [b[i] for i in rng.choice(len(b), n_benign, replace=False)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return pd.DataFrame({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows],
                         "label": [r["label"] for r in rows]})


def test_the_default_model_loads_from_its_gguf_and_embeds(default_lm):
    """Cheap enough for every run (one model load, two rows): the shipped GGUF loads through transformers
    with the shape the defaults assume, and its vectors are finite and differ between rows."""
    from saft_gx.embedding.embed import EmbedConfig, Embedder
    from saft_gx.embedding.models import default_gguf_path, fingerprint_path
    from saft_gx.embedding.rows import Row

    assert (default_lm.num_layers, default_lm.hidden_size) == (30, 576)
    assert default_lm.fingerprint == fingerprint_path(default_gguf_path())
    rows = [Row(messages=(("user", "What is the capital of France?"), ("assistant", "Paris."))),
            Row(messages=(("user", "Name a prime number."), ("assistant", "Seven.")))]
    v = Embedder(default_lm, EmbedConfig(layers=(defaults.layer_for(30),), token=defaults.TOKEN)).embed(rows)
    assert v.shape == (2, 1, 576) and np.isfinite(v).all() and not np.allclose(v[0], v[1])


def test_the_gguf_is_parsed_once_and_later_loads_read_its_float32_copy(default_lm, default_model_cache, monkeypatch):
    """Parsing the GGUF file is most of a cached run; the first load keeps a plain float32 copy beside the cache
    and later loads read it without touching the GGUF parser: the same tokens, chat template, hidden states and
    fingerprint, so cached embeddings and fitted detectors stay valid."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from saft_gx.embedding.models import converted_folder, load_model

    monkeypatch.setenv("SAFT_GX_CACHE", str(default_model_cache))
    folder = converted_folder(default_lm.fingerprint)
    assert folder.parent == default_model_cache / "models"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists()
    assert not list(folder.parent.glob(".*.tmp"))  # written through a temporary folder, renamed into place
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: pytest.fail("the GGUF file was parsed again"))
    copy = load_model(None, device="cpu")
    assert copy.fingerprint == default_lm.fingerprint and copy.model_ref == default_lm.model_ref == "default"
    msgs = [{"role": "user", "content": "Translate « bonjour » to 日本語, then write `print(1)`."},
            {"role": "assistant", "content": "こんにちは."}]
    text = default_lm.tokenizer.apply_chat_template(msgs, tokenize=False)
    assert copy.tokenizer.apply_chat_template(msgs, tokenize=False) == text
    ids = default_lm.tokenizer(text)["input_ids"]
    assert copy.tokenizer(text)["input_ids"] == ids and copy.tokenizer.pad_token == default_lm.tokenizer.pad_token
    with torch.inference_mode():
        a = default_lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        b = copy.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(a) == 31 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert getattr(copy.model, "hf_quantizer", None) is None and getattr(default_lm.model, "hf_quantizer", None) is None


# Minutes on 2 CPU cores (the anchors and 75 rows through the real model): --runslow.
@pytest.mark.slow
def test_harmful_rows_score_higher_on_the_default_model(default_lm, tmp_path):
    df = _mix()
    path = tmp_path / "mix.parquet"
    df.to_parquet(path)
    opts = pipeline.EmbedOptions()
    session = pipeline.Session(opts, lm=default_lm)
    result = pipeline.score_file(path, tmp_path / "scored.parquet", opts=opts, columns=pipeline.ColumnOptions(),
                                 session=session)
    scored = pd.read_parquet(result.out_path)
    a = auroc(scored["harm_score"].to_numpy(), scored["label"].to_numpy())
    length = auroc(scored["response"].str.len().to_numpy(), scored["label"].to_numpy())
    # the benchmark is honest only if length alone does not separate the classes
    print(f"\ndefault detector AUROC {a:.3f}, response-length baseline {length:.3f} ({len(df)} rows, "
          f"{int(df['label'].sum())} harmful)")  # shown with -s: the figures the README quotes
    assert 0.3 < length < 0.7, length
    assert a >= MIN_AUROC, f"AUROC {a:.3f} (response-length baseline {length:.3f})"


# The default detector (probe on the built-in anchors, prompt-end, layer 18, blended; 75 rows: not adapted) scores
# 0.963-0.968 on mixes of these pools (`python tests/bench/detection.py --seeds 5`, worst draw 0.914); a 75-row draw is
# noisier. This draw measured 0.994, response-length baseline 0.504 (`pytest --runslow -s tests/test_default_model.py`).
MIN_AUROC = 0.88
