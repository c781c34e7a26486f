"""The usage spool: where usage waits, on disk, while the broker is away.

Append-only segment files (``00000001.jsonl``, ``00000002.jsonl``, …), one ``UsageRecorded``
JSON per line. Every append is one ``write`` followed by ``fsync`` (and the directory is
fsync'd when a segment is created or removed), so an event the gateway spooled survives a
SIGKILL or a power cut. Segments are re-sent oldest first and deleted only after the broker
acknowledged every line; a crash between the two re-sends a segment, which downstream
de-duplication by ``request_id`` absorbs.

A torn last line (a crash mid-write) is cut off when the spool is opened; a line that does
not decode is moved to ``rejected.jsonl`` beside the segments for an operator, never
dropped silently. One gateway process owns a spool directory (an exclusive ``flock``).

The methods block (they fsync): call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from services.adapters.errors import ConfigError
from services.core.events import UsageRecorded, decode_recorded

log = logging.getLogger("billing.spool")
SEGMENT_BYTES = 64 << 20
SUFFIX = ".jsonl"
REJECTED = "rejected.jsonl"


class SpoolBusy(ConfigError):
    """Another gateway process owns this spool directory."""


class Spool:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._lock_file: int | None = None
        self._active: Path | None = None
        self._sizes: dict[Path, int] = {}
        self._oldest: dict[Path, float] = {}
        """Wall-clock time of each segment's first event (for the oldest-unsent metric)."""
        self._rejected: dict[Path, set[int]] = {}
        """Line numbers of each segment already moved to rejected.jsonl."""

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        if self._lock_file is not None:
            return  # already open (claimed by :func:`claim`)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(
                f"spool {self.directory} is in use by another gateway; give each gateway "
                "process its own BILLING_SPOOL_DIR"
            ) from None
        self._lock_file = fd
        for path in self.segments():
            self._repair(path)
            size = path.stat().st_size
            if size == 0:
                self._remove(path)
                continue
            self._sizes[path] = size
            self._oldest[path] = self._first_time(path)
        if self._sizes:
            log.warning(
                "spool %s holds %d bytes of unsent usage from an earlier run; re-sending",
                self.directory,
                self.size_bytes,
            )

    def close(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    # -- state ---------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def empty(self) -> bool:
        return not self._sizes

    @property
    def oldest(self) -> float | None:
        """Wall-clock time of the oldest spooled event, ``None`` when empty."""
        return min(self._oldest.values(), default=None)

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"[0-9]*{SUFFIX}"))

    # -- writing -------------------------------------------------------------------------

    def append(self, events: list[UsageRecorded]) -> None:
        """Write ``events`` durably: when this returns they are on disk."""
        if not events:
            return
        data = b"".join(e.model_dump_json().encode() + b"\n" for e in events)
        with self._lock:
            path = self._active
            if path is None or self._sizes.get(path, 0) >= self.segment_bytes:
                path = self._new_segment()
            size = self._sizes.get(path, 0)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:  # a full disk may take part of a write and return the count
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # Leave the segment as it was: a partial line would swallow the next append.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                raise
            finally:
                os.close(fd)
            self._sizes[path] = size + len(data)
            self._oldest.setdefault(path, time.time())

    def _new_segment(self) -> Path:
        existing = self.segments()
        number = int(existing[-1].stem) + 1 if existing else 1
        path = self.directory / f"{number:08d}{SUFFIX}"
        path.touch(0o600)
        self._fsync_directory()
        self._active = path
        return path

    # -- re-sending ----------------------------------------------------------------------

    def sealed(self) -> list[Path]:
        """Every segment holding events, oldest first; later appends go to a new segment."""
        with self._lock:
            self._active = None
            return sorted(self._sizes)

    def read(self, path: Path, batch: int) -> Iterator[list[UsageRecorded]]:
        """The events of a sealed segment in batches; undecodable lines go to rejected
        (once, however often the segment is read)."""
        events: list[UsageRecorded] = []
        seen = self._rejected.setdefault(path, set())
        with path.open("rb") as handle:
            for number, line in enumerate(handle):
                try:
                    events.append(decode_recorded(line))
                except (ValidationError, ValueError):
                    if number not in seen:
                        seen.add(number)
                        self._reject(line)
                    continue
                if len(events) >= batch:
                    yield events
                    events = []
        if events:
            yield events

    def remove(self, path: Path) -> None:
        """Forget a segment whose every event the broker acknowledged."""
        with self._lock:
            self._remove(path)

    def _remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._sizes.pop(path, None)
        self._oldest.pop(path, None)
        self._rejected.pop(path, None)
        if self._active == path:
            self._active = None
        self._fsync_directory()

    # -- repair --------------------------------------------------------------------------

    def _repair(self, path: Path) -> None:
        """Cut a torn last line (written partly when the process died)."""
        data = path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.error("spool segment %s ends in a torn line of %d bytes; cut", path, len(data) - keep)
        self._reject(data[keep:] + b"\n")
        with path.open("r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())

    def _reject(self, line: bytes) -> None:
        from services.adapters import metrics

        metrics.SPOOL_REJECTED.inc()
        with (self.directory / REJECTED).open("ab") as handle:
            handle.write(line if line.endswith(b"\n") else line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _first_time(self, path: Path) -> float:
        with path.open("rb") as handle:
            first = handle.readline()
        try:
            return decode_recorded(first).recorded_at.timestamp()
        except (ValidationError, ValueError):
            return path.stat().st_mtime

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def slot_directory(base: Path, slot: int) -> Path:
    """Worker ``slot``'s spool: the base directory itself for slot 0 (a single gateway's
    spool, as before workers existed), ``base/worker-N`` for the others."""
    return base if slot == 0 else base / f"worker-{slot}"


def spooled_bytes(base: Path) -> int:
    """Bytes waiting in every worker's spool under ``base`` (read from the disk: the other
    workers' spools are theirs)."""
    total = 0
    for directory, _, names in os.walk(base):  # a directory gone meanwhile is skipped
        for name in names:
            if not name.endswith(SUFFIX) or name == REJECTED:
                continue
            with contextlib.suppress(FileNotFoundError):  # re-sent and deleted meanwhile
                total += os.stat(os.path.join(directory, name)).st_size
    return total


def claim(base: Path, slots: int) -> Spool:
    """Open the first spool of ``slots`` no other process holds: each of N gateway workers
    gets one, and a worker restarted after a crash takes over the one its predecessor left
    (and re-sends what is in it)."""
    for slot in range(slots):
        spool = Spool(slot_directory(base, slot))
        try:
            spool.open()
        except SpoolBusy:
            continue
        return spool
    raise SpoolBusy(
        f"all {slots} spools under {base} are in use: more gateway processes than "
        "BILLING_GATEWAY_WORKERS share this BILLING_SPOOL_DIR"
    )
