"""The built-in anchors: a small labelled set shipped with the package.

``saft_gx/data/anchors.jsonl`` holds 24 harmful and 24 benign (prompt, response) rows written by the saft_gx
team (CC0-1.0, see data_src/README.md). Harmful rows pair a harmful request with a compliant-sounding but
non-operational answer. They are never evaluation rows of the detection benchmark.

Without user labels, ``saft-gx score`` embeds the anchors with the same model, layer, token position and
cache as the data, and uses them to orient the unsupervised subspace and to pick the direction in it that
separates harm from benign (see ``calibrate.anchor_direct``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Callable

import numpy as np

from .errors import SaftError
from .rows import Row
from .subspace import Detector, MomentStats

ANCHORS_FILE = "anchors.jsonl"
ANCHORS_LICENSE = "CC0-1.0"


def load_anchor_records() -> list[dict]:
    """The anchor rows as dicts: id, prompt, response, label (1 = harmful), category."""
    text = resources.files("saft_gx").joinpath("data", ANCHORS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def anchor_rows() -> tuple[list[Row], np.ndarray]:
    """(rows, labels) of the built-in anchors, formatted like prompt/response dataset rows."""
    recs = load_anchor_records()
    rows = [Row(messages=(("user", r["prompt"]), ("assistant", r["response"]))) for r in recs]
    return rows, np.array([int(r["label"]) for r in recs], dtype=np.int8)


# The default detector: measured on SmolLM2-135M-Instruct with tests/bench/detection.py --explore (see
# tests/bench/README.md). With the anchors, mean pooling at layer 19 of 30 and k = 64 directions is best
# (AUROC 0.98-0.99 on every mix); plain SAFT (--no-anchors) keeps the pipeline's own DEFAULT_* layer/token/k.
DEFAULT_VARIANT = "direct"
DEFAULT_K = 64
DEFAULT_TOKEN = "mean"
DEFAULT_LAYER_FRACTION = 19 / 30
USE_ANCHORS = True  # `saft-gx score` / `fit` without labels; --no-anchors turns it off


def default_layer(num_layers: int) -> int:
    """The anchored default detector's layer for a model with ``num_layers`` decoder layers."""
    return max(1, min(num_layers, round(DEFAULT_LAYER_FRACTION * num_layers)))

_SQUARED = {"none": "saft", "sigma": "saft-sigma", "whiten": "saft-whiten"}


def fit_default(stats: MomentStats, *, k: int | None = None, weighting: str | None = None, anchors: bool = USE_ANCHORS,
                anchor_vectors: Callable[[], np.ndarray] | None = None, meta: dict[str, Any] | None = None) -> Detector:
    """The detector ``saft-gx score`` fits on an unlabelled dataset.

    With anchors (the default): the top-k subspace of the data, directed by the built-in anchors — the
    ``direct`` variant, or the squared SAFT score with ``weighting`` oriented by them when a weighting is named.
    ``anchor_vectors()`` returns the anchors' embeddings at the same model, layer and token position.
    Without anchors: plain SAFT (the paper's score, k = 1 unless given). ``k`` is capped at rows − 1 and the
    embedding size when it was not given explicitly."""
    from .calibrate import anchor_detector
    from .pipeline import DEFAULT_K as PLAIN_K

    meta = dict(meta or {})
    if not anchors:
        return Detector.fit(stats, k=k or PLAIN_K, weighting=weighting or "none", meta={**meta, "variant": "saft",
                                                                                         "anchors": None})
    if anchor_vectors is None:
        raise SaftError("the built-in anchors need the model to embed them; pass --no-anchors")
    kk = k if k is not None else min(DEFAULT_K, stats.dim, max(stats.n - 1, 1))
    variant = DEFAULT_VARIANT if weighting is None else _SQUARED[weighting]
    base = Detector.fit(stats, k=kk, meta=meta)
    _rows, y = anchor_rows()
    # τ: the score that separates the anchors best, out of fold (measured: F1 ≈ 0.85 at every contamination
    # 0.1–0.3, where a fixed "flag 10 %" rule swings from 0.95 to 0.5); --threshold etc. override it
    return anchor_detector(base, anchor_vectors(), y, variant=variant, k=kk)


def fit_with_session(session: Any, stats: MomentStats, *, k: int | None = None, weighting: str | None = None,
                     anchors: bool = USE_ANCHORS, meta: dict[str, Any] | None = None) -> Detector:
    """``fit_default`` with the anchors embedded like the data (``session_anchor_vectors``)."""
    return fit_default(stats, k=k, weighting=weighting, anchors=anchors, meta=meta,
                       anchor_vectors=lambda: session_anchor_vectors(session))


def session_anchor_vectors(session: Any) -> np.ndarray:
    """The built-in anchors embedded by ``session`` (its model, layer, token position and cache), in anchor order;
    a separate Embedder, so the session's counters keep counting dataset rows only."""
    from .calibrate import embed_into_cache
    from .embed import Embedder

    keys = embed_into_cache(Embedder(session.lm, session.config), session.cache, anchor_rows()[0])
    return session.cache.layer(session.layer).get(keys)
