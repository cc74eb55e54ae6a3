"""The sentences Data Docs show for the SAFT expectations: one (template, params) builder per expectation,
used by both GX renderer families (legacy string templates for Data Docs, atomic for rendered_content)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from great_expectations.compatibility.typing_extensions import override
from great_expectations.expectations.expectation import render_suite_parameter_string
from great_expectations.render import LegacyDiagnosticRendererType, LegacyRendererType, RenderedStringTemplateContent
from great_expectations.render.renderer.renderer import renderer
from great_expectations.render.renderer_configuration import RendererConfiguration, RendererValueType
from great_expectations.render.util import num_to_str

Template = Tuple[str, Dict[str, Any]]


def _pct(x: Any) -> str:
    return num_to_str(float(x) * 100, no_scientific=True)


def _shown(value: Any) -> Any:
    """A suite parameter ({"$PARAMETER": name}) is shown by name, not as a dict."""
    if isinstance(value, dict) and "$PARAMETER" in value:
        return f"${{{value['$PARAMETER']}}}"
    return value


def rows_phrase(kw: Dict[str, Any], params: Dict[str, Any], include_column_name: bool) -> str:
    rows = "rows of $column" if include_column_name else "rows of this column"
    if include_column_name:
        params["column"] = kw.get("column")
    if kw.get("response_column"):
        params["response_column"] = kw["response_column"]
        rows += " with $response_column"
    return rows


def scoring_phrase(kw: Dict[str, Any], params: Dict[str, Any]) -> str:
    if kw.get("detector") is not None:
        params["detector"] = _shown(kw["detector"])
        return "scored by the detector in $detector"
    return "scored by a detector fitted on this batch"


def harm_below_template(kw: Dict[str, Any], include_column_name: bool = True) -> Template:
    params: Dict[str, Any] = {}
    rows = rows_phrase(kw, params, include_column_name)
    if kw.get("threshold") is not None:
        params["threshold"] = _shown(kw["threshold"])
        limit = "must have a SAFT harm score of at most $threshold"
    elif kw.get("remove_fraction") is not None:
        params["remove_fraction_pct"] = _pct(kw["remove_fraction"])
        limit = "must not be in the top $remove_fraction_pct % of SAFT harm scores"
    elif kw.get("contamination") is not None:
        params["contamination_pct"] = _pct(kw["contamination"])
        limit = "must not be in the top $contamination_pct % of SAFT harm scores (the expected contamination)"
    else:
        limit = "must have a SAFT harm score of at most the detector's threshold"
    template = f"{rows[0].upper()}{rows[1:]} {limit}, {scoring_phrase(kw, params)}"
    mostly = kw.get("mostly")
    if isinstance(mostly, (int, float)) and mostly < 1:
        params["mostly_pct"] = _pct(mostly)
        template += ", at least $mostly_pct % of the time"
    return template + ".", params


def flag_fraction_template(kw: Dict[str, Any], include_column_name: bool = True) -> Template:
    params: Dict[str, Any] = {"max_fraction_pct": _pct(kw.get("max_fraction", 0.0))}
    rows = rows_phrase(kw, params, include_column_name)
    if kw.get("threshold") is not None:
        params["threshold"] = _shown(kw["threshold"])
        flag = "SAFT harm score above $threshold"
    else:
        flag = "SAFT harm score above the detector's threshold"
    return f"At most $max_fraction_pct % of {rows} may be flagged as harmful ({flag}), {scoring_phrase(kw, params)}.", params


def residual_template(kw: Dict[str, Any], include_column_name: bool = True) -> Template:
    def pct(value: Any) -> Any:
        return _shown(value) if isinstance(value, dict) else _pct(value)

    params: Dict[str, Any] = {"max_rate_pct": pct(kw.get("max_rate", 0.0)), "confidence_pct": pct(kw.get("confidence") or 0.95)}
    rows = rows_phrase(kw, params, include_column_name)
    if kw.get("threshold") is not None:
        params["threshold"] = _shown(kw["threshold"])
        kept = "SAFT harm score at most $threshold"
    else:
        kept = "SAFT harm score at most the detector's threshold"
    params["audit_labels"] = _shown(kw.get("audit_labels"))
    return (f"With $confidence_pct % confidence, at most $max_rate_pct % of the kept {rows} ({kept}) may be harmful, "
            f"bounded from the labelled audit sample $audit_labels, {scoring_phrase(kw, params)}.", params)


def legacy_prescriptive(build: Callable[..., Template], configuration: Any,
                        runtime_configuration: Optional[dict]) -> List[RenderedStringTemplateContent]:
    runtime_configuration = runtime_configuration or {}
    kw = dict(configuration.kwargs) if configuration is not None else {}
    template, params = build(kw, runtime_configuration.get("include_column_name") is not False)
    return [RenderedStringTemplateContent(
        content_block_type="string_template",
        string_template={"template": template, "params": params, "styling": runtime_configuration.get("styling")},
    )]


def atomic_prescriptive(build: Callable[..., Template], renderer_configuration: RendererConfiguration) -> RendererConfiguration:
    kw = dict(renderer_configuration.kwargs)
    template, params = build(kw, renderer_configuration.include_column_name)
    for name, value in params.items():
        kind = RendererValueType.NUMBER if isinstance(value, (int, float)) else RendererValueType.STRING
        renderer_configuration.add_param(name=name, param_type=kind, value=value)
    renderer_configuration.template_str = template
    return renderer_configuration


def observed_sentence(result: Any) -> str:
    """"3 of 120 rows flagged (2.5%); τ = 0.42" from a SAFT expectation's result details."""
    if result is None or not getattr(result, "result", None):
        return "--"
    r = result.result
    details = r.get("details") or {}
    n, flagged = details.get("rows", r.get("element_count")), details.get("flagged", r.get("unexpected_count"))
    if n is None or flagged is None:
        return "--"
    text = f"{flagged} of {n} rows flagged ({flagged / n:.1%})" if n else "no rows"
    if details.get("threshold") is not None:
        text += f"; τ = {details['threshold']:.4g} ({details.get('threshold_rule')})"
    return text


class SaftRenderers:
    """The Data Docs renderers of a SAFT expectation (mixed in before GX's base class, whose renderers it
    overrides); the subclass names its sentence builder in ``_sentence``."""

    _sentence: Callable[..., Template]

    @classmethod
    @override
    def _prescriptive_template(cls, renderer_configuration: RendererConfiguration) -> RendererConfiguration:
        return atomic_prescriptive(cls._sentence, renderer_configuration)

    @classmethod
    @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
    @render_suite_parameter_string
    def _prescriptive_renderer(cls, configuration=None, result=None, runtime_configuration=None, **kwargs):
        return legacy_prescriptive(cls._sentence, configuration, runtime_configuration)

    @classmethod
    @renderer(renderer_type=LegacyDiagnosticRendererType.OBSERVED_VALUE)
    def _diagnostic_observed_value_renderer(cls, configuration=None, result=None, runtime_configuration=None, **kwargs):
        return observed_sentence(result)
