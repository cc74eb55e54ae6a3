"""Register the Great Expectations plugin (``saft_gx.gx``) whenever both ``saft_gx`` and
``great_expectations`` are imported, in either order, without importing GX (seconds) on every
``import saft_gx``.

If GX is already imported, the plugin is imported at once. Otherwise a one-shot import hook waits for
``great_expectations`` to finish importing and then imports ``saft_gx.gx``.

Imports run one way: this module names the plugin only as a string for ``importlib``, and the plugin
never imports this module (both use ``pyspark_guard``), so there is no import circle.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from .pyspark_guard import pyspark_exit_guard

_GX = "great_expectations"


def _register() -> None:
    try:
        importlib.import_module("saft_gx.gx")
    except Exception as e:  # never break the user's own GX import
        warnings.warn(f"saft_gx: could not register the Great Expectations plugin ({type(e).__name__}: {e}); "
                      "import saft_gx.gx to see the error", RuntimeWarning, stacklevel=2)


class _ThenRegister(importlib.abc.Loader):
    """Wraps GX's own loader for one exec_module call, then hands the spec back to it."""

    def __init__(self, inner: Any):
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            with pyspark_exit_guard():
                self.inner.exec_module(module)
        finally:
            module.__loader__ = self.inner
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.inner
        _register()


class _GXFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _GX:
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


def install() -> None:
    if _GX in sys.modules:
        _register()
    elif not any(isinstance(f, _GXFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _GXFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _GXFinder)]
