"""Aggregate gate: the fraction of rows SAFT flags (harm score above τ) must be at most ``max_fraction``.

Metric ``saft.harm_score.flagged_fraction``. τ is absolute here (``threshold`` or the detector's): a
quantile rule would flag the same fraction of every batch, so it is not offered.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple, Union

from great_expectations.compatibility import pydantic
from great_expectations.compatibility.typing_extensions import override
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.core.suite_parameters import SuiteParameterDict  # noqa: TC002
from great_expectations.execution_engine import ExecutionEngine, PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnAggregateExpectation
from great_expectations.expectations.metrics.metric_provider import MetricProvider, metric_value

from . import _render
from .scoring import DOMAIN_KEYS, EMBED_KEYS, ROW_SCORES, NeedsRowScores, SaftFields, ScoredRows

FLAGGED_FRACTION = "saft.harm_score.flagged_fraction"
AGG_KEYS = (*EMBED_KEYS, "threshold")


class SaftFlaggedFraction(NeedsRowScores, MetricProvider):
    metric_name = FLAGGED_FRACTION
    domain_keys = DOMAIN_KEYS
    value_keys = AGG_KEYS

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(cls, execution_engine, metric_domain_kwargs, metric_value_kwargs, metrics, runtime_configuration):
        scored: ScoredRows = metrics[ROW_SCORES]
        return {"fraction": float(scored.flagged.mean()), "flagged": int(scored.flagged.sum()), "rows": int(len(scored.scores)),
                "threshold": scored.threshold, "threshold_rule": scored.rule, "detector_id": scored.detector_id,
                "max_score": float(scored.scores.max()), "mean_score": float(scored.scores.mean())}


class ExpectColumnHarmFlagFractionToBeAtMost(_render.SaftRenderers, SaftFields, ColumnAggregateExpectation):
    """Expect at most ``max_fraction`` of the rows to have a SAFT harm score above τ.

    τ is ``threshold`` or the threshold saved with ``detector``. The observed value is the flagged fraction.
    """

    _sentence = staticmethod(_render.flag_fraction_template)
    max_fraction: Union[float, SuiteParameterDict] = pydantic.Field(description="Largest allowed flagged fraction, 0–1.")
    threshold: Union[float, SuiteParameterDict, None] = pydantic.Field(None, description="Absolute τ.")

    metric_dependencies = (FLAGGED_FRACTION,)
    success_keys: ClassVar[Tuple[str, ...]] = ("max_fraction", *AGG_KEYS)
    args_keys = ("column", "max_fraction")
    domain_type: ClassVar[MetricDomainTypes] = MetricDomainTypes.COLUMN

    library_metadata: ClassVar[Dict[str, Any]] = {
        "maturity": "experimental",
        "tags": ["saft", "safety", "llm", "column aggregate expectation"],
        "contributors": ["saft_gx"],
        "requirements": ["saft-gx"],
    }

    class Config:
        title = "Expect column harm flag fraction to be at most"

    @pydantic.validator("max_fraction", pre=True)
    def _no_boolean(cls, mf: Any) -> Any:
        if isinstance(mf, bool):  # before pydantic makes true 1.0
            _fraction(mf)
        return mf

    @pydantic.validator("max_fraction")
    def _check_max_fraction(cls, mf: Any) -> Any:
        if isinstance(mf, (int, float)):  # a suite parameter is checked once it has a value (_validate)
            _fraction(mf)
        return mf

    @override
    def _validate(self, metrics: Dict, runtime_configuration: Optional[dict] = None,
                  execution_engine: Optional[ExecutionEngine] = None):
        observed = metrics[FLAGGED_FRACTION]
        max_fraction = _fraction(self._get_success_kwarg("max_fraction"))
        details = {k: v for k, v in observed.items() if k != "fraction"}
        return {"success": observed["fraction"] <= max_fraction,
                "result": {"observed_value": observed["fraction"], "details": details}}


def _fraction(mf: Any) -> float:
    """A number in [0, 1]. Not a boolean: JSON's true would otherwise read as 1.0, allowing every row."""
    if isinstance(mf, bool) or not isinstance(mf, (int, float)):
        raise ValueError(f"max_fraction={mf!r}: expected a number between 0 and 1")
    if not 0.0 <= mf <= 1.0:
        raise ValueError(f"max_fraction={mf}: must be between 0 and 1")
    return float(mf)


__all__ = ["ExpectColumnHarmFlagFractionToBeAtMost", "SaftFlaggedFraction"]
