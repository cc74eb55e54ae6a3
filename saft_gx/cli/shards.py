"""``saft-gx merge-stats``: one detector from the fit statistics of several shards (or machines)."""

from __future__ import annotations

import click

from ..shards import detector_from_stats, merge_stats
from .score import fit_options, k_of


@click.command("merge-stats")
@click.argument("stats", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write the detector into.")
@fit_options
@click.option("--threshold", type=float,
              help="τ to store in the detector. Without it each shard's `score` picks τ from its own rows.")
@click.option("--partial", is_flag=True, help="Fit even when some shards of a dataset are missing.")
def merge_stats_command(stats: tuple[str, ...], output: str, k: int | None, weighting: str | None, anchors: bool,
                        adapt: bool, threshold: float | None, partial: bool) -> None:
    """Sum the statistics written by `saft-gx fit --shard i/n --stats-out DIR` and fit one detector, exactly
    as `saft-gx fit --no-adapt` would on all their rows (no model needed: the anchors' vectors travel in the
    statistics). Adapting the probe to the data needs a pass over the rows, which merged statistics do not
    allow: the merged detector is the anchors' probe as it is (recorded in its metadata).

    saft-gx merge-stats stats_0/ stats_1/ stats_2/ stats_3/ -o detector/
    """
    total, metas, anchor_vectors = merge_stats(stats, partial=partial)
    det = detector_from_stats(total, metas, k=k, weighting=weighting, anchors=anchors, anchor_vectors=anchor_vectors,
                              threshold=threshold, adapt=adapt)
    det.save(output)
    click.echo(f"merged {len(metas)} statistics ({total.n} rows) at layer {det.meta.get('layer')}, "
               f"token {det.meta.get('token')}, k={k_of(det)}, {det.meta.get('variant')}")
    click.echo(f"detector {det.detector_id} written to {output}")


COMMANDS = [merge_stats_command]
