"""Where saft_gx keeps what it can rebuild: embeddings, the anchors' fitted probes, converted models."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$SAFT_GX_CACHE``, else ``$XDG_CACHE_HOME/saft_gx``, else ``~/.cache/saft_gx``."""
    env = os.environ.get("SAFT_GX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saft_gx"
