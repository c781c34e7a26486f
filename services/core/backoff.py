"""One retry pacing for every loop that waits for something to come back (pure).

The broker, the database, the spool's disk and the catalogue all fail in the same way from
the caller's point of view: try, wait, try again a little later, and start over quickly
once it worked. :class:`Backoff` is that schedule; the loops keep their own decisions of
what to retry and what to log.
"""

from __future__ import annotations


class Backoff:
    """Delays that double from ``initial`` up to ``cap``; :meth:`reset` after a success."""

    __slots__ = ("cap", "initial", "_next")

    def __init__(self, initial: float = 0.5, cap: float = 5.0) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"need 0 < initial <= cap, got {initial} and {cap}")
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long (at most ``cap``)."""
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """Back to ``initial`` (the thing waited for came back)."""
        self._next = self.initial
