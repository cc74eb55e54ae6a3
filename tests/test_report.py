"""`saft-gx report`: an HTML page whose every plot exists, from a scored parquet or a DuckDB table."""

import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from saft_gx import Detector, MomentStats, SaftError
from saft_gx.cli import cli
from saft_gx.report import ReportData, add_detector, load_parquet, write_report


def _scored(tmp_path, n=60, with_label=False, detector_id="d1"):
    rng = np.random.default_rng(0)
    y = (np.arange(n) % 5 == 0).astype(int)
    score = rng.normal(size=n) + 1.5 * y
    df = pd.DataFrame({"id": [f"q{i}" for i in range(n)], "prompt": [f"prompt <b>{i}</b>" for i in range(n)],
                       "response": ["r" * 500] * n, "row_id": np.arange(n), "text_sha256": ["0" * 64] * n,
                       "harm_score": score, "harm_flag": score > 1.5, "detector_id": [detector_id] * n})
    if with_label:
        df.insert(3, "label", np.where(np.arange(n) < 40, y, np.nan))
    path = tmp_path / "scored.parquet"
    df.to_parquet(path)
    return path, y, score


def _img_srcs(page: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page)


def test_report_from_parquet_with_labels_draws_every_plot(tmp_path):
    det = tmp_path / "det"
    d = Detector.fit(MomentStats(3).update(np.random.default_rng(1).normal(size=(20, 3))), k=1, meta={
        "layer": 7, "token": "last", "calibration": {"auroc_by_layer": {"last": {"6": 0.8, "7": 0.95, "8": 0.9}},
                                                     "labelled_rows": 30}}).with_(threshold=1.5)
    d.save(det)
    path, y, score = _scored(tmp_path, detector_id=d.detector_id)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": [f"q{i}" for i in range(30)], "label": y[:30]}).to_csv(labels, index=False)
    r = CliRunner().invoke(cli, ["report", "--scored", str(path), "--labels", str(labels), "--detector", str(det),
                                 "-o", str(tmp_path / "rep"), "--top", "5"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    srcs = _img_srcs(page)
    assert sorted(srcs) == sorted(f"{n}.png" for n in ("hist_flag", "hist_label", "roc", "pr", "auroc_by_layer"))
    for src in srcs:
        png = tmp_path / "rep" / src
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "Not drawn" not in page
    assert "τ</th><td>1.5 (the detector)" in page
    from saft_gx.core.metrics import auroc

    a = auroc(score[:30], y[:30])
    assert 0.6 < a < 1 and f"AUROC</th><td>{round(a, 4):.5g}</td>" in page  # over the 30 labelled rows only
    # top rows: the 5 highest scores, text escaped and cut
    top = np.argsort(-score)[:5]
    for i in top:
        assert f"prompt &lt;b&gt;{i}&lt;/b&gt;" in page
    assert "r" * 301 not in page
    assert page.count("<tr>") - 1 == len(re.findall(r"<tr><th>", page)) + 5


def test_report_without_labels_explains_missing_plots(tmp_path):
    path, _, score = _scored(tmp_path)
    data = load_parquet(path, top=3)
    html = write_report(data, tmp_path / "rep").read_text()
    assert _img_srcs(html) == ["hist_flag.png"]
    assert html.count("Not drawn") == 4
    # τ inferred from the flags: the highest unflagged score
    assert data.threshold == pytest.approx(score[score <= 1.5].max())


def test_report_uses_a_label_column_in_the_scores(tmp_path):
    path, y, _ = _scored(tmp_path, with_label=True)
    data = load_parquet(path)
    assert (data.labels[:40] == y[:40]).all() and (data.labels[40:] == -1).all()
    page = write_report(data, tmp_path / "rep").read_text()
    assert "roc.png" in _img_srcs(page) and "labelled rows</th><td>40" in page


def test_report_from_duckdb_with_auroc_by_layer(tmp_path):
    """Two detectors (layers 3 and 5) stored in one table + labels: AUROC by layer from the stored scores."""
    from saft_gx.io import store

    n = 40
    y = (np.arange(n) % 4 == 0).astype(int)
    db = tmp_path / "s.duckdb"
    for did, layer, noise in (("aaa", 3, 3.0), ("bbb", 5, 0.1)):
        s = y + np.random.default_rng(layer).normal(size=n) * noise
        df = pd.DataFrame({"prompt": ["p"] * n, "response": ["r"] * n, "row_id": np.arange(n),
                           "text_sha256": ["0" * 64] * n, "harm_score": s, "harm_flag": s > 0.5, "detector_id": did})
        pq = tmp_path / f"{did}.parquet"
        df.to_parquet(pq)
        store.store_scored_parquet(db, "t", pq, detector_id=did, run={"layer": layer, "token": "last", "k": 1,
                                                                      "threshold": 0.5, "threshold_rule": "τ = 0.5"})
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"row_id": np.arange(n), "label": y}).to_csv(labels, index=False)
    r = CliRunner().invoke(cli, ["report", "--db", str(db), "--table", "t", "--labels", str(labels), "-o",
                                 str(tmp_path / "rep")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "auroc_by_layer.png" in _img_srcs(page) and "one stored detector per layer" in page
    assert "detector_id</th><td>bbb" in page  # the latest run by default


def test_report_errors(tmp_path):
    path, _, _ = _scored(tmp_path)
    r = CliRunner().invoke(cli, ["report", "-o", str(tmp_path / "r")])
    assert r.exit_code == 1 and "--scored FILE, or --db FILE" in r.output
    bad = tmp_path / "labels.csv"
    pd.DataFrame({"id": ["q1", "nope"], "label": [1, 0]}).to_csv(bad, index=False)
    r = CliRunner().invoke(cli, ["report", "--scored", str(path), "--labels", str(bad), "-o", str(tmp_path / "r")])
    assert r.exit_code == 1 and "not found" in r.output
    other = tmp_path / "d2"
    Detector.fit(MomentStats(2).update(np.eye(2) * 3 + 1), k=1).save(other)
    data = load_parquet(path)
    with pytest.raises(SaftError, match="but the scores are from d1"):
        add_detector(data, other)
    plain = pd.DataFrame({"x": [1, 2]})
    plain.to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(SaftError, match="no harm_score column"):
        load_parquet(tmp_path / "plain.parquet")
    assert isinstance(data, ReportData)
