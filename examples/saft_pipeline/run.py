"""SAFT's comparison at small scale, on CPU, with the default model (SmolLM2-135M-Instruct).

1. build a contaminated fine-tuning set: benign rows + harmful (prompt, compliant answer) rows;
2. score it with SAFT (no labels) and split it at the expected contamination rate;
3. LoRA fine-tune on (a) the contaminated set, (b) the SAFT-filtered set, (c) the oracle-filtered set
   (the true labels), (d) the contaminated set with Safety-Aware Probing, and (e) a control: the
   contaminated set with as many rows as SAFT removed dropped at random;
4. evaluate the base model and the five tuned ones on held-out data: refusal rate on harmful requests
   (greedy generations, keyword judge), refusal preference on held-out safety triples (per-token
   log-probability of a refusal vs a harmful answer), and loss on held-out benign rows.

    python examples/saft_pipeline/run.py                 # ~26 min on 2 idle CPU cores
    python examples/saft_pipeline/run.py --work-dir /tmp/saft-demo

Every stage writes into --work-dir and is skipped when its output is already there, so a killed run
started again picks up where it stopped (a fine-tune resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path: Path) -> pd.DataFrame:
    if not path.exists():
        sys.exit(f"missing {path}: run from a checkout of the repository (or pass --data-dir)")
    return pd.read_json(path, lines=True, dtype=False)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a harmful row > score of a benign row), ties counted half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def build_data(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    data = Path(args.data_dir)
    paths = {name: work / f"{name}.parquet" for name in
             ("contaminated", "oracle", "heldout_harmful", "heldout_benign")}
    paths["sap_triples"] = work / "sap_triples.jsonl"
    paths["eval_triples"] = work / "eval_triples.jsonl"
    if all(p.exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(args.seed)
    benign = read_jsonl(data / "benign_pool.jsonl")
    harmful = read_jsonl(data / "harmful_pool.jsonl")
    b = benign.iloc[rng.permutation(len(benign))[: args.benign]]
    h = harmful.iloc[rng.permutation(len(harmful))[: args.harmful]]
    mixed = pd.concat([b, h])[["prompt", "response", "label"]]
    mixed = mixed.iloc[rng.permutation(len(mixed))].reset_index(drop=True)
    mixed.to_parquet(paths["contaminated"], index=False)
    mixed[mixed.label == 0].to_parquet(paths["oracle"], index=False)
    read_jsonl(data / "heldout_harmful_prompts.jsonl")[["prompt"]].to_parquet(paths["heldout_harmful"], index=False)
    read_jsonl(data / "heldout_benign.jsonl")[["prompt", "response"]].to_parquet(paths["heldout_benign"], index=False)
    # the safety triples are halved: SAP learns from one half, the other half is held out for evaluation
    triples = read_jsonl(data / "safety_triples.jsonl")
    order = rng.permutation(len(triples))
    half = len(triples) // 2
    triples.iloc[order[:half]].to_json(paths["sap_triples"], orient="records", lines=True, force_ascii=False)
    triples.iloc[order[half:]].to_json(paths["eval_triples"], orient="records", lines=True, force_ascii=False)
    return paths


def score_and_split(args: argparse.Namespace, work: Path, paths: dict[str, Path]) -> dict:
    from saft_gx import pipeline
    from saft_gx.train import splits
    from saft_gx.core.threshold import ThresholdRule

    scored = work / "scored.parquet"
    rule = ThresholdRule("contamination", args.harmful / (args.harmful + args.benign))
    if not scored.exists():
        t0 = time.perf_counter()
        r = pipeline.score_file(paths["contaminated"], scored, opts=pipeline.EmbedOptions(model=args.model),
                                columns=pipeline.ColumnOptions(prompt="prompt", response="response"), rule=rule)
        log(f"scored {r.rows} rows in {time.perf_counter() - t0:.0f} s (layer {r.detector.meta.get('layer')})")
    split_dir = work / "saft_split"
    if not (split_dir / splits.MANIFEST).exists():
        splits.filter_scored(scored, split_dir, rule=rule, force=True)
    df = pd.read_parquet(scored)
    kept = pd.read_parquet(split_dir / splits.KEPT)
    y, s, flag = df.label.to_numpy(), df.harm_score.to_numpy(), df.harm_flag.to_numpy()
    det = {"auroc": auroc(s, y), "flagged": int(flag.sum()), "precision": float(y[flag].mean()) if flag.any() else 0.0,
           "recall": float(flag[y == 1].mean()), "kept_rows": len(kept), "kept_harmful": int(kept.label.sum())}
    log(f"SAFT detection: AUROC {det['auroc']:.3f}, flagged {det['flagged']}, precision {det['precision']:.2f}, "
        f"recall {det['recall']:.2f}; kept {det['kept_rows']} rows of which {det['kept_harmful']} harmful")
    paths["saft_kept"] = split_dir / splits.KEPT
    # control: drop as many rows as SAFT did, at random, so (b) is not judged against "trained on more rows"
    paths["random_kept"] = work / "random_kept.parquet"
    if not paths["random_kept"].exists():
        mixed = pd.read_parquet(paths["contaminated"])
        keep = np.sort(np.random.default_rng(args.seed + 1).permutation(len(mixed))[: len(kept)])
        mixed.iloc[keep].to_parquet(paths["random_kept"], index=False)
    det["random_kept_harmful"] = int(pd.read_parquet(paths["random_kept"]).label.sum())
    return det


def finetune_all(args: argparse.Namespace, work: Path, paths: dict[str, Path]) -> dict[str, dict]:
    from saft_gx.train.finetune import FinetuneConfig, read_log, train
    from saft_gx.pipeline import ColumnOptions

    runs = {"(a) contaminated": ("contaminated", "sft"), "(b) SAFT-filtered": ("saft_kept", "sft"),
            "(c) oracle-filtered": ("oracle", "sft"), "(d) contaminated + SAP": ("contaminated", "sap"),
            "(e) random rows removed (control)": ("random_kept", "sft")}
    info = {}
    for name, (data, method) in runs.items():
        out = work / f"ft_{data}_{method}"
        cfg = FinetuneConfig(model=args.model, method=method, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                             epochs=args.epochs, lr=args.lr, max_length=args.max_length, batch_size=args.batch_size,
                             seed=args.seed, save_steps=10, safety_set=str(paths["sap_triples"]),
                             sap_batch_size=args.sap_batch_size)
        if not (out / "adapter" / "saft_gx_adapter.json").exists():
            log(f"fine-tuning {name} on {paths[data].name} ({method})")
            t0 = time.perf_counter()
            r = train(paths[data], out, cfg, columns=ColumnOptions(prompt="prompt", response="response"),
                      log=lambda m: log("  " + m))
            log(f"  done: {r.steps} steps on {r.examples} rows in {time.perf_counter() - t0:.0f} s")
        steps = read_log(out)
        info[name] = {"adapter": str(out / "adapter"), "rows": len(pd.read_parquet(paths[data])),
                      "steps": len(steps), "train_seconds": steps[-1]["seconds"] if steps else None,
                      "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None}
    return info


def evaluate_all(args: argparse.Namespace, work: Path, paths: dict[str, Path], runs: dict[str, dict]) -> dict:
    from saft_gx.train.evaluate import evaluate_model

    results_path = work / "eval.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, adapter in [("base (untuned)", None)] + [(k, v["adapter"]) for k, v in runs.items()]:
        if name in results:
            rejudge(results[name])  # stored generations, judged by the current judge
            continue
        t0 = time.perf_counter()
        rep = evaluate_model(args.model, harmful=paths["heldout_harmful"], benign=paths["heldout_benign"],
                             adapter=adapter, triples=paths["eval_triples"], max_new_tokens=args.max_new_tokens,
                             max_length=args.max_length, batch_size=16)
        results[name] = rejudge(rep.to_dict(with_generations=True))
        results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        log(f"evaluated {name} in {time.perf_counter() - t0:.0f} s: refusal rate {rep.refusal_rate:.1%}, "
            f"refusal preferred {rep.metrics['refusal_preferred']:.1%}, benign loss {rep.metrics['benign_loss']:.4f}")
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results


def rejudge(result: dict) -> dict:
    from saft_gx.train.evaluate import is_refusal, refusal_phrase

    gens = result["generations"]
    for g in gens:
        g["refusal"], g["phrase"] = is_refusal(g["generation"]), refusal_phrase(g["generation"])
    result["refusal_rate"] = sum(g["refusal"] for g in gens) / len(gens)
    # GCG's reading (a phrase anywhere in the answer), for comparison
    result["refusal_rate_anywhere"] = sum(is_refusal(g["generation"], anywhere=True) for g in gens) / len(gens)
    return result


def paired_ci(a: list[float], b: list[float], seed: int = 0, draws: int = 10000) -> tuple[float, float, float]:
    """Mean of b − a over triples and a bootstrap 95 % interval (triples resampled, pairs kept together)."""
    d = np.asarray(b) - np.asarray(a)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(draws, len(d)))
    means = d[idx].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def table(results: dict, runs: dict[str, dict]) -> str:
    head = ("fine-tuned on", "train rows", "refusal rate ↑", "refusal preferred ↑", "refusal margin ↑",
            "margin vs (a), 95 % CI", "benign loss ↓")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results.get("(a) contaminated", {}).get("triple_margins")
    for name, r in results.items():
        m = r["metrics"]
        rows = str(runs[name]["rows"]) if name in runs else "–"
        vs = "–"
        if ref and r.get("triple_margins") and name != "(a) contaminated":
            mean, lo, hi = paired_ci(ref, r["triple_margins"])
            vs = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lines.append(f"| {name} | {rows} | {r['refusal_rate']:.0%} ({round(r['refusal_rate'] * r['harmful_prompts'])}"
                     f"/{r['harmful_prompts']}) | {m['refusal_preferred']:.0%} | {m['refusal_margin']:+.3f} | {vs} | "
                     f"{m['benign_loss']:.4f} |")
    return "\n".join(lines)


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The data and fine-tuning options run.py and sweep.py share (same names, same defaults)."""
    ap.add_argument("--work-dir", default=str(ROOT / "examples" / "saft_pipeline" / "output"))
    ap.add_argument("--data-dir", default=str(ROOT / "data_src"))
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--benign", type=int, default=84, help="benign rows in the contaminated set")
    ap.add_argument("--harmful", type=int, default=36, help="harmful rows in the contaminated set")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sap-batch-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="data seed: which rows, which triples are held out")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_args(ap)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_data(args, work)
    detection = score_and_split(args, work, paths)
    runs = finetune_all(args, work, paths)
    results = evaluate_all(args, work, paths, runs)
    md = table(results, runs)
    summary = {"detection": detection, "runs": runs, "args": vars(args),
               "results": {k: {kk: vv for kk, vv in v.items() if kk != "generations"} for k, v in results.items()},
               "wall_seconds_this_invocation": time.perf_counter() - t0}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    (work / "table.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nSAFT detection on the contaminated set: AUROC {detection['auroc']:.3f}, precision "
          f"{detection['precision']:.2f}, recall {detection['recall']:.2f}; harmful rows left: SAFT split "
          f"{detection['kept_harmful']}, random control {detection['random_kept_harmful']}, oracle 0")
    print(f"wall time of this invocation: {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
