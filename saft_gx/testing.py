"""Helpers for plumbing tests and benchmarks: a tiny randomly initialised model that needs no download."""

from __future__ import annotations

from pathlib import Path


def tiny_model_folder(folder: Path, *, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """Write a random Llama (``layers`` × ``hidden``) with SmolLM2's tokenizer and chat template into
    ``folder`` (reused when it already holds one). Its hidden states mean nothing: plumbing only."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .embedding.models import default_gguf_path

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
