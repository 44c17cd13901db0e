"""Open table instances, shared by every connection of a service.

Instances are keyed as Postfix keys them (``type:name`` plus instance flags), so
every client that asks for the same table with the same instance flags shares
one open table. Opening may block (reading a 100k-line file), so it runs in a
worker thread while other tables keep answering; concurrent first requests for
the same table wait for the same open. A table that fails to open is replaced
by an unavailable stand-in that answers RETRY (as Postfix's surrogate table
does) and is tried again after ``reopen_delay``; a table whose file changed is
reopened in the background and swapped in atomically, so no client is dropped
and no lookup sees half a table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..tables.base import OpenContext, Table, TableError, TableOptions, TableRetry, utf8_fold
from ..tables.cached import CachedTable
from ..tables.registry import driver_for
from ..wire.proxymap import PATTERN

Key = tuple[str, int]


class TableUnavailable(TableRetry):
    """RETRY from a table that failed to open; the cause was logged when it failed."""


class UnavailableTable(Table):
    """Stands in for a table that could not be opened: every operation is RETRY."""

    impl_flags = PATTERN  # what Postfix's surrogate reports

    def __init__(self, ctx: OpenContext, reason: str) -> None:
        super().__init__(ctx)
        self.reason = reason
        self.retry_at = 0.0

    def _fail(self, *_: object) -> None:
        raise TableUnavailable(f"{self.ctx.spec} is unavailable. {self.reason}")

    lookup = update = delete = sequence = _fail  # type: ignore[assignment]


class TableCache:
    def __init__(
        self,
        *,
        writable: bool,
        fold: Callable[[bytes], bytes] = utf8_fold,
        log: logging.Logger,
        reopen_delay: float = 1.0,
        options_for: Callable[[str], TableOptions] = lambda _: TableOptions(),
    ) -> None:
        self._writable = writable
        self._options_for = options_for
        self._fold = fold
        self._log = log
        self._reopen_delay = reopen_delay
        self._tables: dict[Key, Table] = {}
        self._opening: dict[Key, asyncio.Future[Table]] = {}
        self._refused: dict[Key, str] = {}  # why a changed table's new contents were refused

    def __len__(self) -> int:
        return len(self._tables)

    def instances(self) -> list[tuple[Key, Table]]:
        """The open instances (UnavailableTable for one that failed to open)."""
        return list(self._tables.items())

    def flush(self, name: str) -> list[Table]:
        """Forget every instance of table ``name``, so the next request opens it afresh
        (with an empty result cache); the caller closes what is returned."""
        keys = [key for key in self._tables if key[0] == name]
        for key in keys:
            self._refused.pop(key, None)
        return [self._tables.pop(key) for key in keys]

    def get(self, name: str, instance_flags: int) -> Table | Awaitable[Table]:
        """The open instance, or an awaitable that opens it (once, for every waiter)."""
        key = (name, instance_flags)
        table = self._tables.get(key)
        if table is not None and not (
            isinstance(table, UnavailableTable) and table.retry_at <= time.monotonic()
        ):
            return table
        pending = self._opening.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._open(key, table))
            self._opening[key] = pending
            pending.add_done_callback(lambda _: self._opening.pop(key, None))
        return asyncio.shield(pending)

    async def _open(self, key: Key, previous: Table | None) -> Table:
        table = await asyncio.to_thread(self._open_now, key)
        if isinstance(table, UnavailableTable):
            table.retry_at = time.monotonic() + self._reopen_delay
            if not (isinstance(previous, UnavailableTable) and previous.reason == table.reason):
                self._log.warning("%s is unavailable. %s", table.ctx.spec, table.reason)
        elif isinstance(previous, UnavailableTable):
            self._log.info("%s is available again", table.ctx.spec)
        self._tables[key] = table
        return table

    def _context(self, key: Key) -> OpenContext:
        name, instance_flags = key
        type_name, _, rest = name.partition(":")
        return OpenContext(
            type=type_name,
            name=rest,
            instance_flags=instance_flags,
            writable=self._writable,
            fold=self._fold,
            log=self._log,
            open_nested=self._open_nested,
            options=self._options_for(name),
        )

    def _open_nested(self, name: str, instance_flags: int) -> Table:
        """Open a component table now (we are already in a worker thread)."""
        ctx = self._context((name, instance_flags))
        driver = driver_for(ctx.type)
        if driver is None:
            raise TableRetry(f"unsupported dictionary type: {ctx.type}")
        return driver.open(ctx)

    def _open_now(self, key: Key) -> Table:
        """Open a table (in a worker thread), behind its result cache if it has one;
        never raises."""
        try:
            table = self._open_nested(*key)
            options = table.ctx.options
            wants_cache = options.cache_ttl or options.cache_negative_ttl or options.cache_stale
            return CachedTable(table) if wants_cache and not self._writable else table
        except TableError as e:
            return UnavailableTable(self._context(key), str(e))
        except Exception as e:  # a driver bug must not take the service down
            self._log.exception("%s: open failed", key[0])
            return UnavailableTable(self._context(key), f"open failed: {e!r}")

    async def refresh_changed(self) -> None:
        """Reopen every table whose data changed, swapping each in when it is ready."""
        for key, table in list(self._tables.items()):
            if isinstance(table, UnavailableTable) or not table.changed():
                continue
            fresh = await asyncio.to_thread(self._open_now, key)
            if isinstance(fresh, UnavailableTable):
                # Keep serving the last good data (a file may be missing for a moment
                # while it is replaced), and say once why the new one is refused.
                if self._refused.get(key) != fresh.reason:
                    self._refused[key] = fresh.reason
                    self._log.warning(
                        "%s changed but cannot be reopened: %s; still serving the previous "
                        "contents",
                        table.ctx.spec,
                        fresh.reason,
                    )
                continue
            self._refused.pop(key, None)
            if self._tables.get(key) is table:
                self._tables[key] = fresh
                self._log.info("table %s has changed -- reloaded", table.ctx.spec)
                table.close()
            else:
                fresh.close()

    async def watch(self, interval: float) -> None:
        """Check for changed tables every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_changed()
            except Exception:
                self._log.exception("checking tables for changes failed")

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()
