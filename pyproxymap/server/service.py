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
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable
from inspect import isawaitable
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
from .tablecache import TableCache, TableUnavailable

PROXY_PREFIX = "proxy:"
NON_UTF8 = "malformed UTF-8 or invalid codepoint"
Reply = bytes | Awaitable[bytes]


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
        self.writer = allowlist.writer
        self.name = "proxywrite" if self.writer else "proxymap"

    def handle(self, req: Request) -> Reply:
        """The reply to ``req``: bytes when it is ready now, else an awaitable of bytes."""
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
        if req.flags & OPEN_LOCK and req.flags & LOCK:
            # Postfix's dict_open panics on this combination; no real client sends it.
            self.log.warning(
                "%s request for %s with both open lock and access lock flags", op, name
            )
            return self._reply(req, Status.BAD)
        table = self.tables.get(name, req.instance_flags)
        if isinstance(table, Table):
            return self._call(req, table)
        return self._call_when_open(req, table)

    async def _call_when_open(self, req: Request, opening: Awaitable[Table]) -> bytes:
        reply = self._call(req, await opening)
        return reply if isinstance(reply, bytes) else await reply

    def _call(self, req: Request, table: Table) -> Reply:
        op = req.op
        if op == OPEN:
            return self._reply(req, Status.OK, req.instance_flags | table.flags)
        if op == LOOKUP and self._not_utf8(req, req.key):
            self.log.warning(
                '%s: non-UTF-8 key "%s": %s',
                printable(table.ctx.spec),
                printable(req.key),
                NON_UTF8,
            )
            return self._reply(req, Status.NOKEY, req.flags)
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
            return self._failed(req, e)
        if isawaitable(result):
            return self._finish(req, result)
        return self._succeeded(req, result)

    async def _finish(self, req: Request, pending: Awaitable[Any]) -> bytes:
        try:
            result = await pending
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return self._failed(req, e)
        return self._succeeded(req, result)

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
        if op == DELETE and result is False:
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
