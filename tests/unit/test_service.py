"""The service without sockets: allow-list, table cache and status mapping."""

from __future__ import annotations

import asyncio
import logging

from pyproxymap.config.allowlist import AllowList
from pyproxymap.server.service import Pending, Reply, Service
from pyproxymap.server.tablecache import TableCache
from pyproxymap.tables.base import OpenContext, Table, TableConfigError, TableRetry
from pyproxymap.wire.proxymap import LOOKUP, OLD_DIALECT, SEQUENCE, UPDATE, Request

log = logging.getLogger("test")


def service(*tables: str, writer: bool = False) -> Service:
    cache = TableCache(writable=writer, log=log, reopen_delay=0.05)
    return Service(AllowList(writer, dict.fromkeys(tables, "test")), cache, log)


def run(coro):
    return asyncio.run(coro)


def lookup(table: str, key: bytes, flags: int = 0) -> Request:
    return Request(LOOKUP, table, OLD_DIALECT, 0, flags, key)


async def answered(reply: Reply) -> bytes:
    """The bytes of a reply, once a Pending one has come (as the session waits)."""
    if isinstance(reply, bytes):
        return reply
    await asyncio.wait((reply.future,))
    return reply.finish(reply.future)


async def ask(svc: Service, req: Request) -> bytes:
    return await answered(svc.handle(req))


def test_first_lookup_opens_then_answers_at_once():
    async def go():
        svc = service("static:x")
        first = svc.handle(lookup("static:x", b"k"))
        assert isinstance(first, Pending)  # the open runs in a thread
        assert await answered(first) == b"status\x000\x00value\x00x\x00\x00"
        second = svc.handle(lookup("static:x", b"k"))
        assert second == b"status\x000\x00value\x00x\x00\x00"  # ready: no task, no await

    run(go())


def test_unknown_type_is_retry_like_postfix_surrogate():
    async def go():
        svc = service("nosuchtype:x")
        assert await ask(svc, lookup("nosuchtype:x", b"k")) == b"status\x002\x00value\x00\x00\x00"

    run(go())


class Flaky(Table):
    """A table whose backend fails in each of the ways a backend can."""

    def lookup(self, key, flags):
        if key == b"retry":
            raise TableRetry("backend down")
        if key == b"config":
            raise TableConfigError("bad query")
        if key == b"bug":
            raise RuntimeError("driver bug")
        if key == b"slow":
            return self._slow()
        return None

    async def _slow(self):
        await asyncio.sleep(0.01)
        return b"late"


def test_failures_are_never_nokey():
    async def go():
        svc = service("flaky:x")
        svc.tables._tables[("flaky:x", 0)] = Flaky(OpenContext("flaky", "x"))
        assert await ask(svc, lookup("flaky:x", b"retry")) == b"status\x002\x00value\x00\x00\x00"
        assert await ask(svc, lookup("flaky:x", b"config")) == b"status\x005\x00value\x00\x00\x00"
        assert await ask(svc, lookup("flaky:x", b"bug")) == b"status\x002\x00value\x00\x00\x00"
        assert await ask(svc, lookup("flaky:x", b"slow")) == b"status\x000\x00value\x00late\x00\x00"
        assert await ask(svc, lookup("flaky:x", b"other")) == b"status\x001\x00value\x00\x00\x00"
        # operations the type does not have: CONFIG, not a crash
        req = Request(SEQUENCE, "flaky:x", OLD_DIALECT, 0, 0, function=0)
        assert await ask(svc, req) == b"status\x005\x00key\x00\x00value\x00\x00\x00"

    run(go())


def test_writes_on_the_read_only_service_are_denied():
    async def go():
        svc = service("static:x")
        req = Request(UPDATE, "static:x", OLD_DIALECT, 0, 0, b"k", b"v")
        assert await ask(svc, req) == b"status\x004\x00\x00"

    run(go())


def test_concurrent_first_requests_share_one_open():
    opened = []

    class Counting(Table):
        @classmethod
        def open(cls, ctx):
            opened.append(ctx.spec)
            return cls(ctx)

        def lookup(self, key, flags):
            return b"v"

    async def go():
        svc = service("counting:x")
        svc.tables._open_now = lambda key: Counting.open(svc.tables._context(key))
        replies = await asyncio.gather(*(ask(svc, lookup("counting:x", b"k")) for _ in range(20)))
        assert set(replies) == {b"status\x000\x00value\x00v\x00\x00"}
        assert opened == ["counting:x"]

    run(go())
