"""Fail fast for a moment after a backend server could not be reached.

Used by the network table drivers (ldap, memcache) so that a dead server is
not asked again by every lookup, while a server that comes back is used
again within a second.
"""

from __future__ import annotations

import time


class Backoff:
    """Fail fast for a moment after a server could not be reached, a little longer each time.

    The pause starts at ``first`` seconds and doubles up to ``longest``, short
    enough that lookups succeed again within a second of the server's return;
    any success resets it.
    """

    def __init__(self, first: float = 0.05, longest: float = 0.5) -> None:
        self._first = first
        self._longest = longest
        self._pause = 0.0
        self._until = 0.0
        self.cause = ""

    def blocked(self) -> str | None:
        """The last failure's cause while lookups should not try again yet, else None."""
        return self.cause if time.monotonic() < self._until else None

    def failed(self, cause: str) -> None:
        self._pause = min(self._longest, self._pause * 2 or self._first)
        self._until = time.monotonic() + self._pause
        self.cause = cause

    def succeeded(self) -> None:
        self._pause = self._until = 0.0
