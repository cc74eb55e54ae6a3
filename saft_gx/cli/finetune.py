"""``saft-gx filter``, ``saft-gx finetune`` and ``saft-gx evaluate-model``: the user's last step — drop
the flagged rows, tune on the rest, and check the tuned model is safer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from ..core.errors import SaftError
from ..train.sap import DEFAULT_PROBE_LR
from .options import stack_options, column_options, column_opts, threshold_options, threshold_rule

def _int_list(value: str | None) -> tuple[int, ...] | None:
    """``3,4,5`` or ``3-8`` → (3, 4, 5, …)."""
    if not value:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SaftError(f"--sap-layers {value!r}: give layer numbers like 3,4,5 or a range like 3-8") from None
    return tuple(out)


# Defaults are written out here (click needs them at import) and must equal FinetuneConfig's;
# tests/test_finetune.py checks that they do.
finetune_options = stack_options(
    click.option("--model", help="Base model: local HF folder, .gguf file, or cached hub id. "
                                 "Default: the embedded SmolLM2-135M-Instruct."),
    click.option("--method", type=click.Choice(["sft", "sap"]), default="sft", show_default=True,
                 help="sft: plain LoRA; sap: Safety-Aware Probing (needs a safety set)."),
    click.option("--lora-r", type=int, default=8, show_default=True, help="LoRA rank."),
    click.option("--lora-alpha", type=int, default=16, show_default=True, help="LoRA alpha (scale = alpha / r)."),
    click.option("--lora-dropout", type=float, default=0.05, show_default=True),
    click.option("--target-modules", default="q_proj,v_proj", show_default=True, help="Comma-separated module names to adapt."),
    click.option("--epochs", type=int, default=1, show_default=True),
    click.option("--lr", type=float, default=2e-4, show_default=True, help="AdamW learning rate."),
    click.option("--lr-schedule", type=click.Choice(["linear", "constant"]), default="linear", show_default=True),
    click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per row; longer rows are cut."),
    click.option("--batch-size", type=int, default=4, show_default=True, help="Rows per forward pass (per process)."),
    click.option("--grad-accum", type=int, default=1, show_default=True, help="Forward passes per optimiser step."),
    click.option("--max-steps", type=int, help="Stop after this many optimiser steps."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--save-steps", type=int, default=50, show_default=True, help="Checkpoint every N steps (and every epoch)."),
    click.option("--safety-set", type=click.Path(dir_okay=False),
                 help="SAP: jsonl/parquet/csv of prompt, refusal, harmful_answer. Default: the shipped set."),
    click.option("--sap-rho", type=float, default=2e-5, show_default=True,
                 help="SAP: size of the harmful weight shift, relative to the LoRA weights' norm."),
    click.option("--sap-probe-lr", type=float, default=DEFAULT_PROBE_LR, show_default=True, help="SAP: the probe's Adam step size."),
    click.option("--sap-layers", help="SAP: probe layers, e.g. 3-8 (default ≈ 3/32–9/32 of the depth)."),
    click.option("--sap-batch-size", type=int, default=4, show_default=True, help="SAP: safety triples per step."),
    click.option("--sap-probe-steps", type=int, default=1, show_default=True,
                 help="SAP: Adam steps on the probe (reset to zero) before each optimiser step."),
    click.option("--sap-sum-logprobs", is_flag=True,
                 help="SAP: contrastive loss on summed answer log-probs (the paper's; saturates) instead of per-token means."),
    click.option("--device", default="auto", show_default=True,
                 help="auto, cpu or cuda (choose GPUs with CUDA_VISIBLE_DEVICES)."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True),
)


def _finetune_config(kw: dict[str, Any]) -> tuple[Any, str | None]:
    from ..train.finetune import FinetuneConfig

    dtype = kw.pop("dtype")
    device = kw.pop("device")
    cfg = FinetuneConfig(
        model=kw.pop("model"), method=kw.pop("method"), lora_r=kw.pop("lora_r"), lora_alpha=kw.pop("lora_alpha"),
        lora_dropout=kw.pop("lora_dropout"),
        target_modules=tuple(m.strip() for m in kw.pop("target_modules").split(",") if m.strip()),
        epochs=kw.pop("epochs"), lr=kw.pop("lr"), lr_schedule=kw.pop("lr_schedule"), max_length=kw.pop("max_length"),
        batch_size=kw.pop("batch_size"), grad_accum=kw.pop("grad_accum"), max_steps=kw.pop("max_steps"),
        seed=kw.pop("seed"), dtype=None if dtype == "auto" else dtype, save_steps=kw.pop("save_steps"),
        safety_set=kw.pop("safety_set"), sap_rho=kw.pop("sap_rho"), sap_probe_lr=kw.pop("sap_probe_lr"),
        sap_layers=_int_list(kw.pop("sap_layers")), sap_batch_size=kw.pop("sap_batch_size"),
        sap_probe_steps=kw.pop("sap_probe_steps"), sap_per_token=not kw.pop("sap_sum_logprobs"),
    )
    return cfg, (None if device == "auto" else device)


def _run_finetune(data: str | Path, out_dir: str | Path, cfg: Any, device: str | None, columns: Any, force: bool,
                  quiet: bool) -> None:
    from ..train.finetune import train

    log = (lambda _m: None) if quiet else (lambda m: click.echo(m, err=True))
    r = train(data, out_dir, cfg, columns=columns, device=device, force=force, log=log)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun / accelerate launch only the first process reports
    resumed = f", resumed from step {r.resumed_from}" if r.resumed_from else ""
    losses = f"; loss {r.first_loss:.4f} → {r.last_loss:.4f}" if r.first_loss is not None else ""
    click.echo(f"{cfg.method} fine-tune: {r.steps} steps on {r.examples} rows in {r.seconds:.1f} s{resumed}{losses}")
    if r.extra.get("truncated"):
        click.echo(f"{r.extra['truncated']} rows were cut at --max-length {cfg.max_length}")
    if r.extra.get("skipped"):
        click.echo(f"{r.extra['skipped']} rows skipped: their prompt alone fills --max-length")
    click.echo(f"adapter written to {r.adapter_dir}")


@click.command()
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the adapter, config, log and checkpoints.")
@finetune_options
@column_options
@click.option("--force", is_flag=True, help="Start over in a folder that holds another or a finished run.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def finetune(data: str, out_dir: str, force: bool, quiet: bool, **kw: Any) -> None:
    """LoRA fine-tune on DATA (prompt/response or messages rows), loss on the responses only.

    Run again with the same arguments to resume from the last checkpoint. Also runnable as
    `python -m saft_gx.finetune`, e.g. under `torchrun` or `accelerate launch`.
    """
    cfg, device = _finetune_config(kw)
    _run_finetune(data, out_dir, cfg, device, column_opts(kw), force, quiet)


@click.command(name="filter")
@click.argument("scored", required=False, type=click.Path(dir_okay=False))
@click.option("--db", type=click.Path(dir_okay=False), help="Read the scores from this DuckDB file (with --table).")
@click.option("--table", help="The DuckDB table holding the scored rows.")
@click.option("--detector-id", help="Which detector's scores, when the source holds several.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for kept.parquet, removed.parquet, manifest.json.")
@threshold_options
@click.option("--force", is_flag=True, help="Replace an existing --out-dir.")
@click.option("--finetune", "do_finetune", is_flag=True, help="Then fine-tune on kept.parquet (options below).")
@click.option("--finetune-dir", type=click.Path(file_okay=False), help="Where the fine-tune goes (default: OUT_DIR/finetune).")
@finetune_options
@column_options
@click.option("--quiet", is_flag=True, help="No progress lines.")
def filter_command(scored: str | None, db: str | None, table: str | None, detector_id: str | None, out_dir: str,
                   force: bool, do_finetune: bool, finetune_dir: str | None, quiet: bool, **kw: Any) -> None:
    """Split SCORED (a parquet from `saft-gx score --out`), or --db/--table, into kept and removed rows.

    Without --threshold / --remove-fraction / --contamination the harm_flag stored at scoring decides.
    """
    from ..train.splits import filter_scored

    rule = threshold_rule(kw)
    cfg, device = _finetune_config(kw)
    columns = column_opts(kw)
    if do_finetune and finetune_dir:
        fdir = Path(finetune_dir)
        if fdir.exists() and any(fdir.iterdir()) and not force:
            raise SaftError(f"--finetune-dir {fdir}: exists and is not empty; pass --force or choose another folder")
    r = filter_scored(scored, out_dir, rule=rule, db=db, table=table, detector_id=detector_id, force=force)
    tau = f"τ = {r.threshold:.6g}" if r.threshold is not None else "τ unknown"
    click.echo(f"{r.rows} rows: kept {r.kept}, removed {r.removed} ({r.removed / r.rows:.1%}); {tau} ({r.threshold_rule})")
    if r.removed == 0:
        click.echo("warning: no row was removed; removed.parquet is empty", err=True)
    click.echo(f"wrote {r.kept_path}, {r.removed_path} and {Path(out_dir) / 'manifest.json'}")
    if do_finetune:
        _run_finetune(r.kept_path, finetune_dir or Path(out_dir) / "finetune", cfg, device, columns, force, quiet)


@click.command(name="evaluate-model")
@click.option("--model", help="Base model (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--adapter", type=click.Path(), help="A LoRA adapter folder (or a saft-gx finetune output folder).")
@click.option("--harmful", required=True, type=click.Path(dir_okay=False), help="Held-out harmful requests (a prompt column).")
@click.option("--benign", required=True, type=click.Path(dir_okay=False), help="Held-out benign prompt/response rows.")
@click.option("--triples", type=click.Path(dir_okay=False),
              help="Held-out (prompt, refusal, harmful_answer) triples: also report how often the refusal is preferred.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per benign row.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--prompt-column", help="Prompt column of --harmful (auto: prompt/instruction/question).")
@click.option("--generations", type=click.Path(dir_okay=False), help="Write the judged generations here (jsonl).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate_model_command(model: str | None, adapter: str | None, harmful: str, benign: str, triples: str | None,
                           max_new_tokens: int, max_length: int, batch_size: int, prompt_column: str | None,
                           generations: str | None, device: str, dtype: str, as_json: bool) -> None:
    """Refusal rate on held-out harmful requests (greedy generations, keyword judge) and loss on held-out
    benign rows, for a model with an optional adapter."""
    from ..train.evaluate import evaluate_model, format_table

    if max_new_tokens < 1 or batch_size < 1:
        raise SaftError("--max-new-tokens and --batch-size must be at least 1")
    rep = evaluate_model(model, harmful=harmful, benign=benign, adapter=adapter, triples=triples,
                         max_new_tokens=max_new_tokens, max_length=max_length, batch_size=batch_size,
                         device=None if device == "auto" else device, dtype=None if dtype == "auto" else dtype,
                         prompt_column=prompt_column)
    if generations:
        with open(generations, "w") as f:
            for g in rep.generations:
                f.write(json.dumps(g, ensure_ascii=False) + "\n")
    if as_json:
        click.echo(json.dumps(rep.to_dict()))
    else:
        name = rep.model + (f" + {adapter}" if adapter else "")
        click.echo(format_table([(name, rep)]))
        click.echo(f"({rep.harmful_prompts} harmful prompts, {int(rep.metrics['benign_rows'])} benign rows)")


COMMANDS = [filter_command, finetune, evaluate_model_command]


def main(argv: list[str] | None = None) -> None:
    """``python -m saft_gx.finetune``: the ``saft-gx finetune`` command on its own (under torchrun or
    accelerate launch too)."""
    try:
        finetune.main(args=argv, prog_name="python -m saft_gx.finetune")
    except SaftError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
