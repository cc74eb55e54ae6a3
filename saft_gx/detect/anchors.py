"""The built-in anchors: a labelled set shipped with the package, and the default detector fitted with them.

``saft_gx/data/anchors.jsonl.gz`` holds harmful and benign (prompt, response) rows written by the saft_gx team
(CC0-1.0; sources and counts in data_src/README.md, built by data_src/build_anchors.py): many harm categories
and benign domains, one line to thousands of characters, code, role-play / fiction / translation /
long-context framings on *both* classes, some non-English. Harmful rows pair a harmful request with a
compliant-sounding but non-operational answer. None of them is an evaluation row of the detection benchmark.

Without user labels, ``saft-gx score`` embeds the anchors like the data (same model, layer, token position and
cache) and fits the ``probe`` variant (``saft_gx.detect.calibrate``): a logistic regression on the anchors'
coordinates in the data's own top-k SAFT subspace. Its score is a probability of harm, so the default τ is a
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


_SQUARED = {"none": "saft", "sigma": "saft-sigma", "whiten": "saft-whiten"}


def fit_default(stats: MomentStats, *, k: int | None = None, weighting: str | None = None, anchors: bool = USE_ANCHORS,
                anchor_vectors: Callable[[], np.ndarray] | None = None, anchor_labels: np.ndarray | None = None,
                meta: dict[str, Any] | None = None) -> Detector:
    """The detector ``saft-gx score`` fits on an unlabelled dataset.

    With anchors (the default): the ``probe`` variant in the data's top-k subspace, τ a probability — or the
    squared SAFT score with ``weighting``, oriented by the anchors, when a weighting is named.
    ``anchor_vectors()`` returns the anchors' embeddings at the same model, layer and token position;
    ``anchor_labels`` their labels (default: the built-in anchors').
    Without anchors: plain SAFT (the paper's score, k = ``defaults.PLAIN_K`` unless given). ``k`` is capped at rows − 1 and
    the embedding size when it was not given explicitly."""
    meta = dict(meta or {})
    if not anchors:
        return Detector.fit(stats, k=k or defaults.PLAIN_K, weighting=weighting or "none", meta={**meta, "variant": "saft",
                                                                                        "anchors": None})
    if anchor_vectors is None:
        raise SaftError("the built-in anchors need the model to embed them; pass --no-anchors")
    kk = k if k is not None else min(defaults.K, stats.dim, max(stats.n - 1, 1))
    variant = defaults.VARIANT if weighting is None else _SQUARED[weighting]
    base = Detector.fit(stats, k=kk, meta=meta)
    y = anchor_rows()[1] if anchor_labels is None else np.asarray(anchor_labels)
    return anchor_detector(base, anchor_vectors(), y, variant=variant, k=kk,
                           probability_threshold=defaults.PROBABILITY_THRESHOLD)
