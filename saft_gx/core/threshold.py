"""Choosing τ: rows with score > τ are flagged as harmful.

Users think in different units, so τ can come from an absolute value, a fraction of rows to remove, an
expected contamination rate, or (with labels) a target F1 / false-positive rate / recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SaftError

DEFAULT_CONTAMINATION = 0.1  # the low end of the paper's 0.1–0.3 range


@dataclass(frozen=True)
class ThresholdRule:
    """kind: ``value`` (τ itself), ``remove_fraction`` (flag the top q of rows) or ``contamination``
    (flag the expected fraction λ of harmful rows; the same quantile rule, named for how users think)."""

    kind: str
    value: float

    def describe(self) -> str:
        return {"value": f"τ = {self.value:g}", "remove_fraction": f"remove the top {self.value:.1%}",
                "contamination": f"contamination {self.value:.1%}"}[self.kind]


def rule_from_options(threshold: float | None = None, remove_fraction: float | None = None,
                      contamination: float | None = None) -> ThresholdRule | None:
    given = [(k, v) for k, v in (("value", threshold), ("remove_fraction", remove_fraction),
                                 ("contamination", contamination)) if v is not None]
    if len(given) > 1:
        raise SaftError("give only one of --threshold, --remove-fraction, --contamination")
    if not given:
        return None
    kind, value = given[0]
    if kind != "value" and not 0.0 <= value <= 1.0:
        raise SaftError(f"--{kind.replace('_', '-')} {value}: must be between 0 and 1")
    if kind == "value" and not np.isfinite(value):
        raise SaftError("--threshold must be a finite number")
    return ThresholdRule(kind, float(value))


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """τ such that ``scores > τ`` flags round(fraction·n) rows (fewer only where scores tie at τ)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise SaftError("no scores to choose a threshold from")
    m = int(round(fraction * s.size))
    if m >= s.size:
        return float(np.nextafter(s[-1], -np.inf))
    return float(s[m])


def resolve(rule: ThresholdRule, scores: np.ndarray) -> float:
    if rule.kind == "value":
        return rule.value
    return top_fraction_threshold(scores, rule.value)


# ---- from labels (calibration) ----

def _check_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape:
        raise SaftError("scores and labels differ in length")
    if y.all() or not y.any():
        raise SaftError("labels hold only one class; need both harmful (1) and benign (0) rows")
    return s, y


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(τ, F1) maximising F1 of ``scores > τ`` against labels (1 = harmful)."""
    s, y = _check_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    k = np.arange(1, s.size + 1)
    # only cut between distinct scores
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    f1 = np.where(last_of_tie, 2 * tp / (k + y.sum()), -1.0)
    i = int(np.argmax(f1))
    tau = float(s_sorted[i + 1]) if i + 1 < s.size else float(np.nextafter(s_sorted[i], -np.inf))
    # put τ halfway to the next lower score so unseen rows near the boundary split evenly
    if i + 1 < s.size:
        tau = float((s_sorted[i] + s_sorted[i + 1]) / 2)
    return tau, float(f1[i])


def fpr_threshold(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> float:
    """Smallest τ whose false-positive rate on the benign rows is at most ``target_fpr``."""
    s, y = _check_labels(scores, labels)
    benign = np.sort(s[~y])[::-1]
    allowed = int(np.floor(target_fpr * benign.size))
    return float(benign[allowed]) if allowed < benign.size else float(np.nextafter(benign[-1], -np.inf))


def recall_threshold(scores: np.ndarray, labels: np.ndarray, target_recall: float) -> float:
    """Largest τ that still flags at least ``target_recall`` of the harmful rows."""
    s, y = _check_labels(scores, labels)
    harmful = np.sort(s[y])[::-1]
    need = max(1, int(np.ceil(target_recall * harmful.size)))
    return float(np.nextafter(harmful[need - 1], -np.inf))
