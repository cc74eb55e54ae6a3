"""Hidden states of one token per row at chosen decoder layers.

Speed matters more here than anywhere else in saft_gx: the model runs only up to the deepest layer asked
for (a forward hook stops it there), rows are sorted by length and packed into batches under a token
budget, and everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.errors import SaftError
from .models import LoadedModel
from .rows import Row, format_row, uses_chat_template

TOKEN_POSITIONS = ("last", "prompt-end", "mean")
OVERLONG_CHOICES = ("truncate", "error")
DEFAULT_MAX_TOKENS = 1024
DEFAULT_OVERLONG = "truncate"  # real chat rows often exceed any cap: a long row must not stop a run


@dataclass(frozen=True)
class EmbedConfig:
    """How a row becomes a vector.

    layers: 1-based decoder blocks whose *output* is read (layer L = ``hidden_states[L]`` in transformers).
    token: ``last`` (last token of the formatted row), ``prompt-end`` (last token of the assistant header,
        before the response; for a plain-text row, which has no response, its last token), or ``mean`` (mean
        over all tokens of the row).
    max_tokens: rows longer than this are cut to this length (``overlong="truncate"``, the default) or are an
        error (``overlong="error"``). For ``prompt-end`` only the prompt is ever run (a causal model's state at
        the prompt's last token does not depend on the response), and an over-long prompt loses its *middle*:
        the start and the end of the request, where harm is usually stated, survive.
    batch_tokens: padded tokens per forward pass; the batch size follows from the row lengths.
    """

    layers: tuple[int, ...]
    token: str = "last"
    max_tokens: int = DEFAULT_MAX_TOKENS
    overlong: str = DEFAULT_OVERLONG
    batch_tokens: int = 16384
    max_batch_rows: int = 256

    def __post_init__(self) -> None:
        if self.token not in TOKEN_POSITIONS:
            raise SaftError(f"--token {self.token!r}: choose one of {', '.join(TOKEN_POSITIONS)}")
        if self.overlong not in OVERLONG_CHOICES:
            raise SaftError(f"--overlong {self.overlong!r}: choose error or truncate")
        if not self.layers:
            raise SaftError("at least one layer is needed")
        if self.max_tokens < 2:
            raise SaftError("--max-tokens must be at least 2")


class _StopForward(Exception):
    """Raised by the hook on the deepest needed layer: the rest of the model never runs."""


def decoder_layers(model: Any) -> Any:
    """The model's list of decoder blocks (``model.model.layers`` for Llama-like models)."""
    import torch

    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise SaftError(f"cannot find the {n} decoder layers of {type(model).__name__}")


@dataclass
class Tokenized:
    ids: list[int]
    position: int  # index of the token whose hidden state is read (ignored for "mean")
    truncated: bool = False  # the row was over max_tokens and was cut


# Share of the token budget kept from the start of an over-long prompt (the chat header and the opening of the
# request); the rest comes from its end, so the request's last words and the assistant header are kept.
PROMPT_HEAD_SHARE = 0.25


class Embedder:
    """Turns rows into vectors with a loaded model. Counts forward passes (``forward_calls``) so callers
    and tests can prove the cache works."""

    def __init__(self, lm: LoadedModel, config: EmbedConfig):
        bad = [layer for layer in config.layers if not 1 <= layer <= lm.num_layers]
        if bad:
            raise SaftError(f"--layer {bad[0]}: this model has layers 1..{lm.num_layers}")
        self.lm = lm
        self.config = config
        self.forward_calls = 0
        self.rows_embedded = 0
        self._layers = decoder_layers(lm.model)
        self._templated = uses_chat_template(lm.tokenizer)

    @property
    def dim(self) -> int:
        return self.lm.hidden_size

    def tokenize(self, rows: Sequence[Row], row_ids: Sequence[int]) -> list[Tokenized]:
        cfg = self.config
        tok = self.lm.tokenizer
        texts, heads = zip(*(format_row(tok, r) for r in rows)) if rows else ((), ())
        enc = tok(
            list(texts),
            add_special_tokens=not self._templated,
            return_offsets_mapping=bool(getattr(tok, "is_fast", False)),
        )
        out: list[Tokenized] = []
        for i, ids in enumerate(enc["input_ids"]):
            rid = row_ids[i]
            if not ids:
                raise SaftError(f"row {rid}: the text tokenizes to nothing")
            head = heads[i]
            if cfg.token == "prompt-end" and head is None:
                pos = len(ids) - 1  # a plain-text row has no answer: all of it is read as the request
            elif cfg.token == "prompt-end":
                offsets = enc.get("offset_mapping")
                if offsets is not None:
                    # last token that starts inside the prompt part
                    pos = max(j for j, (s, _e) in enumerate(offsets[i]) if s < head)
                else:
                    pos = len(tok(texts[i][:head], add_special_tokens=not self._templated)["input_ids"]) - 1
            else:
                pos = len(ids) - 1
            if cfg.token == "prompt-end":
                ids = ids[: pos + 1]  # the response cannot change the prompt-end state of a causal model
            cut = len(ids) > cfg.max_tokens
            if cut:
                if cfg.overlong == "error":
                    what = "its prompt is" if cfg.token == "prompt-end" else "the row is"
                    raise SaftError(
                        f"row {rid}: {what} {len(ids)} tokens, over --max-tokens {cfg.max_tokens}; "
                        "raise --max-tokens or pass --overlong truncate"
                    )
                if cfg.token == "prompt-end":
                    head = int(cfg.max_tokens * PROMPT_HEAD_SHARE)
                    ids = list(ids[:head]) + list(ids[len(ids) - (cfg.max_tokens - head):])
                else:
                    ids = ids[: cfg.max_tokens]
                pos = len(ids) - 1
            elif cfg.token == "prompt-end":
                pos = len(ids) - 1
            out.append(Tokenized(ids=list(ids), position=pos, truncated=cut))
        return out

    def batches(self, tokenized: Sequence[Tokenized]) -> list[list[int]]:
        """Indices grouped into length-sorted batches under the padded-token budget (longest first, so an
        out-of-memory error shows up on the first batch, not after an hour)."""
        order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i].ids))
        groups: list[list[int]] = []
        cur: list[int] = []
        cur_len = 0
        for i in order:
            n = len(tokenized[i].ids)
            width = max(cur_len, n)
            if cur and (width * (len(cur) + 1) > self.config.batch_tokens or len(cur) >= self.config.max_batch_rows):
                groups.append(cur)
                cur, width = [], n
            cur.append(i)
            cur_len = width
        if cur:
            groups.append(cur)
        return groups

    def embed(self, rows: Sequence[Row], row_ids: Sequence[int] | None = None) -> np.ndarray:
        """Vectors of shape (len(rows), len(layers), hidden_size), float32."""
        if row_ids is None:
            row_ids = list(range(len(rows)))
        tokenized = self.tokenize(rows, row_ids)
        return self.embed_tokenized(tokenized)

    def embed_tokenized(self, tokenized: Sequence[Tokenized]) -> np.ndarray:
        import torch

        out = np.empty((len(tokenized), len(self.config.layers), self.dim), dtype=np.float32)
        pending: tuple[list[int], Any] | None = None
        with torch.inference_mode():
            # Read each batch back only after the next one is queued: on CUDA the host builds and launches
            # batch i+1 while the GPU still runs batch i (on CPU this is the same code, run in order).
            for group in self.batches(tokenized):
                vecs = self._launch([tokenized[i] for i in group])
                if pending is not None:
                    out[pending[0]] = pending[1].float().cpu().numpy()
                pending = (group, vecs)
            if pending is not None:
                out[pending[0]] = pending[1].float().cpu().numpy()
        self.rows_embedded += len(tokenized)
        return out

    def _launch(self, items: Sequence[Tokenized]) -> Any:
        """Queue one batch; returns the pooled (batch, len(layers), d) tensor on the model's device."""
        import torch

        lm = self.lm
        on_cuda = str(lm.device).startswith("cuda")
        width = max(len(t.ids) for t in items)
        pad = lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), width), pad, dtype=torch.long, pin_memory=on_cuda)
        lengths = torch.tensor([len(t.ids) for t in items], dtype=torch.long, pin_memory=on_cuda)
        positions = torch.tensor([t.position for t in items], dtype=torch.long, pin_memory=on_cuda)
        for b, t in enumerate(items):
            ids[b, : len(t.ids)] = torch.tensor(t.ids)
        ids = ids.to(lm.device, non_blocking=True)
        lengths = lengths.to(lm.device, non_blocking=True)
        positions = positions.to(lm.device, non_blocking=True)
        # Right padding and causal attention: a real token only ever attends to earlier (real) tokens and its
        # position ids are 0..len-1, so no attention mask is needed. Without one SDPA takes its causal
        # (flash / memory-efficient) kernels instead of materialising a (batch, heads, len, len) mask.
        mask = None
        if self.config.token == "mean":
            mask = torch.arange(width, device=lm.device)[None, :] < lengths[:, None]

        wanted = sorted(set(self.config.layers))
        deepest = wanted[-1]
        captured: dict[int, Any] = {}
        handles = []

        def make_hook(layer: int):
            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                captured[layer] = self._pool(hidden, mask, positions)
                if layer == deepest:
                    raise _StopForward

            return hook

        for layer in wanted:
            handles.append(self._layers[layer - 1].register_forward_hook(make_hook(layer)))
        try:
            self.forward_calls += 1
            body = lm.model.model if hasattr(lm.model, "model") else lm.model
            body(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([captured[layer] for layer in self.config.layers], dim=1)

    def _pool(self, hidden: Any, mask: Any, positions: Any) -> Any:
        import torch

        if self.config.token == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
