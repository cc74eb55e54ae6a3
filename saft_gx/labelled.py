"""Labelled rows: reading label files, embedding the labelled rows and the built-in anchors, and running the
calibration search (``saft_gx.detect.calibrate``, pure NumPy) over a dataset. The file/model side of calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import pipeline
from .core import defaults
from .detect.anchors import anchor_rows, fit_default
from .io.cache import EmbeddingCache
from .detect.calibrate import (DEFAULT_FOLDS, DEFAULT_KS, DEFAULT_VARIANTS, Calibration, Key, ThresholdTarget, calibrate,
                               prior_in)
from .embedding.embed import EmbedConfig, Embedder
from .core.errors import SaftError
from .core.subspace import Detector, MomentStats

# ---- labels from files ----

LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "harmful": 1, "benign": 0, "unsafe": 1, "safe": 0,
               "yes": 1, "no": 0}


def parse_labels(values: Any, what: str = "label") -> np.ndarray:
    """0/1 labels from ints, bools or words (harmful/benign, unsafe/safe, true/false, yes/no)."""
    out = np.empty(len(values), dtype=np.int8)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            raise SaftError(f"{what} {i}: empty label; drop the row or label it 0 (benign) or 1 (harmful)")
        key = str(int(v)) if isinstance(v, (bool, np.bool_, int, np.integer)) or (isinstance(v, float) and v.is_integer()) \
            else str(v).strip().lower()
        if key not in LABEL_WORDS:
            raise SaftError(f"{what} {i}: label {v!r} is not 0/1, true/false or harmful/benign")
        out[i] = LABEL_WORDS[key]
    return out


@dataclass
class Labels:
    """Labelled rows of a dataset: 0-based row positions and 0/1 labels (1 = harmful)."""

    rows: np.ndarray
    labels: np.ndarray
    source: str

    def check_two_classes(self) -> None:
        if self.labels.all() or not self.labels.any():
            cls = "harmful (1)" if self.labels.all() else "benign (0)"
            raise SaftError(f"{self.source}: every labelled row is {cls}; label both harmful and benign rows")


def read_table(path: str) -> Any:
    import pandas as pd

    from .io.readers import open_dataset

    ds = open_dataset(path)
    return pd.concat([df for _, df in ds.frames()], ignore_index=True)


def labels_from_file(labels_path: str, dataset: Any, *, id_column: str | None = None,
                     label_column: str = "label") -> Labels:
    """Match a labels file (``id,label``, or ``row_id,label``) to the rows of ``dataset`` (a readers.Dataset).

    The id column is ``--id-column``, else ``id`` when both files have it, else ``row_id`` (0-based row
    positions of the dataset). Unknown or repeated ids, empty labels and a single class are errors."""
    lab = read_table(labels_path)
    if label_column not in lab.columns:
        raise SaftError(f"{labels_path}: no {label_column!r} column (it has: {', '.join(map(str, lab.columns))})")
    if id_column is None:
        if "id" in lab.columns and "id" in dataset.columns:
            id_column = "id"
        elif "row_id" in lab.columns:
            id_column = "row_id"
        elif "id" in lab.columns:
            id_column = "row_id"
            lab = lab.rename(columns={"id": "row_id"})
        else:
            raise SaftError(f"{labels_path}: need an id column (id, row_id or --id-column) beside {label_column!r}")
    if id_column not in lab.columns:
        raise SaftError(f"{labels_path}: no {id_column!r} column (it has: {', '.join(map(str, lab.columns))})")
    y = parse_labels(lab[label_column].tolist(), f"{labels_path}: row")
    ids = lab[id_column].tolist()
    dup = lab[id_column][lab[id_column].duplicated()].tolist()
    if dup:
        raise SaftError(f"{labels_path}: id {dup[0]!r} is labelled more than once")
    if id_column == "row_id" and id_column not in dataset.columns:
        try:
            pos = np.array([int(i) for i in ids], dtype=np.int64)
        except (TypeError, ValueError):
            raise SaftError(f"{labels_path}: row_id values must be integers (0-based row positions)") from None
        n = dataset.num_rows if dataset.num_rows is not None else sum(len(df) for _, df in dataset.frames([dataset.columns[0]]))
        unknown = [int(p) for p in pos if not 0 <= p < n]
        if unknown:
            raise SaftError(f"{labels_path}: {len(unknown)} unknown row_id(s), e.g. {unknown[:3]}; "
                            f"{dataset.path.name} has rows 0..{n - 1}")
    else:
        if id_column not in dataset.columns:
            raise SaftError(f"{dataset.path.name} has no {id_column!r} column to match the labels' ids against")
        want = {_norm_id(i): j for j, i in enumerate(ids)}
        pos = np.full(len(ids), -1, dtype=np.int64)
        for first, df in dataset.frames([id_column]):
            for r, v in enumerate(df[id_column].tolist()):
                j = want.get(_norm_id(v))
                if j is not None:
                    if pos[j] >= 0:
                        raise SaftError(f"{dataset.path.name}: id {v!r} appears on more than one row")
                    pos[j] = first + r
        unknown = [ids[j] for j in np.flatnonzero(pos < 0)]
        if unknown:
            raise SaftError(f"{labels_path}: {len(unknown)} id(s) not found in {dataset.path.name}'s {id_column!r} "
                            f"column, e.g. {', '.join(map(repr, unknown[:3]))}")
    out = Labels(rows=pos, labels=y, source=str(labels_path))
    out.check_two_classes()
    return out


def labels_from_column(dataset: Any, label_column: str) -> Labels:
    """Labelled rows of a dataset with its own label column (empty cells = unlabelled)."""
    if label_column not in dataset.columns:
        raise SaftError(f"{dataset.path.name}: no {label_column!r} column")
    rows, vals = [], []
    for first, df in dataset.frames([label_column]):
        for r, v in enumerate(df[label_column].tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
                continue
            rows.append(first + r)
            vals.append(v)
    if not rows:
        raise SaftError(f"{dataset.path.name}: the {label_column!r} column is empty")
    out = Labels(rows=np.array(rows, dtype=np.int64), labels=parse_labels(vals, f"{dataset.path.name}: labelled row"),
                 source=f"{dataset.path.name}:{label_column}")
    out.check_two_classes()
    return out


def _norm_id(v: Any) -> Any:
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return str(v)


# ---- a dataset on disk: embed every candidate layer in one pass, through the cache ----

def row_keys_at(ds: Any, spec: Any, positions: np.ndarray) -> list[str]:
    """Content keys of the dataset's rows at 0-based ``positions`` (in that order), streaming the file."""
    from .embedding.rows import rows_from_frame

    want = {int(p): i for i, p in enumerate(positions)}
    keys: list[str | None] = [None] * len(positions)
    for first, df in ds.frames(spec.columns):
        hit = [p for p in range(first, first + len(df)) if p in want]
        if hit:
            rows = rows_from_frame(df.iloc[[p - first for p in hit]], spec, hit[0])
            for p, r in zip(hit, rows):
                keys[want[p]] = r.content_key()
    if any(k is None for k in keys):
        raise SaftError("some labelled rows are past the end of the dataset")
    return keys  # type: ignore[return-value]


def calibrate_dataset(session: Any, ds: Any, spec: Any, labels: Labels, *, layers: list[int], tokens: list[str],
                      ks: tuple[int, ...] = DEFAULT_KS, variants: tuple[str, ...] = DEFAULT_VARIANTS,
                      anchors: bool = True, target: ThresholdTarget = ThresholdTarget(), folds: int = DEFAULT_FOLDS,
                      stacks: Sequence[tuple[int, ...]] = (),
                      progress: Callable[[int | None, str], Any] | None = None) -> tuple[Calibration, Any]:
    """Embed ``ds`` once per token position, capturing every layer it reads in one forward pass (cached per
    layer), then ``calibrate`` over (``layers`` and ``stacks``) × ``tokens``. With the anchors,
    the default detector (on the default stack of layers, adapted to ``ds``) is fitted too, as the prior of
    ``probe-fused``. Returns (calibration, embed summary)."""

    lm, base_cfg = session.lm, session.config
    fused = anchors and "probe-fused" in variants
    default_stack = defaults.stack_for(lm.num_layers)  # the default detector's layers: probe-fused's prior
    # the layers read (candidates, stacks, the default detector's), all in one forward pass up to the deepest;
    # the others are not stored (24 layers would be 28 KB a row in the cache)
    captured = tuple(sorted({*layers, *(layer for st in stacks for layer in st), *(default_stack if fused else ())}))
    stacked = list(dict.fromkeys([*stacks, *([default_stack] if fused and len(default_stack) > 1 else [])]))
    stats: dict[Key, MomentStats] = {}
    labelled: dict[Key, np.ndarray] = {}
    anchor_x: dict[Key, np.ndarray] = {}
    caches: dict[str, Any] = {}
    total = pipeline.EmbedSummary()
    lab_rows = labels.rows
    ya = None
    priors: dict[Key, np.ndarray] = {}
    for token in tokens:
        cfg = EmbedConfig(layers=captured, token=token, max_tokens=base_cfg.max_tokens, overlong=base_cfg.overlong,
                          batch_tokens=base_cfg.batch_tokens, max_batch_rows=base_cfg.max_batch_rows)
        embedder = Embedder(lm, cfg)
        cache = EmbeddingCache(session.cache.root, model_fingerprint=lm.fingerprint, token=token,
                               max_tokens=cfg.max_tokens, overlong=cfg.overlong, dim=lm.hidden_size)
        caches[token] = cache
        st: dict[int | tuple[int, ...], MomentStats] = {layer: MomentStats(lm.hidden_size) for layer in captured}
        st.update({stack: MomentStats(lm.hidden_size * len(stack)) for stack in stacked})
        bar = progress(ds.num_rows, f"embedding ({token})") if progress else None
        try:
            summary = pipeline.embed_dataset(ds, spec, embedder, cache, stats=st, progress=bar or (lambda n: None))
        finally:
            if bar is not None:
                bar.close()
        total.rows, total.computed = total.rows + summary.rows, total.computed + summary.computed
        total.truncated += summary.truncated
        if int(lab_rows.max()) >= summary.rows:
            raise SaftError(f"labelled row {int(lab_rows.max())} is past the end of the dataset ({summary.rows} rows)")
        keys = row_keys_at(ds, spec, lab_rows)
        if anchors:
            rows_a, ya = anchor_rows()
            akeys = pipeline.embed_into_cache(embedder, cache, rows_a)
        for layer in layers:
            stats[(token, layer)] = st[layer]
            labelled[(token, layer)] = cache.layer(layer).get(keys)
            if anchors:
                anchor_x[(token, layer)] = cache.layer(layer).get(akeys)
        for stack in stacks:
            stats[(token, stack)] = st[stack]
            labelled[(token, stack)] = pipeline.stacked(cache, stack, keys)
            if anchors:
                anchor_x[(token, stack)] = pipeline.stacked(cache, stack, akeys)
        if fused:
            dkey = default_stack if len(default_stack) > 1 else default_stack[0]
            dmeta = pipeline.embedding_meta(lm, default_stack, token, cfg.max_tokens, cfg.overlong)
            prior = fit_default(st[dkey], meta=dmeta,
                                anchor_vectors=lambda: pipeline.stacked(cache, default_stack, akeys),
                                data_coords=lambda d: pipeline.coords_cached(ds, spec, cache, d, default_stack),
                                data_rows=lambda idx: pipeline.rows_cached(ds, spec, cache, default_stack, idx),
                                adapt=session.adapt).direction()
            for key in stats:
                w = prior_in(key[1], prior, default_stack) if key[0] == token else None
                if w is not None:
                    priors[key] = w
    meta = session.detector_meta(ds, spec)
    meta.pop("subspace_layer", None)  # the default detector's; a calibrated one reads all its layers
    meta["labels"] = labels.source

    def data_scores(det: Detector, key: Key) -> np.ndarray:
        return pipeline.score_cached(ds, spec, caches[key[0]], det, key[1])

    cal = calibrate(stats, labelled, labels.labels, anchors=anchor_x if anchors else None, anchor_labels=ya, ks=ks,
                    variants=variants, target=target, folds=folds, meta=meta, data_scores=data_scores,
                    priors=priors or None)
    return cal, total
