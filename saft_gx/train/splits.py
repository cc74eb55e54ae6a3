"""Split scored rows into the ones to keep for fine-tuning and the ones to remove.

The source is a scored parquet file (``saft-gx score --out``) or a DuckDB table (``saft-gx score --db``).
The output folder gets ``kept.parquet``, ``removed.parquet`` (with a ``removal_reason`` per row) and
``manifest.json`` (counts, τ and how it was chosen, detector id, source hash, creation time, the files'
hashes). The files are written into a hidden temp folder inside the output folder and renamed into place,
the old manifest removed first and the new one renamed last: a folder with a manifest holds one run's
complete files. ``--force`` replaces these three files only; nothing else in the folder is touched, and a
folder holding the source is refused. Rows stream through in batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.errors import SaftError
from ..core.outputs import HOST, clean_stale_temps
from ..io.readers import open_parquet
from ..core.threshold import ThresholdRule, resolve

KEPT = "kept.parquet"
REMOVED = "removed.parquet"
MANIFEST = "manifest.json"
SCORE_COLUMNS = ("harm_score", "harm_flag", "detector_id")


@dataclass
class ScoredSource:
    """Scores of one detector over a scored file or table, and a way to stream its full rows."""

    kind: str  # "parquet" or "duckdb"
    path: Path
    table: str | None
    detector_id: str
    sha256: str | None  # of the scored parquet; for DuckDB, of the dataset file that was scored
    scores: np.ndarray
    flags: np.ndarray
    stored_threshold: float | None
    stored_rule: str | None
    batches: Callable[[], Iterator[Any]]  # pyarrow RecordBatches of this detector's rows, in order
    extra: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_scores(scores: np.ndarray, flags: np.ndarray, where: str) -> None:
    if scores.size == 0:
        raise SaftError(f"{where}: has no scored rows")
    if np.isnan(scores).any():
        raise SaftError(f"{where}: {int(np.isnan(scores).sum())} rows have no harm_score; rescore the dataset")


def _pick_detector(ids: list[str], detector_id: str | None, where: str) -> str:
    ids = sorted({i for i in ids if i is not None})
    if detector_id is not None:
        if detector_id not in ids:
            raise SaftError(f"{where}: no rows scored by detector {detector_id!r} (found: {', '.join(ids) or 'none'})")
        return detector_id
    if len(ids) != 1:
        raise SaftError(f"{where}: holds scores of {len(ids)} detectors ({', '.join(ids)}); choose one with --detector-id")
    return ids[0]


def open_scored_parquet(path: str | Path, detector_id: str | None = None, batch_rows: int = 4096) -> ScoredSource:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise SaftError(f"{p}: no such file")
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SaftError(f"{p}: not a readable parquet file ({why})") from None
    names = pf.schema_arrow.names
    missing = [c for c in SCORE_COLUMNS if c not in names]
    if missing:
        raise SaftError(f"{p}: missing column(s) {', '.join(missing)}; write a scored file with "
                        f"`saft-gx score DATA --out {p.name}` first")
    t = pq.read_table(p, columns=list(SCORE_COLUMNS))
    ids = t.column("detector_id")
    det = _pick_detector(pc.unique(ids).to_pylist(), detector_id, str(p))
    mask = np.asarray(pc.fill_null(pc.equal(ids, det), False).to_numpy(zero_copy_only=False), dtype=bool)
    scores = t.column("harm_score").to_numpy(zero_copy_only=False).astype(np.float64)[mask]
    flags_col = t.column("harm_flag")
    if flags_col.null_count:
        flags_col = pc.fill_null(flags_col, False)
    flags = np.asarray(flags_col.to_numpy(zero_copy_only=False), dtype=bool)[mask]
    _check_scores(scores, flags, str(p))

    def batches() -> Iterator[Any]:
        for b in open_parquet(p).iter_batches(batch_size=batch_rows):
            if mask.all():
                yield b
            else:
                yield b.filter(pc.equal(b.column("detector_id"), det))

    return ScoredSource("parquet", p, None, det, _sha256(p), scores, flags, None, None, batches)


def open_scored_table(db: str | Path, table: str, detector_id: str | None = None, batch_rows: int = 4096) -> ScoredSource:
    from ..io import store

    if not store.IDENT.match(table):
        raise SaftError(f"--table {table!r}: use letters, digits and underscores")
    con = store.connect(db, read_only=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()]
        table = next((t for t in tables if t.lower() == table.lower()), table)  # DuckDB names ignore case
        if table not in tables:
            data_tables = [t for t in tables if not t.startswith("saft_")]
            raise SaftError(f"{db}: no table {table!r} (tables: {', '.join(data_tables) or 'none'})")
        cols = [r[0] for r in con.execute(f"DESCRIBE {store.quote(table)}").fetchall()]
        missing = [c for c in SCORE_COLUMNS + ("row_id",) if c not in cols]
        if missing:
            raise SaftError(f"{db}: table {table!r} has no {', '.join(missing)} column(s); it is not a scored table")
        ids = [r[0] for r in con.execute(f"SELECT DISTINCT detector_id FROM {store.quote(table)}").fetchall()]
        det = _pick_detector(ids, detector_id, f"{db}:{table}")
        q = f"FROM {store.quote(table)} WHERE detector_id = ? ORDER BY row_id"
        arr = con.execute(f"SELECT coalesce(harm_score, 'NaN'::DOUBLE) AS s, coalesce(harm_flag, false) AS f {q}",
                          [det]).fetchnumpy()
        scores = np.asarray(arr["s"], dtype=np.float64)
        flags = np.asarray(arr["f"], dtype=bool)
        _check_scores(scores, flags, f"{db}:{table}")
        run = None
        has_runs = "saft_runs" in tables
        if has_runs:
            run = con.execute("SELECT source, source_sha256, threshold, threshold_rule FROM saft_runs "
                              "WHERE table_name = ? AND detector_id = ? ORDER BY run_at DESC LIMIT 1",
                              [table, det]).fetchone()
    except BaseException:
        con.close()
        raise

    def batches() -> Iterator[Any]:
        res = con.execute(f"SELECT * {q}", [det])
        # DuckDB 2.x: to_arrow_reader; 1.x: fetch_record_batch
        reader = res.to_arrow_reader(batch_rows) if hasattr(res, "to_arrow_reader") else res.fetch_record_batch(batch_rows)
        yield from reader

    src = ScoredSource("duckdb", Path(db), table, det, run[1] if run else None, scores, flags,
                       float(run[2]) if run and run[2] is not None else None, run[3] if run else None, batches,
                       extra={"scored_dataset": run[0] if run else None}, close=con.close)
    return src


@dataclass
class SplitResult:
    out_dir: Path
    rows: int
    kept: int
    removed: int
    threshold: float | None
    threshold_rule: str
    manifest: dict[str, Any]

    @property
    def kept_path(self) -> Path:
        return self.out_dir / KEPT

    @property
    def removed_path(self) -> Path:
        return self.out_dir / REMOVED


OWN_FILES = (KEPT, REMOVED, MANIFEST)


def _contents(out_dir: Path) -> list[Path]:
    """What is in ``out_dir``, less saft_gx temp folders (a live run's, or a killed one's)."""
    return [p for p in out_dir.iterdir() if not p.name.startswith(".saft-")]


def check_out_dir(out_dir: Path, force: bool, source: Path | None = None, *, sources: tuple[Path, ...] = ()) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SaftError(f"--out-dir {out_dir}: exists and is not a folder")
    for src in (source, *sources):
        if src is not None and out_dir.resolve() in src.resolve().parents:
            raise SaftError(f"--out-dir {out_dir}: holds the source {src.name}; choose another folder")
    if out_dir.is_dir() and _contents(out_dir) and not force:
        raise SaftError(f"--out-dir {out_dir}: exists and is not empty; pass --force to replace its "
                        f"{', '.join(OWN_FILES)}")
    for name in OWN_FILES:
        if (out_dir / name).is_dir():
            raise SaftError(f"--out-dir {out_dir}: {name} there is a folder; remove it or choose another folder")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished files in ``tmp`` (a folder inside ``out_dir``) over saft_gx's own files there."""
    (out_dir / MANIFEST).unlink(missing_ok=True)  # until the new one lands, the folder reads as incomplete
    for name in (KEPT, REMOVED, MANIFEST):
        os.replace(tmp / name, out_dir / name)


def _write_parquet(writer_path: Path, schema: Any) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetWriter(str(writer_path), schema)


def split_scored(src: ScoredSource, out_dir: str | Path, *, rule: ThresholdRule | None = None,
                 force: bool = False) -> SplitResult:
    """Write kept / removed / manifest for ``src`` into ``out_dir``. Without a rule the stored
    ``harm_flag`` decides. Refuses an empty kept split: there would be nothing to fine-tune on."""
    import pyarrow as pa

    from .. import __version__

    out = Path(out_dir)
    check_out_dir(out, force, src.path)
    scores = src.scores
    if rule is None:
        flags = src.flags
        tau = src.stored_threshold
        rule_text = (src.stored_rule + " (as scored)") if src.stored_rule else "harm_flag as scored"
    else:
        tau = resolve(rule, scores)
        flags = scores > tau
        rule_text = rule.describe()
    n, n_removed = int(scores.size), int(flags.sum())
    if n_removed == n:
        raise SaftError(f"all {n} rows would be removed ({rule_text}, τ = {tau}); nothing would be left to "
                        "fine-tune on — raise --threshold or lower --remove-fraction")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".saft-{HOST}-{os.getpid()}-split-"))
    writers: dict[str, Any] = {}
    published = False
    try:
        start = 0
        for batch in src.batches():
            table = pa.Table.from_batches([batch])
            m = table.num_rows
            if start + m > n:
                raise SaftError(f"{src.path}: changed while it was being split")
            f = flags[start: start + m]
            table = table.set_column(table.schema.get_field_index("harm_flag"), "harm_flag", pa.array(f, pa.bool_()))
            kept, removed = table.filter(pa.array(~f)), table.filter(pa.array(f))
            s = scores[start: start + m][f]
            reasons = ([f"harm_score {x:.6g} > τ {tau:.6g}" for x in s] if tau is not None
                       else ["harm_flag set when scored"] * len(s))
            removed = removed.append_column("removal_reason", pa.array(reasons, pa.string()))
            for name, part in ((KEPT, kept), (REMOVED, removed)):
                if name not in writers:
                    writers[name] = _write_parquet(tmp / name, part.schema)
                writers[name].write_table(part.cast(writers[name].schema))
            start += m
        if start != n:
            raise SaftError(f"{src.path}: changed while it was being split ({start} rows now, {n} before)")
        for w in writers.values():
            w.close()
        writers.clear()
        manifest = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "saft_gx_version": __version__,
            "source": {"kind": src.kind, "path": str(src.path.resolve()), "table": src.table, "sha256": src.sha256,
                       **{k: v for k, v in src.extra.items() if v is not None}},
            "detector_id": src.detector_id,
            "threshold": tau,
            "threshold_rule": rule_text,
            "rows": n, "kept": n - n_removed, "removed": n_removed,
            "removed_fraction": n_removed / n,
            "files": {name: {"sha256": _sha256(tmp / name)} for name in (KEPT, REMOVED)},
        }
        _write_manifest(tmp / MANIFEST, manifest)
        check_out_dir(out, force)  # another process may have written it meanwhile
        _publish(tmp, out)
        published = True
    finally:
        for w in writers.values():
            w.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if created and not published and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return SplitResult(out, n, n - n_removed, n_removed, tau, rule_text, manifest)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def filter_scored(source: str | Path | None, out_dir: str | Path, *, rule: ThresholdRule | None = None,
                  db: str | Path | None = None, table: str | None = None, detector_id: str | None = None,
                  force: bool = False) -> SplitResult:
    """Split a scored parquet (``source``) or DuckDB table (``db`` + ``table``) into ``out_dir``."""
    if source is not None and (db is not None or table is not None):
        raise SaftError("give a scored parquet file, or --db and --table, not both")
    if source is None and (db is None or table is None):
        raise SaftError("give a scored parquet file, or --db and --table")
    check_out_dir(Path(out_dir), force, Path(source) if source else None, sources=(Path(db),) if db else ())
    if source is not None:
        src = open_scored_parquet(source, detector_id)
    else:
        src = open_scored_table(db, table, detector_id)  # type: ignore[arg-type]
    try:
        return split_scored(src, out_dir, rule=rule, force=force)
    finally:
        src.close()
