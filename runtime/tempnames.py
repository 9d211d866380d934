"""Temporary names inside a bundle folder, and the sweep of those an interrupted run left.

Every multi-file write (export, calibrate, quantize) goes to a temp name and is renamed when
complete, so a bundle never holds half a variant. A run killed hard (SIGKILL, the OOM killer)
cannot remove its temp folder: on a 1.5B model that is gigabytes. Temp names therefore carry
the writer's PID, ``.<label>.<pid>.<random>.tmp``, and the next run in the same folder removes
those whose process is gone (checked on this machine: a folder shared between machines must
not be written from two of them at once). A live run's temp names are never touched, so two
runs on one bundle (say calibrate and quantize) can still overlap.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_OURS = re.compile(r"^\.(?P<label>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
# Names written before the PID was part of them (llama-export <= stop 17): swept only when old.
_LEGACY = re.compile(r"^\.[a-z0-9_]+\.[a-z0-9_]{8}\.tmp$|^\.calibrate-[a-z0-9_]{8}\.onnx$")
LEGACY_MIN_AGE_S = 6 * 3600


def temp_dir(folder: Path, label: str) -> Path:
    """A new private folder ``folder/.<label>.<pid>.<random>.tmp``."""
    return Path(tempfile.mkdtemp(prefix=f".{label}.{os.getpid()}.", suffix=".tmp", dir=folder))


def temp_file(folder: Path, label: str) -> Path:
    """A new empty file ``folder/.<label>.<pid>.<random>.tmp`` (closed)."""
    fd, name = tempfile.mkstemp(prefix=f".{label}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def leftovers(folder: Path, label: str | None = None) -> list[Path]:
    """Temp entries of ``folder`` whose writer is gone (only ``label``'s when given)."""
    now = time.time()
    out = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _OURS.match(p.name)
        if m:
            if (label is None or m["label"] == label) and not pid_alive(int(m["pid"])):
                out.append(p)
        elif label is None and _LEGACY.match(p.name):
            try:
                if now - p.stat().st_mtime > LEGACY_MIN_AGE_S:
                    out.append(p)
            except OSError:
                pass
    return sorted(out)


def sweep_leftovers(folder: Path, log: Callable[[str], None], label: str | None = None) -> int:
    """Remove :func:`leftovers`; log each one; return the bytes freed."""
    freed = 0
    for p in leftovers(folder, label):
        size = _size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            freed += size
            log(f"removed {p.name} ({size / 1e6:.0f} MB), left by an interrupted run")
    return freed


def _size(p: Path) -> int:
    try:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0
