"""saft_gx: find harmful rows in LLM fine-tuning datasets with SAFT subspace scores."""

__version__ = "0.1.0"

from .errors import SaftError  # noqa: E402
from .subspace import Detector, MomentStats  # noqa: E402
from ._gx_hook import install as _install_gx_hook  # noqa: E402

_install_gx_hook()  # registers saft_gx.gx with Great Expectations once GX is imported

__all__ = ["Detector", "MomentStats", "SaftError", "__version__"]
