"""``saft-gx audit sample | estimate | import``: a small labelled sample turns the score threshold into a bound on
the harmful rate of the rows that ship (the statistics: ``saft_gx.core.audit``; the files: ``saft_gx.io.audit_io``)."""

from __future__ import annotations

import json
from typing import Any

import click

from ..core.errors import SaftError

scored_options = [
    click.argument("scored", required=False, type=click.Path(dir_okay=False)),
    click.option("--db", type=click.Path(dir_okay=False), help="Read the scores from this DuckDB file instead of SCORED."),
    click.option("--table", help="With --db: the scored table."),
    click.option("--detector-id", help="Which detector's scores, when the table holds several."),
]


def with_scored(f: Any) -> Any:
    for d in reversed(scored_options):
        f = d(f)
    return f


def _kept(scored: Any, threshold: float | None) -> Any:
    df = scored.frame
    if threshold is None:
        return ~df["harm_flag"].to_numpy(dtype=bool)
    return df["harm_score"].to_numpy() <= threshold


@click.group()
def audit() -> None:
    """Audit a stratified sample by hand and bound the harmful rate of the rows that ship."""


@audit.command()
@with_scored
@click.option("-n", "n", type=int, default=200, show_default=True, help="Rows to sample for labelling.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Audit file to write (.csv or .jsonl).")
@click.option("--threshold", type=float, help="τ separating kept from removed rows (default: the scored harm_flag).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the sample.")
def sample(scored: str | None, db: str | None, table: str | None, detector_id: str | None, n: int, output: str,
           threshold: float | None, seed: int) -> None:
    """Draw a stratified random sample of scored rows for labelling.

    Strata cover the score range: four below τ (far below to just below), two above; every stratum gets
    some rows, the rows above and just below τ more than their share. Fill the ``label`` column with
    1 (harmful) or 0 (benign) for every row, then run ``saft-gx audit estimate``.

    saft-gx audit sample scored.parquet -n 200 -o audit.csv
    """
    from ..core import audit as stats
    from ..io import audit_io

    data = audit_io.read_scored(scored, db=db, table=table, detector_id=detector_id, with_text=True)
    kept = _kept(data, threshold)
    smp = stats.draw_sample(data.frame["harm_score"].to_numpy(), ~kept, n, seed=seed)
    frame = audit_io.sample_frame(data, smp)
    audit_io.write_audit(frame, output)
    if "label" in data.text_columns:
        click.echo("note: the data's own 'label' column is left out of the audit file", err=True)
    per = ", ".join(f"{int(k)}/{int(s)}" for k, s in zip(smp.stratum_sampled, smp.stratum_rows))
    click.echo(f"sampled {len(smp.rows)} of {len(data.frame)} rows ({int(kept.sum())} kept, {int((~kept).sum())} removed) "
               f"in {smp.strata.count} strata (sampled/rows, lowest scores first: {per})")
    click.echo(f"wrote {output}: fill 'label' with 1 (harmful) or 0 (benign) on every row, then "
               f"saft-gx audit estimate {scored or f'--db {db} --table {table}'} --labels {output}")


@audit.command()
@with_scored
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="The labelled audit file (default with --db: the labels last imported for the table).")
@click.option("--threshold", type=float, help="τ: rows with harm_score ≤ τ ship (default: the scored harm_flag).")
@click.option("--target-residual", type=float, help="Also find the largest τ whose upper bound on the kept rows' harmful rate is ≤ this.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Level of each one-sided bound.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(scored: str | None, db: str | None, table: str | None, detector_id: str | None, labels_path: str | None,
             threshold: float | None, target_residual: float | None, confidence: float, as_json: bool) -> None:
    """Estimate the harmful rate of the kept, removed and all rows, with confidence bounds, from a labelled sample.

    saft-gx audit estimate scored.parquet --labels audit.csv --target-residual 0.01
    """
    from ..io import audit_io

    data = audit_io.read_scored(scored, db=db, table=table, detector_id=detector_id)
    if labels_path:
        labels = audit_io.read_audit(labels_path)
    elif db:
        from ..io.audit_store import load_labels

        labels = load_labels(db, table or "", data.detector_id)
    else:
        raise SaftError("give --labels (the labelled audit file), or --db to use the labels imported there")
    df = data.frame
    m = audit_io.match(labels, df["row_id"].to_numpy(), df["text_sha256"].to_numpy(), df["harm_score"].to_numpy(),
                       detector_id=data.detector_id)
    est = audit_io.estimate(m, _kept(data, threshold), confidence=confidence)
    out = est.to_dict()
    out["threshold"] = threshold
    if target_residual is not None:
        tau, at = audit_io.target_threshold(m, target_residual, confidence=confidence)
        out["target_residual"] = {"max_rate": target_residual, "threshold": tau,
                                  "kept": at.kept.to_dict() if at is not None else None}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(describe(est, threshold))
    if target_residual is not None:
        t = out["target_residual"]
        if t["threshold"] is None:
            click.echo(f"no τ keeps the upper bound on the kept rows' harmful rate at or below {target_residual:.2%}")
        else:
            k = t["kept"]
            click.echo(f"largest τ with upper bound ≤ {target_residual:.2%}: τ = {t['threshold']:.6g} (keeps {k['rows']} rows, "
                       f"harmful rate {k['rate']:.2%}, upper bound {k['upper']:.2%})")


def describe(est: Any, threshold: float | None = None) -> str:
    conf = f"{est.confidence:.0%}"
    where = f"τ = {threshold:.6g}" if threshold is not None else "the scored τ (harm_flag)"
    lines = [f"{est.labels} labels ({est.harmful_labels} harmful); rows kept at {where}; one-sided {conf} bounds"]
    for name in ("kept", "removed", "all"):
        b = getattr(est, name)
        rate = "-" if b.rate is None else f"{b.rate:.2%}"
        lines.append(f"  harmful rate, {name:<7} ({b.rows} rows): {rate}  [{b.lower:.2%}, {b.upper:.2%}]")
    for name in ("recall", "precision"):
        b = getattr(est, name)
        rate = "-" if b.rate is None else f"{b.rate:.1%}"
        lines.append(f"  {name:<9}: {rate}  [{b.lower:.1%}, {b.upper:.1%}]")
    k = est.kept
    lines.append(f"with {conf} confidence at most {k.upper:.2%} of the {k.rows} kept rows are harmful")
    return "\n".join(lines)


@audit.command("import")
@click.argument("labels_path", type=click.Path(dir_okay=False))
@click.option("--db", required=True, type=click.Path(dir_okay=False), help="DuckDB file holding the scores.")
@click.option("--table", required=True, help="The scored table the sample was drawn from.")
@click.option("--detector-id", help="Which detector's scores, when the table holds several.")
@click.option("--labeller", help="Who labelled (default: the file's labeller column, else $USER).")
def import_(labels_path: str, db: str, table: str, detector_id: str | None, labeller: str | None) -> None:
    """Check a labelled audit file against the scored table and store it in saft_audit_labels."""
    from ..io import audit_io
    from ..io.audit_store import TABLE, store_labels

    data = audit_io.read_scored(None, db=db, table=table, detector_id=detector_id)
    labels = audit_io.read_audit(labels_path)
    df = data.frame
    audit_io.match(labels, df["row_id"].to_numpy(), df["text_sha256"].to_numpy(), df["harm_score"].to_numpy(),
                   detector_id=data.detector_id)
    n = store_labels(db, table, labels, detector_id=data.detector_id, labeller=labeller)
    click.echo(f"stored {n} labels ({int(labels.labels.sum())} harmful) in {db}, table {TABLE}, for {table} "
               f"(detector {data.detector_id})")


COMMANDS = [audit]
