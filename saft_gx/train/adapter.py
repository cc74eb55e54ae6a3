"""Loading a LoRA adapter written by ``saft-gx finetune`` onto its base model, refusing one trained on
another model. Its own module so evaluation can load adapters without importing the training code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import SaftError

ADAPTER_META = "saft_gx_adapter.json"  # written beside the peft files: base model and its fingerprint


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
