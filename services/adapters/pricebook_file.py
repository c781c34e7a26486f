"""The price book as an append-only JSON Lines file (the file adapter of the ``PriceBook`` port).

Each line is one fact: a price version or an alias. Nothing is rewritten; a correction is a
later line. Writers take an exclusive ``flock`` and first read any lines another process
appended, so version numbers stay unique when the CLI and the gateway share one file. A torn
final line (a crash mid-write) is ignored on load and cut off before the next append.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.adapters.errors import PriceBookCorrupt
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.errors import BillingError
from services.core.pricebook import InMemoryPriceBook, PriceVersion
from services.core.pricing import parse_pricing


def _version_line(v: PriceVersion) -> dict[str, Any]:
    return {
        "type": "version",
        "model": v.model,
        "version": v.version,
        "layer": v.layer,
        "source": v.source,
        "reason": v.reason,
        "effective_from": v.effective_from.isoformat(),
        "recorded_at": v.recorded_at.isoformat(),
        "pricing": v.pricing.to_json(),
    }


class FilePriceBook(InMemoryPriceBook):
    """A price book persisted to ``path``; reads are served from memory."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._offset = 0  # bytes of the file already applied to memory
        self._held: Any = None  # the locked handle while inside ``batch()``
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        with self._locked():
            pass

    @classmethod
    def open(cls, path: Path, *, seed: bool = True) -> FilePriceBook:
        """Open (creating) the book; an empty book is seeded with the bundled snapshot."""
        book = cls(path)
        if seed and book.last_version == 0:
            with book.batch():
                apply_catalogue(
                    book, default_catalogue(), observed_at=datetime.now(UTC), source="snapshot"
                )
        return book

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the lock across many writes and fsync once at the end (catalogue syncs)."""
        if self._held is not None:
            yield
            return
        with self._locked() as handle:
            self._held = handle
            try:
                yield
            finally:
                self._held = None
                handle.flush()
                os.fsync(handle.fileno())

    # -- storage --------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        if self._held is not None:
            yield self._held
            return
        with open(self.path, "r+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._catch_up(handle)
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _catch_up(self, handle: Any) -> None:
        handle.seek(self._offset)
        data = handle.read()
        position = self._offset
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn final write: ignore, truncated before the next append
            try:
                self._apply_line(json.loads(raw, parse_float=Decimal))
            except (ValueError, KeyError, TypeError, BillingError) as exc:
                raise PriceBookCorrupt(f"{self.path}: byte {position}: {exc}") from exc
            position += len(raw)
        self._offset = position

    def _apply_line(self, line: dict[str, Any]) -> None:
        if line["type"] == "alias":
            super().add_alias(line["alias"], line["model"])
            return
        self._apply(
            PriceVersion(
                model=line["model"],
                version=int(line["version"]),
                pricing=parse_pricing(line["pricing"], line["model"]),
                effective_from=datetime.fromisoformat(line["effective_from"]),
                recorded_at=datetime.fromisoformat(line["recorded_at"]),
                layer=line["layer"],
                source=line["source"],
                reason=line.get("reason", ""),
            )
        )

    def _append(self, handle: Any, line: dict[str, Any]) -> None:
        handle.seek(self._offset)
        handle.truncate()  # drop a torn tail left by a crashed writer
        encoded = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        handle.write(encoded)
        self._offset += len(encoded)
        if self._held is None:
            handle.flush()
            os.fsync(handle.fileno())

    # -- the port -------------------------------------------------------------------------

    def _write(self, prepare: Callable[[], PriceVersion | None]) -> PriceVersion | None:
        with self._locked() as handle:
            # Persist first, then apply: a failed write must not leave a version in memory
            # that no other process will ever see.
            version = prepare()
            if version is not None:
                self._append(handle, _version_line(version))
                self._apply(version)
            return version

    def add_alias(self, alias: str, model: str) -> None:
        with self._locked() as handle:
            if alias == model or self.aliases().get(alias) == model:
                return
            self._append(handle, {"type": "alias", "alias": alias, "model": model})
            super().add_alias(alias, model)

    def reload(self) -> None:
        """Apply lines other processes appended since the last read (cheap when none were)."""
        if self.path.stat().st_size == self._offset:
            return
        with self._locked():
            pass
