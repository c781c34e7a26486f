"""A tenant's API key as the gateway knows it, the short-lived cache of key look-ups, and
the count of failed authentications per client address.

A flood of unknown keys must neither push the valid keys out of the cache nor become one
database query per request: known keys and refused ones are kept in two separate bounded
LRU maps (a full map drops its own least recently used entry, never the other map's), and
each client address may fail only so often a minute (:class:`FailureLimiter`) before it is
answered 429 without any look-up.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class TenantKey:
    tenant_id: str
    key_id: str


class _Expiring(Generic[V]):
    """At most ``max_entries`` values, each for ``ttl`` seconds; when full, the least
    recently used one makes room."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, V]] = OrderedDict()

    def get(self, key: bytes) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] < time.monotonic():
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def put(self, key: bytes, value: V, ttl: float) -> None:
        self._entries[key] = (time.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class FailureLimiter:
    """Failed authentications per client address: a bucket of ``limit`` failures refilled
    at ``limit`` a minute; an address with an empty bucket is refused until it refills.
    At most ``max_clients`` addresses are tracked (least recently failed forgotten first)."""

    def __init__(self, max_clients: int = 50_000) -> None:
        self.max_clients = max_clients
        # address -> (failures still allowed, when that was computed)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def retry_after(self, client: str, limit: int) -> int | None:
        """Seconds until ``client`` may try again, or ``None`` when it may try now."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return None
        left = self._refilled(bucket, limit, time.monotonic())
        if left >= 1:
            return None
        return max(1, math.ceil(round((1 - left) * 60 / limit, 6)))  # no float dust

    def failed(self, client: str, limit: int) -> None:
        """Count one failed authentication by ``client``."""
        now = time.monotonic()
        bucket = self._buckets.pop(client, None)
        left = float(limit) if bucket is None else self._refilled(bucket, limit, now)
        self._buckets[client] = (max(left - 1, 0.0), now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    @staticmethod
    def _refilled(bucket: tuple[float, float], limit: int, now: float) -> float:
        left, since = bucket
        return min(float(limit), left + (now - since) * limit / 60)


class KeyCache:
    """Recent key look-ups for ``ttl`` seconds (revocation shows within it): valid keys and
    refused ones in separate bounded maps, so refused keys never evict valid ones; and the
    failed authentications of each client address (:class:`FailureLimiter`)."""

    def __init__(
        self, ttl: float = 5.0, max_entries: int = 10_000, max_refused: int = 10_000
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._valid: _Expiring[TenantKey] = _Expiring(max_entries)
        self._refused: _Expiring[None] = _Expiring(max_refused)
        self.failures = FailureLimiter()

    def get(self, digest: bytes) -> tuple[bool, TenantKey | None]:
        """(known, the key): ``(True, None)`` for a key known to be refused."""
        hit, found = self._valid.get(digest)
        if hit:
            return True, found
        hit, _ = self._refused.get(digest)
        return hit, None

    def put(self, digest: bytes, value: TenantKey | None) -> None:
        if value is None:
            self._valid.discard(digest)
            self._refused.put(digest, None, self.ttl)
        else:
            self._refused.discard(digest)
            self._valid.put(digest, value, self.ttl)

    @property
    def sizes(self) -> tuple[int, int]:
        """(valid keys, refused keys) held now."""
        return len(self._valid), len(self._refused)
