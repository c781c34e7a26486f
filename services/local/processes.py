"""Child processes of the local stack that must not outlive it: parent-death signals, pid
files, and the reaping of a previous stack's leftovers.

``billing up`` starts every child (services, Tansu, SeaweedFS) in a session of its own, so a
Ctrl-C reaches only the supervisor, which then stops them in order. If the supervisor itself
is killed, each child is sent SIGTERM by the kernel (``PR_SET_PDEATHSIG``); one still shutting
down when the next ``billing up`` starts on the same data dir is found through its pid file
and stopped before anything new takes its ports or its files. A pid file holds the pid and the
process's start time, so a pid reused by an unrelated process is never signalled.
Linux only (``/proc``, ``prctl``); elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
_POLL = 0.05


def die_with_parent() -> None:
    """In a child, before exec: be sent SIGTERM when the parent dies (even by SIGKILL).

    The signal follows the *thread* that forked, so only call this for children started from
    a thread that lives as long as the process (the supervisor's main thread)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: orphans are possible if the supervisor is killed


LOOPBACK = "127.0.0.1"
_LOG_TAIL_BYTES = 2000


def signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Signal the process group ``process`` leads (started with ``start_new_session``, so
    its pid is the group id); nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether ``port`` can be bound on ``host``, as the servers' own listeners bind it
    (``SO_REUSEADDR``: a port left in TIME_WAIT by a previous run counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def log_tail(log_path: Path | None, whose: str) -> str:
    """The end of a child's log, to append to an error saying it failed to start."""
    if log_path is None:
        return f" (no log: pass log_path to keep {whose} output)"
    try:
        with log_path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
            tail = log.read().decode(errors="replace").strip()
    except OSError as exc:
        return f" (log {log_path} unreadable: {exc})"
    return f"; last lines of {log_path}:\n{tail}"


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of proc(5), counted from field 3 here


def write_pid_file(path: Path, pid: int) -> None:
    """Record ``pid`` (with its start time) for :func:`stop_recorded`."""
    identity = start_time(pid)
    if identity is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(f"{pid} {identity}\n")
    os.replace(temporary, path)


def recorded_pid(path: Path) -> int | None:
    """The pid in ``path`` if that very process still runs, else None."""
    try:
        pid_text, identity = path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and start_time(pid) == identity else None


POSTMASTER_STOP_SECONDS = 30.0
"""How long the watchdog waits for the embedded PostgreSQL to stop (``watch_postmaster``)."""


def stop_recorded(directory: Path, timeout: float = POSTMASTER_STOP_SECONDS + 5.0) -> list[str]:
    """Stop every process recorded in ``directory/*.pid`` that still runs (SIGTERM to its
    process group, SIGKILL after ``timeout``: longer than the watchdog gives PostgreSQL, so
    a watchdog still stopping it is never killed mid-way); remove the files. Returns the
    names stopped."""
    stopped = []
    for path in sorted(directory.glob("*.pid")):
        pid = recorded_pid(path)
        if pid is not None:
            stop_group(pid, timeout)
            stopped.append(path.stem)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stopped


def stop_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group led by ``pid`` (not our child: polled, not waited for),
    then SIGKILL it if ``pid`` outlives ``timeout``."""
    identity = start_time(pid)
    if identity is None:
        return
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = False
    while start_time(pid) == identity:
        if time.monotonic() >= deadline:
            if killed:
                return  # not ours to kill (another user's): the caller's port check says so
            _signal(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + timeout
        time.sleep(_POLL)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            os.killpg(pid, signum)  # the children lead their own group (start_new_session)
        except ProcessLookupError:
            os.kill(pid, signum)


def watch_postmaster(pgdata: Path, timeout: float = POSTMASTER_STOP_SECONDS) -> None:
    """Wait for SIGTERM (sent by the kernel when the supervisor dies, by the supervisor
    otherwise), then fast-shut-down the PostgreSQL server of ``pgdata`` and wait for it.

    pgserver's server runs detached (``pg_ctl`` starts it in a session of its own), so without
    this a killed ``billing up`` would leave it running."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return  # already stopped (the supervisor's own stop comes first)
    identity = start_time(pid)
    if identity is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown: roll back, checkpoint, exit
    deadline = time.monotonic() + timeout
    while start_time(pid) == identity and time.monotonic() < deadline:
        time.sleep(_POLL)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "watch-postmaster":
        watch_postmaster(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m services.local.processes watch-postmaster PGDATA")
