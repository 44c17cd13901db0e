"""The opt-in result cache: TTLs, size bound, single flight, stale-on-error."""

from __future__ import annotations

import asyncio
import time

import pytest

from pyproxymap import settings
from pyproxymap.tables.base import OpenContext, Table, TableOptions, TableRetry
from pyproxymap.tables.cached import CachedTable


class Backend(Table):
    """A backend that counts its lookups and can be made to fail or wait."""

    def __init__(self, ctx: OpenContext, slow: bool = False) -> None:
        super().__init__(ctx)
        self.data = {b"k": b"v"}
        self.calls = 0
        self.down = False
        self.slow = slow

    def lookup(self, key, flags):
        self.calls += 1
        if self.slow:
            return self._later(key)
        if self.down:
            raise TableRetry("backend down")
        return self.data.get(key)

    async def _later(self, key):
        await asyncio.sleep(0.01)
        if self.down:
            raise TableRetry("backend down")
        return self.data.get(key)


def cached(slow: bool = False, **options) -> tuple[CachedTable, Backend]:
    backend = Backend(OpenContext("x", "y", options=TableOptions(**options)), slow)
    return CachedTable(backend), backend


def test_hits_within_ttl_and_expiry(monkeypatch):
    table, backend = cached(cache_ttl=10)
    assert table.lookup(b"k", 0) == b"v"
    assert table.lookup(b"k", 0) == b"v"
    assert backend.calls == 1
    later = time.monotonic() + 11
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert table.lookup(b"k", 0) == b"v"
    assert backend.calls == 2


def test_negative_answers_have_their_own_ttl():
    table, backend = cached(cache_ttl=10)
    assert table.lookup(b"nokey", 0) is None
    assert table.lookup(b"nokey", 0) is None
    assert backend.calls == 2  # no negative TTL: not cached
    table, backend = cached(cache_ttl=10, cache_negative_ttl=10)
    table.lookup(b"nokey", 0)
    table.lookup(b"nokey", 0)
    assert backend.calls == 1


def test_size_bound_evicts_least_recently_used():
    table, backend = cached(cache_ttl=10, cache_negative_ttl=10, cache_size=2)
    for key in (b"a", b"b", b"a", b"c"):
        table.lookup(key, 0)
    calls = backend.calls
    table.lookup(b"a", 0)
    assert backend.calls == calls  # a was used recently: kept
    table.lookup(b"b", 0)
    assert backend.calls == calls + 1  # b was the least recently used: evicted


def test_concurrent_misses_make_one_backend_query():
    async def go():
        table, backend = cached(slow=True, cache_ttl=10)
        answers = await asyncio.gather(*(_ask(table, b"k") for _ in range(50)))
        assert answers == [b"v"] * 50
        assert backend.calls == 1

    asyncio.run(go())


async def _ask(table, key):
    answer = table.lookup(key, 0)
    return await answer if asyncio.isfuture(answer) or asyncio.iscoroutine(answer) else answer


def test_failures_are_never_cached_and_stale_answers_are_bounded(monkeypatch):
    table, backend = cached(cache_ttl=1, cache_stale=60)
    assert table.lookup(b"k", 0) == b"v"
    backend.down = True
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 30)
    assert table.lookup(b"k", 0) == b"v"  # stale, within 60 s
    assert table.stale_answers == 1
    with pytest.raises(TableRetry, match="backend down"):
        table.lookup(b"other", 0)  # nothing to fall back on: the failure itself
    monkeypatch.setattr(time, "monotonic", lambda: now + 61)
    with pytest.raises(TableRetry):
        table.lookup(b"k", 0)


def test_stale_on_error_for_async_backends():
    async def go():
        table, backend = cached(slow=True, cache_ttl=0.01, cache_stale=60)
        assert await _ask(table, b"k") == b"v"
        await asyncio.sleep(0.02)
        backend.down = True
        assert await _ask(table, b"k") == b"v"
        with pytest.raises(TableRetry):
            await _ask(table, b"nokey")

    asyncio.run(go())


def test_table_options_from_toml(tmp_path):
    toml = tmp_path / "pyproxymap.toml"
    toml.write_text(
        "request_timeout = 2\n"
        "[table_defaults]\nmax_connections = 2\n"
        '[tables."pgsql:/etc/postfix/users.cf"]\ncache_ttl = 60\ncache_stale = 300\n'
    )
    conf = settings.load(toml)
    options = conf.tables.options_for("pgsql:/etc/postfix/users.cf")
    assert (options.max_connections, options.cache_ttl, options.cache_stale) == (2, 60, 300)
    assert conf.tables.options_for("hash:/etc/aliases").cache_ttl == 0
    toml.write_text('[tables."x:y"]\nno_such_option = 1\n')
    with pytest.raises(ValueError, match="unknown table option"):
        settings.load(toml)
