"""Audited gate: with ``confidence``, at most ``max_rate`` of the rows SAFT keeps (score ≤ τ) are harmful.

Metric ``saft.residual_harm_rate``: the batch's rows are scored through ``saft.row_scores`` (the same
detector and τ as the other SAFT expectations), the labelled audit sample (``saft-gx audit sample``, a csv
/ jsonl named by ``audit_labels``, usually the suite parameter ``saft_audit_labels``) is checked against
the rows' text and scores, and ``saft_gx.core.audit`` bounds the kept rows' harmful rate. The expectation
fails when the upper bound exceeds ``max_rate``; a label for a row that changed is an error, not a pass.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import numpy as np
from great_expectations.compatibility import pydantic
from great_expectations.compatibility.typing_extensions import override
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.core.suite_parameters import SuiteParameterDict  # noqa: TC002
from great_expectations.execution_engine import ExecutionEngine, PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnAggregateExpectation
from great_expectations.expectations.metrics.metric_provider import MetricProvider, metric_value
from great_expectations.render.renderer.renderer import renderer
from great_expectations.render import LegacyDiagnosticRendererType

from ..core.errors import SaftError
from . import _render
from .scoring import (DOMAIN_KEYS, EMBED_KEYS, ROW_SCORES, NeedsRowScores, SaftFields, ScoredRows, column_options,
                      domain_columns, is_messages_column)

RESIDUAL = "saft.residual_harm_rate"
RESIDUAL_KEYS = (*EMBED_KEYS, "threshold", "audit_labels", "confidence")


def row_digests(df: Any, column: str, kw: Dict[str, Any]) -> np.ndarray:
    """Each row's ``text_sha256`` as ``saft-gx score`` writes it (the content key, independent of the model)."""
    from ..embedding.rows import detect_columns, rows_from_frame

    response = domain_columns(list(df.columns), column, kw)
    cols = column_options(column, response, is_messages_column(column, df[column]))
    frame = df[[c for c in (column, response) if c]]  # the frame score_rows scores, so the same columns are found
    spec = detect_columns([str(c) for c in frame.columns], prompt=cols.prompt, response=cols.response, text=cols.text,
                          messages=cols.messages)
    return np.array([r.content_key() for r in rows_from_frame(frame, spec, 0)])


def residual_sentence(d: Dict[str, Any]) -> str:
    """"0.4 % of the 4,850 kept rows estimated harmful; upper bound 1.2 % at 95 % confidence, from 200 labels"."""
    if d.get("upper") is None:
        return "--"
    rate = "-" if d.get("rate") is None else f"{d['rate']:.2%}"
    return (f"{rate} of the {d['rows']:,} kept rows estimated harmful; upper bound {d['upper']:.2%} at "
            f"{d['confidence']:.0%} confidence (lower {d['lower']:.2%}), from {d['labels']} audit labels "
            f"({d['harmful_labels']} harmful); τ = {d['threshold']:.4g}")


class SaftResidualHarmRate(NeedsRowScores, MetricProvider):
    metric_name = RESIDUAL
    domain_keys = DOMAIN_KEYS
    value_keys = RESIDUAL_KEYS

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(cls, execution_engine, metric_domain_kwargs, metric_value_kwargs, metrics, runtime_configuration):
        from ..io import audit_io

        kw = dict(metric_value_kwargs)
        scored: ScoredRows = metrics[ROW_SCORES]
        df, _, accessor = execution_engine.get_compute_domain(metric_domain_kwargs, domain_type=MetricDomainTypes.COLUMN)
        path = kw.get("audit_labels")
        if path is None or isinstance(path, dict):
            raise SaftError("audit_labels: give the labelled audit file (saft-gx validate --param saft_audit_labels=audit.csv)")
        labels = audit_io.read_audit(str(path))
        m = audit_io.match(labels, df.index.to_numpy(), row_digests(df, accessor["column"], kw), scored.scores.to_numpy(),
                           detector_id=scored.detector_id)
        est = audit_io.estimate(m, ~scored.flagged.to_numpy(), confidence=float(kw.get("confidence") or 0.95))
        k = est.kept
        return {"rate": k.rate, "lower": k.lower, "upper": k.upper, "rows": k.rows, "labels": est.labels,
                "harmful_labels": est.harmful_labels, "confidence": est.confidence, "threshold": scored.threshold,
                "threshold_rule": scored.rule, "detector_id": scored.detector_id, "audit_labels": str(path),
                "removed_rate": est.removed.rate, "recall_lower": est.recall.lower}


class ExpectResidualHarmRateToBeBelow(_render.SaftRenderers, SaftFields, ColumnAggregateExpectation):
    """Expect, with ``confidence``, at most ``max_rate`` of the rows kept at τ (SAFT harm score ≤ τ) to be harmful.

    The bound comes from a labelled audit sample of these rows (``saft-gx audit sample``, then a human fills
    ``label``), stratified by score, so it holds whatever the detector's quality. τ is ``threshold`` or the
    detector's. The observed value is the upper confidence bound.
    """

    _sentence = staticmethod(_render.residual_template)
    max_rate: Union[float, SuiteParameterDict] = pydantic.Field(description="Largest allowed harmful rate of the kept rows, 0–1.")
    audit_labels: Union[str, SuiteParameterDict] = pydantic.Field(description="The labelled audit file (csv / jsonl).")
    confidence: Union[float, SuiteParameterDict] = pydantic.Field(0.95, description="Level of the one-sided upper bound.")
    threshold: Union[float, SuiteParameterDict, None] = pydantic.Field(None, description="Absolute τ.")

    metric_dependencies = (RESIDUAL,)
    success_keys: ClassVar[Tuple[str, ...]] = ("max_rate", *RESIDUAL_KEYS)
    args_keys = ("column", "max_rate")
    domain_type: ClassVar[MetricDomainTypes] = MetricDomainTypes.COLUMN

    library_metadata: ClassVar[Dict[str, Any]] = {
        "maturity": "experimental",
        "tags": ["saft", "safety", "llm", "audit", "column aggregate expectation"],
        "contributors": ["saft_gx"],
        "requirements": ["saft-gx"],
    }

    class Config:
        title = "Expect residual harm rate to be below"

    @pydantic.validator("max_rate")
    def _check_max_rate(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not 0.0 <= v <= 1.0:
            raise ValueError(f"max_rate={v}: must be between 0 and 1")
        return v

    @pydantic.validator("confidence")
    def _check_confidence(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not 0.5 < v < 1.0:
            raise ValueError(f"confidence={v}: must be between 0.5 and 1")
        return v

    @override
    def _validate(self, metrics: Dict, runtime_configuration: Optional[dict] = None,
                  execution_engine: Optional[ExecutionEngine] = None):
        d = dict(metrics[RESIDUAL])
        max_rate = float(self._get_success_kwarg("max_rate"))
        d["max_rate"] = max_rate
        d["sentence"] = f"{residual_sentence(d)}; allowed at most {max_rate:.2%}"
        return {"success": d["upper"] <= max_rate, "result": {"observed_value": d["upper"], "details": d}}

    @classmethod
    @renderer(renderer_type=LegacyDiagnosticRendererType.OBSERVED_VALUE)
    def _diagnostic_observed_value_renderer(cls, configuration=None, result=None, runtime_configuration=None, **kwargs):
        details = ((getattr(result, "result", None) or {}).get("details")) or {}
        return residual_sentence(details)


__all__ = ["ExpectResidualHarmRateToBeBelow", "SaftResidualHarmRate"]
