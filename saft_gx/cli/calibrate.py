"""``saft-gx calibrate`` and ``saft-gx report``."""

from __future__ import annotations

from pathlib import Path

import click

from .. import pipeline
from ..core import defaults
from ..detect.calibrate import DEFAULT_KS, DEFAULT_VARIANTS
from ..core.errors import SaftError
from ..io.readers import open_dataset
from .options import Progress, column_options, column_opts, embed_options, embed_opts


def parse_layers(text: str | None, single: int | None, num_layers: int) -> list[int]:
    """``none`` (default: the stack alone), ``all``, ``a-b``, ``a,b,c`` or a mix: the candidate single layers,
    checked against the model."""
    if single is not None and text:
        raise SaftError("give --layer or --layers, not both")
    if single is not None:
        text = str(single)
    if not text or text == "none":
        return []
    if text == "all":
        return list(range(1, num_layers + 1))
    out: set[int] = set()
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise SaftError(f"--layers {text!r}: use all, a range like 8-20, or a list like 10,12,15") from None
    bad = [layer for layer in sorted(out) if not 1 <= layer <= num_layers]
    if bad or not out:
        raise SaftError(f"--layers {text!r}: this model has layers 1..{num_layers}")
    return sorted(out)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise SaftError(f"{what} {text!r}: a comma-separated list of integers") from None
    if not vals or min(vals) < 1:
        raise SaftError(f"{what} {text!r}: positive integers")
    return vals


def parse_stack(text: str, layers: list[int], num_layers: int) -> list[tuple[int, ...]]:
    """``auto``, ``none`` or a list of layers: the stacks (layers read side by side) calibrate tries. ``auto``: the
    default stack, alone when no single layer is a candidate, else only when all its layers are candidates."""
    text = (text or "auto").strip().lower()
    if text == "none":
        return []
    if text == "auto":
        auto = defaults.stack_for(num_layers)
        return [auto] if len(auto) > 1 and (not layers or set(auto) <= set(layers)) else []
    stack = _ints(text, "--stack")
    if len(stack) < 2:
        raise SaftError(f"--stack {text!r}: name at least two layers (one layer is a --layers candidate)")
    if max(stack) > num_layers:
        raise SaftError(f"--stack {text!r}: this model has layers 1..{num_layers}")
    return [stack]


@click.command()
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="Labels file (parquet/csv/jsonl) with id,label (or row_id,label; 1 = harmful). "
                   "Without it, the dataset's own --label-column is used.")
@click.option("--label-column", default="label", show_default=True, help="Column holding the 0/1 labels.")
@click.option("--id-column", help="Column matching labels to rows (default: id when both files have it, else row_id).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write the detector into.")
@click.option("--layers", "layers_text", help="Candidate single layers: none (default: the stack alone), all, a range "
              "8-20 or a list 10,12,15. Every layer read is captured in one forward pass and cached.")
@click.option("--stack", "stack_text", default="auto", show_default=True,
              help="Layers read side by side as one more candidate (probe-full / probe-fused only): a list like 12,18,24, "
                   "none, or auto: layers 12,18,24 of 30 (scaled to the model); alone by default, beside --layers "
                   "when all three are among them.")
@click.option("--tokens", "tokens_text", help="Candidate token positions, comma-separated (default: --token, else "
              f"{defaults.TOKEN}, the measured best). Each one costs a forward pass.")
@click.option("--ks", default=",".join(map(str, DEFAULT_KS)),
              show_default=True, help="Candidate numbers of directions.")
@click.option("--variants", help="Candidate scoring variants, comma-separated: saft, saft-sigma, saft-whiten, direct, "
              "probe, probe-full, probe-fused (default: probe-fused, or probe-full with --no-anchors: the measured best "
              f"with ~100 labels; all of them: {','.join(DEFAULT_VARIANTS)}).")
@click.option("--anchors/--no-anchors", default=True, show_default=True,
              help="Also train orientation/direction on the built-in anchors, and fit the default detector as "
                   "probe-fused's prior (never used to judge or for τ).")
@click.option("--target-fpr", type=float, help="τ: at most this false-positive rate on the labelled benign rows.")
@click.option("--target-recall", type=float, help="τ: at least this recall on the labelled harmful rows.")
@click.option("--remove-fraction", type=float, help="τ: flag this fraction of the dataset.")
@column_options
@embed_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(dataset: str, labels_path: str | None, label_column: str, id_column: str | None, output: str,
              layers_text: str | None, stack_text: str, tokens_text: str | None, ks: str, variants: str | None, anchors: bool,
              target_fpr: float | None, target_recall: float | None, remove_fraction: float | None, quiet: bool,
              **kw) -> None:
    """Choose layer, token position, k, variant, orientation and τ for DATASET from a few labelled rows
    (about 100 is plenty), and write the detector. Use it with `saft-gx score DATASET --detector DIR`.

    By default: one candidate, the measured best with ~100 labels — a logistic probe on layers 12, 18 and 24
    side by side, blended with the default detector (probe-fused). --layers/--variants widen the search.

    τ is the best-F1 threshold unless you name a target false-positive rate, recall, or removal fraction."""
    from ..detect import calibrate as cal_mod
    from .. import labelled

    eopts, copts = embed_opts(kw), column_opts(kw)
    target = cal_mod.target_from_options(target_fpr, target_recall, remove_fraction)
    variant_list = (tuple(v.strip() for v in variants.split(",") if v.strip()) if variants
                    else ("probe-fused",) if anchors else ("probe-full",))
    ds = open_dataset(dataset)
    spec = copts.resolve(ds)
    labels = (labelled.labels_from_file(labels_path, ds, id_column=id_column, label_column=label_column)
              if labels_path else labelled.labels_from_column(ds, label_column))
    session = pipeline.Session(pipeline.EmbedOptions(**{**eopts.__dict__, "layer": None}))
    layers = parse_layers(layers_text, eopts.layer, session.lm.num_layers)
    stacks = parse_stack(stack_text, layers, session.lm.num_layers)
    if not layers and not stacks:
        raise SaftError("no candidate: name --layers, or keep a --stack")
    tokens = [t.strip() for t in (tokens_text or eopts.token or defaults.TOKEN).split(",") if t.strip()]
    cal, summary = labelled.calibrate_dataset(session, ds, spec, labels, layers=layers, tokens=tokens, stacks=stacks,
                                             ks=_ints(ks, "--ks"), variants=variant_list, anchors=anchors, target=target,
                                             progress=lambda total, desc: Progress(total, desc, quiet))
    det = cal.detector
    det.save(output)
    c = cal.chosen
    deepest = max([*layers, *(max(st) for st in stacks)])
    click.echo(f"{summary.rows // len(tokens)} rows x {len(tokens)} token position(s), the model run to layer {deepest} "
               f"({summary.computed} embedded, {summary.rows - summary.computed} from cache); "
               f"candidates: {len(layers)} single layer(s){''.join(f' + stack {cal_mod.layer_label(st)}' for st in stacks)} "
               f"x {', '.join(variant_list)}; "
               f"{len(labels.rows)} labelled "
               f"({int(labels.labels.sum())} harmful){' + built-in anchors' if anchors else ''}")
    for tok, d in cal.by_layer().items():
        best = sorted(d.items(), key=lambda kv: -kv[1])[:5]
        click.echo(f"best out-of-fold AUROC by layer [{tok}]: " + ", ".join(f"{layer}: {a:.3f}" for layer, a in best))
    for name, a in cal.by_stack().items():
        click.echo(f"best out-of-fold AUROC of stack [{name}]: {a:.3f}")
    e = cal.expected
    click.echo(f"chosen: layer {cal_mod.layer_label(c.layer)}, token {c.token}, {c.variant}, k={c.k} (out-of-fold AUROC {c.auroc:.3f}); "
               f"τ = {cal.threshold:.6g} ({target.describe()}): precision {e['precision']:.2f}, recall {e['recall']:.2f}, "
               f"F1 {e['f1']:.2f}, FPR {e['fpr']:.2f} out of fold")
    click.echo(f"detector {det.detector_id} written to {output}")


@click.command()
@click.option("--db", type=click.Path(dir_okay=False), help="DuckDB file written by `saft-gx score`.")
@click.option("--table", help="Table in --db.")
@click.option("--detector-id", help="Which detector's scores (default: the table's latest run).")
@click.option("--scored", type=click.Path(dir_okay=False), help="Or: a scored parquet from `saft-gx score --out`.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False), help="Labels file (id,label or row_id,label).")
@click.option("--label-column", default="label", show_default=True, help="Label column (in --labels, or in the scores).")
@click.option("--id-column", help="Column matching labels to rows (default: id when both have it, else row_id).")
@click.option("--detector", "detector_dir", type=click.Path(file_okay=False),
              help="The detector folder: τ, chosen layer and the calibration's AUROC by layer.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder for index.html and PNGs.")
@click.option("--top", type=int, default=20, show_default=True, help="Highest-scoring rows to list.")
def report(db: str | None, table: str | None, detector_id: str | None, scored: str | None, labels_path: str | None,
           label_column: str, id_column: str | None, detector_dir: str | None, output: str, top: int) -> None:
    """Write an HTML report (score histograms with τ, ROC and precision/recall curves, AUROC by layer, the top
    rows) from a DuckDB table or a scored parquet."""
    from .. import report as rep

    if bool(scored) == bool(db):
        raise SaftError("give --scored FILE, or --db FILE with --table")
    if top < 1:
        raise SaftError("--top must be at least 1")
    if scored:
        data = rep.load_parquet(scored, labels_path=labels_path, label_column=label_column, id_column=id_column, top=top)
    else:
        if not table:
            raise SaftError("--db needs --table")
        data = rep.load_duckdb(db, table, detector_id=detector_id, labels_path=labels_path, label_column=label_column,
                               id_column=id_column, top=top)
    if detector_dir:
        rep.add_detector(data, detector_dir)
    path = rep.write_report(data, output, top=top)
    pngs = sorted(p.name for p in Path(output).glob("*.png"))
    click.echo(f"wrote {path} ({len(pngs)} plots: {', '.join(pngs)})")
    if data.labels is not None and (data.labels >= 0).any():
        y = data.labels
        click.echo(f"{int((y >= 0).sum())} labelled rows ({int((y == 1).sum())} harmful)")


COMMANDS = [calibrate, report]
