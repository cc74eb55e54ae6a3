"""`saft-gx score --engine spark` on local[2] gives the local engine's rows and scores, and loads into DuckDB.
Skipped where pyspark or Java is missing."""

import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java", allow_module_level=True)

from saft_gx.cli import cli  # noqa: E402

pytestmark = pytest.mark.spark
N = 240  # with ADAPT_MIN_ROWS lowered below it (the test): both engines adapt the probe to the rows, and must agree


@pytest.fixture(scope="module")
def spark():
    from saft_gx.spark.spark_engine import spark_session

    session, created = spark_session("local[2]", "saft-gx-test",
                                     {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"})
    assert created and spark_session() == (session, False)  # the engine reuses an active session, leaves it running
    yield session
    session.stop()


def test_spark_engine_matches_local_engine(spark, tiny_model_dir, tmp_path, monkeypatch):
    from saft_gx.core import defaults

    monkeypatch.setattr(defaults, "ADAPT_MIN_ROWS", 200)  # the driver fits: both engines adapt to these N rows
    rng = np.random.default_rng(2)
    words = np.array("alpha beta gamma delta river stone cloud paper music table window garden".split())
    df = pd.DataFrame({
        "id": np.arange(N, dtype=np.int32) * 10,
        "prompt": [" ".join(rng.choice(words, 2 + i % 6)) + f" #{i}" for i in range(N)],
        "response": [" ".join(rng.choice(words, 2 + i % 9)) for i in range(N)],
    })
    data = tmp_path / "rows.parquet"
    df.to_parquet(data, row_group_size=8)
    common = ["--model", str(tiny_model_dir), "--layer", "2", "--remove-fraction", "0.25", "--cache-dir", str(tmp_path / "c")]

    r = CliRunner().invoke(cli, ["score", str(data), "--engine", "spark", "--db", str(tmp_path / "s.duckdb"),
                                 "--out", str(tmp_path / "spark.parquet"), *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"scored {N} rows" in r.output and f"{N} embedded, 0 from cache" in r.output
    r = CliRunner().invoke(cli, ["score", str(data), "--no-db", "--out", str(tmp_path / "local.parquet"), *common],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"0 embedded, {N} from cache" in r.output  # the executors filled the same cache

    a, b = pd.read_parquet(tmp_path / "spark.parquet"), pd.read_parquet(tmp_path / "local.parquet")
    assert list(a.columns) == list(b.columns) == ["id", "prompt", "response", "row_id", "text_sha256", "harm_score",
                                                  "harm_flag", "detector_id"]
    assert a["row_id"].tolist() == list(range(N)) and a["id"].tolist() == df["id"].tolist()
    assert a["text_sha256"].tolist() == b["text_sha256"].tolist()
    np.testing.assert_allclose(a["harm_score"], b["harm_score"], rtol=1e-6, atol=1e-9)
    assert a["harm_flag"].tolist() == b["harm_flag"].tolist() and a["harm_flag"].sum() == N // 4
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    assert con.execute("select count(*), count(distinct row_id), sum(harm_flag::int) from rows").fetchone() == (N, N, N // 4)


def test_spark_engine_scores_a_stacked_detector_like_the_local_engine(spark, tiny_model_dir, tmp_path):
    """A calibrated detector reading layers 2 and 3 side by side: the executors embed both layers and score the
    concatenation exactly as the local engine does."""
    n = 48
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "prompt": [f"question {i} about " + "rivers " * (i % 5)
                                                                      for i in range(n)],
                       "response": [f"answer {i} " + "stones " * (i % 7) for i in range(n)]})
    data = tmp_path / "rows.parquet"
    df.to_parquet(data, row_group_size=8)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": [f"r{i}" for i in range(0, 40, 2)], "label": [i % 2 for i in range(20)]}).to_csv(labels, index=False)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "c")]
    r = CliRunner().invoke(cli, ["calibrate", str(data), "--labels", str(labels), "-o", str(tmp_path / "det"), *common,
                                 "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0 and "stack 2+3" in r.output, r.output
    outs = {}
    for engine in ("spark", "local"):
        out = tmp_path / f"{engine}.parquet"
        r = CliRunner().invoke(cli, ["score", str(data), "--engine", engine, "--detector", str(tmp_path / "det"),
                                     "--no-db", "--out", str(out), "--cache-dir", str(tmp_path / f"c-{engine}")],
                               catch_exceptions=False)
        assert r.exit_code == 0 and "layers 2+3" in r.output, r.output
        outs[engine] = pd.read_parquet(out)
    np.testing.assert_allclose(outs["spark"]["harm_score"], outs["local"]["harm_score"], rtol=1e-6, atol=1e-9)
    assert outs["spark"]["harm_score"].std() > 0

    # ... and so do the GX metrics on a Spark DataFrame, against the pandas ones
    import great_expectations as gx
    from great_expectations.core.expectation_suite import ExpectationSuite

    import saft_gx.spark.spark_gx  # noqa: F401  (registers the Spark metrics)
    from saft_gx.gx import ExpectColumnValuesHarmScoreToBeBelow, gate

    def suite(name):
        return ExpectationSuite(name=name, expectations=[ExpectColumnValuesHarmScoreToBeBelow(
            column="prompt", response_column="response", detector=str(tmp_path / "det"), mostly=0.5)])

    rows = df[["prompt", "response"]]
    batch = gx.get_context(mode="ephemeral").data_sources.add_spark("spark").add_dataframe_asset("rows") \
        .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": spark.createDataFrame(rows)})
    on_spark = batch.validate(suite("spark"), result_format="COMPLETE").results[0].result
    on_pandas = next(iter(gate.run_checkpoint(rows, suite("pandas"), result_format="COMPLETE").run_results.values())) \
        .results[0].result
    flagged = int((outs["local"]["harm_flag"]).sum())
    assert on_spark["unexpected_count"] == on_pandas["unexpected_count"] == flagged > 0
    assert sorted(on_spark["unexpected_list"]) == sorted(on_pandas["unexpected_list"])


def test_spark_engine_errors_name_global_rows(spark, tiny_model_dir, tmp_path):
    df = pd.DataFrame({"prompt": [f"question {i}" for i in range(N)], "response": [f"answer {i}" for i in range(N)]})
    df.loc[33, "response"] = "  "
    data = tmp_path / "bad.parquet"
    df.to_parquet(data, row_group_size=8)
    r = CliRunner().invoke(cli, ["score", str(data), "--engine", "spark", "--no-db", "--out", str(tmp_path / "o.parquet"),
                                 "--model", str(tiny_model_dir), "--layer", "2"])
    assert r.exit_code != 0
    assert "row 33: column 'response' is empty" in str(r.output) + str(r.exception)


def test_gx_expectations_on_spark_match_pandas(spark, tiny_model_dir, tmp_path):
    import great_expectations as gx
    from great_expectations.core.expectation_suite import ExpectationSuite

    import saft_gx.spark.spark_gx  # noqa: F401  (registers the Spark metrics)
    from saft_gx.gx import ExpectColumnHarmFlagFractionToBeAtMost, ExpectColumnValuesHarmScoreToBeBelow, gate

    rows = [(f"question {i} about " + "rivers " * (i % 5), f"answer {i} " + "stones " * (i % 7)) for i in range(20)]
    rows[7] = ("zzqx " * 30, "#### $$$$ @@@@ " * 20)
    df = pd.DataFrame(rows, columns=["prompt", "response"])
    common = dict(column="prompt", response_column="response", model=str(tiny_model_dir), layer=2)

    def suite(name):
        return ExpectationSuite(name=name, expectations=[
            ExpectColumnValuesHarmScoreToBeBelow(**common, remove_fraction=0.1, mostly=0.95),
            ExpectColumnHarmFlagFractionToBeAtMost(**common, threshold=1.0, max_fraction=0.5),
        ])

    ctx = gx.get_context(mode="ephemeral")
    batch = ctx.data_sources.add_spark("spark").add_dataframe_asset("rows") \
        .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": spark.createDataFrame(df)})
    on_spark = batch.validate(suite("spark"), result_format="COMPLETE").results
    on_pandas = next(iter(gate.run_checkpoint(df, suite("pandas"), result_format="COMPLETE").run_results.values())).results
    assert len(on_spark) == len(on_pandas) == 2
    for s, p in zip(on_spark, on_pandas):
        assert s.success == p.success
        assert s.result.get("unexpected_count") == p.result.get("unexpected_count")
        assert sorted(s.result.get("unexpected_list") or []) == sorted(p.result.get("unexpected_list") or [])
        assert s.result["details" if "details" in s.result else "observed_value"] is not None
    below = on_spark[0].result
    assert below["unexpected_count"] == 2 and below["details"]["rows"] == 20
    # the same rows are flagged (above); τ itself agrees to 1 %, not to rounding: with 20 rows the probe is fitted in
    # a 19-direction subspace whose basis Spark's tree-merged sums perturb slightly (to investigate)
    np.testing.assert_allclose(below["details"]["threshold"], on_pandas[0].result["details"]["threshold"], rtol=1e-2)


def test_collect_rows_returns_the_vectors_at_positions_of_the_row_id_order(spark):
    """The rows the default detector is adapted to are asked for by position in row-id order (the order of
    ``collect_coords``); row ids need not be contiguous (a row_condition drops rows)."""
    import numpy as np
    import pandas as pd

    from saft_gx.spark.spark_engine import collect_rows

    rng = np.random.default_rng(0)
    ids = np.array([3, 10, 11, 40, 41, 42, 97])
    vecs = rng.normal(size=(len(ids), 4)).astype(np.float16)
    frame = pd.DataFrame({"row_id": ids[::-1], "emb": [v.tobytes() for v in vecs[::-1]]})
    emb = spark.createDataFrame(frame, "row_id long, emb binary").repartition(3)
    idx = np.array([6, 0, 3, 3])
    np.testing.assert_array_equal(collect_rows(emb, idx, 4), vecs[idx].astype(np.float32))
