"""Rows as token examples, padded batches and per-token log-probabilities: the helpers that fine-tuning
(``finetune.py``), safety-aware probing (``sap.py``) and model evaluation (``evaluate.py``) share.

It imports none of them, so those three import downwards only. Position t's logits predict token t+1
everywhere here (the next-token shift), and a label of ``IGNORE`` carries no loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import SaftError
from ..embedding.rows import Row, format_row, rows_from_frame, uses_chat_template

IGNORE = -100  # label of tokens that carry no loss


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
    from ..pipeline import ColumnOptions
    from ..io.readers import open_dataset

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


def answer_logprobs(logits: Any, labels: Any, *, per_token: bool = False) -> Any:
    """Log-probability of each row's labelled tokens: summed, or with ``per_token`` divided by the number of
    labelled tokens (the mean log-probability per answer token, which does not grow with the answer's
    length). (B,)"""
    lp = sequence_logprobs(logits, labels)
    if not per_token:
        return lp
    n = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
    return lp / n.to(lp.dtype)
