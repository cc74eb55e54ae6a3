"""The metric every SAFT expectation builds on: ``saft.row_scores``, the harm score of each row in the
expectation's domain, and the threshold τ that decides which rows are flagged.

GX computes it once per (domain, settings) per validation and hands it to the map and aggregate metrics
that depend on it. The model work goes through the core's process-wide session and on-disk embedding
cache (``pipeline.score_frame``), so however often GX asks, each row runs through the model once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Union

import numpy as np
import pandas as pd
from great_expectations.compatibility import pydantic
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.core.suite_parameters import SuiteParameterDict  # noqa: TC002
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.metrics.metric_provider import MetricProvider, metric_value
from great_expectations.validator.metric_configuration import MetricConfiguration

from ..core.errors import SaftError
from ..embedding.rows import MESSAGES_COLUMNS

ROW_SCORES = "saft.row_scores"
DOMAIN_KEYS = ("batch_id", "table", "column", "row_condition", "condition_parser")
# How rows are embedded and which detector scores them. Shared by every SAFT expectation and metric.
EMBED_KEYS = ("response_column", "detector", "model", "layer", "token", "max_tokens", "overlong", "device", "k")
RULE_KEYS = ("threshold", "remove_fraction", "contamination")
SAFT_KEYS = EMBED_KEYS + RULE_KEYS


class SaftFields(pydantic.BaseModel):
    """Fields shared by the SAFT expectations (a pydantic mixin; GX expectations are pydantic models)."""

    response_column: Optional[str] = pydantic.Field(
        None, description="Column holding the response; the expectation's column is then the prompt.")
    detector: Union[str, SuiteParameterDict, None] = pydantic.Field(
        None, description="Folder of a detector saved by `saft-gx fit`; without one, a detector is fitted on the batch.")
    model: Optional[str] = pydantic.Field(None, description="Model to embed with (default: the detector's, else SmolLM2).")
    layer: Optional[int] = None
    token: Optional[str] = None
    max_tokens: Optional[int] = None
    overlong: Optional[str] = None
    device: Optional[str] = pydantic.Field(None, description="auto (CUDA when available, else CPU), cpu, cuda:1 ...")
    k: Optional[int] = pydantic.Field(None, description="Top singular directions when fitting on the batch.")

    @pydantic.root_validator(skip_on_failure=True)
    def _check_saft_settings(cls, values: dict) -> dict:
        """Bad settings fail when the expectation is built (a clear message), not in the middle of a run."""
        try:
            check_settings(values)
        except SaftError as e:
            raise ValueError(str(e)) from None
        return values


@dataclass(frozen=True)
class ScoredRows:
    """The value of ``saft.row_scores``: scores indexed like the batch rows, τ, and where τ came from."""

    scores: pd.Series
    threshold: float
    rule: str
    detector_id: str

    @property
    def flagged(self) -> pd.Series:
        # NaN scores (non-finite hidden states) compare False with <=: they count as flagged, never as safe
        return ~(self.scores <= self.threshold)


def is_messages_column(name: str, values: pd.Series) -> bool:
    if name.lower() in MESSAGES_COLUMNS:
        return True
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        return isinstance(v, (list, tuple, np.ndarray))
    return False


def column_options(column: str, response_column: str | None, messages: bool) -> Any:
    """The core's ColumnOptions for an expectation: prompt + response, one messages column, or one text column."""
    from ..pipeline import ColumnOptions

    if response_column:
        return ColumnOptions(prompt=column, response=response_column)
    if messages:
        return ColumnOptions(messages=column)
    return ColumnOptions(text=column)


def embed_options(kw: Dict[str, Any]) -> Any:
    from ..embedding.embed import DEFAULT_MAX_TOKENS, DEFAULT_OVERLONG
    from ..pipeline import EmbedOptions

    return EmbedOptions(model=kw.get("model"), layer=kw.get("layer"), token=kw.get("token"),
                        max_tokens=int(kw.get("max_tokens") or DEFAULT_MAX_TOKENS),
                        overlong=kw.get("overlong") or DEFAULT_OVERLONG, device=kw.get("device"))


def threshold_rule(kw: Dict[str, Any]) -> Any:
    from ..core.threshold import ThresholdRule

    given = [(k, kw.get(k)) for k in RULE_KEYS if kw.get(k) is not None]
    if len(given) > 1:
        raise SaftError(f"give only one of threshold, remove_fraction, contamination (got {', '.join(k for k, _ in given)})")
    if not given:
        return None
    key, value = given[0]
    if isinstance(value, dict):  # a suite parameter, substituted before the metric runs
        raise SaftError(f"{key}={value}: the suite parameter was not given a value")
    if isinstance(value, bool):  # float(True) would be 1.0
        raise SaftError(f"{key}={value!r}: expected a number")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SaftError(f"{key}={value!r}: expected a number") from None
    if key != "threshold" and not 0.0 <= value <= 1.0:
        raise SaftError(f"{key}={value}: must be between 0 and 1")
    if not np.isfinite(value):
        raise SaftError(f"{key} must be a finite number")
    return ThresholdRule("value" if key == "threshold" else key, value)


def check_settings(kw: Dict[str, Any]) -> None:
    """Settings errors caught when the suite is loaded, before any data is read (suite parameters,
    ``{"$PARAMETER": name}``, are checked when they have a value)."""
    threshold_rule({k: (0.0 if isinstance(v, dict) else v) for k, v in kw.items()})
    k = kw.get("k")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise SaftError(f"k={k!r}: must be a positive integer")
    from ..embedding.embed import OVERLONG_CHOICES, TOKEN_POSITIONS

    if kw.get("overlong") not in (None, *OVERLONG_CHOICES):
        raise SaftError(f"overlong={kw.get('overlong')!r}: choose one of {', '.join(OVERLONG_CHOICES)}")

    if kw.get("token") not in (None, *TOKEN_POSITIONS):
        raise SaftError(f"token={kw.get('token')!r}: choose one of {', '.join(TOKEN_POSITIONS)}")
    for name in ("layer", "max_tokens"):
        v = kw.get(name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise SaftError(f"{name}={v!r}: must be a positive integer")


def load_detector(path: Any) -> Any:
    from ..core.subspace import Detector

    if isinstance(path, dict):
        raise SaftError(f"detector={path}: the suite parameter was not given a value (pass it at run time)")
    return Detector.load(str(path))


def domain_columns(names: list[Any], column: str, kw: Dict[str, Any]) -> Optional[str]:
    """Check the expectation's column (and ``response_column``) exist in the batch; returns the response column."""
    have = ", ".join(map(str, names))
    if column not in names:
        raise SaftError(f"column {column!r} not found; the data has: {have}")
    response = kw.get("response_column")
    if response is not None and response not in names:
        raise SaftError(f"response_column {response!r} not found; the data has: {have}")
    return response


def score_rows(df: pd.DataFrame, column: str, kw: Dict[str, Any]) -> ScoredRows:
    """Harm scores of every row of ``df`` (the expectation's domain) and τ. Raises SaftError on bad input."""
    from .. import pipeline

    response = domain_columns(list(df.columns), column, kw)
    if len(df) == 0:
        raise SaftError("no rows to score: the batch (after any row_condition) is empty")
    rule = threshold_rule(kw)
    det = load_detector(kw["detector"]) if kw.get("detector") is not None else None
    cols = column_options(column, response, is_messages_column(column, df[column]))
    frame = df[[c for c in (column, response) if c]]
    scores, det = pipeline.score_frame(frame, columns=cols, detector=det, opts=embed_options(kw), k=int(kw["k"]) if kw.get("k") else None)
    tau, text = batch_threshold(rule, scores, det)
    return ScoredRows(pd.Series(scores, index=df.index, dtype="float64"), tau, text, det.detector_id)


def batch_threshold(rule: Any, scores: np.ndarray, det: Any) -> tuple[float, str]:
    """(τ, how it was chosen) for one batch: the expectation's rule, else the detector's saved τ."""
    from ..core.threshold import resolve

    if rule is not None:
        return float(resolve(rule, scores)), ("threshold" if rule.kind == "value" else rule.describe())
    if det.threshold is not None:
        return float(det.threshold), f"τ from detector {det.detector_id}"
    raise SaftError("no threshold: give threshold, remove_fraction or contamination, "
                    "or a detector saved with a threshold (saft-gx fit --contamination/--threshold)")


class SaftRowScores(MetricProvider):
    """``saft.row_scores``: a ScoredRows for the rows of a column domain (row_condition applied)."""

    metric_name = ROW_SCORES
    domain_keys = DOMAIN_KEYS
    value_keys = SAFT_KEYS

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(cls, execution_engine: PandasExecutionEngine, metric_domain_kwargs: dict, metric_value_kwargs: dict,
                metrics: Dict[str, Any], runtime_configuration: dict) -> ScoredRows:
        df, _, accessor = execution_engine.get_compute_domain(metric_domain_kwargs, domain_type=MetricDomainTypes.COLUMN)
        return score_rows(df, accessor["column"], dict(metric_value_kwargs))


def row_scores_dependency(metric: MetricConfiguration) -> MetricConfiguration:
    """The ``saft.row_scores`` configuration a SAFT metric depends on (same domain, the SAFT settings)."""
    kw = metric.metric_value_kwargs or {}
    return MetricConfiguration(
        metric_name=ROW_SCORES,
        metric_domain_kwargs=metric.metric_domain_kwargs,
        metric_value_kwargs={k: kw.get(k) for k in SAFT_KEYS},
    )


class NeedsRowScores:
    """Mixin for SAFT metric providers: the metric reads the one shared ``saft.row_scores`` of its domain, so a
    validation embeds and scores each row once. ``row_score_metrics`` limits this to some of a provider's
    metric names (a map provider also defines metrics that read only the map); None: all of them."""

    row_score_metrics: ClassVar[Optional[tuple]] = None

    @classmethod
    def _get_evaluation_dependencies(cls, metric: MetricConfiguration, configuration=None, execution_engine=None,
                                     runtime_configuration=None) -> dict:
        deps = super()._get_evaluation_dependencies(metric=metric, configuration=configuration,  # type: ignore[misc]
                                                    execution_engine=execution_engine,
                                                    runtime_configuration=runtime_configuration)
        if cls.row_score_metrics is None or metric.metric_name in cls.row_score_metrics:
            deps[ROW_SCORES] = row_scores_dependency(metric)
        return deps
