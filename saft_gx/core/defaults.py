"""Every default of detection in one place (each measured with tests/bench/; see README "Detection quality").

Two detectors share the embedding machinery:
- the default (``saft-gx score`` with the built-in anchors): a logistic probe inside the data's top-k SAFT
  subspace at the prompt-end token, τ a probability;
- plain SAFT (``--no-anchors``), the paper's unsupervised score: mean squared projection on the top-k directions
  of the last token's state.
"""

from __future__ import annotations

# the default detector (built-in anchors)
TOKEN = "prompt-end"
LAYER_FRACTION = 18 / 30
K = 32
VARIANT = "probe"
PROBABILITY_THRESHOLD = 0.9  # chosen on the benchmark's development half: ≤ 2 % of clean rows flagged (the release gate's budget)

# plain SAFT (--no-anchors): measured on our own rows with tests/bench/layer_sweep.py
PLAIN_TOKEN = "last"
PLAIN_LAYER_FRACTION = 6 / 30
PLAIN_K = 4


def layer_for(num_layers: int, *, anchors: bool = True) -> int:
    """The default layer (1-based) for a model with ``num_layers`` decoder layers."""
    frac = LAYER_FRACTION if anchors else PLAIN_LAYER_FRACTION
    return max(1, min(num_layers, round(frac * num_layers)))


def token_for(*, anchors: bool = True) -> str:
    return TOKEN if anchors else PLAIN_TOKEN
