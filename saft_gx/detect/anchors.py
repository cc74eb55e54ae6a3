"""The built-in anchors: a labelled set shipped with the package, and the default detector fitted with them.

``saft_gx/data/anchors.jsonl.gz`` holds harmful and benign (prompt, response) rows written by the saft_gx team
(CC0-1.0; sources and counts in data_src/README.md, built by data_src/build_anchors.py): many harm categories
and benign domains, one line to thousands of characters, code, role-play / fiction / translation /
long-context framings on *both* classes, some non-English. Harmful rows pair a harmful request with a
compliant-sounding but non-operational answer. None of them is an evaluation row of the detection benchmark.

Without user labels, ``saft-gx score`` embeds the anchors like the data (same model, layers, token position and
cache) and fits the ``probe`` variant (``saft_gx.detect.calibrate``): a logistic regression on the anchors'
coordinates in the data's own top-k SAFT subspace (of one layer of the stack the default reads), adapted to
the data and blended with a probe on the whole stacked state. Its score is a probability of harm, so the default τ is a
probability and means the same on every dataset. Pure: no model, no files besides the package's own data.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import numpy as np

from ..core import defaults
from .adapt import adapt_probe, adapt_whole_state, benign_rows, lend_neighbours, reference_rows
from .blend import ArrayStore, blend_full_probe
from .calibrate import anchor_detector
from ..core.errors import SaftError
from ..embedding.rows import Row
from ..core.subspace import Detector, MomentStats

ANCHORS_FILE = "anchors.jsonl.gz"
ANCHORS_LICENSE = "CC0-1.0"

USE_ANCHORS = True  # `saft-gx score` / `fit` without labels; --no-anchors turns it off


def load_anchor_records() -> list[dict]:
    """The anchor rows as dicts: prompt, response, label (1 = harmful), category, framing, lang, source."""
    return [dict(r) for r in _records()]


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    raw = resources.files("saft_gx").joinpath("data", ANCHORS_FILE).read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def anchor_rows() -> tuple[list[Row], np.ndarray]:
    """(rows, labels) of the built-in anchors, formatted like prompt/response dataset rows."""
    recs = load_anchor_records()
    rows = [Row(messages=(("user", r["prompt"]), ("assistant", r["response"]))) for r in recs]
    return rows, np.array([int(r["label"]) for r in recs], dtype=np.int8)


def subspace_columns(meta: dict[str, Any] | None, dim: int) -> tuple[int, int] | None:
    """The columns (start, stop) of ``dim``-wide stacked vectors holding ``meta["subspace_layer"]`` of
    ``meta["layers"]``; None when the vectors are one layer or no subspace layer is named."""
    meta = meta or {}
    layers, sub = meta.get("layers"), meta.get("subspace_layer")
    if not layers or len(layers) < 2 or sub is None:
        return None
    if sub not in layers or dim % len(layers):
        raise SaftError(f"subspace layer {sub} is not one of the {dim}-wide stack of layers {layers}")
    width = dim // len(layers)
    i = list(layers).index(sub)
    return i * width, (i + 1) * width


_SQUARED = {"none": "saft", "sigma": "saft-sigma", "whiten": "saft-whiten"}


def fit_default(stats: MomentStats, *, k: int | None = None, weighting: str | None = None, anchors: bool = USE_ANCHORS,
                anchor_vectors: Callable[[], np.ndarray] | None = None, anchor_labels: np.ndarray | None = None,
                meta: dict[str, Any] | None = None,
                data_coords: Callable[[Detector], np.ndarray] | None = None, adapt: bool = defaults.ADAPT,
                probe_store: ArrayStore | None = None,
                data_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> Detector:
    """The detector ``saft-gx score`` fits on an unlabelled dataset.

    With anchors (the default): the ``probe`` variant in the data's top-k subspace (of the vectors, or, when they
    are several layers side by side, of layer ``meta["subspace_layer"]`` of ``meta["layers"]``: ``subspace_columns``),
    τ a probability — or the
    squared SAFT score with ``weighting``, oriented by the anchors, when a weighting is named.
    ``anchor_vectors()`` returns the anchors' embeddings at the same model, layer and token position;
    ``anchor_labels`` their labels (default: the built-in anchors').
    ``data_coords(det)`` returns the dataset's (n, k) coordinates in ``det``'s subspace (one more pass over the
    rows); with it and ``adapt``, the probe is adapted to the data (``adapt.adapt_probe``) when the data has at
    least ``defaults.ADAPT_MIN_ROWS`` rows. ``meta["adapted"]`` says whether and why not. The probe is then blended
    with a probe on the anchors' whole hidden state (``blend.blend_full_probe``; ``defaults.BLEND_WEIGHT`` 0: not),
    and, given ``data_rows(idx)`` (the vectors of rows ``idx``), the blend is adapted to the data's least suspicious
    rows in the whole state (``adapt.adapt_whole_state``; ``meta["adapted_whole"]``), and each row whose nearest data
    rows score low is lowered (``adapt.lend_neighbours``; ``meta["neighbours"]``).
    ``probe_store`` keeps the anchors' whole-state probes between runs (``blend.anchor_probes``).
    Without anchors: plain SAFT (the paper's score, k = ``defaults.PLAIN_K`` unless given). ``k`` is capped at rows − 1 and
    the embedding size when it was not given explicitly."""
    meta = dict(meta or {})
    if not anchors:
        return Detector.fit(stats, k=k or defaults.PLAIN_K, weighting=weighting or "none", meta={**meta, "variant": "saft",
                                                                                        "anchors": None})
    if anchor_vectors is None:
        raise SaftError("the built-in anchors need the model to embed them; pass --no-anchors")
    cols = subspace_columns(meta, stats.dim)
    kk = k if k is not None else min(defaults.K, stats.dim, max(stats.n - 1, 1))
    variant = defaults.VARIANT if weighting is None else _SQUARED[weighting]
    if cols is None:
        base = Detector.fit(stats, k=kk, meta=meta)
    else:  # a stack: the subspace is one layer's, read from the stacked vectors
        base = Detector.fit(stats.columns(*cols), k=kk, meta=meta).widened(stats.mean, cols[0])
    y = anchor_rows()[1] if anchor_labels is None else np.asarray(anchor_labels)
    xa = anchor_vectors()
    det = anchor_detector(base, xa, y, variant=variant, k=kk, probability_threshold=defaults.PROBABILITY_THRESHOLD)
    why_not = (None if variant == "probe" and adapt and data_coords is not None and stats.n >= defaults.ADAPT_MIN_ROWS
               else "--no-adapt" if not adapt
               else f"variant {variant}" if variant != "probe"
               else "fitted from statistics alone, without a pass over the rows" if data_coords is None
               else f"{stats.n} rows, fewer than {defaults.ADAPT_MIN_ROWS}")
    if why_not is not None:
        det = det.with_(meta={**det.meta, "adapted": False, "adapted_why_not": why_not})
    else:
        det = adapt_probe(det, data_coords(det), det.project(xa), y)
    if variant == "probe" and defaults.BLEND_WEIGHT > 0:
        det = blend_full_probe(det, stats, xa, y, weight=defaults.BLEND_WEIGHT, c=defaults.BLEND_C, store=probe_store)
        if why_not is None and data_rows is not None and (defaults.ADAPT_WHOLE or defaults.NEIGHBOURS):
            s = data_coords(det)[:, 0]
            want = np.union1d(benign_rows(s) if defaults.ADAPT_WHOLE else [],
                              reference_rows(s) if defaults.NEIGHBOURS else []).astype(np.int64)
            got = np.asarray(data_rows(want))  # one pass over the rows for both steps

            def rows(idx: np.ndarray) -> np.ndarray:
                at = np.minimum(np.searchsorted(want, idx), len(want) - 1)
                if not np.array_equal(want[at], idx):  # a step asking for rows not read above would get others
                    raise SaftError("fit_default: a whole-state step asked for rows that were not read")
                return got[at]

            if defaults.ADAPT_WHOLE:
                det = adapt_whole_state(det, stats, s, rows, xa, y)
            if defaults.NEIGHBOURS:
                det = lend_neighbours(det, stats, s, rows, xa, y, down_only=defaults.NEIGHBOURS_DOWN_ONLY)
        det = det.with_(meta={"adapted_whole": False, "neighbours": False, **det.meta})
    return det
