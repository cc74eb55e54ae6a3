"""Register the Great Expectations plugin (``saft_gx.gx``) whenever both ``saft_gx`` and
``great_expectations`` are imported, in either order, without importing GX (seconds) on every
``import saft_gx``.

If GX is already imported, the plugin is imported at once. Otherwise a one-shot import hook waits for
``great_expectations`` to finish importing and then imports ``saft_gx.gx``.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any, Iterator

_GX = "great_expectations"


def _register() -> None:
    try:
        importlib.import_module("saft_gx.gx")
    except Exception as e:  # never break the user's own GX import
        warnings.warn(f"saft_gx: could not register the Great Expectations plugin ({type(e).__name__}: {e}); "
                      "import saft_gx.gx to see the error", RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def pyspark_exit_guard() -> Iterator[None]:
    """Around an import of great_expectations: pyspark >= 4, imported by GX from a process whose
    ``__main__`` has neither a spec nor a file (``python -c``), takes itself for a doctest run and calls
    ``sys.exit(0)`` -- a silent success, the worst outcome for a data gate. Look interactive to it for
    the duration of the import, and turn any such exit into an ImportError."""
    main = sys.modules.get("__main__")
    doctest_like = (main is not None and getattr(main, "__spec__", None) is None and not hasattr(main, "__file__")
                    and not hasattr(sys, "ps1") and "pyspark.sql.connect" not in sys.modules)
    if not doctest_like or importlib.util.find_spec("pyspark") is None:
        yield
        return
    sys.ps1 = ""  # pyspark's test for an interactive session
    try:
        yield
    except SystemExit:
        raise ImportError("importing great_expectations called sys.exit (pyspark's doctest check)") from None
    finally:
        del sys.ps1


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
