import pandas as pd
import pytest

from saft_gx.core.errors import SaftError
from saft_gx.embedding.rows import ColumnSpec, Row, detect_columns, format_row, rows_from_frame


@pytest.mark.parametrize("names,expected", [
    (["id", "prompt", "response"], ColumnSpec(prompt="prompt", response="response")),
    (["instruction", "output"], ColumnSpec(prompt="instruction", response="output")),
    (["Question", "Answer"], ColumnSpec(prompt="Question", response="Answer")),
    (["messages", "meta"], ColumnSpec(messages="messages")),
    (["text"], ColumnSpec(text="text")),
])
def test_detect(names, expected):
    assert detect_columns(names) == expected


@pytest.mark.parametrize("names,kw,msg", [
    (["prompt", "instruction", "response"], {}, "ambiguous prompt column"),
    (["prompt", "foo"], {}, "no response column"),
    (["a", "b"], {}, "no row columns found"),
    (["prompt", "response"], {"prompt": "nope"}, "'nope' not found"),
])
def test_detect_errors(names, kw, msg):
    with pytest.raises(SaftError, match=msg):
        detect_columns(names, **kw)


def test_override_wins():
    assert detect_columns(["q", "a", "prompt", "response"], prompt="q", response="a") == ColumnSpec(prompt="q", response="a")


@pytest.mark.parametrize("value,msg", [(None, "row 11: column 'response' is null"), (3, "holds int"),
                                       ("   ", "is empty")])
def test_bad_cells_name_the_row(value, msg):
    df = pd.DataFrame({"prompt": ["p", "p"], "response": ["fine", value]}, dtype=object)
    with pytest.raises(SaftError, match=msg):
        rows_from_frame(df, ColumnSpec(prompt="prompt", response="response"), first_row_id=10)


def test_messages_cells():
    df = pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                    '[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]']})
    rows = rows_from_frame(df, ColumnSpec(messages="messages"), 0)
    assert rows[0].messages == (("user", "hi"), ("assistant", "hello"))
    assert rows[1].messages == (("user", "q"), ("assistant", "a"))
    bad = pd.DataFrame({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(SaftError, match="expected the assistant"):
        rows_from_frame(bad, ColumnSpec(messages="messages"), 0)


def test_content_key_is_stable_and_distinct():
    a = Row(messages=(("user", "p"), ("assistant", "r")))
    assert a.content_key() == Row(messages=(("user", "p"), ("assistant", "r"))).content_key()
    assert a.content_key() != Row(messages=(("user", "p"), ("assistant", "r "))).content_key()
    assert len(a.content_key()) == 64


def test_format_with_chat_template(tiny_lm):
    text, head = format_row(tiny_lm.tokenizer, Row(messages=(("user", "Hi there"), ("assistant", "Hello!"))))
    assert text[:head].endswith("<|im_start|>assistant\n")
    assert text[head:].startswith("Hello!")
