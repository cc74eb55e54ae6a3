"""Calibration: choose layer, token position, k, scoring variant, orientation and τ from a few labels.

Plain SAFT is unsupervised, and its top directions can be a topic (cooking vs code) rather than harm. A
few labelled rows — the user's, or the built-in anchors (``saft_gx.detect.anchors``) — settle what unsupervised
statistics cannot: which layer separates, whether "far out" means harmful, and which direction *inside*
the unsupervised subspace is the harmful one.

Variants (each is a ``Detector`` option; the subspace itself is always fitted on the unlabelled data):

- ``saft``: the paper's score, mean squared projection on the top-k directions, oriented by the labels;
- ``saft-sigma`` / ``saft-whiten``: the same with σ-weighted or whitened (Mahalanobis) directions;
- ``probe``: a ridge-regularised logistic regression on the labelled rows' coordinates in the top-k subspace
  (``saft_gx.core.probe``); the score is a probability of harm, so a τ chosen on one dataset means the same on
  another. Labelled sources (the user's rows, the anchors) and both classes get equal total weight.
- ``direct``: a signed direction inside the top-k subspace: w_j = Δ_j / (λ_j + α·λ̄), where Δ is the
  difference of the labelled harmful and benign means in the subspace's coordinates and λ_j the data's
  variance along v_j (LDA with the data's covariance, shrunk towards the mean difference). Scaled so the
  data's scores have mean 0 and standard deviation 1: a score is "data standard deviations towards harm".
- ``probe-full``: the logistic probe on every dimension of the hidden state (each standardised), from the
  user's rows alone. With ~100 labels it reads harm the top-k subspace misses (measured in
  tests/bench/detection.py); ``k`` does not apply (reported as the embedding size).
- ``probe-fused``: ``probe-full`` blended with the default detector (the built-in anchors' probe adapted to this
  dataset, which knows harm the 100 labels never showed): score = 0.25·z(default) + 0.75·z(probe-full), each
  logit in the data's standard deviations. Both are linear, so the blend is one direction.

A candidate reads one layer, or several side by side (a *stack*, e.g. layers 12+18+24: the vectors are
concatenated); stacks are tried with the full-space variants only.

Candidates are compared by the AUROC of out-of-fold scores on the labelled rows (stratified folds; the
anchors, when added, only ever train). τ is chosen on the same out-of-fold scores, so it is not fitted to
the rows it is judged on. Everything here is NumPy over arrays; reading label files and embedding the
labelled rows is ``saft_gx.labelled``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..core.errors import SaftError
from ..core.metrics import auroc, precision_recall_f1
from ..core.probe import fit_logistic
from ..core.subspace import Detector, MomentStats
from ..core.threshold import best_f1_threshold, fpr_threshold, recall_threshold, top_fraction_threshold

VARIANTS = ("saft", "saft-sigma", "saft-whiten", "direct", "probe", "probe-full", "probe-fused")
FULL_SPACE = ("probe-full", "probe-fused")  # variants that read every dimension of the hidden state, not the top-k subspace
DEFAULT_VARIANTS = VARIANTS
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
PROBE_C = 0.1  # inverse ridge strength on standardised coordinates; measured in tests/bench/detection.py
DEFAULT_SHRINK = 0.1  # α in w_j = Δ_j / (λ_j + α·λ̄); measured in tests/bench/detection.py
# weight of the default detector in ``probe-fused``; chosen on the development half (exploring 0.25 and 0.5: 0.5 did better
# with ~10 harmful labels, worse with 20+: once there are a few dozen, the labels deserve most of the say)
FUSE_PRIOR_WEIGHT = 0.25
DEFAULT_FOLDS = 5
TARGETS = ("f1", "fpr", "recall", "remove_fraction")
ANCHOR_THRESHOLD_RULE = "best F1 on the built-in anchors (out of fold)"

Key = tuple  # (token position, layer): an int, or a tuple of layers read side by side (a stack)


def layer_label(layer: int | tuple[int, ...]) -> str:
    return "+".join(map(str, layer)) if isinstance(layer, tuple) else str(layer)


# ---- the variants ----

def top(det: Detector, k: int) -> Detector:
    """The detector restricted to its first ``k`` directions (squared, unweighted, unoriented)."""
    if k > det.k:
        raise SaftError(f"k={k}: the fitted subspace has only {det.k} directions")
    return det.with_(components=det.components[:k], singular_values=det.singular_values[:k], weighting="none",
                     form="squared", coef=None, orientation=1, threshold=None)


def direct_coef(det: Detector, x: np.ndarray, y: np.ndarray, *, groups: np.ndarray | None = None,
                shrink: float = DEFAULT_SHRINK) -> np.ndarray:
    """Signed weights of the ``direct`` variant from labelled vectors ``x`` (m, d) and labels ``y``.

    ``groups`` names the source of each row (the user's labels, the built-in anchors). The class-mean
    difference is taken *within* each source and averaged (weights n₁n₀/(n₁+n₀)), so a difference between
    the sources — anchors are short chat rows, a dataset may be long documents — never leaks into the
    direction just because the sources hold different shares of harmful rows."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise SaftError("labels hold only one class; need both harmful (1) and benign (0) rows")
    p = (np.asarray(x, dtype=np.float64) - det.mean) @ det.components.T
    g = np.zeros(len(y), dtype=np.int64) if groups is None else np.asarray(groups)
    delta, total = np.zeros(p.shape[1]), 0.0
    for grp in np.unique(g):
        m = g == grp
        n1, n0 = int((y & m).sum()), int((~y & m).sum())
        if n1 and n0:
            wgt = n1 * n0 / (n1 + n0)
            delta += wgt * (p[y & m].mean(axis=0) - p[~y & m].mean(axis=0))
            total += wgt
    if total == 0:  # no source holds both classes: fall back to the pooled means
        delta, total = p[y].mean(axis=0) - p[~y].mean(axis=0), 1.0
    delta /= total
    n = max(int(det.meta.get("n", 1)), 1)
    lam = det.singular_values**2 / n  # the data's variance along each direction
    w = delta / (lam + shrink * max(float(lam.mean()), 1e-300))
    scale = float(np.sqrt(np.sum(w**2 * lam)))
    return w / scale if scale > 0 else w


def fit_variant(base: Detector, variant: str, k: int, x: np.ndarray | None = None, y: np.ndarray | None = None, *,
                groups: np.ndarray | None = None, shrink: float = DEFAULT_SHRINK,
                prior: np.ndarray | None = None, data_cov: np.ndarray | None = None) -> Detector:
    """The ``variant`` detector on the first ``k`` directions of ``base`` (fitted unsupervised on the data),
    oriented / directed by the labelled vectors ``x`` with labels ``y`` (1 = harmful) when given.

    ``probe-full`` ignores ``k`` and the subspace: a logistic probe on every dimension of the hidden state
    (each standardised), fitted on the user's rows only (group 0 of ``groups``; the anchors, group 1, are left
    out: with 100 labels they pull the direction away from the user's data — tests/bench/detection.py). It is
    stored as a one-direction linear detector: v = β/‖β‖, weight ‖β‖.

    ``probe-fused`` needs ``prior`` (the default detector's logit direction in this space) and ``data_cov`` (the
    data's covariance, to put both logits in data standard deviations)."""
    if variant == "probe-fused":
        if prior is None or data_cov is None:
            raise SaftError("the probe-fused variant needs the default detector's direction and the data's covariance")
        full = fit_variant(base, "probe-full", k, x, y, groups=groups)
        beta = full.components[0] * float(full.coef[0])  # type: ignore[index]
        w = FUSE_PRIOR_WEIGHT * per_data_sd(prior, data_cov) + (1 - FUSE_PRIOR_WEIGHT) * per_data_sd(beta, data_cov)
        return one_direction(base, w, threshold=None)
    if variant == "probe-full":
        if x is None or y is None:
            raise SaftError("the probe-full variant needs labelled rows")
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y)
        if groups is not None and (np.asarray(groups) == 0).any():
            own = np.asarray(groups) == 0
            x, y = x[own], y[own]
        fit = fit_logistic(x - base.mean, y, c=PROBE_C, sample_weight=balanced_weights(y))
        return one_direction(base, fit.coef, intercept=fit.intercept, link="logistic", threshold=None)
    det = top(base, k)
    if variant == "probe":
        if x is None or y is None:
            raise SaftError("the probe variant needs labelled rows or the built-in anchors")
        p = (np.asarray(x, dtype=np.float64) - det.mean) @ det.components.T
        fit = fit_logistic(p, y, c=PROBE_C, sample_weight=balanced_weights(y, groups))
        return det.with_(form="linear", coef=fit.coef, intercept=fit.intercept, link="logistic")
    if variant == "direct":
        if x is None or y is None:
            raise SaftError("the direct variant needs labelled rows or the built-in anchors")
        return det.with_(form="linear", coef=direct_coef(det, x, y, groups=groups, shrink=shrink))
    weighting = {"saft": "none", "saft-sigma": "sigma", "saft-whiten": "whiten"}.get(variant)
    if weighting is None:
        raise SaftError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    det = det.with_(weighting=weighting)
    if x is not None and y is not None:
        det = orient(det, x, y)
    return det


def one_direction(det: Detector, w: np.ndarray, *, scale: float = 1.0, intercept: float = 0.0,
                  link: str = "identity", **changes: Any) -> Detector:
    """``det`` (its mean) reading one direction: score = link(scale·⟨x − μ, w⟩ + intercept), stored as the unit
    vector w/‖w‖ with weight scale·‖w‖ (the full-space probes and the blends are all of this form). Neighbours
    ``det`` lent its rows are dropped: their scores were ``det``'s, not this direction's."""
    norm = float(np.linalg.norm(w)) or 1.0
    return det.with_(components=(w / norm)[None, :], singular_values=np.zeros(1), weighting="none", form="linear",
                     coef=np.array([scale * norm]), intercept=float(intercept), link=link, orientation=1,
                     **{"neighbours": None, **changes})


def prior_in(key_layer: int | tuple[int, ...], direction: np.ndarray, at_layers: int | tuple[int, ...]) -> np.ndarray | None:
    """``direction`` (a detector's, reading ``at_layers``: one layer or a stack) placed in the space of a candidate
    reading ``key_layer`` (one layer or a stack): each layer's block where the candidate reads that layer, zeros on
    the candidate's other layers; None when the candidate does not read every layer of ``at_layers``."""
    where = key_layer if isinstance(key_layer, tuple) else (key_layer,)
    at = at_layers if isinstance(at_layers, tuple) else (at_layers,)
    if not set(at) <= set(where):
        return None
    d = len(direction) // len(at)
    w = np.zeros(d * len(where))
    for j, layer in enumerate(at):
        i = where.index(layer)
        w[i * d : (i + 1) * d] = direction[j * d : (j + 1) * d]
    return w


def per_data_sd(w: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``w`` scaled so that ⟨x, w⟩ has standard deviation 1 over the data."""
    sd = float(np.sqrt(max(w @ cov @ w, 0.0)))
    return w / sd if sd > 0 else w


def balanced_weights(y: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Row weights giving every (source, class) cell the same total: 100 user labels count as much as
    thousands of anchors, and a 10 %-harmful label set does not teach the probe a 10 % prior."""
    y = np.asarray(y).astype(bool)
    g = np.zeros(len(y), dtype=np.int64) if groups is None else np.asarray(groups)
    w = np.zeros(len(y))
    cells = [(grp, cls) for grp in np.unique(g) for cls in (True, False) if ((g == grp) & (y == cls)).any()]
    for grp, cls in cells:
        m = (g == grp) & (y == cls)
        w[m] = 1.0 / m.sum()
    return w * len(y) / w.sum()


def orient(det: Detector, x: np.ndarray, y: np.ndarray) -> Detector:
    """Flip the detector when the labelled harmful rows score *lower* than the benign ones."""
    a = auroc(det.with_(orientation=1).score(x), y)
    return det.with_(orientation=1 if a >= 0.5 else -1)


def _stack(x: np.ndarray, y: np.ndarray, xe: np.ndarray | None,
           ye: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The user's labelled rows (group 0) and the extra ones, the anchors (group 1)."""
    if xe is None or ye is None or len(ye) == 0:
        return x, y, np.zeros(len(y), dtype=np.int64)
    return np.vstack([x, xe]), np.r_[y, ye], np.r_[np.zeros(len(y), dtype=np.int64), np.ones(len(ye), dtype=np.int64)]


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every row, each class spread evenly over the folds."""
    y = np.asarray(y).astype(bool)
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    offset = 0
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(y == cls))
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return out


def oof_scores(base: Detector, variant: str, k: int, x: np.ndarray, y: np.ndarray, *, fold_of: np.ndarray,
               x_extra: np.ndarray | None = None, y_extra: np.ndarray | None = None,
               shrink: float = DEFAULT_SHRINK, **fit_kw: Any) -> np.ndarray:
    """Out-of-fold scores of the labelled rows: each fold scored by a detector directed/oriented without it.
    Scores of different folds share one scale (squared variants only change orientation; ``direct`` scores
    are in data standard deviations)."""
    s = np.empty(len(y), dtype=np.float64)
    for f in np.unique(fold_of):
        test = fold_of == f
        xt, yt, gt = _stack(x[~test], y[~test], x_extra, y_extra)
        if yt.all() or not yt.any():
            raise SaftError("a calibration fold holds only one class; label more rows of the rarer class")
        s[test] = fit_variant(base, variant, k, xt, yt, groups=gt, shrink=shrink, **fit_kw).score(x[test])
    return s


def dprime(scores: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y).astype(bool)
    a, b = scores[y], scores[~y]
    sd = np.sqrt((a.var() + b.var()) / 2)
    return float((a.mean() - b.mean()) / sd) if sd > 0 else float("inf") * np.sign(a.mean() - b.mean())


# ---- thresholds ----

@dataclass(frozen=True)
class ThresholdTarget:
    """How τ is chosen: ``f1`` (best F1 on the labelled rows), ``fpr`` (at most this false-positive rate on
    the labelled benign rows), ``recall`` (at least this recall on the labelled harmful rows) or
    ``remove_fraction`` (flag this fraction of the dataset)."""

    kind: str = "f1"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGETS:
            raise SaftError(f"threshold target {self.kind!r}: choose one of {', '.join(TARGETS)}")
        if self.kind != "f1" and (self.value is None or not 0.0 <= self.value <= 1.0):
            raise SaftError(f"--target-{self.kind.replace('_', '-')} must be between 0 and 1")

    def describe(self) -> str:
        if self.kind == "f1":
            return "best F1 on the labelled rows"
        v = float(self.value)  # type: ignore[arg-type]
        return {"fpr": f"false-positive rate ≤ {v:.1%} on the labelled rows",
                "recall": f"recall ≥ {v:.1%} on the labelled rows",
                "remove_fraction": f"remove the top {v:.1%} of the dataset"}[self.kind]


def target_from_options(target_fpr: float | None = None, target_recall: float | None = None,
                        remove_fraction: float | None = None) -> ThresholdTarget:
    given = [(k, v) for k, v in (("fpr", target_fpr), ("recall", target_recall), ("remove_fraction", remove_fraction))
             if v is not None]
    if len(given) > 1:
        raise SaftError("give only one of --target-fpr, --target-recall, --remove-fraction (default: best F1)")
    return ThresholdTarget(*given[0]) if given else ThresholdTarget("f1")


def choose_threshold(target: ThresholdTarget, scores: np.ndarray, labels: np.ndarray,
                     data_scores: np.ndarray | None = None) -> float:
    if target.kind == "f1":
        return best_f1_threshold(scores, labels)[0]
    if target.kind == "fpr":
        return fpr_threshold(scores, labels, float(target.value))
    if target.kind == "recall":
        return recall_threshold(scores, labels, float(target.value))
    if data_scores is None:
        raise SaftError("--remove-fraction needs the dataset's scores")
    return top_fraction_threshold(data_scores, float(target.value))


def rates(scores: np.ndarray, labels: np.ndarray, tau: float) -> dict[str, float]:
    y = np.asarray(labels).astype(bool)
    flags = np.asarray(scores) > tau
    p, r, f1 = precision_recall_f1(flags, y)
    fpr = float(flags[~y].mean()) if (~y).any() else float("nan")
    return {"precision": p, "recall": r, "f1": f1, "fpr": fpr}


# ---- the search ----

@dataclass(frozen=True)
class Trial:
    token: str
    layer: int | tuple[int, ...]
    variant: str
    k: int
    auroc: float
    dprime: float

    def rank(self) -> tuple:
        # AUROC first (rounded: differences in the 4th digit are one row in a hundred labels), then the
        # separation margin, then the simpler detector
        return (round(self.auroc, 3), round(self.dprime, 2), -self.k)


@dataclass
class Calibration:
    detector: Detector
    chosen: Trial
    trials: list[Trial]
    oof: np.ndarray  # out-of-fold scores of the labelled rows under the chosen candidate
    labels: np.ndarray
    threshold: float
    target: ThresholdTarget
    expected: dict[str, float] = field(default_factory=dict)  # precision/recall/F1/FPR of the oof scores at τ

    def by_layer(self) -> dict[str, dict[int, float]]:
        """Best out-of-fold AUROC per token position and layer (over variants and k)."""
        out: dict[str, dict[int, float]] = {}
        for t in self.trials:
            if isinstance(t.layer, tuple):
                continue
            d = out.setdefault(t.token, {})
            d[t.layer] = max(d.get(t.layer, 0.0), t.auroc)
        return out

    def by_stack(self) -> dict[str, float]:
        """Best out-of-fold AUROC per stack of layers ("token 12+18+24")."""
        out: dict[str, float] = {}
        for t in self.trials:
            if isinstance(t.layer, tuple):
                name = f"{t.token} {layer_label(t.layer)}"
                out[name] = max(out.get(name, 0.0), t.auroc)
        return out

    def summary(self) -> dict[str, Any]:
        c = self.chosen
        y = np.asarray(self.labels).astype(bool)
        return {
            "labelled_rows": int(len(y)), "labelled_harmful": int(y.sum()),
            "token": c.token, "layer": layer_label(c.layer) if isinstance(c.layer, tuple) else c.layer,
            "variant": c.variant, "k": c.k,
            "cv_auroc": round(c.auroc, 4), "threshold_rule": self.target.describe(),
            "expected_at_threshold": {k: round(v, 4) for k, v in self.expected.items()},
            "auroc_by_layer": {tok: {str(layer): round(a, 4) for layer, a in sorted(d.items())}
                               for tok, d in self.by_layer().items()},
            **({"auroc_by_stack": {n: round(a, 4) for n, a in self.by_stack().items()}} if self.by_stack() else {}),
        }


def calibrate(stats: Mapping[Key, MomentStats], labelled: Mapping[Key, np.ndarray], labels: np.ndarray, *,
              anchors: Mapping[Key, np.ndarray] | None = None, anchor_labels: np.ndarray | None = None,
              ks: tuple[int, ...] = DEFAULT_KS, variants: tuple[str, ...] = DEFAULT_VARIANTS,
              target: ThresholdTarget = ThresholdTarget(), folds: int = DEFAULT_FOLDS, seed: int = 0,
              shrink: float = DEFAULT_SHRINK, meta: Mapping[str, Any] | None = None,
              data_scores: Callable[[Detector, Key], np.ndarray] | None = None,
              priors: Mapping[Key, np.ndarray] | None = None) -> Calibration:
    """Search every (token, layer) in ``stats`` × ``variants`` × ``ks`` and return the best detector.

    stats: unlabelled statistics of the whole dataset per (token, layer); the subspaces are fitted on them.
        A key's layer may be a tuple (a stack: the vectors of those layers side by side); stacks are tried with
        the full-space variants only.
    labelled: (m, d) vectors of the labelled rows per (token, layer), in the order of ``labels``.
    anchors / anchor_labels: extra labelled vectors (the built-in anchors) used only for training the
        orientation / direction, never for judging a candidate or choosing τ.
    data_scores: scores of the whole dataset under a detector, needed only for ``remove_fraction``.
    priors: per key, the default detector's logit direction in that key's space (fitted without the labels);
        ``probe-fused`` is tried only where there is one.
    """
    y = np.asarray(labels).astype(np.int8)
    yb = y.astype(bool)
    if y.ndim != 1 or len(y) == 0:
        raise SaftError("no labelled rows")
    if yb.all() or not yb.any():
        raise SaftError("labels hold only one class; need both harmful (1) and benign (0) rows")
    minority = int(min(yb.sum(), (~yb).sum()))
    if minority < 2:
        raise SaftError(f"only {minority} labelled row of one class; label at least 2 harmful and 2 benign rows")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SaftError(f"variant {bad[0]!r}: choose from {', '.join(VARIANTS)}")
    if not stats:
        raise SaftError("no candidate layers")
    fold_of = stratified_folds(yb, min(folds, minority), seed)
    ya = None if anchor_labels is None else np.asarray(anchor_labels).astype(np.int8)

    trials: list[Trial] = []
    bases: dict[Key, Detector] = {}
    best: tuple[tuple, Trial, np.ndarray] | None = None
    fit_kw: dict[Key, dict[str, Any]] = {}
    # single layers first, in numeric order (ties keep the shallower layer, as before stacks), then stacks
    for key in sorted(stats, key=lambda kk: (kk[0], isinstance(kk[1], tuple),
                                             kk[1] if isinstance(kk[1], tuple) else (kk[1],))):
        st = stats[key]
        kmax = min(max(ks), st.dim, st.n - 1)
        base = Detector.fit(st, k=kmax)
        bases[key] = base
        prior = None if priors is None else priors.get(key)
        fit_kw[key] = {} if prior is None or "probe-fused" not in variants else {
            "prior": np.asarray(prior, dtype=np.float64), "data_cov": st.covariance()}
        key_variants = [v for v in variants if (v in FULL_SPACE or not isinstance(key[1], tuple))
                        and (v != "probe-fused" or fit_kw[key])]
        x = np.asarray(labelled[key], dtype=np.float64)
        if x.shape[0] != len(y):
            raise SaftError(f"{len(y)} labels but {x.shape[0]} labelled vectors at {key}")
        xa = None if anchors is None else np.asarray(anchors[key], dtype=np.float64)
        for variant in key_variants:
            for k in ([st.dim] if variant in FULL_SPACE else sorted({min(k, kmax) for k in ks})):
                s = oof_scores(base, variant, k, x, y, fold_of=fold_of, x_extra=xa, y_extra=ya, shrink=shrink,
                               **(fit_kw[key] if variant == "probe-fused" else {}))
                t = Trial(key[0], key[1], variant, k, auroc(s, y), dprime(s, y))
                trials.append(t)
                if best is None or t.rank() > best[0]:
                    best = (t.rank(), t, s)
    if best is None:
        raise SaftError("no candidate to try: probe-fused needs the built-in anchors' detector (drop --no-anchors) "
                        "and a candidate that reads its layers")
    _, chosen, oof = best
    key = (chosen.token, chosen.layer)
    xa = None if anchors is None else np.asarray(anchors[key], dtype=np.float64)
    xt, yt, gt = _stack(np.asarray(labelled[key], dtype=np.float64), y, xa, ya)
    det = fit_variant(bases[key], chosen.variant, chosen.k, xt, yt, groups=gt, shrink=shrink,
                      **(fit_kw[key] if chosen.variant == "probe-fused" else {}))
    if chosen.variant not in ("direct", "probe", *FULL_SPACE) and det.orientation != fit_variant(bases[key], chosen.variant, chosen.k, labelled[key], y).orientation:
        # the anchors and the user's labels disagree on the orientation: the user's rows win
        det = det.with_(orientation=-det.orientation)
    tau = choose_threshold(target, oof, y, data_scores(det, key) if target.kind == "remove_fraction" and data_scores else None)
    cal = Calibration(detector=det, chosen=chosen, trials=trials, oof=oof, labels=y, threshold=tau, target=target,
                      expected=rates(oof, y, tau))
    m = dict(meta or {})
    stack = chosen.layer if isinstance(chosen.layer, tuple) else None
    m.pop("layers", None)
    m.update({"layer": max(stack) if stack else chosen.layer, **({"layers": list(stack)} if stack else {}),
              "token": chosen.token, "variant": chosen.variant,
              "threshold_rule": f"{target.describe()} (saft-gx calibrate)",
              "calibration": {**cal.summary(), "anchors_added": anchors is not None, "folds": int(fold_of.max() + 1),
                              "shrink": shrink}})
    cal.detector = det.with_(threshold=tau, meta={**det.meta, **m})
    return cal


def anchor_detector(base: Detector, x_anchor: np.ndarray, y_anchor: np.ndarray, *, variant: str = "direct", k: int,
                    shrink: float = DEFAULT_SHRINK, folds: int = DEFAULT_FOLDS,
                    probability_threshold: float | None = None) -> Detector:
    """The default detector without user labels: the unsupervised subspace of the data, oriented and
    directed by the built-in anchors. τ: for ``probe``, ``probability_threshold`` (a probability means the same
    on every dataset); otherwise the best F1 on the anchors' *out-of-fold* scores (in-sample scores of a
    direction fitted on the same rows overstate the gap between the classes).
    Records what the anchors chose in ``meta["anchors"]``."""
    k = min(k, base.k)
    y = np.asarray(y_anchor).astype(np.int8)
    det = fit_variant(base, variant, k, x_anchor, y, shrink=shrink)
    fold_of = stratified_folds(y.astype(bool), min(folds, int(min(y.sum(), (1 - y).sum()))))
    oof = oof_scores(base, variant, k, np.asarray(x_anchor, dtype=np.float64), y, fold_of=fold_of, shrink=shrink)
    if variant == "probe" and probability_threshold is not None:
        tau, rule = float(probability_threshold), f"probability of harm > {probability_threshold:g} (built-in anchors' probe)"
    else:
        tau, _ = best_f1_threshold(oof, y)
        rule = ANCHOR_THRESHOLD_RULE
    return det.with_(threshold=tau, meta={
        **det.meta, "variant": variant, "threshold_rule": rule,
        "anchors": {"rows": int(len(y)), "harmful": int(y.sum()), "variant": variant, "k": int(k),
                    "anchor_auroc_out_of_fold": round(float(auroc(oof, y)), 4)}})
