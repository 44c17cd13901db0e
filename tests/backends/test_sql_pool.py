"""The connection pool: never more connections than max_connections, as the server counts
them; a bounded wait in line; idle connections closed; one pool per connection setting."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pyproxymap.client import Client
from pyproxymap.tables.base import TableRetry
from tests.backends.conftest import Database, lookup, open_table, run
from tests.conftest import ROOT, SERVE, write_confdir

pytestmark = pytest.mark.backends

#: Sleeps 50 ms, then answers with the number of connections open to this database.
COUNTING = {
    "pgsql": "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())"
    "::text FROM pg_sleep(0.05) WHERE '%s' <> ''",
    "mysql": "SELECT (SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()) "
    "FROM (SELECT SLEEP(0.05)) AS s WHERE '%s' <> ''",
}
SLOW = {
    "pgsql": "SELECT 'slow' FROM pg_sleep(0.5) WHERE '%s' <> ''",
    "mysql": "SELECT 'slow' FROM (SELECT SLEEP(0.5)) AS s WHERE '%s' <> ''",
}


@pytest.fixture(params=["pgsql", "mysql"])
def server_db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue({"pgsql": "postgres", "mysql": "mariadb"}[request.param])


def test_fifty_concurrent_lookups_never_exceed_max_connections(
    server_db: Database, tmp_path: Path
) -> None:
    cf = server_db.cf(tmp_path / "count.cf", query=COUNTING[server_db.kind])
    keys = [f"user{i}@example.com".encode() for i in range(50)]

    async def scenario() -> list[int]:
        # Connections of the test's own helpers close asynchronously: wait for none.
        probe = open_table(server_db.kind, cf, max_connections=1)
        try:
            deadline = time.monotonic() + 5
            while int(await lookup(probe, b"x@y") or 0) > 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            probe.close()
        table = open_table(server_db.kind, cf, max_connections=3, pool_wait=10)
        try:
            seen = await asyncio.gather(*(lookup(table, key) for key in keys))
            assert table.stats()["pool_in_use"] == 0 and table.stats()["pool_idle"] == 3
        finally:
            table.close()
        return [int(count or 0) for count in seen]

    counts = run(scenario())
    assert len(counts) == 50
    assert max(counts) <= 3, counts
    assert max(counts) >= 2, counts  # the lookups did run side by side


def test_pool_wait_times_out_as_retry(server_db: Database, tmp_path: Path) -> None:
    cf = server_db.cf(tmp_path / "slow.cf", query=SLOW[server_db.kind])

    async def scenario() -> list[bytes | BaseException | None]:
        table = open_table(server_db.kind, cf, max_connections=1, pool_wait=0.1)
        try:
            return await asyncio.gather(
                lookup(table, b"a@x"), lookup(table, b"b@x"), return_exceptions=True
            )
        finally:
            table.close()

    first, second = run(scenario())
    assert first == b"slow"
    assert isinstance(second, TableRetry)
    assert f"no free {server_db.kind} connection after" in str(second)


def test_idle_connections_are_closed(postgres: Database, tmp_path: Path) -> None:
    """idle_interval (Postfix 3.9) closes unused connections; the next lookup reconnects."""
    table_name = f"idle_{secrets.token_hex(3)}"
    postgres.execute(
        f"CREATE TABLE {table_name} (k text)", f"INSERT INTO {table_name} VALUES ('k')"
    )
    cf = postgres.cf(
        tmp_path / "idle.cf", query=f"SELECT k FROM {table_name} WHERE k='%s'", idle_interval="1"
    )

    async def scenario() -> None:
        table = open_table("pgsql", cf)
        try:
            assert await lookup(table, b"k") == b"k"
            assert table.stats()["pool_idle"] == 1
            await asyncio.sleep(1.1)
            assert table.stats()["pool_idle"] == 0
            assert await lookup(table, b"k") == b"k"
        finally:
            table.close()

    run(scenario())


def test_tables_with_the_same_settings_share_a_pool(sqlite_db: Database, tmp_path: Path) -> None:
    sqlite_db.execute("CREATE TABLE IF NOT EXISTS shared (k text)")
    one = sqlite_db.cf(tmp_path / "one.cf", query="SELECT k FROM shared WHERE k='%s'")
    two = sqlite_db.cf(tmp_path / "two.cf", query="SELECT 1 FROM shared WHERE k='%s'")
    a, b = open_table("sqlite", one), open_table("sqlite", two)
    c = open_table("sqlite", one, max_connections=2)
    try:
        assert a.pool is b.pool  # type: ignore[attr-defined]
        assert a.pool is not c.pool  # type: ignore[attr-defined]
    finally:
        for table in (a, b, c):
            table.close()


def test_worker_processes_share_one_connection_bound(
    server_db: Database, tmp_path: Path, serve
) -> None:
    """max_connections bounds the whole service: 3 proxymap workers and the proxywrite
    one get 4 // 4 = 1 connection each, however many clients ask at once."""
    cf = server_db.cf(tmp_path / "count.cf", query=COUNTING[server_db.kind])
    probe = open_table(server_db.kind, cf, max_connections=1)
    try:  # connections of earlier tests close asynchronously: wait for none
        deadline = time.monotonic() + 5
        while int(run(lookup(probe, b"x@y")) or 0) > 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        probe.close()
    spec = f"{server_db.kind}:{cf}"
    conf = write_confdir(tmp_path, f"proxy_read_maps = proxy:{spec}\n")
    (conf / "pyproxymap.toml").write_text(
        "workers = 3\n[table_defaults]\nmax_connections = 4\npool_wait = 20\n"
    )
    server = serve(conf)
    deadline = time.monotonic() + 20
    while len(set(re.findall(r"pyproxymap/\w+\[(\d+)\]: listening", server.log()))) < 4:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)

    def ask(n: int) -> int:
        with Client(server.socket(), timeout=30) as client:
            return int(client.lookup(spec, f"user{n}@example.com") or 0)

    with ThreadPoolExecutor(40) as pool:
        counts = list(pool.map(ask, range(80)))
    assert max(counts) <= 4, counts
    assert max(counts) >= 2, counts  # several workers did query side by side


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
def test_started_as_root_the_server_drops_to_mail_owner_and_still_reaches_the_database(
    server_db: Database,
) -> None:
    """The database driver is imported before the privilege drop: mail_owner may not be
    able to read where it is installed (a Python under /root)."""
    site = Path(tempfile.mkdtemp(prefix="pyproxymap-db-", dir="/tmp"))
    try:
        site.chmod(0o755)
        cf = server_db.cf(site / "count.cf", query=COUNTING[server_db.kind])
        cf.chmod(0o644)
        queue = site / "q"
        for sub in ("private", "public"):
            (queue / sub).mkdir(parents=True)
            shutil.chown(queue / sub, "postfix")
        spec = f"{server_db.kind}:{cf}"
        (site / "main.cf").write_text(
            f"queue_directory = {queue}\ncompatibility_level = 3.6\nmail_owner = postfix\n"
            f"proxy_read_maps = proxy:{spec}\n"
        )
        with (site / "log").open("w") as log:
            proc = subprocess.Popen(
                [*SERVE, "-c", str(site)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        try:
            deadline = time.monotonic() + 20
            while "pyproxymap started" not in (site / "log").read_text():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert f"Uid:\t{pwd.getpwnam('postfix').pw_uid}\t" in status
            with Client(queue / "private" / "proxymap") as client:
                assert int(client.lookup(spec, "alice@example.com") or 0) >= 1
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        shutil.rmtree(site, ignore_errors=True)


def test_each_idle_connection_is_closed_at_its_own_limit(
    postgres: Database, tmp_path: Path
) -> None:
    """One timer serves every idle connection: each still closes idle_interval after its
    own last use, not when the first one does."""
    cf = postgres.cf(
        tmp_path / "idle2.cf",
        query="SELECT '%s' FROM pg_sleep(0.05)",
        idle_interval="1",
    )

    async def scenario() -> None:
        table = open_table("pgsql", cf, max_connections=2)
        try:
            assert await asyncio.gather(lookup(table, b"a"), lookup(table, b"b")) == [b"a", b"b"]
            assert table.stats()["pool_idle"] == 2
            await asyncio.sleep(0.6)
            assert await lookup(table, b"c") == b"c"  # uses one again: its idle time restarts
            await asyncio.sleep(0.6)
            assert table.stats()["pool_idle"] == 1
            await asyncio.sleep(0.6)
            assert table.stats()["pool_idle"] == 0
            assert await lookup(table, b"d") == b"d"
        finally:
            table.close()

    run(scenario())
