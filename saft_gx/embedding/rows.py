"""What a dataset row is, how its columns are found, and how it becomes the model's input text.

A row is either a conversation (a list of ``{"role", "content"}`` messages whose last message is the
assistant's response) or one plain text. Prompt/response columns become a two-message conversation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.errors import SaftError

PROMPT_COLUMNS = ("prompt", "instruction", "question", "query", "input")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion", "chosen")
MESSAGES_COLUMNS = ("messages", "conversations", "conversation")
TEXT_COLUMNS = ("text",)


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold the row. Exactly one of the three shapes is set."""

    prompt: str | None = None
    response: str | None = None
    messages: str | None = None
    text: str | None = None

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.prompt, self.response, self.messages, self.text) if c]

    def describe(self) -> str:
        if self.messages:
            return f"messages={self.messages}"
        if self.text:
            return f"text={self.text}"
        return f"prompt={self.prompt}, response={self.response}"

    def to_dict(self) -> dict[str, str | None]:
        return {"prompt": self.prompt, "response": self.response, "messages": self.messages, "text": self.text}


def pick(names: Sequence[str], candidates: Sequence[str], what: str) -> str | None:
    lower = {n.lower(): n for n in names}
    found = [lower[c] for c in candidates if c in lower]
    if len(found) > 1:
        raise SaftError(
            f"ambiguous {what} column: found {', '.join(found)}; choose one with --{what}-column"
        )
    return found[0] if found else None


def detect_columns(
    names: Sequence[str],
    *,
    prompt: str | None = None,
    response: str | None = None,
    text: str | None = None,
    messages: str | None = None,
) -> ColumnSpec:
    """Find the row columns among ``names``; explicit choices win and must exist."""
    for given in (prompt, response, text, messages):
        if given is not None and given not in names:
            raise SaftError(f"column {given!r} not found; the file has: {', '.join(names)}")
    if messages:
        return ColumnSpec(messages=messages)
    if text:
        return ColumnSpec(text=text)
    if prompt or response:
        p = prompt or pick(names, PROMPT_COLUMNS, "prompt")
        r = response or pick(names, RESPONSE_COLUMNS, "response")
        if not p or not r:
            raise SaftError(
                f"need both a prompt and a response column (got prompt={p}, response={r}); "
                f"the file has: {', '.join(names)}"
            )
        return ColumnSpec(prompt=p, response=r)
    p = pick(names, PROMPT_COLUMNS, "prompt")
    r = pick(names, RESPONSE_COLUMNS, "response")
    if p and r:
        return ColumnSpec(prompt=p, response=r)
    m = pick(names, MESSAGES_COLUMNS, "messages")
    if m:
        return ColumnSpec(messages=m)
    t = pick(names, TEXT_COLUMNS, "text")
    if t:
        return ColumnSpec(text=t)
    if p or r:
        missing = "response" if p else "prompt"
        raise SaftError(
            f"found a {'prompt' if p else 'response'} column ({p or r}) but no {missing} column; "
            f"name it with --{missing}-column. The file has: {', '.join(names)}"
        )
    raise SaftError(
        "no row columns found: expected prompt/instruction/question + response/output/answer/completion, "
        f"a messages column, or a text column (or name them with --prompt-column etc.); "
        f"the file has: {', '.join(names)}"
    )


@dataclass(frozen=True)
class Row:
    """One dataset row as the model will see it."""

    messages: tuple[tuple[str, str], ...] | None = None  # (role, content); last is the assistant's
    text: str | None = None

    def content_key(self) -> str:
        """sha256 of the row's content, independent of model and template: the cache key."""
        payload = {"messages": self.messages} if self.messages is not None else {"text": self.text}
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_str(value: Any, col: str, row_id: int) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise SaftError(f"row {row_id}: column {col!r} is null; fill or drop null rows before scoring")
    if not isinstance(value, str):
        raise SaftError(
            f"row {row_id}: column {col!r} holds {type(value).__name__}, expected text"
        )
    if not value.strip():
        raise SaftError(f"row {row_id}: column {col!r} is empty; drop empty rows before scoring")
    return value


def _messages_from_cell(cell: Any, col: str, row_id: int) -> tuple[tuple[str, str], ...]:
    if cell is None:
        raise SaftError(f"row {row_id}: column {col!r} is null; fill or drop null rows before scoring")
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise SaftError(f"row {row_id}: column {col!r} is text but not a JSON list of messages") from None
    if isinstance(cell, np.ndarray):
        cell = cell.tolist()
    if not isinstance(cell, (list, tuple)) or not cell:
        raise SaftError(f"row {row_id}: column {col!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for m in cell:
        if not isinstance(m, dict):
            raise SaftError(f"row {row_id}: column {col!r} holds a message that is not a {{role, content}} mapping")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if not isinstance(role, str):
            raise SaftError(f"row {row_id}: column {col!r} holds a message without a role")
        out.append((role, check_str(content, f"{col}.content", row_id)))
    if out[-1][0] != "assistant":
        raise SaftError(f"row {row_id}: the last message in {col!r} is from {out[-1][0]!r}, expected the assistant's response")
    return tuple(out)


def rows_from_frame(df: Any, spec: ColumnSpec, first_row_id: int) -> list[Row]:
    """Validate and convert a pandas DataFrame chunk; errors name the global row id."""
    rows: list[Row] = []
    if spec.messages:
        for i, cell in enumerate(df[spec.messages].tolist()):
            rows.append(Row(messages=_messages_from_cell(cell, spec.messages, first_row_id + i)))
    elif spec.text:
        for i, cell in enumerate(df[spec.text].tolist()):
            rows.append(Row(text=check_str(cell, spec.text, first_row_id + i)))
    else:
        prompts = df[spec.prompt].tolist()
        responses = df[spec.response].tolist()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            rid = first_row_id + i
            rows.append(
                Row(messages=(("user", check_str(p, spec.prompt, rid)), ("assistant", check_str(r, spec.response, rid))))
            )
    return rows


def format_row(tokenizer: Any, row: Row) -> tuple[str, int | None]:
    """The text fed to the model and the character length of its prompt part (up to and including
    the assistant header), which locates the ``prompt-end`` token. Plain-text rows have no prompt part."""
    if row.text is not None:
        return row.text, None
    msgs = [{"role": r, "content": c} for r, c in row.messages]
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        head = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(head):  # templates that rewrite earlier turns: fall back to the shared prefix
            n = 0
            while n < min(len(full), len(head)) and full[n] == head[n]:
                n += 1
            return full, n
        return full, len(head)
    head = "".join(f"{'User' if r == 'user' else r.capitalize()}: {c}\n" for r, c in row.messages[:-1]) + "Assistant: "
    return head + row.messages[-1][1], len(head)


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
