"""The embedded PostgreSQL of ``billing up`` (and of tests and benchmarks without a server).

The ``pgserver`` wheel ships PostgreSQL 16; the server keeps its files under
``<data-dir>/postgres`` and is reached over a unix socket in that directory, so it never
takes a TCP port.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from services.adapters.errors import DatabaseError
from services.local.processes import start_time


class EmbeddedPostgres:
    """A PostgreSQL server of the ``pgserver`` wheel, kept in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "postgres"
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server; return its connection URL."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
            import pgserver

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            _forget_dead_handles(self.pgdata)
            try:
                self._server = pgserver.get_server(self.pgdata, cleanup_mode=None)
            except Exception as exc:  # pgserver raises plain exceptions with pg_ctl's output
                raise DatabaseError(f"embedded PostgreSQL did not start: {exc}") from exc
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup_mode = "stop"
            self._server.cleanup()
            self._server = None


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop the processes that died without saying so (a killed ``billing up``) from
    pgserver's list of the server's users: it stops the server only when the last one in
    the list lets go, so a dead pid there would keep it running after every later stop."""
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        with contextlib.suppress(OSError):
            path.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    if Path("/proc").is_dir():
        return start_time(pid) is not None  # a zombie (killed, not yet reaped) is dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
