"""Coverage and tightness of the audited release gate's bound, by simulation (no model).

A fixed synthetic population per setting: N rows, a known set of harmful rows, detector scores that
separate them weakly to strongly (harmful ~ N(d, 1), benign ~ N(0, 1)), τ removing the top 5 %. Each of
``audits`` simulated audits draws a fresh stratified sample (``saft_gx.core.audit.draw_sample``), labels it with
the truth and bounds the kept rows' harmful rate (``saft_gx.core.audit.estimate``). Coverage: how often the upper
bound is at or above the true kept rate. Tightness: the mean upper bound beside the Clopper–Pearson bound
from a simple random sample of the same size (its kept rows).

    python tests/bench/audit_coverage.py            # the full grid (a few minutes on one core)
    python tests/bench/audit_coverage.py --quick    # the settings the test suite runs
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from saft_gx.core import audit  # noqa: E402

DETECTORS = {"weak": 0.5, "medium": 2.0, "strong": 4.0}
RATES = (0.0, 0.005, 0.02, 0.10)
LABELS = (100, 200, 500)
QUICK = [("weak", 0.02, 100), ("strong", 0.005, 200), ("medium", 0.10, 500)]


@dataclass
class Result:
    detector: str
    rate: float
    labels: int
    true_kept: float
    coverage: float
    coverage_lower: float
    coverage_recall: float
    mean_upper: float
    mean_upper_srs: float
    coverage_srs: float
    mean_recall_lower: float
    mean_recall_lower_srs: float
    share_above: float = 0.0  # mean share of the sample's labels drawn above τ


def population(detector: str, rate: float, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.zeros(rows, dtype=np.int64)
    y[rng.choice(rows, int(round(rate * rows)), replace=False)] = 1
    scores = rng.normal(size=rows) + DETECTORS[detector] * y
    removed = scores > np.quantile(scores, 0.95)
    return scores, removed, y


def simulate(detector: str, rate: float, labels: int, *, audits: int = 1000, rows: int = 20_000, seed: int = 0,
             confidence: float = audit.DEFAULT_CONFIDENCE) -> Result:
    scores, removed, y = population(detector, rate, rows, seed)
    kept = ~removed
    true_kept = float(y[kept].mean())
    true_recall = float(y[removed].sum() / y.sum()) if y.sum() else None
    rng = np.random.default_rng(seed + 1)
    strata = audit.make_strata(scores, removed)
    h = strata.assign(scores)
    up, lo, rec_lo, up_srs, rec_lo_srs, above = (np.empty(audits) for _ in range(6))
    one = np.zeros(rows, dtype=np.int64)  # simple random sampling = one stratum
    for i in range(audits):
        s = audit.draw_sample(scores, removed, labels, seed=int(rng.integers(2**63)))
        c = audit.cells(h, kept, h[s.rows], kept[s.rows], y[s.rows], strata.count)
        est = audit.estimate(c, confidence=confidence)
        up[i], lo[i], rec_lo[i] = est.kept.upper, est.kept.lower, est.recall.lower
        above[i] = removed[s.rows].mean()
        srs = rng.choice(rows, labels, replace=False)
        k = kept[srs]
        up_srs[i] = audit.srs_upper(int(k.sum()), int(y[srs][k].sum()), confidence)
        rec_lo_srs[i] = audit.estimate(audit.cells(one, kept, one[srs], k, y[srs], 1), confidence=confidence).recall.lower
    return Result(detector, rate, labels, true_kept, float((up >= true_kept).mean()), float((lo <= true_kept).mean()),
                  float((rec_lo <= true_recall).mean()) if true_recall is not None else 1.0,
                  float(up.mean()), float(up_srs.mean()), float((up_srs >= true_kept).mean()), float(rec_lo.mean()),
                  float(rec_lo_srs.mean()), float(above.mean()))


def table(results: list[Result]) -> str:
    head = ("| detector | harmful | labels | true kept rate | coverage: kept upper | kept lower | recall lower "
            "| mean kept upper: stratified | SRS | mean recall lower: stratified | SRS |")
    lines = [head, "|---" * 11 + "|"]
    for r in results:
        lines.append(f"| {r.detector} | {r.rate:.1%} | {r.labels} | {r.true_kept:.2%} | {r.coverage:.1%} | {r.coverage_lower:.1%} "
                     f"| {r.coverage_recall:.1%} | {r.mean_upper:.2%} | {r.mean_upper_srs:.2%} "
                     f"| {r.mean_recall_lower:.0%} | {r.mean_recall_lower_srs:.0%} |")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """The figures the README quotes from the table, computed rather than read off it."""
    looser = [r.mean_upper / r.mean_upper_srs - 1 for r in results if r.mean_upper_srs > 0]
    recall = [r.mean_recall_lower / r.mean_recall_lower_srs for r in results if r.mean_recall_lower_srs > 0]
    lines = [
        f"upper bound on the kept rate held in >= {min(r.coverage for r in results):.1%} of audits in every "
        f"setting; the lower bound in >= {min(r.coverage_lower for r in results):.1%}",
        f"mean kept upper bound vs SRS: {min(looser):+.0%} to {max(looser):+.0%}",
        f"labels drawn above τ: {min(r.share_above for r in results):.0%}–{max(r.share_above for r in results):.0%} "
        "of the sample",
    ]
    if recall:
        lines.append(f"mean recall lower bound, stratified / SRS (where SRS > 0): {min(recall):.1f}–{max(recall):.1f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the settings the test suite runs")
    ap.add_argument("--audits", type=int, default=1000)
    args = ap.parse_args()
    grid = QUICK if args.quick else [(d, r, n) for d in DETECTORS for r in RATES for n in LABELS]
    t0 = time.perf_counter()
    results = [simulate(d, r, n, audits=args.audits) for d, r, n in grid]
    print(table(results))
    print("\n" + summary(results))
    print(f"\n{args.audits} simulated audits per setting, 20,000 rows, τ removes the top 5 %, confidence 95 %; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
