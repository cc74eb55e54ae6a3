"""Audit labels in DuckDB beside the scores: one table, ``saft_audit_labels``, one row per labelled row with
who labelled it, when, from which file, for which scored table and detector, and the sample's design (so an
estimate can run from the database alone).

The table is created with CREATE TABLE IF NOT EXISTS rather than as a numbered migration in ``store``: it
is new and independent of the scored tables; fold it into ``store.MIGRATIONS`` when its schema first changes.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import store
from .audit_io import AuditLabels, parse_audit
from ..core.errors import SaftError

TABLE = "saft_audit_labels"
SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    table_name VARCHAR, detector_id VARCHAR, row_id BIGINT, text_sha256 VARCHAR, label TINYINT,
    stratum INTEGER, stratum_low DOUBLE, stratum_high DOUBLE, stratum_rows BIGINT,
    labeller VARCHAR, labelled_at TIMESTAMP, source_file VARCHAR, imported_at TIMESTAMP)"""


def store_labels(db: str | Path, table: str, labels: AuditLabels, *, detector_id: str, labeller: str | None = None) -> int:
    """Write checked labels; a file imported again for the same table and detector replaces its rows."""
    df = labels.frame
    source = str(Path(labels.source).resolve())
    who = _column_or(df, "labeller", labeller or os.environ.get("USER") or "unknown")
    mtime = datetime.fromtimestamp(Path(labels.source).stat().st_mtime, tz=timezone.utc).replace(tzinfo=None) \
        if Path(labels.source).is_file() else None
    when = pd.to_datetime(_column_or(df, "labelled_at", mtime), errors="coerce", utc=True).tz_convert(None)
    lows, highs = labels.strata.lows(), labels.strata.highs
    rows = pd.DataFrame({
        "table_name": table, "detector_id": detector_id, "row_id": labels.row_id, "text_sha256": labels.text_sha256,
        "label": labels.labels, "stratum": labels.stratum,
        "stratum_low": np.where(np.isfinite(lows), lows, np.nan)[labels.stratum],
        "stratum_high": np.where(np.isfinite(highs), highs, np.nan)[labels.stratum],
        "stratum_rows": labels.stratum_rows[labels.stratum], "labeller": who, "labelled_at": when,
        "source_file": source, "imported_at": datetime.now(timezone.utc).replace(tzinfo=None),
    })
    with store.transaction(db) as con:
        con.execute(SCHEMA)
        con.execute(f"DELETE FROM {TABLE} WHERE table_name = ? AND detector_id = ? AND source_file = ?", [table, detector_id, source])
        con.register("new_labels", rows)
        con.execute(f"INSERT INTO {TABLE} SELECT * FROM new_labels")
    return len(rows)


def load_labels(db: str | Path, table: str, detector_id: str) -> AuditLabels:
    """The labels last imported for ``table`` and ``detector_id`` (one sample: its design must be whole)."""
    con = store.connect(db, read_only=True)
    try:
        exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [TABLE]).fetchone()[0]
        if not exists:
            raise SaftError(f"{db}: no audit labels stored; import them with saft-gx audit import LABELS --db {db} --table {table}")
        df = con.execute(
            f"""SELECT * FROM {TABLE} WHERE table_name = ? AND detector_id = ? AND source_file = (
                    SELECT source_file FROM {TABLE} WHERE table_name = ? AND detector_id = ?
                    ORDER BY imported_at DESC LIMIT 1) ORDER BY row_id""", [table, detector_id, table, detector_id]).df()
    finally:
        con.close()
    if df.empty:
        raise SaftError(f"{db}: no audit labels stored for table {table!r} and detector {detector_id}")
    return parse_audit(df, f"{db}:{TABLE} ({df['source_file'].iloc[0]})")


def _column_or(df: pd.DataFrame, name: str, default: Any) -> Any:
    if name not in df.columns:
        return default
    col = df[name].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()) else v)
    return col.where(col.notna(), default).to_numpy()


__all__ = ["TABLE", "load_labels", "store_labels"]
