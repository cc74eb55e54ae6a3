"""``saft-gx validate``: run a GX suite as a release gate on a dataset file.

Exit status: 0 the gate passed, 1 the data failed an expectation, 2 the gate could not be evaluated
(bad input or suite, an expectation that raised, zero expectations evaluated). Great Expectations is
imported only here, when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..core.errors import SaftError


def _parse_params(params: tuple[str, ...]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise SaftError(f"--param {p!r}: expected NAME=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _store_scores(dataset: str, df: Any, suite: Any, db: str, table: str | None, params: dict[str, Any]) -> str:
    """Score the file with the first SAFT expectation's settings (cache hits: no model work) and store it."""
    from .. import pipeline
    from ..io import store
    from ..gx import EXPECTATION_TYPES
    from ..gx.scoring import column_options, embed_options, is_messages_column, load_detector, threshold_rule

    saft = [e for e in suite.expectations if e.expectation_type in EXPECTATION_TYPES]
    if not saft:
        raise SaftError("--db: the suite has no SAFT expectation whose scores could be stored")
    kw = dict(saft[0].configuration.kwargs)
    if kw.get("row_condition"):
        raise SaftError("--db stores the scores of every row, but the SAFT expectation has a row_condition")
    det_ref = kw.get("detector")
    if isinstance(det_ref, dict) and "$PARAMETER" in det_ref:
        det_ref = params.get(det_ref["$PARAMETER"], det_ref)
    det = load_detector(det_ref) if det_ref is not None else None
    rule = threshold_rule(kw)
    opts = embed_options(kw)
    cols = column_options(kw["column"], kw.get("response_column"), is_messages_column(kw["column"], df[kw["column"]]))
    table = table or store.table_name_for(dataset)
    from ..core.outputs import temp_file
    from .score import k_of

    tmp = temp_file(Path(db).resolve().parent, ".parquet")  # a killed run's temp is removed by the next
    try:
        res = pipeline.score_file(dataset, tmp, opts=opts, columns=cols, detector=det, k=int(kw["k"]) if kw.get("k") else None, rule=rule,
                                  session=pipeline.shared_session(opts, det))
        meta = res.detector.meta
        store.store_scored_parquet(db, table, res.out_path, detector_id=res.detector.detector_id, run={
            "source": str(Path(dataset).resolve()), "source_sha256": res.source_sha256, "rows": res.rows,
            "flagged": res.flagged, "threshold": res.threshold, "threshold_rule": res.threshold_rule,
            "model": meta.get("model"), "model_fingerprint": meta.get("model_fingerprint"), "layer": meta.get("layer"),
            "token": meta.get("token"), "k": k_of(res.detector)})
    finally:
        Path(tmp).unlink(missing_ok=True)
    return f"scores stored in {db}, table {table} (detector_id {res.detector.detector_id}, {res.flagged} of {res.rows} flagged)"


@click.command()
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("--suite", "suite_path", required=True, type=click.Path(dir_okay=False),
              help="GX suite file (JSON), e.g. expectations/release_gate.json.")
@click.option("--db", type=click.Path(dir_okay=False), help="Also store the rows' scores in this DuckDB file.")
@click.option("--table", help="Table for --db (default: the dataset's file name).")
@click.option("--docs", "docs_dir", type=click.Path(file_okay=False), help="Write GX Data Docs (HTML) into this folder.")
@click.option("--detector", help="Detector folder for every SAFT expectation (overrides the suite's).")
@click.option("--model", help="Model for every SAFT expectation (overrides the suite's).")
@click.option("--device", help="Device for every SAFT expectation: auto, cpu, cuda ... (default: auto).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A suite parameter ({\"$PARAMETER\": NAME} in the suite), repeatable. VALUE is JSON or text.")
@click.option("--result-format", type=click.Choice(["BASIC", "SUMMARY", "COMPLETE"]), default="SUMMARY", show_default=True,
              help="GX result format (COMPLETE lists every unexpected row).")
def validate(dataset: str, suite_path: str, db: str | None, table: str | None, docs_dir: str | None, detector: str | None,
             model: str | None, device: str | None, params: tuple[str, ...], result_format: str) -> None:
    """Run the GX suite SUITE on DATASET through a checkpoint; exit 0 pass, 1 fail, 2 error.

    saft-gx validate data.parquet --suite expectations/release_gate.json --param saft_detector=detector/
    """
    try:
        code = _run(dataset, suite_path, db, table, docs_dir, detector, model, device, params, result_format)
    except SaftError as e:
        click.echo(f"Error: {e}", err=True)
        code = 2
    except Exception as e:  # a gate must not exit 1 (= "the data failed") on a crash
        click.echo(f"Error: {type(e).__name__}: {' '.join(str(e).split())[:500]}", err=True)
        code = 2
    sys.exit(code)


def _run(dataset: str, suite_path: str, db: str | None, table: str | None, docs_dir: str | None, detector: str | None,
         model: str | None, device: str | None, params: tuple[str, ...], result_format: str) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="PySpark does not yet fully support", category=FutureWarning)
    from ..gx import gate  # imports GX and registers the SAFT expectations

    parameters = _parse_params(params)
    overrides = {"detector": detector, "model": model, "device": device}
    suite = gate.load_suite(suite_path, overrides=overrides)
    expected = len(suite.expectations)
    df = gate.read_frame(dataset)
    click.echo(f"validating {dataset} ({len(df)} rows) against {suite_path} ({expected} expectations)")
    result = gate.run_checkpoint(df, suite, data_name=Path(dataset).stem, docs_dir=docs_dir,
                                 expectation_parameters=parameters, result_format=result_format)
    v = gate.verdict(result, expected=expected, suite=suite)
    for o in v.outcomes:
        click.echo(f"  {o.line()}")
    status = {gate.PASSED: "PASSED", gate.FAILED: "FAILED", gate.ERROR: "ERROR"}[v.exit_code]
    click.echo(f"gate {status}: {v.reason}", err=v.exit_code == gate.ERROR)
    if docs_dir:
        click.echo(f"data docs: {gate.docs_index(docs_dir)}")
    if db:
        if any(o.error for o in v.outcomes if o.type in _saft_types()):
            click.echo("--db: not stored, a SAFT expectation raised an error", err=True)
        else:
            click.echo(_store_scores(dataset, df, suite, db, table, parameters))
    return v.exit_code


def _saft_types() -> tuple[str, ...]:
    from ..gx import EXPECTATION_TYPES

    return EXPECTATION_TYPES


COMMANDS = [validate]
