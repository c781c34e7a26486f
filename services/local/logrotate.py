"""Size-based rotation of the logs ``billing up`` keeps in ``<data-dir>/logs``.

Every child (the services, Tansu, weed) writes straight to its log file, opened by the
supervisor with ``O_APPEND`` and passed as its stdout and stderr: a child never waits for the
supervisor, whatever the supervisor is doing, and a Rust or Go binary's output is kept like a
Python service's. The supervisor rotates by *copy and truncate* (logrotate's
``copytruncate``): ``name.log`` is copied to ``name.log.1`` (older copies move up, the oldest
beyond ``backups`` is dropped) and then truncated in place; as every writer appends, its next
line lands at the new start of the file. A line written between the copy and the truncation
is lost — a window of microseconds, taken instead of any way for a child to block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
"""Kept beside the live file: at most ~60 MB per log."""


def rotate(path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> bool:
    """Rotate ``path`` if it holds more than ``max_bytes``; whether it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups < 1:
        os.truncate(path, 0)
        return True
    with contextlib.suppress(FileNotFoundError):
        path.with_name(f"{path.name}.{backups}").unlink()
    for n in range(backups - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path.with_name(f"{path.name}.{n}"), path.with_name(f"{path.name}.{n + 1}"))
    copy = path.with_name(f"{path.name}.1")
    with path.open("rb") as source, copy.open("wb") as target:
        shutil.copyfileobj(source, target, 1024 * 1024)
        os.truncate(path, 0)  # right after the copy: the window for a lost line is the copy's end
    return True


def rotate_all(
    directory: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
) -> list[Path]:
    """Rotate every ``*.log`` in ``directory`` that is over ``max_bytes``; those rotated."""
    rotated = []
    for path in sorted(directory.glob("*.log")):
        try:
            if rotate(path, max_bytes, backups):
                rotated.append(path)
        except OSError:
            continue  # a full disk or a permission: keep supervising, try again next time
    return rotated
