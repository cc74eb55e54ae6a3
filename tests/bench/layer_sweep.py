"""Which layer and token position separate harmful from benign rows best on the default model?

Embeds the labelled pool (data_src/harmful_pool.jsonl + benign_pool.jsonl) once per token position,
capturing every decoder layer in the same forward pass, then fits *unsupervised* SAFT on mixtures at
contamination λ ∈ {0.1, 0.2, 0.3} (all benign rows + a random draw of harmful rows, 5 draws) and prints
the mean AUROC per layer and k, beside the trivial baselines (response length in characters and tokens).

    python tests/bench/layer_sweep.py [--model M] [--tokens last,prompt-end,mean] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from saft_gx.embedding.embed import EmbedConfig, Embedder
from saft_gx.core.metrics import auroc
from saft_gx.embedding.models import load_model
from saft_gx.embedding.rows import Row

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data_src"


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def labelled_pool(harmful: str = "harmful_pool.jsonl", benign: str = "benign_pool.jsonl") -> tuple[list[Row], np.ndarray, list[dict]]:
    recs = load_jsonl(DATA / harmful) + load_jsonl(DATA / benign)
    rows = [Row(messages=(("user", r["prompt"]), ("assistant", r["response"]))) for r in recs]
    labels = np.array([int(r["label"]) for r in recs])
    return rows, labels, recs


def mixtures(labels: np.ndarray, lam: float, draws: int, seed: int = 0) -> list[np.ndarray]:
    """Index sets: every benign row plus enough random harmful rows for contamination λ."""
    rng = np.random.default_rng(seed)
    benign = np.flatnonzero(labels == 0)
    harmful = np.flatnonzero(labels == 1)
    m = min(len(harmful), int(round(lam / (1 - lam) * len(benign))))
    return [np.r_[benign, rng.choice(harmful, m, replace=False)] for _ in range(draws)]


def unsupervised_aurocs(x: np.ndarray, labels: np.ndarray, idx: np.ndarray, ks: list[int]) -> dict[int, float]:
    """AUROC of unsupervised SAFT for several k from one SVD of the centred mixture (the same subspace
    Detector.fit finds from streamed statistics; tests/test_subspace.py checks the equivalence)."""
    z = x[idx] - x[idx].mean(axis=0)
    _, _, vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)
    proj2 = (z @ vt[: max(ks)].T) ** 2
    return {k: auroc(proj2[:, :k].mean(axis=1), labels[idx]) for k in ks}


def embed_all_layers(lm, rows: list[Row], token: str, cache: Path | None) -> np.ndarray:
    """(n, layers, d) at the cache's float16 precision; reuses an .npz from an earlier run."""
    path = cache / f"{token}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path, allow_pickle=False)
    emb = Embedder(lm, EmbedConfig(layers=tuple(range(1, lm.num_layers + 1)), token=token, max_tokens=2048))
    x = emb.embed(rows).astype(np.float16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", default="last,prompt-end,mean")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--emb-cache", default=None, help="folder to keep the embeddings in between runs")
    args = ap.parse_args()

    lm = load_model(args.model)
    rows, labels, recs = labelled_pool()
    resp_chars = np.array([len(r["response"]) for r in recs])
    tok = lm.tokenizer
    resp_tokens = np.array([len(tok(r["response"])["input_ids"]) for r in recs])
    ks = [int(k) for k in args.ks.split(",")]
    lams = (0.1, 0.2, 0.3)
    results: dict = {"model": lm.model_ref, "n_harmful": int(labels.sum()), "n_benign": int((labels == 0).sum()),
                     "baselines": {}, "sweep": {}}
    for lam in lams:
        mix = mixtures(labels, lam, args.draws)
        results["baselines"][str(lam)] = {
            "response_chars": float(np.mean([auroc(resp_chars[i], labels[i]) for i in mix])),
            "response_tokens": float(np.mean([auroc(resp_tokens[i], labels[i]) for i in mix])),
        }
    print("trivial baselines (AUROC):", json.dumps(results["baselines"]))
    layers = tuple(range(1, lm.num_layers + 1))
    for token in args.tokens.split(","):
        t0 = time.perf_counter()
        cache = Path(args.emb_cache) if args.emb_cache else None
        x_all = embed_all_layers(lm, rows, token, cache).astype(np.float32)
        print(f"[{token}] embedded {len(rows)} rows x {len(layers)} layers in {time.perf_counter() - t0:.0f} s")
        for li, layer in enumerate(layers):
            x = x_all[:, li, :]
            per = {lam: [unsupervised_aurocs(x, labels, i, ks) for i in mixtures(labels, lam, args.draws)] for lam in lams}
            for k in ks:
                results["sweep"][f"{token}|{layer}|{k}"] = {str(lam): float(np.mean([d[k] for d in per[lam]])) for lam in lams}
        best = sorted(((np.mean(list(v.values())), key) for key, v in results["sweep"].items() if key.startswith(token + "|")), reverse=True)[:5]
        for score, key in best:
            print(f"  {key}: mean AUROC {score:.3f}  {results['sweep'][key]}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("\nlayer  " + "  ".join(f"{t}:k={k}" for t in args.tokens.split(",") for k in ks))
    for layer in layers:
        cells = [np.mean(list(results["sweep"][f"{t}|{layer}|{k}"].values())) for t in args.tokens.split(",") for k in ks]
        print(f"{layer:5d}  " + "  ".join(f"{c:.3f}" for c in cells))


if __name__ == "__main__":
    main()
