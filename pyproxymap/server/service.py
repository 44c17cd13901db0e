"""Request in, reply bytes out: the proxymap service without any socket.

This is where a request meets the allow-list and a table, and the one place
where outcomes become status codes:

====================================  ========
found / done                          OK
not found                             NOKEY
TableRetry, timeout, any other error  RETRY
TableConfigError, Unsupported         CONFIG
malformed request                     BAD
not approved, write on proxymap       DENY
====================================  ========

A failure is never answered NOKEY: Postfix would bounce mail on it.

Every reply is counted by (table, request, status), and every request that
reaches a table is timed into a (table, request) histogram; one slower than the
table's ``slow_lookup`` is logged.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from inspect import isawaitable
from time import perf_counter_ns
from typing import Any

from ..config.allowlist import AllowList
from ..tables.base import Table, TableConfigError, TableRetry, Unsupported
from ..tables.source import printable, valid_utf8
from ..wire.proxymap import (
    DELETE,
    LOCK,
    LOOKUP,
    OPEN,
    OPEN_LOCK,
    SEQ_FIRST,
    SEQ_NEXT,
    SEQUENCE,
    UPDATE,
    UTF8_REQUEST,
    Request,
    Status,
    encode_reply,
)
from .latency import BOUNDS_NS, Histogram, new_histogram
from .tablecache import TableCache, TableUnavailable

PROXY_PREFIX = "proxy:"
#: Result types that are answers already (isawaitable is costly on the hot path).
_READY = frozenset({bytes, bool, tuple})
NON_UTF8 = "malformed UTF-8 or invalid codepoint"
KEYED = (LOOKUP, UPDATE, DELETE)


class Pending:
    """A reply still to come: ``finish(future)`` is the reply once ``future`` is done.

    A table's own future (a database answer) is waited for with a callback, not a
    task: the session adds one to ``future`` and sends ``finish``'s bytes. Cancelling
    ``future`` gives the request up."""

    __slots__ = ("finish", "future")

    def __init__(
        self, future: asyncio.Future[Any], finish: Callable[[asyncio.Future[Any]], bytes]
    ) -> None:
        self.future = future
        self.finish = finish


Reply = bytes | Pending


class Service:
    """One proxymap-protocol service (the read-only proxymap, or proxywrite)."""

    def __init__(
        self, allowlist: AllowList, tables: TableCache, log: logging.Logger, *, utf8: bool = True
    ) -> None:
        self.allowlist = allowlist
        self.tables = tables
        self.log = log
        self.utf8 = utf8  # smtputf8_enable: Postfix's dict_utf8 layer wraps every table
        #: replies sent, by (table as asked, request, status): for status and metrics
        self.counts: Counter[tuple[str, str, int]] = Counter()
        #: time from request to reply, by (table as asked, request): see latency.py
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.writer = allowlist.writer
        self.name = "proxywrite" if self.writer else "proxymap"

    def keep_stats(self, old: Service) -> None:
        """Go on counting where ``old`` (the service a reload replaces) left off."""
        self.counts, self.latency = old.counts, old.latency

    def handle(self, req: Request) -> Reply:
        """The reply to ``req``: bytes when it is ready now, else the Pending reply."""
        name = req.table
        while name.startswith(PROXY_PREFIX):
            name = name[len(PROXY_PREFIX) :]
        op = req.op
        if op in (UPDATE, DELETE) and not self.writer:
            self.log.warning("refusing %s %s request on non-proxywrite service", name, op)
            return self._reply(req, Status.DENY)
        if ":" not in name:
            self.log.warning("%s request: table name without type: %r", op, name)
            return self._reply(req, Status.BAD)
        if not self.allowlist.approves(name):
            self.log.warning('request for unapproved table: "%s"', name)
            self.log.warning("%s", self.allowlist.hint(name))
            return self._reply(req, Status.DENY)
        if op == SEQUENCE and req.function not in (SEQ_FIRST, SEQ_NEXT):
            self.log.warning("sequence request with bad function %d", req.function)
            return self._reply(req, Status.BAD)
        if op == OPEN and req.flags & OPEN_LOCK and req.flags & LOCK:
            # Postfix's dict_open panics when a table is opened with both; no real client
            # sends LOCK in an open (verify(8) sends both in its updates, which is fine).
            self.log.warning(
                "%s request for %s with both open lock and access lock flags", op, name
            )
            return self._reply(req, Status.BAD)
        start = perf_counter_ns()
        table = self.tables.get(name, req.instance_flags)
        if not isinstance(table, Table):
            opened = asyncio.get_running_loop().create_task(self._call_when_open(req, table, start))
            return Pending(opened, asyncio.Task.result)
        return self._call(req, table, start)

    async def _call_when_open(self, req: Request, opening: Awaitable[Table], start: int) -> bytes:
        table = await opening
        reply = self._call(req, table, start)
        if isinstance(reply, bytes):
            return reply
        try:
            await reply.future  # cancelling this task cancels it
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
        except Exception:
            pass  # finish() answers it
        return reply.finish(reply.future)

    def _took(self, req: Request, table: Table, start: int) -> None:
        """Time a reply (from ``start``, perf_counter_ns) and warn when it was slow."""
        elapsed = perf_counter_ns() - start
        histogram = self.latency.get((req.table, req.op))
        if histogram is None:
            histogram = self.latency[req.table, req.op] = new_histogram()
        histogram[bisect_left(BOUNDS_NS, elapsed)] += 1
        histogram[-1] += elapsed
        slow = table.ctx.options.slow_lookup
        if elapsed > slow * 1e9 and slow:
            what = f' of "{printable(req.key[:100])}"' if req.op in KEYED else ""
            self.log.warning(
                "%s: %s%s took %.0f ms (slow_lookup = %g s)",
                printable(table.ctx.spec),
                req.op,
                what,
                elapsed / 1e6,
                slow,
            )

    def _call(self, req: Request, table: Table, start: int) -> Reply:
        """The reply now, or Pending until the table has answered; timed either way."""
        op = req.op
        if op == OPEN:
            reply = self._reply(req, Status.OK, req.instance_flags | table.flags)
        elif op == LOOKUP and self._not_utf8(req, req.key):
            self.log.warning(
                '%s: non-UTF-8 key "%s": %s',
                printable(table.ctx.spec),
                printable(req.key),
                NON_UTF8,
            )
            reply = self._reply(req, Status.NOKEY, req.flags)
        else:
            try:
                if op == LOOKUP:
                    result: Any = table.lookup(table.folded(req.key, req.flags), req.flags)
                elif op == SEQUENCE:
                    result = table.sequence(req.function, req.flags)
                elif op == UPDATE:
                    result = table.update(table.folded(req.key, req.flags), req.value, req.flags)
                else:
                    result = table.delete(table.folded(req.key, req.flags), req.flags)
            except Exception as e:
                reply = self._failed(req, e)
            else:
                if isinstance(result, asyncio.Future):  # a database's answer to come
                    return Pending(result, partial(self._settled, req, table, start))
                if result is not None and type(result) not in _READY and isawaitable(result):
                    task = asyncio.get_running_loop().create_task(result)
                    return Pending(task, partial(self._settled, req, table, start))
                reply = self._succeeded(req, result)
        self._took(req, table, start)
        return reply

    def _settled(self, req: Request, table: Table, start: int, done: asyncio.Future[Any]) -> bytes:
        """The reply once the table's answer (or failure) is in."""
        if done.cancelled():
            reply = self._failed(req, TableRetry(f"{req.table}: {req.op} was cancelled"))
        elif (error := done.exception()) is not None:
            reply = self._failed(req, error)
        else:
            reply = self._succeeded(req, done.result())
        self._took(req, table, start)
        return reply

    def _reply(
        self, req: Request, status: Status, flags: int = 0, key: bytes = b"", value: bytes = b""
    ) -> bytes:
        """Every reply leaves through here: counted, then encoded."""
        self.counts[req.table, req.op, status] += 1
        return encode_reply(req.op, req.dialect, status, flags, key, value)

    def _not_utf8(self, req: Request, text: bytes) -> bool:
        """Postfix's dict_utf8 layer: with smtputf8_enable=yes and a UTF8_REQUEST
        request, keys and values must be valid UTF-8."""
        return (
            self.utf8 and req.flags & UTF8_REQUEST and not text.isascii() and not valid_utf8(text)
        )

    def _succeeded(self, req: Request, result: Any) -> bytes:
        op, flags = req.op, req.flags
        if op == LOOKUP:
            if result is None:
                return self._reply(req, Status.NOKEY, flags)
            if self._not_utf8(req, result):
                return self._failed(
                    req,
                    TableConfigError(
                        f'{req.table}: key "{printable(req.key)}": non-UTF-8 value '
                        f'"{printable(result)}": {NON_UTF8}'
                    ),
                )
            return self._reply(req, Status.OK, flags, value=result)
        if op == SEQUENCE:
            if result is None:
                return self._reply(req, Status.NOKEY, flags)
            key, value = result
            return self._reply(req, Status.OK, flags, key=key, value=value)
        if result is False:  # delete of a missing key; an update the table skipped
            return self._reply(req, Status.NOKEY, flags)
        return self._reply(req, Status.OK, flags)

    def _failed(self, req: Request, error: BaseException) -> bytes:
        if isinstance(error, TableRetry | TimeoutError):
            status = Status.RETRY
            if not isinstance(error, TableUnavailable):  # logged once, when the open failed
                self.log.warning("%s", error or f"{req.table}: {req.op} timed out")
        elif isinstance(error, TableConfigError | Unsupported):
            status = Status.CONFIG
            self.log.warning("%s", error)
        else:
            status = Status.RETRY
            self.log.error("%s: %s failed", req.table, req.op, exc_info=error)
        return self._reply(req, status, req.flags)
