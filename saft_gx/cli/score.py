"""``saft-gx fit`` and ``saft-gx score``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from .. import pipeline, store
from ..errors import SaftError
from ..readers import open_dataset
from ..subspace import WEIGHTINGS, Detector
from ..threshold import DEFAULT_CONTAMINATION, ThresholdRule, resolve
from .options import Progress, stack_options, column_opts, column_options, embed_options, embed_opts, threshold_options, threshold_rule

fit_options = stack_options(
    click.option("--k", "k", type=int, default=pipeline.DEFAULT_K, show_default=True, help="Number of top singular directions."),
    click.option("--weighting", type=click.Choice(WEIGHTINGS), default="none", show_default=True,
                 help="Weight the squared projections equally, or by singular value."),
)


@click.command()
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="Folder to write the detector into.")
@column_options
@embed_options
@threshold_options
@fit_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit(dataset: str, output: str, quiet: bool, k: int, weighting: str, **kw) -> None:
    """Fit a SAFT detector on DATASET and save it, for scoring other files with --detector."""
    eopts, copts, rule = embed_opts(kw), column_opts(kw), threshold_rule(kw)
    ds = open_dataset(dataset)
    spec = copts.resolve(ds)
    session = pipeline.Session(eopts)
    bar = Progress(ds.num_rows, "embedding", quiet)
    try:
        det, summary = pipeline.fit(session, ds, spec, k=k, weighting=weighting, progress=bar)
    finally:
        bar.close()
    scores, _ = pipeline.score_cached(ds, spec, session.cache, det, session.layer)
    rule = rule or ThresholdRule("contamination", DEFAULT_CONTAMINATION)
    det = det.with_(threshold=resolve(rule, scores))
    det.save(output)
    click.echo(
        f"fitted on {summary.rows} rows ({summary.computed} embedded, {summary.rows - summary.computed} from cache) "
        f"at layer {session.layer}, token {session.config.token}, k={k}; τ = {det.threshold:.6g} ({rule.describe()})"
    )
    click.echo(f"detector {det.detector_id} written to {output}")



@click.command()
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("--detector", type=click.Path(), help="Score with a saved detector instead of fitting on DATASET.")
@click.option("--db", default="saft.duckdb", show_default=True, type=click.Path(dir_okay=False),
              help="DuckDB file to store the scored rows in.")
@click.option("--no-db", is_flag=True, help="Do not write to DuckDB (then --out is required).")
@click.option("--table", help="Table name (default: the dataset's file name).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the scored rows to this parquet file.")
@click.option("--save-detector", type=click.Path(file_okay=False), help="Save the detector fitted on DATASET here.")
@column_options
@embed_options
@threshold_options
@fit_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score(dataset: str, detector: str | None, db: str, no_db: bool, table: str | None, out: str | None,
          save_detector: str | None, quiet: bool, k: int, weighting: str, **kw) -> None:
    """Score every row of DATASET (parquet, jsonl or csv) and store harm_score / harm_flag in DuckDB."""
    eopts, copts, rule = embed_opts(kw), column_opts(kw), threshold_rule(kw)
    if no_db and not out:
        raise SaftError("--no-db needs --out, or the scores would go nowhere")
    table = table or store.table_name_for(dataset)
    if not store._IDENT.match(table):
        raise SaftError(f"--table {table!r}: use letters, digits and underscores")
    det = Detector.load(detector) if detector else None
    ds = open_dataset(dataset)
    if out and Path(out).resolve() == Path(dataset).resolve():
        raise SaftError("--out must not be the input file")

    # Write to a temp file beside the final output; it replaces --out only after the database took the
    # rows, so a failure anywhere leaves both the old output and the old database as they were.
    tmp_dir = Path(out).resolve().parent if out else Path(db).resolve().parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_out = tempfile.mkstemp(suffix=".parquet", prefix=".saft-", dir=tmp_dir)
    os.close(fd)
    bar = Progress(ds.num_rows, "embedding", quiet)
    try:
        result = pipeline.score_file(dataset, tmp_out, opts=eopts, columns=copts, detector=det, k=k,
                                     weighting=weighting, rule=rule, progress=bar)
        bar.close()
        meta = result.detector.meta
        if not no_db:
            store.store_scored_parquet(db, table, result.out_path, detector_id=result.detector.detector_id, run={
                "source": str(Path(dataset).resolve()), "source_sha256": result.source_sha256, "rows": result.rows,
                "flagged": result.flagged, "threshold": result.threshold, "threshold_rule": result.threshold_rule,
                "model": meta.get("model"), "model_fingerprint": meta.get("model_fingerprint"),
                "layer": meta.get("layer"), "token": meta.get("token"), "k": result.detector.k})
        if out:
            os.replace(tmp_out, out)
        if save_detector:
            result.detector.save(save_detector)
    finally:
        bar.close()
        Path(tmp_out).unlink(missing_ok=True)
    e = result.embed
    click.echo(
        f"scored {result.rows} rows in {result.seconds:.1f} s ({result.rows_per_second:.1f} rows/s; "
        f"{e.computed} embedded, {e.rows - e.computed} from cache)"
    )
    click.echo(
        f"layer {meta.get('layer')}, token {meta.get('token')}, k={result.detector.k}; "
        f"τ = {result.threshold:.6g} ({result.threshold_rule}); flagged {result.flagged} "
        f"({result.flagged / result.rows:.1%})"
    )
    if out:
        click.echo(f"wrote {out}")
    if not no_db:
        click.echo(f"stored in {db}, table {table} (detector_id {result.detector.detector_id})")
    if save_detector:
        click.echo(f"detector written to {save_detector}")


COMMANDS = [fit, score]
