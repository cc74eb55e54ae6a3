"""saft_gx: find harmful rows in LLM fine-tuning datasets with SAFT subspace scores.

The folders are the layers, and imports run one way, down this list (``tests/test_layering.py`` checks it):
``cli/`` (Click commands, each a few lines over what is below) → integrations: ``gx/`` (Great Expectations
expectations and the release gate), ``spark/`` (the Spark engine and Spark metrics), ``train/`` (filtered
splits, LoRA fine-tune with SAP, model evaluation) → the pipeline at the top level: ``pipeline.py`` (streams a
file through embedding, detection and storage), ``shards.py`` (sharded runs), ``labelled.py`` (labelled rows
for calibration), ``report.py`` → ``detect/`` (choosing a detector: anchors, adaptation, calibration search; pure
functions over vectors and labels) → ``embedding/`` (model loading, row formatting, hidden states) and
``io/`` (dataset readers, embedding cache, DuckDB store, audit files) → ``core/`` (streaming statistics and
``Detector``, thresholds, metrics, the probe, the audit bound, errors, defaults and atomic file writes;
NumPy and the standard library only). ``saft_gx.finetune`` is the old path of ``saft_gx.train.finetune``,
kept for ``python -m saft_gx.finetune``; ``_gx_hook.py`` and ``pyspark_guard.py`` register the GX plugin,
``testing.py`` builds the tiny test model.
"""

__version__ = "0.1.0"

from .core.errors import SaftError  # noqa: E402
from .core.subspace import Detector, MomentStats  # noqa: E402
from ._gx_hook import install as _install_gx_hook  # noqa: E402

_install_gx_hook()  # registers saft_gx.gx with Great Expectations once GX is imported

__all__ = ["Detector", "MomentStats", "SaftError", "__version__"]
