"""LoRA fine-tuning on the tiny random Llama: response-only labels, weights move, loss falls, resume."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from saft_gx.core.errors import SaftError
from saft_gx.train.finetune import IGNORE, FinetuneConfig, encode_row, load_adapter, load_examples, train
from saft_gx.embedding.rows import Row

ROWS = [
    ("How many legs does a spider have?", "Spiders have eight legs."),
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("Suggest a name for a grey cat.", "Ash, Pebble, Smokey or Earl Grey would all suit a grey cat."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall / the maple lets its colours go / cold wind hums softly"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "four.parquet"
    pd.DataFrame(ROWS, columns=["prompt", "response"]).to_parquet(path)
    return path


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), epochs=4, lr=1e-2, lr_schedule="constant", lora_dropout=0.0, batch_size=4,
                save_steps=1)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    return train(data, out, _cfg(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_labels_cover_the_response_and_the_end_of_turn_only(tokenizer):
    ex = encode_row(tokenizer, Row(messages=(("user", "Hi there?"), ("assistant", "Hello, friend."))), 512)
    first = next(i for i, x in enumerate(ex.labels) if x != IGNORE)
    assert all(x == IGNORE for x in ex.labels[:first])
    assert all(x != IGNORE for x in ex.labels[first:])
    target = tokenizer.decode([t for t in ex.labels if t != IGNORE])
    assert target == "Hello, friend.<|im_end|>\n"
    assert tokenizer.eos_token_id in ex.labels  # the end-of-turn token is learnt, not masked
    assert tokenizer.decode(ex.input_ids[:first]).endswith("<|im_start|>assistant\n")
    cut = encode_row(tokenizer, Row(messages=(("user", "Hi there?"), ("assistant", "Hello, friend."))), first + 2)
    assert cut.truncated and len(cut.input_ids) == first + 2 and cut.n_target == 2


def test_a_few_steps_move_the_adapter_and_lower_the_loss(trained):
    log = [json.loads(x) for x in (trained.out_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"] - 0.03  # same four rows every step: the loss must fall
    weights = load_file(str(trained.adapter_dir / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 1e-4 for v in lora_b)  # B starts at zero
    meta = json.loads((trained.adapter_dir / "saft_gx_adapter.json").read_text())
    cfg = json.loads((trained.out_dir / "finetune_config.json").read_text())
    assert meta["model_fingerprint"] == cfg["model_fingerprint"] and meta["steps"] == 4
    assert cfg["config"]["lora_r"] == 8 and cfg["rows"] == 4 and len(cfg["data_sha256"]) == 64


def test_a_killed_run_resumes_from_its_checkpoint(trained, tiny_model_dir, data, tmp_path):
    out = tmp_path / "b"

    def kill(record):  # step 3's record comes before step 3's checkpoint: the last one is step 2's
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, out, _cfg(tiny_model_dir), device="cpu", on_step=kill)
    assert not (out / "adapter").exists()
    r = train(data, out, _cfg(tiny_model_dir), device="cpu")
    assert r.resumed_from == 2 and r.steps == 4
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["seconds"] for r in log] == sorted(r["seconds"] for r in log)  # time counts across the resume
    a = load_file(str(trained.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the same weights as the run that was never interrupted
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    with pytest.raises(SaftError, match="finished fine-tune.*--force"):
        train(data, out, _cfg(tiny_model_dir), device="cpu")
    shutil.rmtree(out / "adapter")
    with pytest.raises(SaftError, match="other settings.*lr"):
        train(data, out, _cfg(tiny_model_dir, lr=1e-3), device="cpu")


def test_adapter_for_another_model_is_refused(trained, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saft_gx.embedding.models import load_model

    other = tmp_path / "other"
    src_cfg = json.loads((trained.out_dir / "finetune_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(src_cfg["model"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    lm = load_model(str(other), device="cpu")
    with pytest.raises(SaftError, match="was trained on model .*not on"):
        load_adapter(lm, trained.out_dir)
    bare = tmp_path / "bare"  # a peft adapter without saft-gx's metadata: the shapes give it away
    shutil.copytree(trained.adapter_dir, bare)
    (bare / "saft_gx_adapter.json").unlink()
    with pytest.raises(SaftError, match="does not fit"):
        load_adapter(lm, bare)
    with pytest.raises(SaftError, match="no adapter_config.json"):
        load_adapter(lm, tmp_path)


def test_bad_training_data(tokenizer, tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "response": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(SaftError, match="no rows; nothing to fine-tune on"):
        load_examples(empty, tokenizer, 512)
    wrong = tmp_path / "wrong.parquet"
    pd.DataFrame({"question_text": ["a"], "reply": ["b"]}).to_parquet(wrong)
    with pytest.raises(SaftError, match="no row columns found"):
        load_examples(wrong, tokenizer, 512)
    text = tmp_path / "text.parquet"
    pd.DataFrame({"text": ["just text"]}).to_parquet(text)
    with pytest.raises(SaftError, match="not one text column"):
        load_examples(text, tokenizer, 512)
    with pytest.raises(SaftError, match="--method"):
        FinetuneConfig(method="dpo")
    with pytest.raises(SaftError, match="--batch-size"):
        FinetuneConfig(batch_size=0)


def test_cli_defaults_match_the_library(tmp_path):
    """The click options spell the defaults out; they must stay equal to FinetuneConfig's."""
    from saft_gx.cli.finetune import _finetune_config, finetune

    params = finetune.make_context("finetune", ["data.parquet", "--out-dir", str(tmp_path)]).params
    cfg, device = _finetune_config(dict(params))
    assert cfg == FinetuneConfig() and device is None


def test_module_entry_point_and_cli_errors(tmp_path):
    from saft_gx.cli import cli
    from saft_gx.cli.finetune import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    res = CliRunner().invoke(cli, ["finetune", str(tmp_path / "missing.parquet"), "--out-dir", str(tmp_path / "o"),
                                   "--method", "sap", "--safety-set", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 1 and "no such file" in res.output


def test_filter_then_finetune_on_the_kept_rows(tiny_model_dir, tmp_path):
    from saft_gx.cli import cli

    n = 6
    scored = tmp_path / "scored.parquet"
    pd.DataFrame({"prompt": [p for p, _ in ROWS] + ["Say hi.", "Say bye."],
                  "response": [r for _, r in ROWS] + ["Hi!", "Bye!"],
                  "row_id": range(n), "text_sha256": ["0" * 64] * n, "harm_score": [0.1, 0.2, 0.3, 0.4, 5.0, 6.0],
                  "harm_flag": [False] * n, "detector_id": ["d"] * n}).to_parquet(scored)
    out = tmp_path / "split"
    res = CliRunner().invoke(cli, ["filter", str(scored), "--out-dir", str(out), "--threshold", "1", "--finetune",
                                   "--model", str(tiny_model_dir), "--max-steps", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "kept 4, removed 2" in res.output and "sft fine-tune: 1 steps on 4 rows" in res.output
    assert "train_runtime" not in res.output  # Trainer's own printer is off: the command's lines only
    cfg = json.loads((out / "finetune" / "finetune_config.json").read_text())
    assert cfg["data"] == str((out / "kept.parquet").resolve()) and cfg["rows"] == 4
    assert (out / "finetune" / "adapter" / "adapter_model.safetensors").exists()


def test_python_dash_m_runs_the_command(tmp_path):
    import subprocess
    import sys

    # the old path (a thin module kept for torchrun/accelerate command lines) and the module's own path
    r = subprocess.run([sys.executable, "-m", "saft_gx.finetune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--sap-probe-steps" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "saft_gx.train.finetune", str(tmp_path / "none.parquet"), "--out-dir",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("Error:") and "Traceback" not in r.stderr


TRAINING_MODULES = ("finetune", "sap", "evaluate", "lm_data", "adapter")


def _saft_imports(name):
    """saft_gx modules that saft_gx/train/<name>.py imports, anywhere but under ``if __name__ == "__main__":``."""
    import ast
    from pathlib import Path

    import saft_gx

    tree = ast.parse((Path(saft_gx.__file__).parent / "train" / f"{name}.py").read_text())
    main_guards = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)}
    skip = {id(c) for n in ast.walk(tree) if id(n) in main_guards for c in ast.walk(n)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: .x → saft_gx.train.x, ..x → saft_gx.x
                mod = ".".join(["saft_gx", "train"][: 3 - node.level] + ([mod] if mod else []))
            if mod.startswith("saft_gx"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("saft_gx"))
    return found


def test_training_imports_run_one_way():
    """cli → finetune → sap → lm_data; evaluate → sap, lm_data, adapter; nothing imports back up or the CLI."""
    found = {m: _saft_imports(m) for m in TRAINING_MODULES}
    for m, mods in found.items():
        assert not any(x == "saft_gx.cli" or x.startswith("saft_gx.cli.") for x in mods), \
            f"saft_gx/train/{m}.py imports the CLI"
    imports = {m: {x.split(".")[2] for x in mods if x.startswith("saft_gx.train.")} for m, mods in found.items()}
    # a strict order: each module imports only modules later in it
    order = ["evaluate", "finetune", "sap", "adapter", "lm_data"]
    for i, m in enumerate(order):
        assert not imports[m] & set(order[: i + 1]), (m, imports[m] & set(order[: i + 1]))
