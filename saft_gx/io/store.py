"""DuckDB storage of scored rows, beside the original columns.

One table per dataset holds the input's columns plus ``row_id, text_sha256, harm_score, harm_flag,
detector_id``; (detector_id, row_id) is unique: re-scoring with the same detector replaces its rows in one
transaction, a different detector adds its own. ``saft_runs`` records every run. Schema changes to these
bookkeeping tables are numbered migrations.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import SaftError

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# DuckDB's buffer pool keeps the blocks it writes until its memory limit (default: 80 % of RAM), so loading
# n rows grew the resident set with n (+400 MiB at 1 M rows). A fixed limit makes it write through / spill:
# with 128MB a 1 M-row load adds ~75 MiB (tests/bench/memory.py) at the cost of a few seconds.
LOAD_MEMORY_LIMIT = os.environ.get("SAFT_GX_DUCKDB_MEMORY_LIMIT", "128MB")


def _m1(con: Any) -> None:
    con.execute(
        """CREATE TABLE IF NOT EXISTS saft_runs (
            run_at TIMESTAMP, table_name VARCHAR, detector_id VARCHAR, source VARCHAR, source_sha256 VARCHAR,
            rows BIGINT, flagged BIGINT, threshold DOUBLE, threshold_rule VARCHAR, model VARCHAR,
            model_fingerprint VARCHAR, layer INTEGER, token VARCHAR, k INTEGER)"""
    )


MIGRATIONS = [_m1]


def table_name_for(path: str | Path) -> str:
    """A SQL-safe table name from a file name: ``my-data.v2.parquet`` -> ``my_data_v2``."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem)
    if not name or name[0].isdigit():
        name = f"t_{name}"
    return name


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# Query connections read this one database and nothing else: no files, no network, no extensions, and a
# statement cannot turn that back on. ``allow_files`` re-enables reading files (see ``query_all``).
QUERY_CONFIG = {"enable_external_access": False, "autoload_known_extensions": False,
                "autoinstall_known_extensions": False, "lock_configuration": True}


def check_database_file(db_path: str | Path) -> None:
    """A path that exists must be a DuckDB file: DuckDB itself opens e.g. a parquet as an in-memory
    database, so writes to it would vanish."""
    p = Path(db_path)
    if p.is_dir():
        raise SaftError(f"{p}: is a folder, not a DuckDB database")
    if p.exists():
        with open(p, "rb") as f:
            head = f.read(12)
        if head[8:12] != b"DUCK":  # DuckDB's magic bytes follow an 8-byte checksum
            raise SaftError(f"{p}: not a DuckDB database; give a .duckdb file or a new path")


def check_writable(db_path: str | Path) -> None:
    """Before any work: the database can be opened for writing now (not another file type, not locked).
    A database that does not exist yet is not created here."""
    check_database_file(db_path)
    p = Path(db_path)
    if p.exists():
        connect(p).close()
    elif not os.access(p.resolve().parent if p.resolve().parent.exists() else Path.cwd(), os.W_OK):
        raise SaftError(f"{p}: cannot create the database there (no write permission)")


def connect(db_path: str | Path, *, read_only: bool = False, memory_limit: str | None = None,
            config: dict[str, Any] | None = None) -> Any:
    import duckdb

    p = Path(db_path)
    if read_only and not p.exists():
        raise SaftError(f"{p}: no such database")
    check_database_file(p)
    cfg = {**({"memory_limit": memory_limit} if memory_limit else {}), **(config or {})}
    try:
        return duckdb.connect(str(p), read_only=read_only, config=cfg)
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        if "lock" in msg.lower():
            raise SaftError(f"{p}: the database is in use by another process ({msg})") from None
        raise SaftError(f"{p}: cannot open the database ({msg})") from None


def migrate(con: Any) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS saft_schema (version INTEGER)")
    row = con.execute("SELECT max(version) FROM saft_schema").fetchone()
    current = row[0] or 0
    for version, step in enumerate(MIGRATIONS, start=1):
        if version > current:
            step(con)
            con.execute("INSERT INTO saft_schema VALUES (?)", [version])


def _columns(con: Any, sql: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {sql}").fetchall()]


def store_scored_parquet(db_path: str | Path, table: str, parquet_path: str | Path, *, detector_id: str,
                         run: dict[str, Any], row_range: tuple[int, int] | None = None) -> int:
    """Load a scored parquet into ``table``, replacing that detector's earlier rows (only those with
    ``row_range[0] <= row_id < row_range[1]`` when given: one shard of a sharded run). All or nothing."""
    if not IDENT.match(table):
        raise SaftError(f"--table {table!r}: use letters, digits and underscores")
    src = f"read_parquet({_sql_str(str(parquet_path))})"
    with transaction(db_path, memory_limit=LOAD_MEMORY_LIMIT) as con:
        migrate(con)
        exists = con.execute(
            # DuckDB names are case-insensitive: BASE20 is the table base20
            "SELECT count(*) FROM information_schema.tables WHERE lower(table_name) = lower(?) AND table_schema = 'main'",
            [table]).fetchone()[0]
        new_cols = _columns(con, f"SELECT * FROM {src}")
        if exists:
            old_cols = _columns(con, quote(table))
            if old_cols != new_cols:
                raise SaftError(
                    f"table {table!r} exists with another schema ({_diff(old_cols, new_cols)}); "
                    "pass --table to store these rows elsewhere"
                )
            if row_range is None:
                con.execute(f"DELETE FROM {quote(table)} WHERE detector_id = ?", [detector_id])
            else:
                con.execute(f"DELETE FROM {quote(table)} WHERE detector_id = ? AND row_id >= ? AND row_id < ?",
                            [detector_id, int(row_range[0]), int(row_range[1])])
            con.execute(f"INSERT INTO {quote(table)} SELECT * FROM {src}")
        else:
            con.execute(f"CREATE TABLE {quote(table)} AS SELECT * FROM {src}")
        n = con.execute(f"SELECT count(*) FROM {quote(table)} WHERE detector_id = ?", [detector_id]).fetchone()[0]
        con.execute(
            "INSERT INTO saft_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [datetime.now(timezone.utc).replace(tzinfo=None), table, detector_id, run.get("source"),
             run.get("source_sha256"), run.get("rows"), run.get("flagged"), run.get("threshold"),
             run.get("threshold_rule"), run.get("model"), run.get("model_fingerprint"), run.get("layer"),
             run.get("token"), run.get("k")],
        )
    return int(n)


@contextmanager
def transaction(db_path: str | Path, **connect_kwargs: Any) -> Iterator[Any]:
    """A writable connection inside one transaction: committed when the block ends, rolled back on any error
    (a DuckDB error becomes one line naming the database), closed either way."""
    import duckdb

    con = connect(db_path, **connect_kwargs)
    try:
        con.execute("BEGIN TRANSACTION")
        yield con
        con.execute("COMMIT")
    except BaseException as e:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        if isinstance(e, duckdb.Error):
            raise SaftError(f"{db_path}: {str(e).splitlines()[0]}") from None
        raise
    finally:
        con.close()


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _diff(old: list[tuple[str, str]], new: list[tuple[str, str]]) -> str:
    o, n = dict(old), dict(new)
    parts = [f"missing {c}" for c in n if c not in o] + [f"extra {c}" for c in o if c not in n]
    parts += [f"{c}: {o[c]} vs {n[c]}" for c in n if c in o and o[c] != n[c]]
    return ", ".join(parts[:4]) or "column order differs"


# Statements that only read. With files allowed, anything else could write or attach them.
_READING = ("SELECT", "EXPLAIN", "PRAGMA", "CALL")


def query(db_path: str | Path, sql: str) -> Any:
    """Run ``sql`` (one statement) on a read-only, sealed connection and return a pandas DataFrame."""
    frames = query_all(db_path, sql)
    if len(frames) != 1:
        raise SaftError(f"query: expected one statement, got {len(frames)}")
    return frames[0]


def query_all(db_path: str | Path, sql: str, *, allow_files: bool = False) -> list[Any]:
    """Run each statement of ``sql`` on a read-only connection that sees this database only (``QUERY_CONFIG``);
    one pandas DataFrame per statement. ``allow_files``: reading files (``read_csv`` …) is allowed, and only
    reading statements run."""
    import duckdb

    config = {**QUERY_CONFIG, **({"enable_external_access": True} if allow_files else {})}
    con = connect(db_path, read_only=True, config=config)
    try:
        statements = con.extract_statements(sql)
        if not statements:
            raise SaftError("query: no SQL statement given")
        if allow_files:
            for st in statements:
                kind = str(st.type).rsplit(".", 1)[-1]
                if kind not in _READING:
                    raise SaftError(f"query: {kind} statements are refused with --allow-files (reading only)")
        return [con.execute(st).df() for st in statements]
    except duckdb.Error as e:
        raise SaftError(f"query failed: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
