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
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import SaftError
from .rows import Row, format_row, rows_from_frame, uses_chat_template

METHODS = ("sft", "sap")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
ADAPTER_META = "saft_gx_adapter.json"
CONFIG_FILE = "finetune_config.json"
LOG_FILE = "train_log.jsonl"
IGNORE = -100  # label of tokens that carry no loss

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
    sap_probe_lr: float = 0.05
    sap_layers: tuple[int, ...] | None = None  # None: layers ≈ 3/32 … 9/32 of the depth
    sap_batch_size: int = 4

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SaftError(msg)

        if self.method not in METHODS:
            bad(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("lora_r", "lora_alpha", "epochs", "max_length", "batch_size", "grad_accum", "save_steps",
                     "keep_checkpoints", "sap_batch_size"):
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


# ---- turning rows into training examples -------------------------------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens; the token id on response tokens (EOS included)
    truncated: bool = False

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_row(tokenizer: Any, row: Row, max_length: int) -> Example:
    """Token ids of ``format_row(row)`` and labels that keep only the response part (everything after
    the assistant header, the end-of-turn token included). Rows over ``max_length`` are cut."""
    if row.messages is None:
        raise SaftError("plain-text rows have no response to train on; give prompt/response or messages columns")
    text, head = format_row(tokenizer, row)
    templated = uses_chat_template(tokenizer)
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if offsets is not None:
        is_prompt = [s < head for s, _e in offsets]
        if not templated:  # special tokens added by the tokenizer (BOS) carry (0, 0) offsets
            is_prompt = [p or (s == e == 0) for p, (s, e) in zip(is_prompt, offsets)]
    else:
        n_head = len(tokenizer(text[:head], add_special_tokens=not templated)["input_ids"])
        is_prompt = [i < n_head for i in range(len(ids))]
    labels = [IGNORE if p else t for t, p in zip(ids, is_prompt)]
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels, truncated)


def prompt_text(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> str:
    """The text a model is given to answer ``messages`` (ending with the assistant header): the prompt
    part of ``format_row``, so generation sees exactly what training and scoring saw."""
    text, head = format_row(tokenizer, Row(messages=tuple(messages) + (("assistant", "x"),)))
    return text[:head]


@dataclass
class EncodedData:
    examples: list[Example]
    rows: int
    truncated: int
    skipped: int  # rows whose prompt alone fills max_length: nothing left to learn from
    sha256: str
    columns: dict[str, Any]


def load_examples(path: str | Path, tokenizer: Any, max_length: int, columns: Any = None) -> EncodedData:
    """Read a prompt/response (or messages) file and encode every row."""
    from .pipeline import ColumnOptions
    from .readers import open_dataset

    ds = open_dataset(path)
    spec = (columns or ColumnOptions()).resolve(ds)
    if spec.text:
        raise SaftError(f"{path}: fine-tuning needs prompt/response or messages columns, not one text column")
    examples: list[Example] = []
    truncated = skipped = rows = 0
    for first, df in ds.frames(spec.columns):
        for row in rows_from_frame(df, spec, first):
            rows += 1
            ex = encode_row(tokenizer, row, max_length)
            if ex.n_target == 0:
                skipped += 1
                continue
            truncated += ex.truncated
            examples.append(ex)
    if rows == 0:
        raise SaftError(f"{path}: the dataset has no rows; nothing to fine-tune on")
    if not examples:
        raise SaftError(f"{path}: every row's prompt fills --max-length {max_length}; raise it")
    return EncodedData(examples, rows, truncated, skipped, ds.sha256(), spec.to_dict())


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_nll(logits: Any, labels: Any) -> Any:
    """Per-token negative log-likelihood with the next-token shift: position t's logits predict token
    t+1. Returns (B, T-1); zero where the label is IGNORE."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(shift_labels.shape)


def sequence_logprobs(logits: Any, labels: Any) -> Any:
    """Σ_t log p(label_t | tokens < t) over each row's labelled tokens (teacher forcing, shifted). (B,)"""
    return -token_nll(logits, labels).sum(dim=1)


# ---- adapters ----------------------------------------------------------------------------------------

def load_adapter(lm: Any, adapter_dir: str | Path, *, merge: bool = True) -> Any:
    """Apply a saved LoRA adapter to ``lm.model`` (in place: ``lm.model`` becomes the tuned model).
    Refuses an adapter trained on another base model."""
    from peft import PeftModel

    path = Path(adapter_dir)
    if (path / "adapter" / "adapter_config.json").exists():
        path = path / "adapter"  # a fine-tune output folder
    if not (path / "adapter_config.json").exists():
        raise SaftError(f"--adapter {adapter_dir}: no adapter_config.json (expected a folder written by saft-gx finetune)")
    meta_path = path / ADAPTER_META
    if meta_path.exists():
        lm.refuse_other_model(json.loads(meta_path.read_text()), f"--adapter {adapter_dir} was trained",
                            "pass the matching --model")
    try:
        model = PeftModel.from_pretrained(lm.model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()
        raise SaftError(f"--adapter {adapter_dir} does not fit model {lm.model_ref!r} "
                        f"({msg[0] if msg else type(e).__name__}…)") from None
    model.eval()
    if merge:
        model = model.merge_and_unload()
    lm.model = model
    return lm


# ---- distributed launch (torchrun / accelerate launch set these variables) ---------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device: str | None) -> tuple[_Dist, str | None]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device not in ("cpu",):
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), local), device


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _mean_across(d: _Dist, value: float, device: str) -> float:
    if d.world <= 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


# ---- checkpoints ------------------------------------------------------------------------------------

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


def _checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.exists():
        return []
    cps = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(cps, key=lambda p: int(p.name.split("-")[1]))


def _lora_state(model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


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


def _lr_at(cfg: FinetuneConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * max(0.0, 1.0 - step / max(1, total))


def train(data: str | Path, out_dir: str | Path, config: FinetuneConfig | None = None, *,
          columns: Any = None, device: str | None = None, force: bool = False,
          log: Callable[[str], None] | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` with LoRA on the rows of ``data`` and save the adapter in ``out_dir``
    (``config`` defaults to ``FinetuneConfig()``).

    A folder holding an unfinished run with the same settings and data is resumed from its last
    checkpoint; one with other settings, or a finished run, is an error unless ``force`` (start over).
    ``on_step`` gets each step's log record (tests use it to interrupt a run)."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from . import __version__
    from .models import load_model

    cfg = config or FinetuneConfig()
    dist_info, device = _dist_setup(device)
    say = log if (log is not None and dist_info.main) else (lambda _m: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SaftError(f"--out-dir {out}: exists and is not a folder")
    torch.manual_seed(cfg.seed)

    # check the inputs before spending time on the model
    from .pipeline import ColumnOptions
    from .readers import open_dataset

    (columns or ColumnOptions()).resolve(open_dataset(data))
    sap = None
    if cfg.method == "sap":
        from .sap import SAP, load_safety_triples

        triples, triples_sha = load_safety_triples(cfg.safety_set)
    lm = load_model(cfg.model, device=device, dtype=cfg.dtype)
    tok = lm.tokenizer
    data_enc = load_examples(data, tok, cfg.max_length, columns)
    run_info: dict[str, Any] = {
        "config": cfg.identity(),
        "data": str(Path(data).resolve()), "data_sha256": data_enc.sha256, "columns": data_enc.columns,
        "model": lm.model_ref, "model_fingerprint": lm.fingerprint, "world_size": dist_info.world,
    }
    if cfg.method == "sap":
        run_info["safety_set_sha256"] = triples_sha
    if force and dist_info.main and out.exists():
        for name in ("adapter", "checkpoints", CONFIG_FILE, LOG_FILE):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    _barrier(dist_info)

    _start_or_check_run(out, run_info, write=dist_info.main, extra={
        "rows": data_enc.rows, "rows_truncated": data_enc.truncated, "rows_skipped": data_enc.skipped,
        "saft_gx_version": __version__, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    _barrier(dist_info)

    model = lm.model
    model.config.use_cache = False
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise SaftError(f"--target-modules {','.join(cfg.target_modules)}: {str(e).splitlines()[0]}") from None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if cfg.method == "sap":
        sap = SAP(model, tok, triples, layers=cfg.sap_layers, rho=cfg.sap_rho, probe_lr=cfg.sap_probe_lr,
                  batch_size=cfg.sap_batch_size, max_length=cfg.max_length, seed=cfg.seed + 7919 * dist_info.rank)
    wrapped = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[dist_info.local_rank] if str(lm.device).startswith("cuda") else None)

    n = len(data_enc.examples)
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    per_step = dist_info.world * cfg.grad_accum
    steps_per_epoch = math.ceil(micro_per_epoch / per_step)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    global_step, resumed_from = 0, None
    cps = _checkpoints(out)
    if cps:
        cp = cps[-1]
        state = json.loads((cp / "state.json").read_text())
        set_peft_model_state_dict(model, load_file(str(cp / "adapter.safetensors"), device=str(lm.device)))
        optimizer.load_state_dict(torch.load(cp / "optimizer.pt", map_location=lm.device, weights_only=True))
        torch.set_rng_state(torch.load(cp / "rng.pt", weights_only=True))
        if sap is not None and (cp / "probe_optimizer.pt").exists():
            sap.load_state_dict(torch.load(cp / "probe_optimizer.pt", map_location=lm.device, weights_only=True))
        global_step = resumed_from = int(state["global_step"])
        say(f"resuming from checkpoint step {global_step} of {total_steps}")
    log_path = out / LOG_FILE
    seconds_before = _trim_log(log_path, global_step) if dist_info.main else 0.0

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter() - seconds_before  # the log's seconds count the whole run, across resumes
    first_loss = last_loss = None

    def save_checkpoint(step: int) -> None:
        if not dist_info.main:
            return

        def write(tmp: Path) -> None:
            save_file(_lora_state(model), str(tmp / "adapter.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(torch.get_rng_state(), tmp / "rng.pt")
            if sap is not None:
                torch.save(sap.state_dict(), tmp / "probe_optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"global_step": step}))

        _atomic_dir(out / "checkpoints" / f"step-{step:07d}", write)
        for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    step = global_step
    while step < total_steps:
        epoch, s = divmod(step, steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        micro = [order[i: i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        group = micro[s * per_step: (s + 1) * per_step]
        mine = group[dist_info.rank:: dist_info.world] or [group[dist_info.rank % len(group)]]
        batches = [collate([data_enc.examples[i] for i in idx], pad) for idx in mine]
        n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        lr = _lr_at(cfg, step, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        record: dict[str, Any] = {}
        if sap is not None:
            record.update(sap.probe_step())
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        ctx = sap.probe_active() if sap is not None else _nullcontext()
        with ctx:
            for j, b in enumerate(batches):
                b = {k: v.to(lm.device) for k, v in b.items()}
                sync = j == len(batches) - 1 or dist_info.world == 1
                with (_nullcontext() if sync else wrapped.no_sync()):
                    logits = wrapped(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    nll = token_nll(logits, b["labels"]).sum()
                    (nll / max(1, n_tok)).backward()
                loss_sum += float(nll.detach())
        optimizer.step()
        step += 1
        loss = _mean_across(dist_info, loss_sum / max(1, n_tok), str(lm.device))
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        record = {"step": step, "epoch": epoch + (s + 1) / steps_per_epoch, "loss": round(loss, 6), "lr": lr,
                  "tokens": n_tok, "seconds": round(time.perf_counter() - t0, 2), **record}
        if dist_info.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if step % max(1, steps_per_epoch // 10 or 1) == 0 or step == total_steps:
            say(f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  {record['seconds']:.0f} s")
        if step % cfg.save_steps == 0 or step % steps_per_epoch == 0 or step == total_steps:
            save_checkpoint(step)
        _barrier(dist_info)
        if on_step is not None:
            on_step(record)

    adapter_dir = out / "adapter"
    if dist_info.main:
        def write_adapter(tmp: Path) -> None:
            model.save_pretrained(str(tmp))
            meta = {"model": lm.model_ref, "model_fingerprint": lm.fingerprint, "method": cfg.method,
                    "steps": step, "saft_gx_version": __version__,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))

        _atomic_dir(adapter_dir, write_adapter)
    _barrier(dist_info)
    extra = {"rows": data_enc.rows, "truncated": data_enc.truncated, "skipped": data_enc.skipped}
    if sap is not None:
        extra["sap_layers"] = list(sap.layers)
    return FinetuneResult(out, adapter_dir, step, time.perf_counter() - t0, first_loss, last_loss, resumed_from,
                          len(data_enc.examples), extra)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


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


def main(argv: list[str] | None = None) -> None:
    """``python -m saft_gx.finetune``: the ``saft-gx finetune`` command on its own."""
    import click

    from .cli.finetune import finetune as command

    try:
        command.main(args=argv, prog_name="python -m saft_gx.finetune")
    except SaftError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

if __name__ == "__main__":
    main()
