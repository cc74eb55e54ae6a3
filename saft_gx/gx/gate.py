"""A release gate: load a suite file, run a real GX checkpoint on a DataFrame, and judge the result strictly.

GX's own ``success`` is not enough for a gate. A suite whose expectation types are not registered loads
with those expectations dropped (a logged error), then validates as a success; an expectation that
raised is merely "unsuccessful". ``verdict`` therefore fails a result that evaluated no expectations,
fewer than the suite file holds, or any that raised, and tells these apart from a plain failure:
exit code 0 = passed, 1 = the data failed an expectation, 2 = the gate could not be evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..core.errors import SaftError
from . import EXPECTATION_TYPES

PASSED, FAILED, ERROR = 0, 1, 2
DOCS_SITE = "saft_gx"


# ---- suites ----

def read_suite_file(path: str | Path) -> Dict[str, Any]:
    """The suite file as a dict, each expectation with a ``type`` (GX 1.x) or ``expectation_type`` (0.x)."""
    p = Path(path)
    if not p.is_file():
        raise SaftError(f"{p}: no such suite file")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaftError(f"{p}: not a JSON suite ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise SaftError(f"{p}: expected a JSON object with an \"expectations\" list")
    for i, exp in enumerate(data["expectations"]):
        if not isinstance(exp, dict) or not isinstance(exp.get("type", exp.get("expectation_type")), str):
            raise SaftError(f"{p}: expectation {i} has no \"type\"")
        if not isinstance(exp.get("kwargs", {}), dict):
            raise SaftError(f"{p}: expectation {i}: \"kwargs\" must be an object")
    return data


def load_suite(path: str | Path, *, overrides: Optional[Dict[str, Any]] = None, name: Optional[str] = None) -> Any:
    """An ExpectationSuite from a suite file; ``overrides`` (detector, model, device ...) are set on every
    SAFT expectation. Unknown types and invalid kwargs are errors here, never silently dropped."""
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
    from great_expectations.expectations.registry import get_expectation_impl
    from great_expectations.exceptions import ExpectationNotFoundError

    p = Path(path)
    data = read_suite_file(p)
    if not data["expectations"]:
        raise SaftError(f"{p}: the suite has no expectations; a gate that checks nothing cannot pass")
    unknown, expectations = [], []
    for i, raw in enumerate(data["expectations"]):
        etype = raw.get("type", raw.get("expectation_type"))
        try:
            get_expectation_impl(etype)
        except ExpectationNotFoundError:
            unknown.append(etype)
            continue
        kwargs = dict(raw.get("kwargs") or {})
        if etype in EXPECTATION_TYPES and overrides:
            kwargs.update({k: v for k, v in overrides.items() if v is not None})
        try:
            cfg = ExpectationConfiguration(type=etype, kwargs=kwargs, meta=raw.get("meta") or {})
            expectations.append(cfg.to_domain_obj())
        except Exception as e:  # pydantic's ValidationError, GX's InvalidExpectationConfigurationError
            raise SaftError(f"{p}: expectation {i} ({etype}): {_one_line(e)}") from None
    if unknown:
        raise SaftError(
            f"{p}: unknown expectation type(s) {', '.join(sorted(set(unknown)))}: not registered with Great "
            "Expectations. Import the plugin that defines them before running the suite (import saft_gx.gx for "
            "the SAFT expectations); GX would otherwise skip them and report success."
        )
    return ExpectationSuite(name=name or data.get("name") or p.stem, expectations=expectations, meta=data.get("meta") or {})


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ---- running ----

def ephemeral_context(docs_dir: Optional[str | Path] = None) -> Any:
    """An in-memory GX context (no analytics, no progress bars), with a Data Docs site in ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    cfg = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
                            progress_bars=ProgressBarsConfig(globally=False))
    ctx = gx.get_context(mode="ephemeral", project_config=cfg)
    if docs_dir is not None:
        ctx.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return ctx


def run_checkpoint(df: Any, suite: Any, *, data_name: str = "data", docs_dir: Optional[str | Path] = None,
                   expectation_parameters: Optional[Dict[str, Any]] = None, result_format: str = "SUMMARY") -> Any:
    """Validate ``df`` against ``suite`` through a Checkpoint in an ephemeral context; returns the
    CheckpointResult. With ``docs_dir``, the checkpoint's UpdateDataDocsAction writes Data Docs there."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    ctx = ephemeral_context(docs_dir)
    batch_def = ctx.data_sources.add_pandas("saft_gx").add_dataframe_asset(data_name).add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(suite)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{data_name}:{suite.name}", data=batch_def, suite=suite))
    actions = [UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])] if docs_dir is not None else []
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(name=f"saft_gx:{suite.name}", validation_definitions=[vd], actions=actions,
                                                   result_format={"result_format": result_format}))
    return _run(checkpoint, df, expectation_parameters)


def _run(checkpoint: Any, df: Any, expectation_parameters: Optional[Dict[str, Any]]) -> Any:
    from great_expectations.exceptions import SuiteParameterError

    try:
        return checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=expectation_parameters or None)
    except SuiteParameterError as e:
        raise SaftError(f"{_one_line(e)}: give it a value (saft-gx validate --param NAME=VALUE or --detector DIR; or the checkpoint's "
                        "expectation_parameters)") from None


def run_project_checkpoint(project_root: str | Path, checkpoint: str, df: Any, *,
                           expectation_parameters: Optional[Dict[str, Any]] = None) -> tuple[Any, int]:
    """Run a checkpoint of a file GX project (``<project_root>/gx``) on ``df`` (its validation definitions
    must use dataframe assets). Returns (CheckpointResult, number of expectations in its suite files):
    pass both to ``verdict``, which then catches expectations GX dropped while loading the suites."""
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

    root = Path(project_root)
    if not (root / "gx" / "great_expectations.yml").is_file():
        raise SaftError(f"{root}: not a GX project (no gx/great_expectations.yml)")
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    try:
        cp = ctx.checkpoints.get(checkpoint)
    except DataContextError as e:
        raise SaftError(f"{root}: no checkpoint {checkpoint!r} ({_one_line(e)})") from None
    expected = sum(len(read_suite_file(root / "gx" / "expectations" / f"{vd.suite.name}.json")["expectations"])
                   for vd in cp.validation_definitions)
    return _run(cp, df, expectation_parameters), expected


def read_frame(path: str | Path) -> Any:
    """A whole dataset file (parquet, jsonl, csv) as one pandas DataFrame with a 0..n-1 index."""
    import pandas as pd

    from ..io.readers import open_dataset

    frames = [df for _, df in open_dataset(path).frames()]
    if not frames:
        raise SaftError(f"{path}: the dataset has no rows")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


# ---- judging ----

@dataclass
class Outcome:
    """One expectation's result, as the gate reports it."""

    type: str
    column: Optional[str]
    success: bool
    error: Optional[str]
    summary: str
    result: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def status(self) -> str:
        return "ERROR" if self.error else ("PASS" if self.success else "FAIL")

    def line(self) -> str:
        where = f"({self.column})" if self.column else ""
        return f"{self.status:<5} {self.type}{where}: {self.error or self.summary}"


@dataclass
class Verdict:
    outcomes: List[Outcome]
    expected: Optional[int]
    exit_code: int
    reason: str

    @property
    def passed(self) -> bool:
        return self.exit_code == PASSED


def exception_message(exception_info: Any) -> Optional[str]:
    """The first raised exception's message in an ExpectationValidationResult's ``exception_info`` (flat, or
    keyed by metric id as GX 1.x reports metric errors)."""
    if not exception_info:
        return None
    infos = [exception_info] if ("raised_exception" in exception_info) else list(exception_info.values())
    for info in infos:
        get = info.get if isinstance(info, dict) else (lambda k, _i=info: getattr(_i, k, None))
        if get("raised_exception"):
            return _one_line(get("exception_message") or "an exception was raised")
    return None


def _pct(x: float) -> str:
    return f"{x:.1%}"


def summarize(evr: Any) -> Outcome:
    cfg = evr.expectation_config
    kw = dict(cfg.kwargs)
    r = dict(evr.result or {})
    err = exception_message(evr.exception_info)
    details = r.get("details") if isinstance(r.get("details"), dict) else {}
    if cfg.type == "expect_column_values_harm_score_to_be_below" and "unexpected_count" in r:
        n, bad = r.get("element_count") or 0, r.get("unexpected_count") or 0
        mostly = kw.get("mostly", 1)
        text = f"{bad} of {n} rows flagged ({_pct(bad / n) if n else '-'}; allowed {_pct(1 - float(mostly))})"
        if details:
            text += f"; τ = {details['threshold']:.4g} ({details['threshold_rule']})"
        rows = r.get("partial_unexpected_index_list")
        if rows:
            text += f"; rows {', '.join(map(str, rows[:10]))}{' ...' if bad > 10 else ''}"
    elif cfg.type == "expect_column_harm_flag_fraction_to_be_at_most" and r.get("observed_value") is not None:
        text = (f"flagged fraction {_pct(r['observed_value'])} ({details.get('flagged')} of {details.get('rows')} rows), "
                f"allowed at most {_pct(float(kw['max_fraction']))}; τ = {details.get('threshold', float('nan')):.4g} "
                f"({details.get('threshold_rule')})")
    elif isinstance(details.get("sentence"), str):  # an expectation that words its own result (the audited gate)
        text = details["sentence"]
    elif "unexpected_count" in r:
        n, bad = r.get("element_count") or 0, r.get("unexpected_count") or 0
        text = f"{bad} of {n} rows unexpected"
    elif "observed_value" in r:
        text = f"observed {r['observed_value']!r}"
    else:
        text = "ok" if evr.success else "failed"
    return Outcome(type=cfg.type, column=kw.get("column"), success=bool(evr.success), error=err, summary=text, result=r)


def verdict(checkpoint_result: Any, expected: Optional[int] = None, suite: Any = None) -> Verdict:
    """Judge a CheckpointResult (or one ExpectationSuiteValidationResult). ``expected``: how many
    expectations the suite file holds; fewer evaluated means some were dropped (unregistered types).
    With ``suite`` (the one that ran), outcomes come in its order."""
    runs = list(checkpoint_result.run_results.values()) if hasattr(checkpoint_result, "run_results") else [checkpoint_result]
    evrs = [evr for run in runs for evr in run.results]
    if suite is not None:
        position = {e.id: i for i, e in enumerate(suite.expectations) if e.id}
        evrs.sort(key=lambda evr: position.get(evr.expectation_config.id, len(position)))
    outcomes = [summarize(evr) for evr in evrs]
    n = len(outcomes)
    if n == 0:
        return Verdict(outcomes, expected, ERROR,
                       "the suite evaluated 0 expectations, so it checked nothing; GX reports that as a success, the "
                       "gate does not. Are the expectation types registered (import saft_gx.gx before running)?")
    if expected is not None and n != expected:
        return Verdict(outcomes, expected, ERROR,
                       f"the suite file holds {expected} expectations but {n} were evaluated; the others were dropped "
                       "(unregistered expectation types? import saft_gx.gx before running)")
    errors = [o for o in outcomes if o.error]
    failed = [o for o in outcomes if not o.success and not o.error]
    if errors:
        return Verdict(outcomes, expected, ERROR, f"{len(errors)} of {n} expectations raised an error")
    if failed or not all(run.success for run in runs):
        return Verdict(outcomes, expected, FAILED, f"{len(failed)} of {n} expectations failed")
    return Verdict(outcomes, expected, PASSED, f"all {n} expectations passed")


def docs_index(docs_dir: str | Path) -> Path:
    return Path(docs_dir) / "index.html"


__all__ = ["ERROR", "FAILED", "PASSED", "Outcome", "Verdict", "load_suite", "read_frame", "read_suite_file", "run_checkpoint",
           "run_project_checkpoint", "verdict"]
