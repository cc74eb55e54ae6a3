"""Great Expectations plugin: SAFT harm scores as GX expectations.

Importing this module registers, with GX 1.24:

- ``expect_column_values_harm_score_to_be_below`` (row level; metric ``saft.harm_score`` and condition
  ``saft.harm_score.below_threshold``): flagged rows are GX's unexpected rows;
- ``expect_column_harm_flag_fraction_to_be_at_most`` (aggregate; metric ``saft.harm_score.flagged_fraction``);
- ``expect_residual_harm_rate_to_be_below`` (aggregate, audited; metric ``saft.residual_harm_rate``): an
  upper confidence bound on the kept rows' harmful rate from a labelled audit sample;
- their shared metric ``saft.row_scores``.

GX registers an expectation as a side effect of defining its class, so **whoever runs a suite that uses
these expectations must import ``saft_gx.gx`` first** (``import saft_gx`` does it too, as soon as
``great_expectations`` is imported in the same process). Without it, GX drops the unknown expectations
and reports success for what is left: ``saft_gx.gx.gate.verdict`` refuses such a result.
"""

from __future__ import annotations

from ..pyspark_guard import pyspark_exit_guard

with pyspark_exit_guard():
    import great_expectations  # noqa: F401

from .expect_column_harm_flag_fraction_to_be_at_most import ExpectColumnHarmFlagFractionToBeAtMost, SaftFlaggedFraction  # noqa: E402
from .expect_column_values_harm_score_to_be_below import ExpectColumnValuesHarmScoreToBeBelow, SaftHarmScore  # noqa: E402
from .expect_residual_harm_rate_to_be_below import ExpectResidualHarmRateToBeBelow, SaftResidualHarmRate  # noqa: E402
from .scoring import SaftRowScores, ScoredRows, score_rows  # noqa: E402

EXPECTATION_TYPES = (
    "expect_column_values_harm_score_to_be_below",
    "expect_column_harm_flag_fraction_to_be_at_most",
    "expect_residual_harm_rate_to_be_below",
)

__all__ = [
    "EXPECTATION_TYPES",
    "ExpectColumnHarmFlagFractionToBeAtMost",
    "ExpectColumnValuesHarmScoreToBeBelow",
    "ExpectResidualHarmRateToBeBelow",
    "SaftFlaggedFraction",
    "SaftHarmScore",
    "SaftResidualHarmRate",
    "SaftRowScores",
    "ScoredRows",
    "score_rows",
]
