"""Throughput benchmark: saft_gx's embedding path against a naive Hugging Face loop, on the same rows in one
run. Not part of the default test run.

(a) naive: the loop most people write first. Whole model, ``output_hidden_states=True``, a fixed batch of 8
    rows in file order (unsorted), right padding with the attention mask, the hidden state of each row's last
    real token at the layer. Same loaded model object, dtype, device, attention kernel (SDPA), thread count,
    chat-template formatting, truncation and ``torch.inference_mode`` as (b): the only differences are the
    ones saft_gx makes on purpose.
(b) saft_gx: ``pipeline.embed_dataset`` on a parquet file with an empty cache, i.e. what ``saft-gx score``
    runs: parquet read, row validation, content hashing, tokenizing one frame ahead in a worker thread,
    length-sorted token-budget batches, the forward pass stopped at the layer, no attention mask
    (right padding + causal attention), fp16 cache shards written to disk.

Both produce the same vectors; the benchmark checks it (max |Δ| relative to the largest value, after the
fp16 rounding of the cache). Timings alternate naive / saft_gx ``--repeat`` times and report the best of
each, which is the figure least distorted by other processes on a shared machine. Tokens are real
(non-padding) tokens. On CUDA it also prints useful TFLOP/s (layers 1..L on real tokens, causal attention
counted, padding and the skipped layers not counted) and MFU against the card's dense bf16 peak.

    # CPU, default model (SmolLM2-135M-Instruct, its default layer 15 of 30):
    python tests/bench/throughput.py --rows 64
    # GPU: a Llama-2-7B-shaped model with random weights (same FLOPs as the real one) cut at layer 16:
    python tests/bench/throughput.py --llama7b --rows 2048 --naive-rows 512 --batch-tokens 65536
    # the same code path on CPU, scaled down (a smoke test of the --llama7b path):
    python tests/bench/throughput.py --llama7b --shape tiny --rows 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had "
    "by hot word but what some we can out other were all there when up use your how said an each she which "
    "do their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call first "
    "who may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
    "air well also play small end put home read hand port large spell add even land here must big high such "
    "follow act why ask men change went light kind off need house picture try us again animal point mother "
    "world near build self earth father head stand own page should country found answer school grow study "
    "still learn plant cover food sun four between state keep eye never last let thought city tree cross farm "
    "hard start might story saw far sea draw left late run while press close night real life few north"
).split()

# dense bf16 peak TFLOP/s (no sparsity) by device name fragment, most specific first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 125.0),
                    ("A10", 125.0))


def synthetic_frame(n: int, seed: int = 0, prompt_words: float = 30.0, response_words: float = 150.0,
                    max_prompt_words: int = 600, max_response_words: int = 900):
    """Prompt/response rows of varied, chat-log-like length (log-normal word counts, capped), every row distinct."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pw = np.clip(rng.lognormal(np.log(prompt_words), 0.7, n), 3, max_prompt_words).astype(int)
    rw = np.clip(rng.lognormal(np.log(response_words), 0.8, n), 2, max_response_words).astype(int)
    return pd.DataFrame({
        "prompt": [" ".join(rng.choice(words, k)) + f" (#{i})" for i, k in enumerate(pw)],
        "response": [" ".join(rng.choice(words, k)) for k in rw],
    })


# ---- the random Llama-2-7B-shaped model (GPU MFU figure) ----

SHAPES = {
    # Llama-2-7B: 32 layers, d 4096, MLP 11008, 32 heads, no GQA. The vocabulary is SmolLM2's tokenizer's
    # (49152, not 32000): it only changes the naive loop's LM head, never the layers that are timed.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
}


def random_llama(shape: str, device: str):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saft_gx.embedding.models import LoadedModel, default_gguf_path, pick_device

    device = pick_device(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the card: 7B random weights on a CPU take minutes
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, model_ref=f"random-llama-{shape}", fingerprint="0" * 64,
                       num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, device=device, dtype=dtype)


def forward_flops(cfg, layers: int, lengths: np.ndarray) -> float:
    """FLOPs of decoder layers 1..layers on rows of these real lengths: 2 per multiply-add of every linear
    layer, plus causal attention (QKᵀ and AV over the n(n+1)/2 visible pairs)."""
    d, ff = cfg.hidden_size, cfg.intermediate_size
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    linear_params = d * d + 2 * d * kv + d * d + 3 * d * ff  # q, k, v, o, gate/up/down
    n = lengths.astype(np.float64)
    return float(layers * (2 * linear_params * n.sum() + 2 * 2 * d * (n * (n + 1) / 2).sum()))


def peak_tflops(device_name: str) -> float | None:
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return peak
    return None


# ---- the two paths ----

def naive_embed(lm, df, layer: int, *, batch: int = 8, max_tokens: int = 1024) -> np.ndarray:
    import torch

    from saft_gx.embedding.rows import format_row, rows_from_frame, detect_columns, uses_chat_template

    tok = lm.tokenizer
    tok.padding_side = "right"
    spec = detect_columns(list(df.columns))
    texts = [format_row(tok, r)[0] for r in rows_from_frame(df, spec, 0)]
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_tokens,
                      add_special_tokens=not uses_chat_template(tok), return_tensors="pt").to(lm.device)
            hidden = lm.model(**enc, output_hidden_states=True).hidden_states[layer]
            last = enc["attention_mask"].sum(1) - 1
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu().numpy())
    return np.concatenate(out)


def saft_embed(lm, data: Path, layer: int, cache_dir: Path, *, batch_tokens: int,
               max_tokens: int = 1024) -> tuple[float, np.ndarray]:
    """(seconds spent in ``embed_dataset``, the vectors read back from the cache)."""
    from saft_gx.io.cache import EmbeddingCache
    from saft_gx.embedding.embed import EmbedConfig, Embedder
    from saft_gx.pipeline import embed_dataset
    from saft_gx.io.readers import open_dataset
    from saft_gx.embedding.rows import detect_columns, rows_from_frame

    ds = open_dataset(data)
    spec = detect_columns(ds.columns)
    embedder = Embedder(lm, EmbedConfig(layers=(layer,), max_tokens=max_tokens, overlong="truncate",
                                        batch_tokens=batch_tokens))
    cache = EmbeddingCache(cache_dir, model_fingerprint=lm.fingerprint, token="last", max_tokens=max_tokens,
                           overlong="truncate", dim=lm.hidden_size)
    _sync(lm)
    t = time.perf_counter()
    summary = embed_dataset(ds, spec, embedder, cache)
    _sync(lm)
    seconds = time.perf_counter() - t
    assert summary.computed == summary.rows, "the cache was not empty"
    keys = [r.content_key() for _, df in ds.frames(spec.columns) for r in rows_from_frame(df, spec, 0)]
    return seconds, cache.layer(layer).get(keys)


@dataclass
class Timing:
    seconds: float
    rows: int
    tokens: int

    def line(self, name: str) -> str:
        return (f"{name:8s} {self.seconds:8.2f} s  {self.rows / self.seconds:9.1f} rows/s  "
                f"{self.tokens / self.seconds:11.0f} tokens/s")


def _sync(lm) -> None:
    if str(lm.device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model reference (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--llama7b", action="store_true", help="random Llama-2-7B-shaped model instead of --model")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="with --llama7b: 'tiny' runs the same code small")
    ap.add_argument("--layer", type=int, help="default: the package default (16 for --llama7b)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--naive-rows", type=int, help="time the naive loop on the first N rows only (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="alternate naive / saft_gx this many times; best of each")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if its name is not known here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from saft_gx.embedding.embed import Embedder, EmbedConfig
    from saft_gx.embedding.models import load_model
    from saft_gx.pipeline import default_layer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.llama7b:
        lm = random_llama(args.shape, args.device)
        layer = args.layer or (16 if args.shape == "7b" else 2)
    else:
        lm = load_model(args.model, device=args.device)
        layer = args.layer or default_layer(lm.num_layers)
    load_s = time.perf_counter() - t0

    df = synthetic_frame(args.rows, seed=args.seed)
    naive_n = min(args.naive_rows or args.rows, args.rows)
    lengths_tok = Embedder(lm, EmbedConfig(layers=(layer,), max_tokens=args.max_tokens, overlong="truncate"))
    from saft_gx.embedding.rows import detect_columns, rows_from_frame

    rows = rows_from_frame(df, detect_columns(list(df.columns)), 0)
    lengths = np.array([len(t.ids) for t in lengths_tok.tokenize(rows, list(range(len(rows))))])

    dev = str(lm.device)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"model     {lm.model_ref} ({lm.num_layers} layers, d={lm.hidden_size}, {str(lm.dtype).replace('torch.', '')}), "
          f"layer {layer}; loaded in {load_s:.1f} s")
    print(f"device    {name}")
    print(f"rows      {args.rows} (naive loop: {naive_n}), tokens/row mean {lengths.mean():.0f}, "
          f"median {np.median(lengths):.0f}, max {lengths.max()}; batch-tokens {args.batch_tokens}")
    try:
        print(f"load      {os.getloadavg()[0]:.2f} (1-min load average, {os.cpu_count()} CPUs)")
    except OSError:
        pass

    with tempfile.TemporaryDirectory(prefix="saft-bench-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "rows.parquet"
        df.to_parquet(data)
        warm = tmp_path / "warm.parquet"
        df.head(8).to_parquet(warm)
        # warm-up (kernels, allocator, tokenizer) for both paths, not timed
        naive_embed(lm, df.head(8), layer, max_tokens=args.max_tokens)
        saft_embed(lm, warm, layer, tmp_path / "warm-cache", batch_tokens=args.batch_tokens, max_tokens=args.max_tokens)

        best_naive = best_saft = float("inf")
        naive_vecs = saft_vecs = None
        for rep in range(args.repeat):
            _sync(lm)
            t = time.perf_counter()
            naive_vecs = naive_embed(lm, df.head(naive_n), layer, max_tokens=args.max_tokens)
            _sync(lm)
            best_naive = min(best_naive, time.perf_counter() - t)
            seconds, saft_vecs = saft_embed(lm, data, layer, tmp_path / f"cache{rep}", batch_tokens=args.batch_tokens,
                                            max_tokens=args.max_tokens)
            best_saft = min(best_saft, seconds)
            print(f"trial {rep + 1}: naive {best_naive:.2f} s, saft_gx {best_saft:.2f} s (best so far)", file=sys.stderr)

    naive = Timing(best_naive, naive_n, int(lengths[:naive_n].sum()))
    saft = Timing(best_saft, args.rows, int(lengths.sum()))
    scale = float(np.abs(naive_vecs).max())
    diff = float(np.abs(naive_vecs - saft_vecs[:naive_n]).max()) / scale
    print(naive.line("naive"))
    print(saft.line("saft_gx"))
    ratio = (saft.tokens / saft.seconds) / (naive.tokens / naive.seconds)
    print(f"ratio     {ratio:.2f}x tokens/s (saft_gx / naive); same vectors: max |Δ| / max |x| = {diff:.1e}")
    if dev.startswith("cuda"):
        cfg = lm.model.config
        peak = args.peak_tflops or peak_tflops(name)
        for label, timing, lens in (("naive", naive, lengths[:naive_n]), ("saft_gx", saft, lengths)):
            tf = forward_flops(cfg, layer, lens) / timing.seconds / 1e12
            mfu = f", MFU {tf / peak:.1%} of {peak:g} TFLOP/s bf16 peak" if peak else " (pass --peak-tflops for MFU)"
            print(f"{label:8s} {tf:8.1f} useful TFLOP/s (layers 1..{layer}, real tokens){mfu}")
        print(f"memory    peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated on the GPU")


if __name__ == "__main__":
    main()
