"""A tenant's API key as the gateway knows it, and the short-lived cache of key look-ups."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TenantKey:
    tenant_id: str
    key_id: str


class KeyCache:
    """Recent key look-ups, positive and negative, for a few seconds (revocation shows
    within ``ttl``); bounded so a flood of random keys cannot grow it without limit."""

    def __init__(self, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, TenantKey | None]] = {}

    def get(self, digest: bytes) -> tuple[bool, TenantKey | None]:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, digest: bytes, value: TenantKey | None) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl, value)
