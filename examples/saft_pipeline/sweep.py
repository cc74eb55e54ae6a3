"""Does SAP help at 135M? A sweep of SAP settings against plain SFT and the random-removal control, on the
same contaminated set as `run.py`, over several seeds.

Arms (each fine-tuned once per seed, LoRA r = 8 on q/v, the settings of `run.py`):

- ``sft``: plain SFT on the contaminated set (the reference every gain is measured against);
- ``random``: the contaminated set with as many rows as SAFT removed dropped at random (the control);
- ``saft``: the SAFT-filtered set, plain SFT;
- ``sap[<setting>]``: SAP on the contaminated set, one arm per ``--sap`` setting;
- ``saft+sap[<setting>]``: SAP on the SAFT-filtered set, one arm per ``--sap`` setting.

Evaluation, on the held-out half of the safety triples (SAP trains on the other half) and the held-out
benign rows: the per-token refusal-vs-harmful margin of each triple, and the benign loss. *gain vs sft* is
the per-triple margin minus plain SFT's with the same seed, averaged over seeds, with a bootstrap 95 %
interval over the triples (pairs kept together); *gain vs random* likewise against the control.

    python examples/saft_pipeline/sweep.py --seeds 0,1 --sap rho=2e-5:sum --sap rho=2e-5 --sap rho=1e-3 \\
        --sap rho=1e-3:layers=3-15 --sap rho=1e-3:steps=3
    python examples/saft_pipeline/sweep.py --max-steps 3 --seeds 0,1 --sap rho=1e-3 --work-dir /tmp/sweep-smoke

A ``--sap`` setting is ``key=value`` pairs joined by ``:`` — ``rho``, ``lr`` (probe learning rate),
``layers`` (e.g. ``3-8``), ``steps`` (probe steps), ``batch`` (triples per step) — plus the bare word ``sum``
for the paper's summed log-probabilities. Every fine-tune and evaluation is stored in --work-dir and
skipped when already there, so a stopped sweep resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as pipeline_run  # noqa: E402  (the data and the SAFT split are run.py's)

log = pipeline_run.log


def parse_setting(text: str) -> dict:
    """``rho=1e-3:layers=3-8:steps=2:sum`` → FinetuneConfig keyword arguments."""
    kw: dict = {}
    keys = {"rho": ("sap_rho", float), "lr": ("sap_probe_lr", float), "steps": ("sap_probe_steps", int),
            "batch": ("sap_batch_size", int), "layers": ("sap_layers", None)}
    for part in filter(None, text.split(":")):
        if part == "sum":
            kw["sap_per_token"] = False
            continue
        key, _, value = part.partition("=")
        if key not in keys or not value:
            sys.exit(f"--sap {text!r}: unknown part {part!r} (use rho=, lr=, layers=, steps=, batch= or sum)")
        name, conv = keys[key]
        if name == "sap_layers":
            a, _, b = value.partition("-")
            kw[name] = tuple(range(int(a), int(b or a) + 1))
        else:
            kw[name] = conv(value)
    return kw


def paired(diffs: np.ndarray, seed: int = 0, draws: int = 10000) -> tuple[float, float, float]:
    """Mean of per-triple differences and a bootstrap 95 % interval (triples resampled)."""
    idx = np.random.default_rng(seed).integers(0, len(diffs), size=(draws, len(diffs)))
    means = diffs[idx].mean(axis=1)
    return float(diffs.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pipeline_run.add_setup_args(ap)
    ap.add_argument("--seeds", default="0,1", help="training seeds (LoRA init, data order, SAP's triple draws)")
    ap.add_argument("--sap", action="append", default=None, help="a SAP setting (repeatable); default: rho=1e-3")
    ap.add_argument("--arms", default="sft,random,saft,sap,saft+sap", help="which arm kinds to run")
    ap.add_argument("--max-steps", type=int, default=None, help="cap every fine-tune (smoke runs)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--table-only", action="store_true",
                    help="print the table from the stored results; train and evaluate nothing")
    args = ap.parse_args()
    device = None if args.device == "auto" else args.device

    import torch

    from saft_gx.train.adapter import load_adapter
    from saft_gx.train.evaluate import benign_loss, refusal_preference
    from saft_gx.train.finetune import FinetuneConfig, train
    from saft_gx.embedding.models import load_model
    from saft_gx.pipeline import ColumnOptions
    from saft_gx.train.sap import load_safety_triples

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    paths = pipeline_run.build_data(args, work)
    detection = pipeline_run.score_and_split(args, work, paths)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = args.sap or ["rho=1e-3"]
    kinds = set(args.arms.split(","))
    arms: list[tuple[str, str, dict]] = []  # (name, data, FinetuneConfig overrides)
    if "sft" in kinds:
        arms.append(("sft", "contaminated", {}))
    if "random" in kinds:
        arms.append(("random", "random_kept", {}))
    if "saft" in kinds:
        arms.append(("saft", "saft_kept", {}))
    if "sap" in kinds:
        arms += [(f"sap[{s}]", "contaminated", {"method": "sap", **parse_setting(s)}) for s in settings]
    if "saft+sap" in kinds:
        arms += [(f"saft+sap[{s}]", "saft_kept", {"method": "sap", **parse_setting(s)}) for s in settings]

    sweep = work / "sweep"
    sweep.mkdir(exist_ok=True)
    results_path = sweep / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    base_lm = None
    triples = load_safety_triples(paths["eval_triples"])[0]
    cols = ColumnOptions(prompt="prompt", response="response")
    for name, data, over in arms:
        for seed in seeds:
            key = f"{name} seed={seed}" + (f" max_steps={args.max_steps}" if args.max_steps else "")
            if key in results or args.table_only:
                continue
            slug = "".join(c if c.isalnum() or c in "-.=" else "_" for c in name)
            out = sweep / f"{slug}_s{seed}" if not args.max_steps else sweep / f"{slug}_s{seed}_max{args.max_steps}"
            cfg = FinetuneConfig(model=args.model, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, epochs=args.epochs,
                                 lr=args.lr, max_length=args.max_length, batch_size=args.batch_size, seed=seed,
                                 max_steps=args.max_steps, save_steps=10, safety_set=str(paths["sap_triples"]),
                                 sap_batch_size=args.sap_batch_size, **over)
            t0 = time.perf_counter()
            if not (out / "adapter" / "saft_gx_adapter.json").exists():
                log(f"fine-tuning {key} on {paths[data].name}")
                train(paths[data], out, cfg, columns=cols, device=device)
            t_train = time.perf_counter() - t0
            if base_lm is None:
                base_lm = load_model(args.model, device=device)
                base_model = base_lm.model
            lm = copy.copy(base_lm)
            lm.model = copy.deepcopy(base_model)
            load_adapter(lm, out)
            margins: list[float] = []
            pref = refusal_preference(lm, triples, max_length=args.max_length, batch_size=8, per_triple=margins)
            ben = benign_loss(lm, paths["heldout_benign"], max_length=args.max_length, batch_size=8, columns=cols)
            steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
            probe = [s["sap_probe_norm"] for s in steps if "sap_probe_norm" in s]
            results[key] = {"arm": name, "seed": seed, "margins": margins, "refusal_margin": pref["refusal_margin"],
                            "benign_loss": ben["benign_loss"], "steps": len(steps),
                            "train_seconds": steps[-1]["seconds"] if steps else None,
                            "mean_probe_norm": float(np.mean(probe)) if probe else None,
                            "zero_probe_steps": sum(p == 0 for p in probe) if probe else None}
            results_path.write_text(json.dumps(results, indent=1))
            log(f"  {key}: margin {pref['refusal_margin']:+.4f}, benign loss {ben['benign_loss']:.4f} "
                f"({t_train:.0f} s training)")

    suffix = f" max_steps={args.max_steps}" if args.max_steps else ""

    def per_seed(name: str) -> dict[int, dict]:
        return {s: results[f"{name} seed={s}{suffix}"] for s in seeds if f"{name} seed={s}{suffix}" in results}

    def gain(name: str, ref: str) -> str:
        a, b = per_seed(name), per_seed(ref)
        common = sorted(set(a) & set(b))
        if name == ref or not common:
            return "–"
        d = np.mean([np.asarray(a[s]["margins"]) - np.asarray(b[s]["margins"]) for s in common], axis=0)
        m, lo, hi = paired(d)
        return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    head = ("arm", "seeds", "steps", "refusal margin ↑", "gain vs sft, 95 % CI", "gain vs random, 95 % CI",
            "benign loss ↓", "vs sft", "mean ‖v‖")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, _data, _over in arms:
        rs = per_seed(name)  # the seeds this arm has results for (fewer than --seeds if it was stopped)
        if not rs:
            continue
        loss = float(np.mean([r["benign_loss"] for r in rs.values()]))
        ref = per_seed("sft")
        same = sorted(set(rs) & set(ref))  # the benign loss against plain SFT's with the same seeds
        rel = (f"{(np.mean([rs[x]['benign_loss'] for x in same]) / np.mean([ref[x]['benign_loss'] for x in same]) - 1) * 100:+.2f} %"
               if same else "–")
        probes = [r["mean_probe_norm"] for r in rs.values() if r["mean_probe_norm"] is not None]
        probe = f"{np.mean(probes):.3g}" if probes else "–"
        lines.append(f"| {name} | {len(rs)} | {int(np.mean([r['steps'] for r in rs.values()]))} | "
                     f"{np.mean([r['refusal_margin'] for r in rs.values()]):+.4f} | {gain(name, 'sft')} | "
                     f"{gain(name, 'random')} | {loss:.4f} | {rel} | {probe} |")
    combined = [name for name, _d, _o in arms if name.startswith("saft+sap")]
    for name in combined:  # does SAP add anything once SAFT has filtered? (same kept rows, same seeds)
        if per_seed("saft") and per_seed(name):
            lines.append(f"\n{name} vs saft (filtering alone), 95 % CI: {gain(name, 'saft')}")
    md = "\n".join(lines)
    (sweep / "table.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\n{len(triples)} held-out triples; SAFT split: AUROC {detection['auroc']:.3f}, kept {detection['kept_rows']} "
          f"rows ({detection['kept_harmful']} harmful), random control kept {detection['random_kept_harmful']} harmful")
    print(f"wall time of this invocation: {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
