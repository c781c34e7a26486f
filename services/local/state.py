"""``<data-dir>/stack.json``: where a running ``billing up`` can be reached.

``billing up`` writes it once the stack is ready and removes it when it stops; the CLI reads
it so that a command run beside the stack, on the same data dir, uses the stack's database
and broker without any ``BILLING_*`` variable. A file whose stack is gone (killed: its
process is dead, or nothing holds the data dir's lock) is ignored. Standard library only:
every CLI command reads it, ``billing quote --batch`` included.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "stack.json"
LOCK_FILE = "up.lock"
"""Held (flock) by the running ``billing up`` for as long as it lives."""


@dataclass(frozen=True, slots=True)
class StackState:
    pid: int
    data_dir: str
    database_url: str
    kafka_bootstrap: str
    gateway_url: str
    topic_prefix: str = ""
    started_at: str = ""
    broker_storage: str = ""
    """``s3`` (durable, in ``<data-dir>/objects``), ``memory`` or ``external`` (a given one)."""


def state_path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_FILE


def write_state(data_dir: Path, state: StackState) -> Path:
    """Write the file atomically (readers see the old file or the new one, never half),
    readable by its owner only: the database URL may carry a password."""
    path = state_path(data_dir)
    temporary = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(asdict(state), handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read_state(data_dir: Path) -> StackState | None:
    """The running stack's state, or None: no file, an unreadable one, or a dead process."""
    try:
        document = json.loads(state_path(data_dir).read_text())
        state = StackState(**document)
    except (OSError, ValueError, TypeError):
        return None
    return state if _alive(state.pid) and _locked(data_dir) else None


def remove_state(data_dir: Path, pid: int) -> None:
    """Remove the file if it is ``pid``'s (a newer stack's file is left alone)."""
    path = state_path(data_dir)
    try:
        if json.loads(path.read_text()).get("pid") != pid:
            return
    except (OSError, ValueError, AttributeError):
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _locked(data_dir: Path) -> bool:
    """Whether a ``billing up`` holds the data dir's lock: a pid alone can be reused by
    another process after a crash or a reboot."""
    try:
        handle = lock_path(data_dir).open("a")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # held exclusively: the stack is up
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
