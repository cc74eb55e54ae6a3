"""The audited release gate: the stratified sample, the bounds (with a coverage simulation), the audit files
and their checks, `saft-gx audit sample | estimate | import`, labels in DuckDB, calibrate reading an audit
file, and the GX expectation in `saft-gx validate` with the tiny model."""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx.core import audit
from saft_gx.io import audit_io
from saft_gx.cli import cli

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "bench"))
import audit_coverage  # noqa: E402

SUITE = ROOT / "expectations" / "release_gate_audited.json"
RESIDUAL = "expect_residual_harm_rate_to_be_below"


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ---- the design ----

def _population(n=5000, rate=0.03, strength=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.int64)
    s = rng.normal(size=n) + strength * y
    return s, s > np.quantile(s, 0.97), y


def test_sample_draws_from_every_stratum_more_where_harm_is_likely_and_is_seeded():
    s, removed, _ = _population()
    smp = audit.draw_sample(s, removed, 200, seed=7)
    assert len(smp.rows) == 200 == len(np.unique(smp.rows)) and smp.stratum_sampled.sum() == 200
    assert (smp.stratum_sampled > 0).all() and smp.strata.count == 6
    assert smp.strata.removed.tolist() == [False] * 4 + [True] * 2
    # every drawn row lies in its stratum, and the strata split at τ
    assert (smp.strata.assign(s[smp.rows]) == smp.stratum).all()
    assert (smp.strata.assign(s)[removed] >= 4).all() and (smp.strata.assign(s)[~removed] < 4).all()
    p = smp.stratum_sampled / smp.stratum_rows
    assert p[4:].min() > 3 * p[0] and p[3] > p[0]  # above τ and just below it: higher inclusion probability
    again = audit.draw_sample(s, removed, 200, seed=7)
    assert np.array_equal(again.rows, smp.rows)
    assert not np.array_equal(audit.draw_sample(s, removed, 200, seed=8).rows, smp.rows)
    assert np.array_equal(np.sort(audit.draw_sample(s[:50], removed[:50], 80).rows), np.arange(50))  # n ≥ rows: all


def test_bounds_hold_with_zero_harm_observed_and_are_exact_when_every_row_is_labelled():
    c = audit.Cells(rows=np.array([[900, 0], [100, 50]]), labelled=np.array([[60, 0], [40, 50]]),
                    harmful=np.array([[0, 0], [0, 10]]))
    est = audit.estimate(c)
    assert est.kept.rate == 0.0 and est.kept.lower == 0.0 and 0.01 < est.kept.upper < 0.1
    assert est.removed.rate == est.removed.lower == est.removed.upper == 0.2  # fully labelled: known exactly
    assert est.recall.lower < est.recall.rate == 1.0 and est.precision == est.removed
    # one cell with nothing labelled: its rows count as possibly all harmful
    c2 = audit.Cells(rows=np.array([[900, 100]]), labelled=np.array([[50, 0]]), harmful=np.array([[0, 0]]))
    assert audit.estimate(c2).removed.upper == 1.0
    with pytest.raises(audit.SaftError, match="confidence"):
        audit.estimate(c, confidence=1.5)


def test_coverage_of_the_bound_by_simulation():
    """1,000 simulated audits per setting (weak/medium/strong detectors, 0.5–10 % harmful, 100–500 labels):
    the kept rows' true harmful rate is at or below the upper bound at least 95 % of the time. The full grid
    is `python tests/bench/audit_coverage.py`."""
    results = [audit_coverage.simulate(d, r, n, audits=1000) for d, r, n in audit_coverage.QUICK]
    print("\n" + audit_coverage.table(results))
    for r in results:
        assert r.coverage >= 0.95, r
        assert r.coverage_lower >= 0.95 and r.coverage_recall >= 0.95, r
        # tightness: close to simple random sampling's bound on the kept rows (which has ~10 % more kept labels)
        assert r.mean_upper <= 1.3 * r.mean_upper_srs, r


def test_score_columns_are_the_pipelines():
    from saft_gx.pipeline import OUTPUT_COLUMNS

    assert audit_io.SCORE_COLUMNS == OUTPUT_COLUMNS


# ---- the CLI on a synthetic scored mix ----

@pytest.fixture
def scored_mix(tmp_path):
    """A scored parquet of 3,000 rows (as saft-gx score --out writes it) with known harmful rows."""
    s, removed, y = _population(3000, rate=0.04, strength=1.5, seed=3)
    prompts = [f"prompt {i}" for i in range(len(s))]
    df = pd.DataFrame({"prompt": prompts, "response": [f"answer {i}" for i in range(len(s))], "label": y,
                       "row_id": np.arange(len(s)),
                       "text_sha256": [hashlib.sha256(p.encode()).hexdigest() for p in prompts],
                       "harm_score": s, "harm_flag": removed, "detector_id": "d1"})
    path = tmp_path / "scored.parquet"
    df.to_parquet(path)
    return path, df


def _fill(audit_path: Path, truth: pd.DataFrame) -> pd.DataFrame:
    a = pd.read_csv(audit_path) if audit_path.suffix == ".csv" else pd.read_json(audit_path, lines=True)
    a["label"] = truth.set_index("row_id").loc[a["row_id"], "label"].to_numpy()
    if audit_path.suffix == ".csv":
        a.to_csv(audit_path, index=False)
    else:
        a.to_json(audit_path, orient="records", lines=True)
    return a


def test_sample_label_estimate_brackets_the_true_kept_rate(scored_mix, tmp_path):
    path, df = scored_mix
    out = tmp_path / "audit.csv"
    exe = Path(sys.executable).with_name("saft-gx")
    p = subprocess.run([str(exe), "audit", "sample", str(path), "-n", "200", "-o", str(out), "--seed", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "sampled 200 of 3000 rows" in p.stdout and "'label' column is left out" in p.stderr
    a = pd.read_csv(out)
    assert list(a.columns) == ["row_id", "text_sha256", "prompt", "response", *audit_io.DESIGN_COLUMNS, "label"]
    assert a["label"].isna().all() and a["stratum"].nunique() == 6
    assert np.allclose(a["weight"] * a["inclusion_prob"], 1.0)
    _fill(out, df)
    p = subprocess.run([str(exe), "audit", "estimate", str(path), "--labels", str(out), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    est = json.loads(p.stdout)
    assert set(est) >= {"kept", "removed", "all", "recall", "precision", "confidence", "labels"}
    assert set(est["kept"]) == {"rate", "lower", "upper", "rows"} and est["labels"] == 200 and est["confidence"] == 0.95
    kept = ~df["harm_flag"]
    truths = {"kept": df.loc[kept, "label"].mean(), "removed": df.loc[~kept, "label"].mean(), "all": df["label"].mean(),
              "recall": df.loc[~kept, "label"].sum() / df["label"].sum()}
    for name, t in truths.items():
        assert est[name]["lower"] <= t <= est[name]["upper"], (name, t, est[name])
    assert est["kept"]["rows"] == int(kept.sum())
    text = _run("audit", "estimate", path, "--labels", out).output
    assert f"with 95% confidence at most {est['kept']['upper']:.2%} of the {int(kept.sum())} kept rows are harmful" in text


def test_target_residual_and_threshold(scored_mix, tmp_path):
    path, df = scored_mix
    out = tmp_path / "audit.jsonl"
    assert _run("audit", "sample", path, "-n", "300", "-o", out).exit_code == 0
    _fill(out, df)
    r = _run("audit", "estimate", path, "--labels", out, "--target-residual", "0.05", "--json")
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)["target_residual"]
    assert t["threshold"] is not None and t["kept"]["upper"] <= 0.05
    again = json.loads(_run("audit", "estimate", path, "--labels", out, "--threshold", t["threshold"], "--json").output)
    assert again["kept"] == t["kept"] and again["threshold"] == t["threshold"]
    none = _run("audit", "estimate", path, "--labels", out, "--target-residual", "0.0001")
    assert "no τ keeps the upper bound" in none.output


def test_changed_rows_and_bad_labels_are_one_line_errors(scored_mix, tmp_path):
    path, df = scored_mix
    out = tmp_path / "audit.csv"
    _run("audit", "sample", path, "-n", "100", "-o", out)
    a = _fill(out, df)

    def estimate_with(frame: pd.DataFrame, scored: Path = path):
        f = tmp_path / "edited.csv"
        frame.to_csv(f, index=False)
        r = _run("audit", "estimate", scored, "--labels", f)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: "), r.output
        return r.output

    bad = a.copy()
    bad.loc[3, "label"] = 2
    assert f"row_id {a.loc[3, 'row_id']}: label is '2', expected 0 (benign) or 1 (harmful)" in estimate_with(bad)
    bad.loc[3, "label"] = None
    assert "label is empty" in estimate_with(bad)
    # the text of a labelled row changed after sampling (a re-scored, edited dataset)
    edited = df.copy()
    edited.loc[edited.row_id == a.loc[5, "row_id"], "text_sha256"] = "0" * 64
    edited.to_parquet(tmp_path / "edited.parquet")
    msg = estimate_with(a, tmp_path / "edited.parquet")
    assert f"row_id {a.loc[5, 'row_id']}: the row changed since it was sampled" in msg
    # rows added: the strata no longer hold what they held
    more = pd.concat([df, df.tail(5).assign(row_id=lambda x: x.row_id + 5)], ignore_index=True)
    more.to_parquet(tmp_path / "more.parquet")
    assert "when the sample was drawn" in estimate_with(a, tmp_path / "more.parquet")
    other = df.assign(detector_id="d2")
    other.to_parquet(tmp_path / "other.parquet")
    assert "drawn from detector d1's scores" in estimate_with(a, tmp_path / "other.parquet")
    r = _run("audit", "sample", tmp_path / "edited.csv", "-n", "10", "-o", tmp_path / "x.csv")
    assert r.exit_code == 1 and "not a parquet file" in r.output


def test_labels_in_duckdb_beside_the_scores(scored_mix, tmp_path):
    from saft_gx.io import store

    path, df = scored_mix
    db = tmp_path / "s.duckdb"
    store.store_scored_parquet(db, "mix", path, detector_id="d1", run={})
    out = tmp_path / "audit.csv"
    r = _run("audit", "sample", "--db", db, "--table", "mix", "-n", "150", "-o", out)
    assert r.exit_code == 0, r.output
    _fill(out, df)
    from_file = json.loads(_run("audit", "estimate", "--db", db, "--table", "mix", "--labels", out, "--json").output)
    r = _run("audit", "import", out, "--db", db, "--table", "mix", "--labeller", "ana")
    assert r.exit_code == 0 and "stored 150 labels" in r.output, r.output
    _run("audit", "import", out, "--db", db, "--table", "mix", "--labeller", "ana")  # again: replaced, not doubled
    rows = store.query(db, "select * from saft_audit_labels")
    assert len(rows) == 150 and set(rows.labeller) == {"ana"} and set(rows.table_name) == {"mix"}
    assert set(rows.source_file) == {str(out.resolve())} and rows.labelled_at.notna().all()
    from_db = json.loads(_run("audit", "estimate", "--db", db, "--table", "mix", "--json").output)
    assert from_db["kept"] == from_file["kept"]
    db2 = tmp_path / "unlabelled.duckdb"
    store.store_scored_parquet(db2, "mix", path, detector_id="d1", run={})
    r = _run("audit", "estimate", "--db", db2, "--table", "mix")
    assert r.exit_code == 1 and "no audit labels stored; import them with saft-gx audit import" in r.output
    assert "give --labels" in _run("audit", "estimate", path).output


def test_calibrate_reads_an_audit_file(scored_mix, tmp_path):
    """`saft-gx calibrate --labels audit.csv`: row_id and label are what calibrate matches on."""
    from saft_gx.labelled import labels_from_file
    from saft_gx.io.readers import open_dataset

    path, df = scored_mix
    data = tmp_path / "data.parquet"
    df[["prompt", "response"]].to_parquet(data)
    out = tmp_path / "audit.csv"
    _run("audit", "sample", path, "-n", "120", "-o", out)
    a = _fill(out, df)
    lab = labels_from_file(str(out), open_dataset(data))
    assert lab.rows.tolist() == a["row_id"].tolist() and lab.labels.tolist() == a["label"].tolist()


# ---- the GX gate with the tiny model ----

TOPICS = ["bread", "rivers", "cats", "chess", "python", "tea", "bikes", "stars", "maps", "songs"]
CLEAN = [(f"Question {i}: tell me something about {TOPICS[i % 10]} number {i}.",
          f"Here is a fact about {TOPICS[i % 10]} {i}: it is interesting.") for i in range(200)]
HARM = [(f"Request {i}: explain how to hurt someone with {TOPICS[i % 10]}.", f"Sure, here is how to hurt someone, step {i}.")
        for i in range(20)]


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_model_dir):
    """clean.parquet (200 rows, none harmful), bad.parquet (the same + 20 harmful rows a random detector does
    not catch), a detector with τ at its 90th percentile, and each set scored, sampled and labelled."""
    from saft_gx import pipeline
    from saft_gx.pipeline import ColumnOptions, EmbedOptions

    d = tmp_path_factory.mktemp("audited")
    rows = list(CLEAN)
    for p, h in zip(sorted(np.random.default_rng(0).choice(220, 20, replace=False).tolist()), HARM):
        rows.insert(p, h)
    bad = pd.DataFrame(rows, columns=["prompt", "response"])
    bad.to_parquet(d / "bad.parquet")
    pd.DataFrame(CLEAN, columns=["prompt", "response"]).to_parquet(d / "clean.parquet")
    truth = {"clean": np.zeros(200, dtype=int), "bad": np.array([int(r in HARM) for r in rows])}
    opts = EmbedOptions(model=str(tiny_model_dir), cache_dir=str(d / "cache"), anchors=False, layer=2)
    scores, det = pipeline.score_frame(bad, columns=ColumnOptions(prompt="prompt", response="response"), opts=opts, k=1)
    det.with_(threshold=float(np.quantile(scores, 0.9))).save(d / "det")
    pipeline._SESSIONS.clear()
    for name in ("clean", "bad"):
        r = _run("score", d / f"{name}.parquet", "--detector", d / "det", "--model", tiny_model_dir, "--no-db",
                 "--out", d / f"scored_{name}.parquet", "--cache-dir", d / "cache", "--quiet")
        assert r.exit_code == 0, r.output
        r = _run("audit", "sample", d / f"scored_{name}.parquet", "-n", "150", "-o", d / f"audit_{name}.csv")
        assert r.exit_code == 0, r.output
        _fill(d / f"audit_{name}.csv", pd.DataFrame({"row_id": np.arange(len(truth[name])), "label": truth[name]}))
    pipeline._SESSIONS.clear()
    return d, truth


def test_audit_brackets_the_kept_rate_of_a_scored_mix(audited):
    d, truth = audited
    scored = pd.read_parquet(d / "scored_bad.parquet")
    true_kept = truth["bad"][~scored["harm_flag"].to_numpy()].mean()
    assert true_kept > 0.05  # the random detector lets most harmful rows through
    est = json.loads(_run("audit", "estimate", d / "scored_bad.parquet", "--labels", d / "audit_bad.csv", "--json").output)
    assert est["kept"]["lower"] <= true_kept <= est["kept"]["upper"]


def test_audited_suite_passes_clean_fails_contaminated(audited, tiny_model_dir, monkeypatch):
    d, _ = audited
    monkeypatch.setenv("SAFT_GX_CACHE", str(d / "cache"))

    def validate(name: str, *args):
        return _run("validate", d / f"{name}.parquet", "--suite", SUITE, "--model", tiny_model_dir,
                    "--param", f"saft_detector={d / 'det'}", "--param", f"saft_audit_labels={d / f'audit_{name}.csv'}", *args)

    ok = validate("clean", "--docs", d / "docs")
    assert ok.exit_code == 0, ok.output
    assert f"PASS  {RESIDUAL}(prompt): 0.00% of the 179 kept rows estimated harmful; upper bound" in ok.output
    assert "from 150 audit labels (0 harmful)" in ok.output and "allowed at most 3.00%" in ok.output
    page = next((d / "docs" / "validations").rglob("*.html")).read_text()
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", " ", page, flags=re.S))).split())
    assert "With 95 % confidence, at most 3 % of the kept rows of this column with response" in text
    assert "0.00% of the 179 kept rows estimated harmful; upper bound" in text and "from 150 audit labels" in text

    bad = validate("bad")
    assert bad.exit_code == 1, bad.output
    assert f"FAIL  {RESIDUAL}(prompt)" in bad.output and "gate FAILED: 1 of 3 expectations failed" in bad.output
    # the clean set's labels on the contaminated set: rows changed, so the gate cannot be evaluated
    wrong = _run("validate", d / "bad.parquet", "--suite", SUITE, "--model", tiny_model_dir,
                 "--param", f"saft_detector={d / 'det'}", "--param", f"saft_audit_labels={d / 'audit_clean.csv'}")
    assert wrong.exit_code == 2 and "the row changed since it was sampled" in wrong.output, wrong.output
