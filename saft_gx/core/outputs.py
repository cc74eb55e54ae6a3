"""Output files: no output over an input, temp files a later run can clean up, the user's umask.

Temp files are named ``.saft-<host>-<pid>-<random><suffix>`` beside their final place, so a run killed
with SIGKILL leaves a name whose owner a later run on the same host can see is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import SaftError

HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
# ".saft-HOST-PID-..." and the temp a writer makes from such a name (".<name>.<random>.tmp")
_TEMP = re.compile(r"^\.{1,2}saft-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-")


def _umask() -> int:
    try:  # Linux: read it without the set-and-restore race of os.umask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 under the umask (mkstemp gives 0600)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove saft_gx temp files and folders in ``folder`` whose process, on this host, is gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if not m or m["host"] != HOST or _alive(int(m["pid"])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_file(folder: str | Path, suffix: str) -> Path:
    """An empty temp file in ``folder`` (created), named so ``clean_stale_temps`` can find it once its
    process is gone; stale ones of this host are removed first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)
    fd, name = tempfile.mkstemp(suffix=suffix, prefix=f".saft-{HOST}-{os.getpid()}-", dir=folder)
    os.close(fd)
    return Path(name)


def publish(tmp: str | Path, final: str | Path) -> None:
    """Rename a finished temp file into place with the mode a plain ``open()`` would have given it."""
    os.chmod(tmp, file_mode())
    os.replace(tmp, final)


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def refuse_overlaps(inputs: dict[str, str | Path | None], outputs: dict[str, str | Path | None],
                    folders: dict[str, tuple[str, ...]] | None = None) -> None:
    """One-line error when an output is (or resolves to, through symlinks, hard links and ``..``) an input
    or another output. ``folders`` names the options that are folders and the files in them that are read
    or written."""
    folders = folders or {}

    def paths(name: str, value: str | Path) -> list[tuple[Path, str]]:
        return [(Path(value), "")] + [(Path(value) / f, f" ({f} in it)") for f in folders.get(name, ())]

    everything = {k: v for k, v in {**inputs, **outputs}.items() if v}
    for name, value in outputs.items():
        if not value:
            continue
        for other, ovalue in everything.items():
            if other == name:
                continue
            for t, what in paths(name, value):
                for o, owhat in paths(other, ovalue):
                    if _same(t, o):
                        raise SaftError(f"{name} {value}{what} is the same file as {other} {ovalue}{owhat}; "
                                        "choose another path (nothing was written)")
