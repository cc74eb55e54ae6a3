"""Every default of detection in one place (each measured with tests/bench/; see README "Detection quality").

Two detectors share the embedding machinery:
- the default (``saft-gx score`` with the built-in anchors): the prompt-end token's states at layers 12, 18 and 24
  (of 30) side by side; a logistic probe inside the data's top-k SAFT subspace of layer 18, adapted to the
  dataset by self-training, blended with a probe on the whole stacked state; τ a probability;
- plain SAFT (``--no-anchors``), the paper's unsupervised score: mean squared projection on the top-k directions
  of the last token's state.
"""

from __future__ import annotations

# the default detector (built-in anchors)
TOKEN = "prompt-end"
LAYER_FRACTION = 18 / 30  # the layer whose SAFT subspace the default probe reads
# the layers the default detector reads side by side (the whole-state probe of the blend reads all three; the
# subspace probe its LAYER_FRACTION block): on the benchmark's development half +0.012–0.016 AUROC over layer 18 alone
STACK_FRACTIONS = (12 / 30, 18 / 30, 24 / 30)
K = 32
VARIANT = "probe"
# adapting the anchors' probe to the dataset (saft_gx/detect/adapt.py), chosen on the benchmark's development half
ADAPT = True
ADAPT_TOP = 0.05  # the probe's most suspicious 5 % of the rows are taken as harmful ...
ADAPT_BOTTOM = 0.8  # ... its least suspicious 80 % as benign
ADAPT_ROUNDS = 2
ADAPT_MIN_ROWS = 500  # below this, 5 % is under 25 rows, too few to teach the probe (on our own 390-row pools
#                       adapting raised the clean rows flagged from 1.5 % to 3.5 %): the anchors' probe is kept
# blending the (adapted) probe with a probe on the whole hidden state fitted on the anchors (saft_gx/detect/blend.py)
BLEND_WEIGHT = 0.5  # the whole-state probe's share, each logit in the data's standard deviations
BLEND_C = 0.1  # its inverse ridge strength
# adapting the blend to the data's own benign rows (saft_gx/detect/adapt.py, adapt_whole_state), chosen on the
# benchmark's development half: the whole-state probe refitted on the anchors plus the blend's least suspicious
# 80 % of the rows (as benign; no row is taken as harmful, so a clean set is not pushed above τ)
ADAPT_WHOLE = True
ADAPT_WHOLE_BOTTOM = 0.8
ADAPT_WHOLE_C = 0.003  # stronger ridge than the anchors-only probe: the data's rows are many and alike
ADAPT_WHOLE_WEIGHT = 2.0  # the refitted probe's logit against the blend's, each in the data's standard deviations
ADAPT_WHOLE_ROWS = 2000  # data rows it is refitted on at most (evenly over the ranks): 2000 × 1,728 × 8 B = 28 MB
# lowering each row whose nearest data rows score low (saft_gx/core/neighbours.py, adapt.lend_neighbours): the
# mean calibrated logit of its 15 nearest rows (cosine in the data's top 32 principal directions, whitened), where
# below the data's median, lowers the row's logit by twice the gap; no row is raised. Chosen on the benchmark's
# development half among a centre at the 30th / 50th / 70th / 90th percentile, weight 2 / 4 and k 15 / 30: the
# median at weight 2 gave −0.002 to +0.02 AUROC (+0.01 to +0.02 at λ 0.2–0.3) with F1, flags and clean rates
# unchanged (higher centres ranked better at λ ≥ 0.2 but flagged fewer harmful rows). Both ways, Platt-scaled on the anchors (NEIGHBOURS_DOWN_ONLY
# False) ranked better still but shrank the probabilities, so the release gate passed contaminated sets.
# tests/bench/detection.py --no-neighbours / --neighbours-both measure the alternatives.
NEIGHBOURS = True
NEIGHBOURS_DOWN_ONLY = True
NEIGHBOURS_DIMS = 32
NEIGHBOURS_K = 15
NEIGHBOURS_WEIGHT = 2.0
NEIGHBOURS_ROWS = 2000  # the reference kept in the detector: 2,000 × 32 float64 = 0.5 MB
PROBABILITY_THRESHOLD = 0.98  # chosen on the benchmark's development half: ≤ 2 % of clean rows flagged on every draw (the
#                              release gate's budget; 0.97 flagged 2.2 % of one clean draw once the blend was adapted to the data)

# plain SAFT (--no-anchors): measured on our own rows with tests/bench/layer_sweep.py
PLAIN_TOKEN = "last"
PLAIN_LAYER_FRACTION = 6 / 30
PLAIN_K = 4


def layer_for(num_layers: int, *, anchors: bool = True) -> int:
    """The default layer (1-based) for a model with ``num_layers`` decoder layers: with the anchors, the layer whose
    subspace the default probe reads (the detector reads ``stack_for``, which holds it); without, plain SAFT's."""
    frac = LAYER_FRACTION if anchors else PLAIN_LAYER_FRACTION
    return max(1, min(num_layers, round(frac * num_layers)))


def token_for(*, anchors: bool = True) -> str:
    return TOKEN if anchors else PLAIN_TOKEN


def stack_for(num_layers: int) -> tuple[int, ...]:
    """The layers (1-based) the default detector and ``saft-gx calibrate`` read side by side; ``layer_for`` is one of
    them (``saft-gx calibrate`` measured on the development half: 100 labels at layers 12+18+24 beat any one layer)."""
    return tuple(sorted({max(1, min(num_layers, round(f * num_layers))) for f in STACK_FRACTIONS}))
