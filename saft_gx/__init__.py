"""saft_gx: find harmful rows in LLM fine-tuning datasets with SAFT subspace scores."""

__version__ = "0.1.0"

from .errors import SaftError  # noqa: E402
from .subspace import Detector, MomentStats  # noqa: E402

__all__ = ["Detector", "MomentStats", "SaftError", "__version__"]
