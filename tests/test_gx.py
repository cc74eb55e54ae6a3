"""The Great Expectations plugin and the `saft-gx validate` gate, end to end with the tiny model.

"Contaminated" is detectable by construction: three gibberish rows among 30 ordinary ones. The detector
is fitted on the contaminated set (unsupervised, SAFT's setting) and τ is calibrated between the two
groups, as labelled anchors would place it; the clean set alone then scores below τ.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx import pipeline
from saft_gx.cli import cli
from saft_gx.pipeline import ColumnOptions, EmbedOptions
from saft_gx.core.subspace import Detector

from conftest import ROOT, TOY_ROWS  # rootdir-style import, as pytest puts tests/ on sys.path

SUITE = ROOT / "expectations" / "release_gate.json"
EXAMPLE = ROOT / "examples" / "data_ci"
BELOW = "expect_column_values_harm_score_to_be_below"
FRACTION = "expect_column_harm_flag_fraction_to_be_at_most"
PR = ColumnOptions(prompt="prompt", response="response")

ENDINGS = ["", " Hope that helps!", " Happy to help.", " Let me know if you need more.", " Cheers."]
CLEAN = [(p, r + e) for e in ENDINGS for p, r in TOY_ROWS]  # 30 distinct rows
OUTLIERS = [("zzqx " * 40, "#### $$$$ @@@@ " * 30), ("qqqq wwww vvvv " * 25, "%%%% ^^^^ &&&& " * 30),
            ("xkcd jjjj kkkk " * 25, "~~~~ |||| !!!! " * 30)]
BAD_IDS = [3, 17, 31]  # where the outliers go in the contaminated set (33 rows)


def _contaminated() -> pd.DataFrame:
    rows = list(CLEAN)
    for i, row in zip(BAD_IDS, OUTLIERS):
        rows.insert(i, row)
    return pd.DataFrame(rows, columns=["prompt", "response"])


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory, tiny_model_dir):
    """clean.parquet, bad.parquet and a detector fitted on bad.parquet, τ between its clean and bad rows."""
    d = tmp_path_factory.mktemp("gx")
    pd.DataFrame(CLEAN, columns=["prompt", "response"]).to_parquet(d / "clean.parquet")
    bad = _contaminated()
    bad.to_parquet(d / "bad.parquet")
    # plain SAFT: the built-in anchors would orient a random model's directions at random
    opts = EmbedOptions(model=str(tiny_model_dir), cache_dir=str(d / "cache"), anchors=False, layer=2)
    scores, det = pipeline.score_frame(bad, columns=PR, opts=opts, k=1)
    top_clean, low_bad = np.delete(scores, BAD_IDS).max(), scores[BAD_IDS].min()
    assert low_bad > 3 * top_clean, "the construction no longer separates the outliers"
    det.with_(threshold=float(np.sqrt(top_clean * low_bad))).save(d / "det")
    pipeline._SESSIONS.clear()
    return d


@pytest.fixture
def validate(gate_data):
    def _run(data: str, *args: str, suite: Path = SUITE):
        return CliRunner().invoke(cli, ["validate", str(gate_data / data) if "/" not in data else data,
                                        "--suite", str(suite), *args], catch_exceptions=False)

    return _run


def _write_suite(path: Path, expectations: list) -> Path:
    path.write_text(json.dumps({"name": path.stem, "expectations": expectations}))
    return path


def _tiny(tiny_model_dir, **kwargs) -> dict:
    return {"column": "prompt", "response_column": "response", "model": str(tiny_model_dir), **kwargs}


def _html_text(folder: Path) -> str:
    pages = list((folder / "validations").rglob("*.html"))
    assert pages, f"no validation page under {folder}"
    t = re.sub(r"<(script|style).*?</\1>", " ", pages[0].read_text(), flags=re.S)
    t = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", t)).split())
    return re.sub(r" ([.,;)])", r"\1", t)


# ---- the gate: clean passes, contaminated fails, the unexpected rows are the flagged ones ----

def test_release_gate_clean_passes_contaminated_fails(validate, gate_data, tmp_path):
    det = str(gate_data / "det")
    ok = validate("clean.parquet", "--param", f"saft_detector={det}")
    assert ok.exit_code == 0, ok.output
    assert "gate PASSED: all 4 expectations passed" in ok.output

    db = tmp_path / "s.duckdb"
    bad = validate("bad.parquet", "--param", f"saft_detector={det}", "--db", str(db))
    assert bad.exit_code == 1, bad.output
    assert f"FAIL  {BELOW}(prompt): 3 of 33 rows flagged (9.1%; allowed 2.0%)" in bad.output
    assert "rows 3, 17, 31" in bad.output
    assert f"FAIL  {FRACTION}(prompt): flagged fraction 9.1% (3 of 33 rows)" in bad.output
    assert "PASS  expect_column_values_to_not_be_null(response)" in bad.output
    assert "gate FAILED: 2 of 4 expectations failed" in bad.output

    # --db stores the same decision, row by row
    from saft_gx.io import store

    stored = store.query(db, "select row_id, harm_flag, harm_score from bad order by row_id")
    assert len(stored) == 33 and stored.loc[stored.harm_flag, "row_id"].tolist() == BAD_IDS
    tau = Detector.load(gate_data / "det").threshold
    assert (stored.harm_score > tau).tolist() == stored.harm_flag.tolist()


def test_unexpected_rows_are_the_flagged_rows_and_mostly_is_gx_mostly(gate_data, tiny_model_dir):
    from great_expectations.core.expectation_suite import ExpectationSuite

    from saft_gx.gx import ExpectColumnValuesHarmScoreToBeBelow, gate

    df = _contaminated()
    det = Detector.load(gate_data / "det")
    scores, _ = pipeline.score_frame(df, columns=PR, detector=det)
    flagged = np.flatnonzero(scores > det.threshold).tolist()
    assert flagged == BAD_IDS

    def run(mostly: float, **kw):
        e = ExpectColumnValuesHarmScoreToBeBelow(column="prompt", response_column="response", detector=str(gate_data / "det"),
                                                 mostly=mostly, **kw)
        res = gate.run_checkpoint(df, ExpectationSuite(name=f"m{mostly}", expectations=[e]), result_format="COMPLETE")
        return next(iter(res.run_results.values())).results[0]

    # 3 of 33 unexpected: 90.9 % expected. GX: success iff expected fraction >= mostly
    loose, strict = run(0.9), run(0.95)
    assert loose.success and not strict.success
    for r in (loose, strict):
        assert r.result["unexpected_count"] == 3
        assert r.result["unexpected_index_list"] == BAD_IDS
        assert r.result["unexpected_list"] == [OUTLIERS[0][0], OUTLIERS[1][0], OUTLIERS[2][0]]
        assert r.result["details"]["threshold"] == pytest.approx(det.threshold)
    # an explicit threshold overrides the detector's; a quantile rule flags the top rows of this batch
    assert run(1.0, threshold=float(np.sort(scores)[-2]) - 1e-12).result["unexpected_index_list"] == sorted(np.argsort(scores)[-2:].tolist())
    assert run(1.0, remove_fraction=1 / 33).result["unexpected_index_list"] == [int(np.argmax(scores))]


def test_messages_and_text_columns(tiny_model_dir):
    from great_expectations.core.expectation_suite import ExpectationSuite

    from saft_gx.gx import ExpectColumnValuesHarmScoreToBeBelow, gate

    df = pd.DataFrame({
        "messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in CLEAN[:10]],
        "text": [f"{p} {r}" for p, r in CLEAN[:10]],
    })
    suite = ExpectationSuite(name="shapes", expectations=[
        ExpectColumnValuesHarmScoreToBeBelow(column="messages", model=str(tiny_model_dir), threshold=-1e9),
        ExpectColumnValuesHarmScoreToBeBelow(column="text", model=str(tiny_model_dir), threshold=1e9),
    ])
    v = gate.verdict(gate.run_checkpoint(df, suite), expected=2)
    by_column = {o.column: o for o in v.outcomes}
    assert by_column["messages"].result["unexpected_count"] == 10  # every score is > -1e9
    assert by_column["text"].success and by_column["text"].result["unexpected_count"] == 0
    assert v.exit_code == gate.FAILED


# ---- the model runs once per row per validation ----

def test_one_model_pass_per_row_per_validation(tiny_model_dir, monkeypatch):
    from great_expectations.core.expectation_suite import ExpectationSuite

    from saft_gx.gx import ExpectColumnHarmFlagFractionToBeAtMost, ExpectColumnValuesHarmScoreToBeBelow, gate

    calls = []
    real = pipeline.score_frame
    monkeypatch.setattr(pipeline, "score_frame", lambda *a, **k: calls.append(1) or real(*a, **k))
    df = _contaminated()
    suite = ExpectationSuite(name="twice", expectations=[
        ExpectColumnValuesHarmScoreToBeBelow(**_tiny(tiny_model_dir, contamination=0.1)),
        ExpectColumnValuesHarmScoreToBeBelow(**_tiny(tiny_model_dir, threshold=0.5), mostly=0.5),
        ExpectColumnHarmFlagFractionToBeAtMost(**_tiny(tiny_model_dir, threshold=0.5), max_fraction=0.5),
    ])
    res = gate.run_checkpoint(df, suite, result_format="COMPLETE")
    assert gate.verdict(res, expected=3).exit_code in (gate.PASSED, gate.FAILED)
    (session,) = pipeline._SESSIONS.values()
    assert len(calls) >= 2  # GX asked for scores more than once ...
    assert session.embedder.rows_embedded == len(df)  # ... and the model saw each row once
    first = session.embedder.forward_calls
    assert first >= 1
    gate.run_checkpoint(df, suite)  # a second validation of the same rows: all from the cache
    assert session.embedder.rows_embedded == len(df) and session.embedder.forward_calls == first


# ---- Data Docs ----

def test_data_docs_render_the_custom_expectations(validate, gate_data, tmp_path):
    docs = tmp_path / "docs"
    det = str(gate_data / "det")
    r = validate("bad.parquet", "--param", f"saft_detector={det}", "--docs", str(docs))
    assert r.exit_code == 1, r.output
    assert (docs / "index.html").is_file()
    text = _html_text(docs)
    assert (f"Rows of this column with response must have a SAFT harm score of at most the detector's threshold, "
            f"scored by the detector in {det}, at least 98 % of the time.") in text
    assert (f"At most 2 % of rows of this column with response may be flagged as harmful (SAFT harm score above the "
            f"detector's threshold), scored by the detector in {det}.") in text
    assert "3 of 33 rows flagged (9.1%); τ =" in text  # the diagnostic (observed value) renderer
    assert "(**" not in text and "$PARAMETER" not in text  # never raw kwargs


def test_prescriptive_sentence_with_threshold_and_column_name():
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    from saft_gx.gx import ExpectColumnValuesHarmScoreToBeBelow

    cfg = ExpectationConfiguration(type=BELOW, kwargs={"column": "text", "threshold": 0.25, "mostly": 0.9})
    (block,) = ExpectColumnValuesHarmScoreToBeBelow._prescriptive_renderer(configuration=cfg)
    t = block.string_template
    sentence = re.sub(r"\$(\w+)", lambda m: str(t["params"][m.group(1)]), t["template"])
    assert sentence == ("Rows of text must have a SAFT harm score of at most 0.25, scored by a detector fitted on this "
                        "batch, at least 90 % of the time.")


# ---- a gate that checks nothing never passes ----

def test_zero_expectations_fail_with_a_reason(validate, tmp_path, gate_data):
    empty = _write_suite(tmp_path / "empty.json", [])
    r = validate("clean.parquet", suite=empty)
    assert r.exit_code == 2 and "the suite has no expectations; a gate that checks nothing cannot pass" in r.output

    typo = _write_suite(tmp_path / "typo.json", [{"type": "expect_column_values_harm_score_to_be_bellow",
                                                   "kwargs": {"column": "prompt", "threshold": 1.0}}])
    r = validate("clean.parquet", suite=typo)
    assert r.exit_code == 2
    assert "unknown expectation type(s) expect_column_values_harm_score_to_be_bellow: not registered" in r.output


def test_verdict_refuses_what_gx_calls_success(gate_data):
    """GX drops an unregistered expectation type while loading a suite, then validates zero expectations
    and reports success: exactly what happens when the plugin is not imported."""
    from great_expectations.core.expectation_suite import ExpectationSuite

    from saft_gx.gx import gate

    data = {"name": "unregistered", "expectations": [{"type": "expect_rows_to_be_harmless", "kwargs": {"column": "prompt"}}]}
    suite = ExpectationSuite(**data)
    assert suite.expectations == []
    res = gate.run_checkpoint(pd.read_parquet(gate_data / "clean.parquet"), suite)
    assert res.success  # GX opens the gate ...
    v = gate.verdict(res, expected=1)
    assert v.exit_code == gate.ERROR and not v.passed  # ... the verdict does not
    assert "evaluated 0 expectations" in v.reason and "import saft_gx.gx" in v.reason


# ---- bad input: a failed expectation or one clear line, never only a traceback ----

@pytest.mark.parametrize("case, message", [
    ("null", "row 5: column 'response' is null; fill or drop null rows before scoring"),
    ("missing_response", "response_column 'answer' not found"),
    ("missing_column", "prompt_text"),
    ("wrong_type", "column 'prompt' holds int, expected text"),
])
def test_bad_input_is_an_error_with_a_message(validate, tmp_path, tiny_model_dir, case, message):
    df = pd.DataFrame(CLEAN[:8], columns=["prompt", "response"])
    kw = _tiny(tiny_model_dir, threshold=1.0)
    if case == "null":
        df.loc[5, "response"] = None
    elif case == "missing_response":
        kw["response_column"] = "answer"
    elif case == "missing_column":
        kw["column"] = "prompt_text"
    else:
        df["prompt"] = range(len(df))
    df.to_parquet(tmp_path / "d.parquet")
    suite = _write_suite(tmp_path / "s.json", [{"type": BELOW, "kwargs": kw}])
    r = validate(str(tmp_path / "d.parquet"), suite=suite)
    assert r.exit_code == 2, r.output
    assert f"ERROR {BELOW}" in r.output and message in r.output
    assert "gate ERROR: 1 of 1 expectations raised an error" in r.output
    assert "Traceback" not in r.output


def test_bad_suite_and_parameters_are_one_line_errors(validate, tmp_path, tiny_model_dir, gate_data):
    both = _write_suite(tmp_path / "both.json", [{"type": BELOW, "kwargs": _tiny(tiny_model_dir, threshold=1.0, contamination=0.1)}])
    r = validate("clean.parquet", suite=both)
    assert r.exit_code == 2 and "expectation 0 (expect_column_values_harm_score_to_be_below)" in r.output
    assert "give only one of threshold, remove_fraction, contamination" in r.output

    r = validate("clean.parquet")  # the release gate without its detector parameter
    assert r.exit_code == 2 and "No value found for $PARAMETER saft_detector" in r.output

    r = validate("nope.parquet", "--detector", str(gate_data / "det"))
    assert r.exit_code == 2 and "no such file" in r.output
    assert "Traceback" not in r.output


# ---- suites, the example project, registration ----

def test_suite_file_is_a_gx_suite_shared_with_the_example():
    from great_expectations.core.expectation_suite import ExpectationSuite

    from saft_gx.gx import gate

    data = json.loads(SUITE.read_text())
    assert json.loads((EXAMPLE / "gx" / "expectations" / "release_gate.json").read_text()) == data
    gx_suite = ExpectationSuite(**data)  # GX's own loader keeps all four (plugin registered)
    assert [e.expectation_type for e in gx_suite.expectations] == [e["type"] for e in data["expectations"]]
    assert len(gate.load_suite(SUITE).expectations) == 4


def test_example_checkpoint_runner(gate_data, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE / "gx", project / "gx")
    spec = importlib.util.spec_from_file_location("run_gate", EXAMPLE / "run_gate.py")
    run_gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_gate)
    det = str(gate_data / "det")
    assert run_gate.main([str(gate_data / "clean.parquet"), "--detector", det, "--project", str(project)]) == 0
    assert run_gate.main([str(gate_data / "bad.parquet"), "--detector", det, "--project", str(project)]) == 1
    assert list((project / "gx" / "uncommitted" / "data_docs" / "local_site").rglob("*.html"))


def test_import_saft_gx_registers_the_plugin_once_gx_is_imported():
    code = ("import sys, saft_gx; assert 'great_expectations' not in sys.modules; import great_expectations; "
            "from great_expectations.expectations.registry import get_expectation_impl as g; "
            f"g('{BELOW}'); g('{FRACTION}'); print('registered')")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "registered" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("kind, kwargs, message", [
    ("fraction", dict(max_fraction=1.5), "max_fraction=1.5: must be between 0 and 1"),
    ("fraction", dict(max_fraction=0.1, layer=2, token="middle"), "token='middle': choose one of last, prompt-end, mean"),
    ("below", dict(contamination=0.1, layer=0), "layer=0: must be a positive integer"),
    ("below", dict(threshold=1.0, contamination=0.1), "give only one of threshold, remove_fraction, contamination"),
    ("below", dict(contamination=2.0), "contamination=2.0: must be between 0 and 1"),
])
def test_bad_settings_fail_when_the_expectation_is_built(kind, kwargs, message):
    """Both expectations check their SAFT settings at construction (one shared validator), so a bad suite
    fails when it is loaded, with the reason, before any model is run."""
    from saft_gx.gx.expect_column_harm_flag_fraction_to_be_at_most import ExpectColumnHarmFlagFractionToBeAtMost
    from saft_gx.gx.expect_column_values_harm_score_to_be_below import ExpectColumnValuesHarmScoreToBeBelow

    cls = ExpectColumnHarmFlagFractionToBeAtMost if kind == "fraction" else ExpectColumnValuesHarmScoreToBeBelow
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(column="prompt", **kwargs)
    ok = dict(max_fraction=0.1) if kind == "fraction" else dict(contamination=0.1)
    cls(column="prompt", **ok)  # and good settings pass
