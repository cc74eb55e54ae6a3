"""The SAFT expectations on Great Expectations' Spark execution engine (``SparkDFExecutionEngine``).

Importing this module adds Spark implementations of the three SAFT metrics of ``saft_gx.gx``:

- ``saft.row_scores``: the batch's rows embedded on the executors (``spark_engine``'s ``mapInPandas``
  step: one model per Python worker, each machine's embedding cache), a detector fitted by a
  ``treeAggregate`` of the statistics when none is given, the scores computed on the executors and
  collected to the driver (n floats; τ and the result details need them), τ as on pandas;
- ``saft.harm_score`` / ``saft.harm_score.below_threshold``: a pandas UDF giving each row's score (the
  embedding comes from the executor's cache, filled by ``saft.row_scores``), so GX's own Spark map-metric
  machinery counts and lists the unexpected rows;
- ``saft.harm_score.flagged_fraction``: the same aggregate as on pandas.

The expectations themselves are engine-agnostic; only the metrics needed engine code. Rows are validated
exactly as on pandas; error messages count rows from 0 in the batch's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import pandas as pd
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.execution_engine import SparkDFExecutionEngine
from great_expectations.expectations.metrics.map_metric_provider import column_condition_partial, column_function_partial
from great_expectations.expectations.metrics.metric_provider import metric_value

from ..detect.anchors import USE_ANCHORS, fit_default
from ..core.errors import SaftError
from ..gx.expect_column_harm_flag_fraction_to_be_at_most import SaftFlaggedFraction
from ..gx.expect_column_values_harm_score_to_be_below import SaftHarmScore
from ..gx.scoring import (ROW_SCORES, SaftRowScores, ScoredRows, batch_threshold, column_options, domain_columns,
                         embed_options, load_detector, threshold_rule)
from ..pipeline import EmbedOptions, embedding_meta
from ..embedding.rows import MESSAGES_COLUMNS, ColumnSpec, detect_columns
from .spark_engine import (anchor_vectors, collect_coords, collect_rows, embed_fn, executor_session, score_fn, stats_tree_aggregate,
                           worker_errors, describe_model, resolve_options)
from ..core.subspace import Detector


@dataclass(frozen=True)
class SparkScoredRows(ScoredRows):
    """``ScoredRows`` plus what an executor needs to score a row again: the detector, the resolved
    embedding options and the row columns."""

    detector: Detector = None  # type: ignore[assignment]
    opts: EmbedOptions = None  # type: ignore[assignment]
    spec: ColumnSpec = None  # type: ignore[assignment]
    fingerprint: str = ""


def _is_messages(sdf: Any, column: str) -> bool:
    from pyspark.sql.types import ArrayType

    return column.lower() in MESSAGES_COLUMNS or isinstance(sdf.schema[column].dataType, ArrayType)


def spark_row_scores(sdf: Any, column: str, kw: Dict[str, Any]) -> SparkScoredRows:
    """``gx.scoring.score_rows`` for a Spark DataFrame: scores of every row of the domain and τ."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    response = domain_columns(sdf.columns, column, kw)
    rule = threshold_rule(kw)
    det = load_detector(kw["detector"]) if kw.get("detector") is not None else None
    cols = column_options(column, response, _is_messages(sdf, column))
    spec = detect_columns(sdf.columns, prompt=cols.prompt, response=cols.response, text=cols.text, messages=cols.messages)
    opts = embed_options(kw)
    lm = describe_model(opts.model or (det.meta.get("model") if det is not None else None))
    ropts = resolve_options(opts, lm, det)
    spark = sdf.sparkSession
    with worker_errors():
        # 0-based positions in the batch's order, for error messages (as on pandas)
        text = sdf.select(*[F.col(f"`{c}`") for c in spec.columns])
        ids = spark.createDataFrame(text.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1])),
                                    text.schema.add("row_id", LongType(), nullable=False))
        computed = spark.sparkContext.accumulator(0)
        emb = ids.mapInPandas(embed_fn(ropts, spec, lm.fingerprint, computed),
                              "row_id long, text_sha256 string, emb binary").persist()
        try:
            if emb.count() == 0:
                raise SaftError("no rows to score: the batch (after any row_condition) is empty")
            if det is None:
                meta = {**embedding_meta(lm, ropts.layers, ropts.token, ropts.max_tokens, ropts.overlong),
                        "columns": spec.to_dict()}
                dim = lm.hidden_size * len(ropts.layers)
                det = fit_default(stats_tree_aggregate(emb, dim), k=int(kw["k"]) if kw.get("k") else None,
                                  anchors=USE_ANCHORS, meta=meta,
                                  anchor_vectors=lambda: anchor_vectors(spark, ropts, lm.fingerprint, dim),
                                  data_coords=lambda d: collect_coords(emb, d), adapt=ropts.adapt,
                                  data_rows=lambda idx: collect_rows(emb, idx, dim))
            scored = emb.mapInPandas(score_fn(det), "row_id long, text_sha256 string, harm_score double") \
                .select("row_id", "harm_score").toPandas().sort_values("row_id")
        finally:
            emb.unpersist()
    scores = pd.Series(scored["harm_score"].to_numpy(dtype=np.float64), dtype="float64")
    tau, rule_text = batch_threshold(rule, scores.to_numpy(), det)
    return SparkScoredRows(scores, tau, rule_text, det.detector_id, detector=det, opts=ropts, spec=spec,
                           fingerprint=lm.fingerprint)


def score_column(scored: SparkScoredRows) -> Any:
    """A Spark column with each row's harm score: a pandas UDF that embeds (from the executor's cache,
    filled by ``saft.row_scores``) and scores with the detector."""
    from pyspark.sql import functions as F

    spec, opts, det, fingerprint = scored.spec, scored.opts, scored.detector, scored.fingerprint
    names = spec.columns

    def score(*columns: pd.Series) -> pd.Series:
        from ..pipeline import embed_rows
        from ..embedding.rows import rows_from_frame

        frame = pd.DataFrame({name: col for name, col in zip(names, columns)})
        session = executor_session(opts, fingerprint)
        return pd.Series(det.score(embed_rows(session, rows_from_frame(frame, spec, 0))))

    return F.pandas_udf(score, "double")(*[F.col(f"`{c}`") for c in names])


class SparkSaftRowScores(SaftRowScores):
    @metric_value(engine=SparkDFExecutionEngine)
    def _spark(cls, execution_engine: SparkDFExecutionEngine, metric_domain_kwargs: dict, metric_value_kwargs: dict,
               metrics: Dict[str, Any], runtime_configuration: dict) -> SparkScoredRows:
        sdf, _, accessor = execution_engine.get_compute_domain(metric_domain_kwargs, domain_type=MetricDomainTypes.COLUMN)
        return spark_row_scores(sdf, accessor["column"], dict(metric_value_kwargs))


class SparkSaftHarmScore(SaftHarmScore):
    @column_function_partial(engine=SparkDFExecutionEngine)
    def _spark_function(cls, column: Any, _metrics: Dict[str, Any], **kwargs: Any) -> Any:
        return score_column(_metrics[ROW_SCORES])

    @column_condition_partial(engine=SparkDFExecutionEngine)
    def _spark_condition(cls, column: Any, _metrics: Dict[str, Any], **kwargs: Any) -> Any:
        from pyspark.sql import functions as F

        scored: SparkScoredRows = _metrics[ROW_SCORES]
        # NaN scores count as flagged, never as safe (as on pandas)
        return F.coalesce(score_column(scored) <= F.lit(scored.threshold), F.lit(False))


class SparkSaftFlaggedFraction(SaftFlaggedFraction):
    @metric_value(engine=SparkDFExecutionEngine)
    def _spark(cls, execution_engine: Any, metric_domain_kwargs: dict, metric_value_kwargs: dict,
               metrics: Dict[str, Any], runtime_configuration: dict) -> dict:
        return SaftFlaggedFraction._pandas(cls, execution_engine, metric_domain_kwargs, metric_value_kwargs, metrics,
                                           runtime_configuration)


__all__ = ["SparkScoredRows", "score_column", "spark_row_scores"]
