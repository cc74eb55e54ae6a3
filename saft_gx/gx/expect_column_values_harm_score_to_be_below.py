"""Row-level gate: every row's SAFT harm score must be at or below τ (``mostly`` of them, as in GX).

Metric ``saft.harm_score`` (the score of each row, a column map function) and its condition
``saft.harm_score.below_threshold`` (score ≤ τ); the rows that fail come back in GX's ``unexpected_*``
result fields.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import pandas as pd
from great_expectations.compatibility import pydantic
from great_expectations.compatibility.typing_extensions import override
from great_expectations.core.suite_parameters import SuiteParameterDict  # noqa: TC002
from great_expectations.execution_engine import ExecutionEngine, PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnMapMetricProvider,
    column_condition_partial,
    column_function_partial,
)

from . import _render
from .scoring import ROW_SCORES, SAFT_KEYS, NeedsRowScores, SaftFields, ScoredRows, row_scores_dependency


def _aligned(values: pd.Series, column: pd.Series) -> pd.Series:
    # the domain frame and the column GX passes are the same rows (filter_column_isnull is off)
    if len(values) != len(column):
        raise ValueError(f"saft.harm_score: {len(values)} scores for {len(column)} rows")
    return pd.Series(values.to_numpy(), index=column.index)


class SaftHarmScore(NeedsRowScores, ColumnMapMetricProvider):
    row_score_metrics = ("saft.harm_score.map", "saft.harm_score.below_threshold.condition")
    function_metric_name = "saft.harm_score"
    function_value_keys = SAFT_KEYS
    condition_metric_name = "saft.harm_score.below_threshold"
    condition_value_keys = SAFT_KEYS
    # a null row is not "missing" here: it cannot be scored, and scoring says so (fail closed)
    filter_column_isnull = False

    @column_function_partial(engine=PandasExecutionEngine)
    def _pandas_function(cls, column: pd.Series, _metrics: Dict[str, Any], **kwargs: Any) -> pd.Series:
        scored: ScoredRows = _metrics[ROW_SCORES]
        return _aligned(scored.scores, column)

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas_condition(cls, column: pd.Series, _metrics: Dict[str, Any], **kwargs: Any) -> pd.Series:
        scored: ScoredRows = _metrics[ROW_SCORES]
        return _aligned(~scored.flagged, column)


class ExpectColumnValuesHarmScoreToBeBelow(_render.SaftRenderers, SaftFields, ColumnMapExpectation):
    """Expect each row's SAFT harm score to be at most τ.

    ``column`` holds the prompt (with ``response_column`` the response), or the whole row as one text or
    messages column. τ is ``threshold``, or the top ``remove_fraction`` / ``contamination`` of this batch's
    scores, or the threshold saved with ``detector``. Rows above τ are the unexpected rows; the expectation
    succeeds when at least ``mostly`` of the rows are at or below τ. Rows that cannot be scored (null, empty,
    not text) raise a clear error: the expectation fails, it never skips them.

    Flagged rows are candidates for review, not proof of harm: SAFT's score is unsupervised and has false
    positives.
    """

    _sentence = staticmethod(_render.harm_below_template)
    threshold: Union[float, SuiteParameterDict, None] = pydantic.Field(None, description="Absolute τ.")
    remove_fraction: Optional[float] = pydantic.Field(None, description="Flag the top fraction of this batch.")
    contamination: Optional[float] = pydantic.Field(None, description="Expected harmful fraction; flags that top fraction.")

    map_metric = "saft.harm_score.below_threshold"
    success_keys: ClassVar[Tuple[str, ...]] = ("mostly", *SAFT_KEYS)
    args_keys = ("column", "threshold")

    library_metadata: ClassVar[Dict[str, Any]] = {
        "maturity": "experimental",
        "tags": ["saft", "safety", "llm", "column map expectation"],
        "contributors": ["saft_gx"],
        "requirements": ["saft-gx"],
    }

    class Config:
        title = "Expect column values harm score to be below"

    @override
    def get_validation_dependencies(self, execution_engine: Optional[ExecutionEngine] = None,
                                    runtime_configuration: Optional[dict] = None, **kwargs: Any):
        deps = super().get_validation_dependencies(execution_engine=execution_engine,
                                                   runtime_configuration=runtime_configuration)
        map_cfg = deps.get_metric_configuration(f"{self.map_metric}.unexpected_count")
        deps.set_metric_configuration(ROW_SCORES, row_scores_dependency(map_cfg))
        return deps

    @override
    def _validate(self, metrics: Dict, runtime_configuration: Optional[dict] = None,
                  execution_engine: Optional[ExecutionEngine] = None):
        out = super()._validate(metrics=metrics, runtime_configuration=runtime_configuration,
                                execution_engine=execution_engine)
        scored: Optional[ScoredRows] = metrics.get(ROW_SCORES)
        if scored is not None and "result" in out:
            s = scored.scores
            out["result"]["details"] = {
                "threshold": scored.threshold, "threshold_rule": scored.rule, "detector_id": scored.detector_id,
                "rows": int(len(s)), "flagged": int(scored.flagged.sum()),
                "max_score": float(s.max()), "mean_score": float(s.mean()),
            }
        return out
