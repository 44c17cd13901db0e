"""An opt-in result cache in front of one table (beyond proxymap, which has none).

Found answers live ``cache_ttl`` seconds, "not found" ``cache_negative_ttl``;
at most ``cache_size`` answers are kept (least recently used go first).
Concurrent misses for the same key share one backend lookup. With
``cache_stale``, a backend failure (RETRY) is answered with the last good
answer for that key while it is no older than that, so a short database outage
does not defer mail. Errors themselves are never cached, and a reopened table
(file changed, configuration reloaded) starts with an empty cache.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from inspect import isawaitable

from .base import Maybe, Table, TableRetry

_MISS = object()


class CachedTable(Table):
    """Wraps an open table; lookups go through the cache, everything else straight through."""

    def __init__(self, inner: Table) -> None:
        super().__init__(inner.ctx)
        self.inner = inner
        self.flags = inner.flags
        options = inner.ctx.options
        self._ttl = options.cache_ttl
        self._negative_ttl = options.cache_negative_ttl
        self._stale = options.cache_stale
        self._size = options.cache_size
        # key -> (stored at, answer); answers are bytes or None ("not found")
        self._entries: OrderedDict[bytes, tuple[float, bytes | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[bytes | None]] = {}
        self.hits = self.misses = self.stale_answers = 0

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            stored, answer = entry
            if now - stored < (self._ttl if answer is not None else self._negative_ttl):
                self._entries.move_to_end(key)
                self.hits += 1
                return answer
        self.misses += 1
        pending = self._inflight.get(key)
        if pending is not None:
            return asyncio.shield(pending)
        try:
            result = self.inner.lookup(key, flags)
        except TableRetry as e:
            return self._stale_or_raise(key, now, e)
        if not isawaitable(result):
            self._store(key, result, now)
            return result
        return self._await(key, flags, result)

    async def _await(self, key: bytes, flags: int, result: Maybe[bytes | None]) -> bytes | None:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await result  # type: ignore[misc]
        except TableRetry as e:
            self._inflight.pop(key, None)
            try:
                answer = self._stale_or_raise(key, time.monotonic(), e)
            except TableRetry:
                future.set_exception(e)
                future.exception()  # waiters get it; nobody else needs to retrieve it
                raise
            future.set_result(answer)
            return answer
        except BaseException as e:
            self._inflight.pop(key, None)
            future.set_exception(e)
            future.exception()
            raise
        self._inflight.pop(key, None)
        self._store(key, answer, time.monotonic())
        future.set_result(answer)
        return answer

    def _store(self, key: bytes, answer: bytes | None, now: float) -> None:
        if (self._ttl if answer is not None else self._negative_ttl) <= 0 and not self._stale:
            return
        self._entries[key] = (now, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def _stale_or_raise(self, key: bytes, now: float, error: TableRetry) -> bytes | None:
        """The last good answer while it is no older than cache_stale; else the failure."""
        entry = self._entries.get(key)
        if entry is None or now - entry[0] >= self._stale:
            raise error
        self.stale_answers += 1
        self.ctx.log.warning(
            "%s: backend failed; answering from the cache (%.0f s old)",
            self.ctx.spec,
            now - entry[0],
        )
        return entry[1]

    # Everything but lookup goes to the table itself.
    def update(self, key: bytes, value: bytes, flags: int) -> Maybe[None]:
        return self.inner.update(key, value, flags)

    def delete(self, key: bytes, flags: int) -> Maybe[bool]:
        return self.inner.delete(key, flags)

    def sequence(self, function: int, flags: int) -> Maybe[tuple[bytes, bytes] | None]:
        return self.inner.sequence(function, flags)

    def changed(self) -> bool:
        return self.inner.changed()

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict[str, int]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_stale": self.stale_answers,
            "cache_entries": len(self._entries),
            **self.inner.stats(),
        }
