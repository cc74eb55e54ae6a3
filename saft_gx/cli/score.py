"""``saft-gx fit`` and ``saft-gx score``."""

from __future__ import annotations

from pathlib import Path

import click

from ..core import outputs
from .. import pipeline
from ..io import store
from ..core.errors import SaftError
from ..core import defaults
from ..detect.anchors import USE_ANCHORS
from ..pipeline import fit_with_session, session_anchor_vectors
from ..io.readers import open_dataset
from ..shards import Shard, first_row_id, save_stats, shard_dataset
from ..core.subspace import WEIGHTINGS, Detector
from ..core.threshold import DEFAULT_CONTAMINATION, ThresholdRule, resolve
from .options import Progress, stack_options, column_opts, column_options, embed_options, embed_opts, threshold_options, threshold_rule

def _parse_shard(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Shard | None:
    try:
        return Shard.parse(value) if value else None
    except SaftError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


shard_option = click.option(
    "--shard", callback=_parse_shard,
    help="i/n: only shard i (0-based) of n equal contiguous row ranges, for splitting one dataset over n machines.")

DETECTOR_FILES = ("detector.json", "detector.safetensors")

fit_options = stack_options(
    click.option("--k", "k", type=int, help=f"Number of top singular directions of the data (default {defaults.K} "
                 f"with the built-in anchors; {defaults.PLAIN_K} for plain SAFT, --no-anchors)."),
    click.option("--weighting", type=click.Choice(WEIGHTINGS),
                 help="Score by the squared projections (SAFT), weighted equally, by singular value or whitened; "
                      "oriented by the anchors unless --no-anchors. Default: the anchors' logistic probe in the "
                      "subspace (a probability of harm)."),
    click.option("--anchors/--no-anchors", default=USE_ANCHORS, show_default=True,
                 help="Fit the detector in the data's SAFT subspace with the built-in labelled anchors; "
                      "--no-anchors: plain unsupervised SAFT."),
    click.option("--adapt/--no-adapt", default=defaults.ADAPT, show_default=True,
                 help=f"With the anchors: adapt their probe to DATASET by self-training (its top "
                      f"{defaults.ADAPT_TOP:.0%} and bottom {defaults.ADAPT_BOTTOM:.0%} taken as harmful / benign, "
                      f"recalibrated on the anchors; datasets of {defaults.ADAPT_MIN_ROWS}+ rows)."),
)


def layers_phrase(meta: dict) -> str:
    """"layer 18", or "layers 12+18+24" for a detector reading several side by side."""
    layers = meta.get("layers")
    return f"layers {'+'.join(map(str, layers))}" if layers else f"layer {meta.get('layer')}"


def anchors_phrase(meta: dict) -> str:
    """`` (built-in anchors, adapted to 600 rows; blended with a whole-state probe, adapted to 480 of the rows; rows
    whose 15 nearest rows (of 600) score low lowered)`` /
    `` (built-in anchors; not adapted: <why>; …)`` / ``""``."""
    if not meta.get("anchors"):
        return ""
    blended = "; blended with a whole-state probe" if meta.get("blend") else ""
    whole = meta.get("adapted_whole")
    if blended and isinstance(whole, dict):
        blended += f", adapted to {whole.get('rows')} of the rows"
    near = meta.get("neighbours")
    if blended and isinstance(near, dict):
        blended += (f"; rows whose {near.get('k')} nearest rows (of {near.get('rows')}) score low lowered"
                    if near.get("down_only") else
                    f"; each row lent its {near.get('k')} nearest rows' scores (of {near.get('rows')})")
    adapted = meta.get("adapted")
    if isinstance(adapted, dict):
        return f" (built-in anchors, adapted to {adapted.get('rows')} rows{blended})"
    why = meta.get("adapted_why_not")
    return f" (built-in anchors; not adapted: {why}{blended})" if why else f" (built-in anchors{blended})"


def k_of(det: Detector) -> int:
    """The subspace's size (--k): a blended default detector stores one direction, read from k of them."""
    return int(det.meta.get("subspace_k", det.k))


@click.command()
@click.argument("dataset", type=click.Path())
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), help="Folder to write the detector into.")
@click.option("--stats-out", type=click.Path(file_okay=False),
              help="Also (or instead) save the fit statistics here, to merge shards with `saft-gx merge-stats`.")
@shard_option
@column_options
@embed_options
@threshold_options
@fit_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit(dataset: str, output: str | None, stats_out: str | None, shard: Shard | None, quiet: bool, k: int | None,
        weighting: str | None, anchors: bool, adapt: bool, **kw) -> None:
    """Fit a SAFT detector on DATASET and save it, for scoring other files with --detector."""
    eopts, copts, rule = embed_opts(kw), column_opts(kw), threshold_rule(kw)
    eopts.anchors, eopts.adapt = anchors, adapt  # the default layer / token follow the mode
    if not output and not stats_out:
        raise SaftError("give -o/--output (the detector), --stats-out (statistics for merge-stats), or both")
    outputs.refuse_overlaps({"DATASET": dataset}, {"--output": output}, folders={"--output": DETECTOR_FILES})
    outputs.refuse_overlaps({"DATASET": dataset}, {"--stats-out": stats_out})  # may share --output's folder
    ds = open_dataset(dataset)
    spec = copts.resolve(ds)
    if shard is not None:
        ds = shard_dataset(ds, shard)
    session = pipeline.Session(eopts)
    bar = Progress(ds.num_rows, "embedding", quiet)
    try:
        stats, summary = pipeline.fit_stats(session, ds, spec, progress=bar)
    finally:
        bar.close()
    meta = session.detector_meta(ds, spec)
    if stats_out:
        first = first_row_id(ds)
        save_stats(stats_out, stats, {**meta, "source": str(Path(dataset).resolve()), "source_sha256": ds.sha256(),
                                      "shard": str(shard) if shard else None, "row_start": first,
                                      "row_stop": first + summary.rows}, anchors=session_anchor_vectors(session))
        where = f"rows {first}..{first + summary.rows - 1} (shard {shard})" if shard else f"{summary.rows} rows"
        click.echo(f"statistics of {where} written to {stats_out} "
                   f"({summary.computed} embedded, {summary.rows - summary.computed} from cache)")
        if not output:
            return
    det = fit_with_session(session, stats, k=k, weighting=weighting, anchors=anchors, meta=meta,
                           data_coords=lambda d: pipeline.coords_cached(ds, spec, session.cache, d, session.layers),
                           data_rows=lambda idx: pipeline.rows_cached(ds, spec, session.cache, session.layers, idx))
    scores = pipeline.score_cached(ds, spec, session.cache, det, session.layers)
    if rule is None and det.threshold is not None:  # τ from the built-in anchors
        rule_text = det.meta.get("threshold_rule", "from the detector")
    else:
        rule = rule or ThresholdRule("contamination", DEFAULT_CONTAMINATION)
        rule_text = rule.describe()
        det = det.with_(threshold=resolve(rule, scores), meta={**det.meta, "threshold_rule": rule_text})
    det.save(output)
    truncation_notice(summary.truncated, det.meta)
    click.echo(
        f"fitted on {summary.rows} rows ({summary.computed} embedded, {summary.rows - summary.computed} from cache) "
        f"at {layers_phrase(det.meta)}, token {session.config.token}, k={k_of(det)}, {det.meta.get('variant')}"
        f"{anchors_phrase(det.meta)}; τ = {det.threshold:.6g} ({rule_text})"
    )
    click.echo(f"detector {det.detector_id} written to {output}")



@click.command()
@click.argument("dataset", type=click.Path())
@click.option("--detector", type=click.Path(), help="Score with a saved detector instead of fitting on DATASET.")
@click.option("--db", default="saft.duckdb", show_default=True, type=click.Path(dir_okay=False),
              help="DuckDB file to store the scored rows in.")
@click.option("--no-db", is_flag=True, help="Do not write to DuckDB (then --out is required).")
@click.option("--table", help="Table name (default: the dataset's file name).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the scored rows to this parquet file.")
@click.option("--save-detector", type=click.Path(file_okay=False), help="Save the detector fitted on DATASET here.")
@shard_option
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: this process; spark: embed and score on a Spark cluster (pip install 'saft-gx[spark]').")
@click.option("--spark-master", help="With --engine spark: the master URL, e.g. local[4] (default: spark-submit's, else local[*]).")
@click.option("--spark-dir", help="With --engine spark: work folder every executor and the driver can reach (default: a temp folder beside the output).")
@column_options
@embed_options
@threshold_options
@fit_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score(dataset: str, detector: str | None, db: str, no_db: bool, table: str | None, out: str | None,
          save_detector: str | None, shard: Shard | None, engine: str, spark_master: str | None,
          spark_dir: str | None, quiet: bool, k: int | None, weighting: str | None, anchors: bool, adapt: bool,
          **kw) -> None:
    """Score every row of DATASET (parquet, jsonl or csv) and store harm_score / harm_flag in DuckDB.

    With --shard i/n only rows i·N/n .. (i+1)·N/n − 1 are scored (global row ids kept), and only that range of
    the detector's rows is replaced in DuckDB; pass the merged --detector so all shards score alike."""
    eopts, copts, rule = embed_opts(kw), column_opts(kw), threshold_rule(kw)
    eopts.anchors, eopts.adapt = anchors, adapt  # the default layer / token follow the mode
    if engine == "spark" and shard is not None:
        raise SaftError("--engine spark splits the dataset itself; drop --shard")
    if no_db and not out:
        raise SaftError("--no-db needs --out, or the scores would go nowhere")
    table = table or store.table_name_for(dataset)
    if not store.IDENT.match(table):
        raise SaftError(f"--table {table!r}: use letters, digits and underscores")
    # before any work: no output over an input or another output, and a database we can write now
    outputs.refuse_overlaps({"DATASET": dataset, "--detector": detector},
                            {"--db": None if no_db else db, "--out": out, "--save-detector": save_detector},
                            folders={"--save-detector": DETECTOR_FILES, "--detector": DETECTOR_FILES})
    det = Detector.load(detector) if detector else None
    ds = open_dataset(dataset)
    pipeline.refuse_reserved_columns(ds.columns)
    if not no_db:
        store.check_writable(db)

    # Write to a temp file beside the final output; it replaces --out only after the database took the
    # rows, so a failure anywhere leaves both the old output and the old database as they were.
    tmp_out = outputs.temp_file(Path(out).resolve().parent if out else Path(db).resolve().parent, ".parquet")
    bar = Progress(ds.num_rows, "embedding", quiet)
    try:
        if engine == "spark":
            from ..spark.spark_engine import score_file as spark_score_file

            bar.close()
            result = spark_score_file(dataset, tmp_out, opts=eopts, columns=copts, detector=det, k=k,
                                      weighting=weighting, anchors=anchors, rule=rule, master=spark_master,
                                      work_dir=spark_dir)
        else:
            result = pipeline.score_file(dataset, tmp_out, opts=eopts, columns=copts, detector=det, k=k,
                                         weighting=weighting, anchors=anchors, rule=rule, progress=bar, shard=shard)
        bar.close()
        meta = result.detector.meta
        if not no_db:
            store.store_scored_parquet(db, table, result.out_path, detector_id=result.detector.detector_id,
                                       row_range=result.extra.get("row_range") if shard else None, run={
                "source": str(Path(dataset).resolve()), "source_sha256": result.source_sha256, "rows": result.rows,
                "flagged": result.flagged, "threshold": result.threshold, "threshold_rule": result.threshold_rule,
                "model": meta.get("model"), "model_fingerprint": meta.get("model_fingerprint"),
                "layer": meta.get("layer"), "token": meta.get("token"), "k": k_of(result.detector)})
        if out:
            outputs.publish(tmp_out, out)
        if save_detector:
            result.detector.save(save_detector)
    finally:
        bar.close()
        Path(tmp_out).unlink(missing_ok=True)
    e = result.embed
    if shard is not None:
        lo, hi = result.extra["row_range"]
        tau_from_rows = rule.kind != "value" if rule else det is None or det.threshold is None
        click.echo(f"shard {shard}: rows {lo}..{hi - 1}" + ("; τ from this shard's rows only" if tau_from_rows else ""))
    click.echo(
        f"scored {result.rows} rows in {result.seconds:.1f} s ({result.rows_per_second:.1f} rows/s; "
        f"{e.computed} embedded, {e.rows - e.computed} from cache)"
    )
    truncation_notice(e.truncated, meta)
    click.echo(
        f"{layers_phrase(meta)}, token {meta.get('token')}, k={k_of(result.detector)}"
        f"{', ' + meta['variant'] if meta.get('variant') else ''}{anchors_phrase(meta)}; "
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


def truncation_notice(n: int, meta: dict) -> None:
    """One line when rows were cut at the token cap (the run goes on; ``--overlong error`` refuses instead)."""
    if n:
        what = "prompts lost their middle" if meta.get("token") == "prompt-end" else "rows lost their end"
        click.echo(f"note: {n} rows were over --max-tokens {meta.get('max_tokens')} and were truncated ({what}; "
                   "recorded in the detector as overlong=truncate)", err=True)
