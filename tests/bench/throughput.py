"""Throughput benchmark: saft_gx's embedding path against a naive Hugging Face loop, on the same rows in one
run, at the default detector's settings (token and layers from ``saft_gx.core.defaults``: the stack of layers it
reads, captured in one pass that stops at the deepest; the naive loop reads the deepest). Not part of the default
test run.

(a) naive: the loop most people write first. Whole model, whole row (prompt + response),
    ``output_hidden_states=True``, a fixed batch of 8 rows in file order (unsorted), right padding with the
    attention mask, rows cut at ``--naive-max-tokens`` (512), the hidden state at the same token and layer as
    (b): for ``prompt-end`` the prompt's last token inside the full row (the last real token if the cut falls
    inside the prompt), for ``last`` the last real token, for ``mean`` the mean over real tokens. Same loaded
    model object, dtype, device, attention kernel (SDPA), thread count, chat-template formatting and
    ``torch.inference_mode`` as (b).
(b) saft_gx: ``pipeline.embed_dataset`` on a parquet file with an empty cache, i.e. what ``saft-gx score``
    runs: parquet read, row validation, content hashing, tokenizing one frame ahead in a worker thread (for
    ``prompt-end`` only the prompt's tokens, middle-truncated over ``--max-tokens``), length-sorted
    token-budget batches, the forward pass stopped at the layer, no attention mask (right padding + causal
    attention), fp16 cache shards written to disk.

The two paths run different numbers of tokens (for ``prompt-end`` saft_gx runs only the prompt), so the ratio
is in rows/s; tokens/s are printed for each (real, non-padding tokens each path ran). Where both paths saw the
whole of what they read (saft_gx did not truncate, and the naive cut did not reach the token read), they must
give the same vectors: the benchmark prints max |Δ| / max |x| over those rows (fp16 rounding of the cache).
Timings alternate naive / saft_gx ``--repeat`` times and report the best of each, the figure least distorted
by other processes on a shared machine; the 1-minute load average is printed before and after. On CUDA it
also prints useful TFLOP/s (layers 1..L on the real tokens each path ran, causal attention counted, padding
and the skipped layers not counted) and MFU against the card's dense bf16 peak.

Rows: ``--data PATH`` (parquet / jsonl / csv that ``saft-gx score`` reads; ``--rows`` of them sampled with
``--seed``) or, without it, synthetic rows shaped like real chat rows: every row distinct, word counts
log-normal and capped (these common words are ~1 token each with SmolLM2's tokenizer; the chat template adds
~30 tokens of system prompt and headers before the prompt's last token). Measured over 2,000 rows:
    prompt    median 35 words, sigma 1.1, cap 1,000: ~40 tokens median, 90th percentile ~150, 99th ~420,
              the longest few towards 1,000;
    response  median 300 words, sigma 0.7, cap 1,500: ~290 tokens median, 90th percentile ~740, ~4 % of
              rows past 1,024 tokens (up to ~1,500).

    # CPU, default model (SmolLM2-135M-Instruct) at the default detector's token and layers (prompt-end, 12+18+24 of 30):
    python tests/bench/throughput.py --rows 120
    # real rows (a local chat dataset with prompt/response columns):
    python tests/bench/throughput.py --rows 120 --data chat.parquet
    # another token / layer:
    python tests/bench/throughput.py --rows 120 --token last --layer 6
    # GPU: a Llama-2-7B-shaped model with random weights (same FLOPs as the real one) at the default layer:
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


def synthetic_frame(n: int, seed: int = 0, prompt_words: float = 35.0, response_words: float = 300.0,
                    max_prompt_words: int = 1000, max_response_words: int = 1500, prompt_sigma: float = 1.1,
                    response_sigma: float = 0.7):
    """Prompt/response rows of chat-log-like length (log-normal word counts around the medians, capped), every
    row distinct (the module docstring gives the default distribution)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pw = np.clip(rng.lognormal(np.log(prompt_words), prompt_sigma, n), 3, max_prompt_words).astype(int)
    rw = np.clip(rng.lognormal(np.log(response_words), response_sigma, n), 2, max_response_words).astype(int)
    return pd.DataFrame({
        "prompt": [" ".join(rng.choice(words, k)) + f" (#{i})" for i, k in enumerate(pw)],
        "response": [" ".join(rng.choice(words, k)) for k in rw],
    })


def sample_frame(path: Path, n: int, seed: int):
    """``n`` rows drawn at random (``seed``) from a dataset file, only the columns saft_gx reads."""
    import pandas as pd

    from saft_gx.io.readers import open_dataset
    from saft_gx.embedding.rows import detect_columns

    ds = open_dataset(path)
    spec = detect_columns(ds.columns)
    df = pd.concat([f for _, f in ds.frames(spec.columns)], ignore_index=True)
    if n < len(df):
        df = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), n, replace=False))]
    return df.reset_index(drop=True)


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

def naive_embed(lm, df, layer: int, token: str, *, batch: int = 8,
                max_tokens: int = 512) -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors, whether the token read lay inside the cut, real tokens run)."""
    import torch

    from saft_gx.embedding.rows import detect_columns, format_row, rows_from_frame, uses_chat_template

    tok = lm.tokenizer
    tok.padding_side = "right"
    spec = detect_columns(list(df.columns))
    texts, heads = zip(*(format_row(tok, r) for r in rows_from_frame(df, spec, 0)))
    out, whole, tokens = [], [], 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(list(texts[i : i + batch]), padding=True, truncation=True, max_length=max_tokens,
                      add_special_tokens=not uses_chat_template(tok), return_offsets_mapping=True,
                      return_tensors="pt")
            offsets = enc.pop("offset_mapping")
            enc = enc.to(lm.device)
            mask = enc["attention_mask"]
            real = mask.sum(1)
            tokens += int(real.sum())
            hidden = lm.model(**enc, output_hidden_states=True).hidden_states[layer]
            if token == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * m).sum(1) / m.sum(1)
                whole += [int(n) < max_tokens for n in real]
            else:
                pos = (real - 1).tolist()
                if token == "prompt-end":  # the last real token that starts inside the prompt part
                    for j, head in enumerate(heads[i : i + batch]):
                        starts = offsets[j, : pos[j] + 1, 0]
                        inside = (starts < head).nonzero()
                        pos[j] = int(inside[-1])
                        whole.append(pos[j] < int(real[j]) - 1 or int(real[j]) < max_tokens)
                else:
                    whole += [int(n) < max_tokens for n in real]
                index = torch.tensor(pos, device=hidden.device)
                vec = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
            out.append(vec.float().cpu().numpy())
    return np.concatenate(out), np.array(whole), tokens


def saft_embed(lm, data: Path, layers: tuple[int, ...], token: str, cache_dir: Path, *, batch_tokens: int,
               max_tokens: int) -> tuple[float, np.ndarray]:
    """(seconds spent in ``embed_dataset`` capturing ``layers``, the deepest layer's vectors read back from the cache)."""
    from saft_gx.io.cache import EmbeddingCache
    from saft_gx.embedding.embed import EmbedConfig, Embedder
    from saft_gx.pipeline import embed_dataset
    from saft_gx.io.readers import open_dataset
    from saft_gx.embedding.rows import detect_columns, rows_from_frame

    ds = open_dataset(data)
    spec = detect_columns(ds.columns)
    embedder = Embedder(lm, EmbedConfig(layers=layers, token=token, max_tokens=max_tokens, overlong="truncate",
                                        batch_tokens=batch_tokens))
    cache = EmbeddingCache(cache_dir, model_fingerprint=lm.fingerprint, token=token, max_tokens=max_tokens,
                           overlong="truncate", dim=lm.hidden_size)
    _sync(lm)
    t = time.perf_counter()
    summary = embed_dataset(ds, spec, embedder, cache)
    _sync(lm)
    seconds = time.perf_counter() - t
    assert summary.computed == summary.rows, "the cache was not empty"
    keys = [r.content_key() for _, df in ds.frames(spec.columns) for r in rows_from_frame(df, spec, 0)]
    return seconds, cache.layer(max(layers)).get(keys)


@dataclass
class Timing:
    seconds: float
    rows: int
    tokens: int

    def line(self, name: str) -> str:
        return (f"{name:8s} {self.seconds:8.2f} s  {self.rows / self.seconds:9.2f} rows/s  "
                f"{self.tokens / self.seconds:11.0f} tokens/s")


def _sync(lm) -> None:
    if str(lm.device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f} (1-min load average, {os.cpu_count()} CPUs)"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    from saft_gx.core import defaults
    from saft_gx.embedding.embed import DEFAULT_MAX_TOKENS, TOKEN_POSITIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model reference (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--llama7b", action="store_true", help="random Llama-2-7B-shaped model instead of --model")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="with --llama7b: 'tiny' runs the same code small")
    ap.add_argument("--token", choices=TOKEN_POSITIONS, default=defaults.TOKEN,
                    help=f"token position read (default: the default detector's, {defaults.TOKEN})")
    ap.add_argument("--layer", type=int, help="read this one layer (default: the default detector's stack, "
                    "defaults.stack_for(num_layers), up to its deepest)")
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--data", type=Path, help="parquet / jsonl / csv rows to sample --rows from (default: synthetic)")
    ap.add_argument("--naive-rows", type=int, help="time the naive loop on the first N rows only (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="saft_gx's cap (default %(default)s)")
    ap.add_argument("--naive-max-tokens", type=int, default=512, help="the naive loop's cut (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=2, help="alternate naive / saft_gx this many times; best of each")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if its name is not known here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from saft_gx.embedding.embed import EmbedConfig, Embedder
    from saft_gx.embedding.models import load_model
    from saft_gx.embedding.rows import detect_columns, rows_from_frame

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = random_llama(args.shape, args.device) if args.llama7b else load_model(args.model, device=args.device)
    layers = (args.layer,) if args.layer else defaults.stack_for(lm.num_layers)
    layer = max(layers)  # the model runs to it; the naive loop reads it
    load_s = time.perf_counter() - t0

    df = sample_frame(args.data, args.rows, args.seed) if args.data else synthetic_frame(args.rows, seed=args.seed)
    n_rows = len(df)
    naive_n = min(args.naive_rows or n_rows, n_rows)
    rows = rows_from_frame(df, detect_columns(list(df.columns)), 0)

    def lengths(token: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Real tokens per row, whether the row was cut, and saft_gx's padded tokens over all its batches."""
        embedder = Embedder(lm, EmbedConfig(layers=(layer,), token=token, max_tokens=max_tokens,
                                            batch_tokens=args.batch_tokens))
        tokenized = embedder.tokenize(rows, list(range(len(rows))))
        padded = sum(len(g) * max(len(tokenized[i].ids) for i in g) for g in embedder.batches(tokenized))
        return np.array([len(t.ids) for t in tokenized]), np.array([t.truncated for t in tokenized]), padded

    saft_len, saft_cut, saft_padded = lengths(args.token, args.max_tokens)
    row_len = lengths("last", 10**9)[0]
    prompt_len = lengths("prompt-end", 10**9)[0] if args.token == "prompt-end" else None

    def stats(x: np.ndarray) -> str:
        return f"median {np.median(x):.0f}, p90 {np.percentile(x, 90):.0f}, max {x.max()}"

    dev = str(lm.device)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"model     {lm.model_ref} ({lm.num_layers} layers, d={lm.hidden_size}, {str(lm.dtype).replace('torch.', '')}), "
          f"token {args.token}, layers {'+'.join(map(str, layers))}; loaded in {load_s:.1f} s")
    print(f"device    {name}")
    print(f"rows      {n_rows} {'from ' + str(args.data) if args.data else 'synthetic'} (seed {args.seed}; naive loop: "
          f"{naive_n}); batch-tokens {args.batch_tokens}")
    print(f"lengths   whole row (tokens, chat template included): {stats(row_len)}; "
          f"{(row_len > args.naive_max_tokens).sum()} over the naive cut {args.naive_max_tokens}, "
          f"{(row_len > 1024).sum()} over 1024")
    if prompt_len is not None:
        print(f"          prompt up to prompt-end: {stats(prompt_len)}; {int(saft_cut.sum())} over --max-tokens "
              f"{args.max_tokens} (middle-truncated)")
    print(f"          saft_gx runs {saft_len.sum()} real tokens in {saft_padded} padded (length-sorted batches "
          f"under --batch-tokens {args.batch_tokens})")
    print(f"load      {_load()} before")

    with tempfile.TemporaryDirectory(prefix="saft-bench-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "rows.parquet"
        df.to_parquet(data)
        warm = tmp_path / "warm.parquet"
        df.head(8).to_parquet(warm)
        # warm-up (kernels, allocator, tokenizer) for both paths, not timed
        naive_embed(lm, df.head(8), layer, args.token, max_tokens=args.naive_max_tokens)
        saft_embed(lm, warm, layers, args.token, tmp_path / "warm-cache", batch_tokens=args.batch_tokens,
                   max_tokens=args.max_tokens)

        best_naive = best_saft = float("inf")
        naive_vecs = saft_vecs = naive_whole = None
        naive_tokens = 0
        for rep in range(args.repeat):
            _sync(lm)
            t = time.perf_counter()
            naive_vecs, naive_whole, naive_tokens = naive_embed(lm, df.head(naive_n), layer, args.token,
                                                                max_tokens=args.naive_max_tokens)
            _sync(lm)
            best_naive = min(best_naive, time.perf_counter() - t)
            seconds, saft_vecs = saft_embed(lm, data, layers, args.token, tmp_path / f"cache{rep}",
                                            batch_tokens=args.batch_tokens, max_tokens=args.max_tokens)
            best_saft = min(best_saft, seconds)
            print(f"trial {rep + 1}: naive {best_naive:.2f} s, saft_gx {best_saft:.2f} s (best so far); "
                  f"load {_load()}", file=sys.stderr)

    naive = Timing(best_naive, naive_n, naive_tokens)
    saft = Timing(best_saft, n_rows, int(saft_len.sum()))
    print(naive.line("naive"))
    print(saft.line("saft_gx"))
    ratio = (saft.rows / saft.seconds) / (naive.rows / naive.seconds)
    same = naive_whole & ~saft_cut[:naive_n]
    if same.any():
        scale = float(np.abs(naive_vecs[same]).max())
        diff = float(np.abs(naive_vecs[same] - saft_vecs[:naive_n][same]).max()) / scale
        check = f"same vectors on the {same.sum()} rows neither cut: max |Δ| / max |x| = {diff:.1e}"
    else:
        check = "no row was whole in both paths: vectors not compared"
    print(f"ratio     {ratio:.2f}x rows/s (saft_gx / naive); {check}")
    print(f"load      {_load()} after")
    if dev.startswith("cuda"):
        cfg = lm.model.config
        peak = args.peak_tflops or peak_tflops(name)
        naive_lens = np.minimum(row_len[:naive_n], args.naive_max_tokens)
        for label, timing, lens in (("naive", naive, naive_lens), ("saft_gx", saft, saft_len)):
            tf = forward_flops(cfg, layer, lens) / timing.seconds / 1e12
            mfu = f", MFU {tf / peak:.1%} of {peak:g} TFLOP/s bf16 peak" if peak else " (pass --peak-tflops for MFU)"
            print(f"{label:8s} {tf:8.1f} useful TFLOP/s (layers 1..{layer}, real tokens){mfu}")
        print(f"memory    peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated on the GPU")


if __name__ == "__main__":
    main()
