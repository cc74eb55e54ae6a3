"""LoRA fine-tuning on prompt/response rows: plain SFT, or Safety-Aware Probing (``method="sap"``, see
``sap.py``).

Rows are formatted exactly as the scorer formats them (``rows.format_row``: the model's chat template);
the loss covers the response tokens only, the end-of-turn / EOS token included, so the tuned model learns
where an answer stops. Run it as

    python -m saft_gx.finetune DATA --out-dir runs/x            # one process
    torchrun --nproc-per-node 4 -m saft_gx.finetune DATA ...    # or accelerate launch -m saft_gx.finetune
    saft-gx finetune DATA --out-dir runs/x                      # the same command

The output folder holds ``adapter/`` (a peft adapter plus ``saft_gx_adapter.json`` naming the base model's
fingerprint), ``finetune_config.json`` (everything that decides the result), ``train_log.jsonl`` (one
line per optimiser step) and ``checkpoints/``. A killed run started again with the same command resumes
from its last checkpoint.

**The loop is ``transformers.Trainer``** (not TRL's ``SFTTrainer``: our rows are already tokenised with
response-only labels, which is all SFTTrainer would add, and it would pull in another dependency).
Trainer owns the optimiser (AdamW, no weight decay), the LR schedule, gradient accumulation, distributed
launch (torchrun / accelerate set the environment; Trainer wraps the model in DDP), checkpoints
(``checkpoints/checkpoint-N``: adapter, optimiser, scheduler, RNG, data position) and resuming. What is
ours is small: ``_Trainer.compute_loss`` (summed response-token NLL over the tokens of the whole
optimiser step, so rows weigh by their answer length and gradient accumulation changes nothing), a
callback that runs SAP's probe step at the start of every optimiser step and keeps its probe optimiser in
each checkpoint, and the per-step ``train_log.jsonl`` that ``read_log`` reads. Around it: the run-identity
check (a folder resumes only the same settings and data) and the atomic adapter write.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .adapter import ADAPTER_META, load_adapter
from .sap import DEFAULT_PROBE_LR
from ..core.errors import SaftError
# re-exported: these lived here before lm_data.py; callers may import them from saft_gx.train.finetune
from .lm_data import (IGNORE, EncodedData, Example, collate, encode_row, load_examples, prompt_text,  # noqa: F401
                      sequence_logprobs, token_nll)

METHODS = ("sft", "sap")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
CONFIG_FILE = "finetune_config.json"
LOG_FILE = "train_log.jsonl"
PROBE_STATE = "sap_probe.pt"  # SAP's probe optimiser, saved inside each Trainer checkpoint

# Settings that do not change the trained weights: a resumed run may differ in these.
_NOT_IDENTITY = ("save_steps", "keep_checkpoints")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides the trained adapter. ``epochs`` passes over the data, capped by
    ``max_steps`` optimiser steps; one step sees ``batch_size × grad_accum`` rows per process."""

    model: str | None = None  # None: the embedded default model
    method: str = "sft"  # "sft" or "sap"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    epochs: int = 1
    lr: float = 2e-4
    lr_schedule: str = "linear"  # "linear" decay to 0, or "constant"
    max_length: int = 512  # tokens per row; longer rows are cut (their response end is lost)
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    seed: int = 0
    dtype: str | None = None  # None/auto: bfloat16 on CUDA, float32 on CPU
    save_steps: int = 50
    keep_checkpoints: int = 2
    # SAP only (ignored by sft); defaults are the paper's (reference setup: Llama-2-7B, layers 3-9 of 32)
    safety_set: str | None = None  # None: the shipped set, saft_gx/data/safety_triples.jsonl
    sap_rho: float = 2e-5
    sap_probe_lr: float = DEFAULT_PROBE_LR
    sap_layers: tuple[int, ...] | None = None  # None: layers ≈ 3/32 … 9/32 of the depth
    sap_batch_size: int = 4
    sap_probe_steps: int = 1  # Adam steps on the (reset) probe before each optimiser step
    sap_per_token: bool = True  # L_c on mean per-token log-probs (False: summed, the paper's; saturates)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SaftError(msg)

        if self.method not in METHODS:
            bad(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("lora_r", "lora_alpha", "epochs", "max_length", "batch_size", "grad_accum", "save_steps",
                     "keep_checkpoints", "sap_batch_size", "sap_probe_steps"):
            if int(getattr(self, name)) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_length < 8:
            bad("--max-length must be at least 8 tokens")
        if self.max_steps is not None and self.max_steps < 1:
            bad("--max-steps must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("--lr must be a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad("--lora-dropout must be in [0, 1)")
        if self.lr_schedule not in ("linear", "constant"):
            bad(f"--lr-schedule {self.lr_schedule!r}: choose linear or constant")
        if not self.target_modules:
            bad("--target-modules: name at least one module, e.g. q_proj,v_proj")
        if self.sap_rho < 0 or self.sap_probe_lr < 0:
            bad("--sap-rho and --sap-probe-lr must not be negative")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.sap_layers is not None:
            object.__setattr__(self, "sap_layers", tuple(int(x) for x in self.sap_layers))

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in _NOT_IDENTITY:
            d.pop(k)
        d["target_modules"] = list(self.target_modules)
        d["sap_layers"] = list(self.sap_layers) if self.sap_layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("target_modules", "sap_layers"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# ---- files ------------------------------------------------------------------------------------------

def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _atomic_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _last_checkpoint(folder: Path, need: tuple[str, ...] = ()) -> Path | None:
    """The newest complete Trainer checkpoint. Trainer writes ``trainer_state.json`` last, so a folder
    without it (a kill during the save) is skipped, as is one without the files in ``need``."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").exists() and all((p / n).exists() for n in need)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


# ---- training --------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    out_dir: Path
    adapter_dir: Path
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    resumed_from: int | None
    examples: int
    extra: dict[str, Any] = field(default_factory=dict)


def _training_args(cfg: FinetuneConfig, out: Path, device: str | None) -> Any:
    from transformers import TrainingArguments

    if device not in (None, "cpu", "cuda"):
        raise SaftError(f"--device {device}: give auto, cpu or cuda (pick a GPU with CUDA_VISIBLE_DEVICES; "
                        "several with torchrun or accelerate launch)")
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_schedule, warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=0.0,  # no clipping, as before the move to Trainer
        seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints, logging_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device == "cpu",
        ddp_find_unused_parameters=False, average_tokens_across_devices=True)


class _Dataset:
    """The encoded rows as a map-style dataset (Trainer's sampler needs ``len`` and indexing)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _make_trainer(model: Any, args: Any, data: list[Example], pad_id: int, sap: Any, callbacks: list[Any]) -> Any:
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _Trainer(Trainer):
        """Trainer with our loss: the summed NLL of the response tokens divided by the response tokens of the
        whole optimiser step (``num_items_in_batch``, counted by Trainer over all micro-batches and
        processes from the ``shift_labels`` the collator gives), with SAP's probe added when it is on."""

        model_accepts_loss_kwargs = True  # makes Trainer count num_items_in_batch
        loss_is_scaled_for_ga = True  # ...and we divide by it ourselves

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = True
            self.step_nll = 0.0  # this process's summed NLL and tokens in the current optimiser step
            self.step_tokens = 0

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"]
            with sap.probe_active() if sap is not None else nullcontext():
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            nll = token_nll(out.logits, labels).sum()
            n_local = int((labels[:, 1:] != IGNORE).sum())
            self.step_nll += float(nll.detach())
            self.step_tokens += n_local
            loss = nll / (num_items_in_batch if num_items_in_batch is not None else max(1, n_local))
            if self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over processes; the count is global
            return (loss, out) if return_outputs else loss

    def collator(examples: list[Example]) -> dict[str, Any]:
        b = collate(examples, pad_id)
        b["shift_labels"] = b["labels"][:, 1:]  # what Trainer counts as this batch's loss tokens
        return b

    trainer = _Trainer(model=model, args=args, train_dataset=_Dataset(data), data_collator=collator, callbacks=callbacks)
    for printer in (PrinterCallback, ProgressCallback):  # our callback logs; theirs would print dicts to stdout
        trainer.remove_callback(printer)
    return trainer


def _callback(trainer_ref: list[Any], sap: Any, log_path: Path, t0: float, on_step: Callable[[dict[str, Any]], None] | None,
              say: Callable[[str], None], first_last: list[float | None], steps_per_epoch: int) -> Any:
    import torch
    from transformers import TrainerCallback

    class _Steps(TrainerCallback):
        """SAP's probe step before each optimiser step; one log line after it; a checkpoint at the end
        of every epoch and of the run, beside Trainer's every ``save_steps``."""

        sap_record: dict[str, Any] = {}
        lr_used = float("nan")

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            trainer = trainer_ref[0]
            trainer.step_nll, trainer.step_tokens = 0.0, 0
            if sap is not None:
                self.sap_record = sap.probe_step(step=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            trainer = trainer_ref[0]
            totals = torch.tensor([trainer.step_nll, float(trainer.step_tokens)], dtype=torch.float64,
                                  device=args.device)
            if args.world_size > 1:
                totals = trainer.accelerator.reduce(totals, reduction="sum")
            nll, n_tok = float(totals[0]), float(totals[1])
            loss = nll / max(1.0, n_tok)
            first_last[0] = loss if first_last[0] is None else first_last[0]
            first_last[1] = loss
            step, total = state.global_step, state.max_steps
            record = {"step": step, "epoch": round(state.epoch, 6), "loss": round(loss, 6), "lr": self.lr_used,
                      "tokens": int(n_tok), "seconds": round(time.perf_counter() - t0, 2), **self.sap_record}
            if state.is_world_process_zero:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if step % max(1, steps_per_epoch // 10 or 1) == 0 or step == total:
                say(f"step {step}/{total}  loss {loss:.4f}  lr {record['lr']:.2e}  {record['seconds']:.0f} s")
            if step % steps_per_epoch == 0 or step == total:
                control.should_save = True
            if on_step is not None:
                on_step(record)  # before this step's checkpoint is written
            return control

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.lr_used = float(trainer_ref[0].lr_scheduler.get_last_lr()[0])  # the rate this update uses

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if sap is not None and state.is_world_process_zero:
                cp = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if cp.is_dir():
                    torch.save(sap.state_dict(), cp / PROBE_STATE)

    return _Steps()


def train(data: str | Path, out_dir: str | Path, config: FinetuneConfig | None = None, *,
          columns: Any = None, device: str | None = None, force: bool = False,
          log: Callable[[str], None] | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` with LoRA on the rows of ``data`` and save the adapter in ``out_dir``
    (``config`` defaults to ``FinetuneConfig()``).

    A folder holding an unfinished run with the same settings and data is resumed from its last
    checkpoint; one with other settings, or a finished run, is an error unless ``force`` (start over).
    ``on_step`` gets each step's log record before that step's checkpoint is written (tests use it to
    interrupt a run)."""
    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model

    from .. import __version__
    from ..embedding.models import load_model
    from ..pipeline import ColumnOptions
    from ..io.readers import open_dataset

    cfg = config or FinetuneConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SaftError(f"--out-dir {out}: exists and is not a folder")
    args = _training_args(cfg, out, device)  # also sets up torch.distributed under torchrun / accelerate
    state = PartialState()
    say = log if (log is not None and state.is_main_process) else (lambda _m: None)
    torch.manual_seed(cfg.seed)

    # check the inputs before spending time on the model
    (columns or ColumnOptions()).resolve(open_dataset(data))
    if cfg.method == "sap":
        from .sap import SAP, load_safety_triples

        triples, triples_sha = load_safety_triples(cfg.safety_set)
    lm = load_model(cfg.model, device=str(args.device), dtype=cfg.dtype)
    tok = lm.tokenizer
    data_enc = load_examples(data, tok, cfg.max_length, columns)
    run_info: dict[str, Any] = {
        "config": cfg.identity(),
        "data": str(Path(data).resolve()), "data_sha256": data_enc.sha256, "columns": data_enc.columns,
        "model": lm.model_ref, "model_fingerprint": lm.fingerprint, "world_size": args.world_size,
    }
    if cfg.method == "sap":
        run_info["safety_set_sha256"] = triples_sha
    if force and state.is_main_process and out.exists():
        for name in ("adapter", "checkpoints", CONFIG_FILE, LOG_FILE):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    state.wait_for_everyone()
    _start_or_check_run(out, run_info, write=state.is_main_process, extra={
        "rows": data_enc.rows, "rows_truncated": data_enc.truncated, "rows_skipped": data_enc.skipped,
        "saft_gx_version": __version__, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    state.wait_for_everyone()

    model = lm.model
    model.config.use_cache = False
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise SaftError(f"--target-modules {','.join(cfg.target_modules)}: {str(e).splitlines()[0]}") from None
    sap = None
    if cfg.method == "sap":
        sap = SAP(model, tok, triples, layers=cfg.sap_layers, rho=cfg.sap_rho, probe_lr=cfg.sap_probe_lr,
                  batch_size=cfg.sap_batch_size, max_length=cfg.max_length, probe_steps=cfg.sap_probe_steps,
                  per_token=cfg.sap_per_token, seed=cfg.seed + 7919 * state.process_index)

    checkpoint = _last_checkpoint(out / "checkpoints", (PROBE_STATE,) if sap is not None else ())
    resumed_from = None
    if checkpoint is not None:
        resumed_from = int(checkpoint.name.split("-")[-1])
        if sap is not None:
            sap.load_state_dict(torch.load(checkpoint / PROBE_STATE, map_location=lm.device, weights_only=True))
    log_path = out / LOG_FILE
    seconds_before = _trim_log(log_path, resumed_from or 0) if state.is_main_process else 0.0
    t0 = time.perf_counter() - seconds_before  # the log's seconds count the whole run, across resumes

    n = len(data_enc.examples)
    steps_per_epoch = math.ceil(math.ceil(n / (cfg.batch_size * args.world_size)) / cfg.grad_accum)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    trainer_ref: list[Any] = []
    first_last: list[float | None] = [None, None]
    cb = _callback(trainer_ref, sap, log_path, t0, on_step, say, first_last, steps_per_epoch)
    trainer = _make_trainer(model, args, data_enc.examples, pad, sap, [cb])
    trainer_ref.append(trainer)
    if resumed_from is not None:
        say(f"resuming from checkpoint step {resumed_from}")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    step = trainer.state.global_step

    adapter_dir = out / "adapter"
    if state.is_main_process:
        def write_adapter(tmp: Path) -> None:
            model.save_pretrained(str(tmp))
            meta = {"model": lm.model_ref, "model_fingerprint": lm.fingerprint, "method": cfg.method,
                    "steps": step, "saft_gx_version": __version__,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))

        _atomic_dir(adapter_dir, write_adapter)
    state.wait_for_everyone()
    extra = {"rows": data_enc.rows, "truncated": data_enc.truncated, "skipped": data_enc.skipped}
    if sap is not None:
        extra["sap_layers"] = list(sap.layers)
        sap.remove()
    return FinetuneResult(out, adapter_dir, step, time.perf_counter() - t0, first_last[0], first_last[1], resumed_from,
                          len(data_enc.examples), extra)


def _start_or_check_run(out: Path, run_info: dict[str, Any], *, write: bool, extra: dict[str, Any]) -> None:
    """Refuse a folder holding a finished run or an unfinished one with other settings; record a new one."""
    cfg_path = out / CONFIG_FILE
    if (out / "adapter" / ADAPTER_META).exists():
        raise SaftError(f"{out}: holds a finished fine-tune; pass --force to train again, or choose another --out-dir")
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        diff = [k for k in run_info if k not in ("data", "config") and saved.get(k) != run_info[k]]
        diff += [f"config.{k}" for k in run_info["config"] if saved.get("config", {}).get(k) != run_info["config"][k]]
        if diff:
            raise SaftError(f"{out}: holds an unfinished run with other settings ({', '.join(diff[:5])}); "
                            "pass --force to start over, or choose another --out-dir")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(cfg_path, {**run_info, **extra})


def _trim_log(path: Path, step: int) -> float:
    """Drop log lines written after the checkpoint a run resumes from (a killed run's last steps); return
    the seconds the kept lines had run."""
    if not path.exists():
        return 0.0
    keep, seconds = [], 0.0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
            seconds = float(rec.get("seconds", seconds))
    path.write_text("".join(x + "\n" for x in keep))
    return seconds


def read_log(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / LOG_FILE
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    # ``python -m saft_gx.finetune``: this file is then the program, not a library import, so reaching up
    # to the command here makes no import circle (the library itself never imports saft_gx.cli).
    from saft_gx.cli.finetune import main

    main()
