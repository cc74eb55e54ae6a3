"""Where SAP's probe signal dies: the probe step on the same safety triples, summed vs per-token
log-probabilities, at several ρ, with the default model (SmolLM2-135M-Instruct) and a fresh LoRA adapter
(r = 8 on q/v, as at the first step of `saft-gx finetune --method sap`).

    python examples/saft_pipeline/probe_signal.py               # ~2-4 min on 2 CPU cores
    python examples/saft_pipeline/probe_signal.py --steps 8     # also: 8 consecutive probe steps per setting

For each setting it prints the refusal-vs-harmful margin the loss sees, L_c, the weight shift ‖δ‖, the gain
J(0) = L_c(θ+δ, 0) − L_c(θ, 0), the probe's gradient ‖∂J/∂v‖ (and its root-mean-square per coordinate,
to compare with Adam's ε = 1e-8), the probe's norm after its Adam step, and how much the probe changes
the task gradient on one batch of benign rows (‖∇L_task(v) − ∇L_task(0)‖ / ‖∇L_task(0)‖): the only way
the probe acts on training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--triples", default=str(ROOT / "data_src" / "safety_triples.jsonl"))
    ap.add_argument("--benign", default=str(ROOT / "data_src" / "benign_pool.jsonl"))
    ap.add_argument("--rho", default="2e-5,1e-3,1e-2", help="comma-separated ρ values")
    ap.add_argument("--batch-size", type=int, default=4, help="safety triples per probe step")
    ap.add_argument("--logprobs", default="sum,mean", help="sum, mean (per token) or both")
    ap.add_argument("--steps", type=int, default=1, help="consecutive probe steps (different batches, Adam moments kept)")
    ap.add_argument("--probe-lr", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from saft_gx.train.lm_data import Example, collate, encode_row, token_nll
    from saft_gx.embedding.models import load_model
    from saft_gx.embedding.rows import Row
    from saft_gx.train.sap import SAP, load_safety_triples

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = load_model(args.model, device="cpu")
    model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    triples, _ = load_safety_triples(args.triples)
    tok = lm.tokenizer
    benign = [json.loads(x) for x in Path(args.benign).read_text().splitlines()[:4]]
    task: list[Example] = [encode_row(tok, Row(messages=(("user", r["prompt"]), ("assistant", r["response"]))),
                                      args.max_length) for r in benign]
    task_batch = collate(task, tok.pad_token_id if tok.pad_token_id is not None else 0)
    params = [p for p in model.parameters() if p.requires_grad]

    def task_grad(sap: SAP | None) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        ctx = sap.probe_active() if sap is not None else torch.enable_grad()
        with ctx:
            logits = model(input_ids=task_batch["input_ids"], attention_mask=task_batch["attention_mask"]).logits
        loss = token_nll(logits, task_batch["labels"]).sum() / (task_batch["labels"][:, 1:] != -100).sum()
        g = torch.autograd.grad(loss, params)
        return torch.cat([x.flatten() for x in g])

    g_plain = task_grad(None)
    print(f"model loaded and task gradient in {time.perf_counter() - t0:.0f} s; {len(triples)} triples, "
          f"LoRA ‖θ‖ = {float(torch.sqrt(sum((p.detach() ** 2).sum() for p in params))):.3f}")
    head = ("log-probs", "rho", "step", "margin mean", "margin min", "L_c", "|delta|", "J(0)", "|dJ/dv|",
            "rms dJ/dv", "|v|", "task grad change")
    print(" | ".join(head))
    for per_token in [x.strip() == "mean" for x in args.logprobs.split(",")]:
        for rho in (float(x) for x in args.rho.split(",")):
            sap = SAP(model, tok, triples, rho=rho, probe_lr=args.probe_lr, batch_size=args.batch_size,
                      max_length=args.max_length, per_token=per_token, seed=0)
            try:
                for step in range(args.steps):
                    batch = sap.next_batch(step)
                    with torch.no_grad():
                        from saft_gx.train.sap import triple_logprobs

                        model.eval()
                        r, h = triple_logprobs(model, batch, batch["input_ids"].shape[0] // 2, per_token=per_token)
                        margin = (r - h).float()
                    rec = sap.probe_step(batch)
                    model.train()
                    change = float((task_grad(sap) - g_plain).norm() / g_plain.norm())
                    rms = rec["sap_probe_grad_norm"] / sap.probe.numel() ** 0.5
                    print(" | ".join([
                        "per-token" if per_token else "summed", f"{rho:g}", str(step + 1),
                        f"{float(margin.mean()):+.2f}", f"{float(margin.min()):+.2f}", f"{rec['sap_safety_loss']:.3g}",
                        f"{rec['sap_delta_norm']:.3g}", f"{rec['sap_shift_gain']:.3g}", f"{rec['sap_probe_grad_norm']:.3g}",
                        f"{rms:.2g}", f"{rec['sap_probe_norm']:.3g}", f"{change:.3g}"]), flush=True)
            finally:
                sap.remove()
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
