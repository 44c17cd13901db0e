"""memcache: tables: real postmap vs our table against a throwaway memcached, then failures.

Parity: ``postmap -q KEY memcache:FILE`` and our table give the same answers
(hits, misses, key_format, domain, size limits, a backup table), directly and
through our server. Then what only we can be asked: read-through into
memcache, update and delete, RETRY with a log line naming table and host when
memcached is gone, recovery within a second, a hung server that delays only
its own table, and a pool that never holds more connections than allowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from pyproxymap.tables.base import TableOptions, TableRetry
from pyproxymap.wire.proxymap import FOLD_FIX
from tests.backends.ldap_memcache_fixtures import (
    Memcached,
    ask,
    backdate_all,
    memcached,  # noqa: F401  (fixture)
    open_spec,
    postmap_answer,
    run,
)
from tests.conftest import RunningServer, backdate, write_confdir
from tests.unit.test_texthash import Postfix

pytestmark = pytest.mark.backends

STORED = {
    b"alice@example.com": b"alice@mail1.example.com",
    b"pfx:bob@example.com": b"bob@cached.example.com",
    b"example.com|dan": b"dan@by-parts.example.com",
    b"long@example.com": b"x" * 300,
}
CONFIGS = {
    "plain": "",
    "backup": "key_format = pfx:%s\nbackup = texthash:{dir}/backup.txt\n",
    "parts": "key_format = %d|%u\n",
    "labels": "key_format = %2.%1|%u\n",
    "domain": "domain = example.com\n",
    "data": "data_size_limit = 100\nmax_try = 1\n",
    "line": "line_size_limit = 10\nmax_try = 1\n",
}
KEYS = [
    b"alice@example.com",
    b"ALICE@EXAMPLE.COM",
    b"bob@example.com",
    b"carol@example.com",
    b"dan@example.com",
    b"long@example.com",
    b"nobody@example.com",
    b"alice",
    b"@example.com",
    b"a b@example.com",
    b"carol@other.example",
]


def write_cfs(root: Path, server: Memcached) -> dict[str, Path]:
    (root / "backup.txt").write_text(
        "carol@example.com carol@backup.example.com\n"
        "carol@other.example carol@other.example\n"
        "a b@example.com never-asked\n"
    )
    paths = {}
    for name, extra in CONFIGS.items():
        paths[name] = root / f"{name}.cf"
        paths[name].write_text(
            f"memcache = inet:127.0.0.1:{server.port}\n" + extra.format(dir=root)
        )
    backdate_all(root)
    return paths


def preload(server: Memcached) -> None:
    for key, value in STORED.items():
        server.set(key, value)


async def ours_all(paths: dict[str, Path]) -> dict[str, list[object]]:
    answers = {}
    for name, path in paths.items():
        table = open_spec(f"memcache:{path}")
        try:
            answers[name] = [await ask(table, key) for key in KEYS]
        finally:
            table.close()
    return answers


@pytest.mark.interop
def test_answers_as_postmap_does_directly_and_through_our_server(
    memcached: Memcached,  # noqa: F811
    tmp_path: Path,
) -> None:
    paths = write_cfs(tmp_path, memcached)
    listed = "\n\t".join(f"proxy:memcache:{path}" for path in paths.values())
    conf = write_confdir(tmp_path / "conf", f"proxy_read_maps =\n\t{listed}\n")
    backdate(conf / "main.cf")
    postfix = Postfix(conf, fold=lambda key: key)
    preload(memcached)
    commands = [("-q", key, f"memcache:{path}") for path in paths.values() for key in KEYS]
    direct = postfix.run_all(commands)
    preload(memcached)  # postmap's backup lookups stored what they found: start over
    for key in (b"pfx:carol@example.com", b"pfx:carol@other.example"):
        memcached.command(b"delete " + key + b"\r\n")
    ours = run(ours_all(paths))
    wanted = iter(direct)
    mismatches = []
    for name in paths:
        for key, got in zip(KEYS, ours[name], strict=True):
            want = postmap_answer(next(wanted))
            if got != want:
                mismatches.append((name, key, want, got))
    assert not mismatches
    assert ours["backup"][3] == b"carol@backup.example.com"
    assert ours["parts"][4] == b"dan@by-parts.example.com"
    assert ours["data"][5] is TableRetry and ours["line"][0] is TableRetry

    server = RunningServer(conf)
    try:
        proxied = postfix.run_all([(opt, key, f"proxy:{spec}") for opt, key, spec in commands])
    finally:
        server.stop()
    for want, got in zip(direct, proxied, strict=True):
        assert (got.rc, got.stdout, got.fatal is None) == (want.rc, want.stdout, want.fatal is None)
    assert "Traceback" not in server.log()


def test_backup_answers_are_stored_in_memcache(
    memcached: Memcached,  # noqa: F811
    tmp_path: Path,
) -> None:
    paths = write_cfs(tmp_path, memcached)
    table = open_spec(f"memcache:{paths['backup']}")

    async def scenario() -> None:
        assert await ask(table, b"Carol@example.com") == b"carol@backup.example.com"
        for _ in range(100):  # stored in the background
            if memcached.get(b"pfx:carol@example.com") is not None:
                break
            await asyncio.sleep(0.01)
        assert memcached.get(b"pfx:carol@example.com") == b"carol@backup.example.com"
        memcached.set(b"pfx:carol@example.com", b"changed@cache")
        assert await ask(table, b"carol@example.com") == b"changed@cache"  # a hit now

    run(scenario(), table)


def test_update_delete_and_sequence(
    memcached: Memcached,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cf = tmp_path / "rw.cf"
    cf.write_text(f"memcache = inet:127.0.0.1:{memcached.port}\nkey_format = rw:%s\nttl = 60\n")
    table = open_spec(f"memcache:{cf}", writable=True)

    async def scenario() -> None:
        assert await table.update(b"k@example.com", b"v1", FOLD_FIX) is None  # type: ignore[misc]
        assert memcached.get(b"rw:k@example.com") == b"v1"
        assert await ask(table, b"k@example.com") == b"v1"
        assert await table.delete(b"k@example.com", FOLD_FIX) is True  # type: ignore[misc]
        assert await table.delete(b"k@example.com", FOLD_FIX) is False  # type: ignore[misc]
        assert await ask(table, b"k@example.com") is None
        assert await table.update(b"a b", b"v", 0) is None  # type: ignore[misc]
        assert table.sequence(0, 0) is None

    run(scenario(), table)
    assert 'skipping update for name "a b": name contains space or controls' in caplog.text
    assert "first/next support requires backup database" in caplog.text
    readonly = open_spec(f"memcache:{cf}")
    with pytest.raises(Exception, match="not supported"):
        readonly.update(b"k", b"v", 0)
    readonly.close()


def test_server_down_is_retry_and_back_within_a_second(
    memcached: Memcached,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    paths = write_cfs(tmp_path, memcached)
    plain = open_spec(f"memcache:{paths['plain']}")
    backed = open_spec(f"memcache:{paths['backup']}")

    async def scenario() -> float:
        preload(memcached)
        assert await ask(plain, b"alice@example.com") == b"alice@mail1.example.com"
        memcached.stop()
        for _ in range(3):
            assert await ask(plain, b"alice@example.com") is TableRetry
            # With a backup, its answer stands (Postfix: no error, the backup decides).
            assert await ask(backed, b"carol@example.com") == b"carol@backup.example.com"
            assert await ask(backed, b"nobody@example.com") is None
        memcached.start()
        started = time.monotonic()
        while await ask(plain, b"nobody@example.com") is TableRetry:
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    assert run(scenario(), plain, backed) < 1.0
    assert f"memcache:{paths['plain']}" in caplog.text
    assert f"127.0.0.1:{memcached.port}: Connection refused" in caplog.text


def test_hung_server_times_out_and_spares_other_tables(
    memcached: Memcached,  # noqa: F811
    tmp_path: Path,
) -> None:
    other = Memcached()
    hung_cf = tmp_path / "hung.cf"
    hung_cf.write_text(f"memcache = inet:127.0.0.1:{memcached.port}\ntimeout = 1\nmax_try = 1\n")
    ok_cf = tmp_path / "ok.cf"
    ok_cf.write_text(f"memcache = inet:127.0.0.1:{other.port}\n")
    hung = open_spec(f"memcache:{hung_cf}")
    healthy = open_spec(f"memcache:{ok_cf}")
    other.set(b"alice@example.com", b"fine")

    async def scenario() -> None:
        memcached.freeze()
        started = time.monotonic()
        stuck = asyncio.ensure_future(ask(hung, b"alice@example.com"))
        for _ in range(5):
            assert await ask(healthy, b"alice@example.com") == b"fine"
        assert time.monotonic() - started < 0.5
        assert await stuck is TableRetry
        assert time.monotonic() - started < 2.0
        memcached.thaw()

    try:
        run(scenario(), hung, healthy)
    finally:
        other.stop()


def test_pool_never_exceeds_max_connections(
    memcached: Memcached,  # noqa: F811
    tmp_path: Path,
) -> None:
    cf = tmp_path / "pool.cf"
    cf.write_text(f"memcache = inet:127.0.0.1:{memcached.port}\n")
    table = open_spec(f"memcache:{cf}", options=TableOptions(max_connections=3))
    memcached.set(b"alice@example.com", b"v" * 5000)
    stats = memcached.stats()  # each stats() call is one more connection of its own
    before, total_before = int(stats["curr_connections"]), int(stats["total_connections"])

    async def many() -> tuple[list[object], dict[str, str]]:
        answers = await asyncio.gather(*(ask(table, b"alice@example.com") for _ in range(200)))
        return answers, memcached.stats()  # ours are still open, idle in the pool

    answers, stats = run(many(), table)
    assert answers == [b"v" * 5000] * 200
    assert 1 <= int(stats["curr_connections"]) - before <= 3
    assert int(stats["total_connections"]) - total_before - 1 <= 3  # none opened and dropped
