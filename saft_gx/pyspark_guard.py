"""A guard for importing ``great_expectations`` when pyspark is installed, shared by the GX import hook
(``_gx_hook``) and the plugin (``saft_gx.gx``). Standard library only, so either can import it."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Iterator


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
