"""A database that is down, restarted, hung or locked: RETRY, never "not found".

Every failure must reach the client as RETRY with a log line naming the table,
the host and the cause (and never a password), and lookups must succeed again
within a second of the database's return, without restarting anything. The
PostgreSQL and MariaDB outages are made with a TCP relay in front of the shared
servers; SQLite is locked by a writer.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyproxymap.client import Client
from pyproxymap.tables.base import Table, TableRetry
from pyproxymap.tables.sql.pool import CHECK_AFTER
from pyproxymap.wire.proxymap import LOOKUP, Status
from tests.backends.conftest import (
    MY_PORT,
    PG_PORT,
    Database,
    Relay,
    free_port,
    has_map_type,
    lookup,
    open_table,
    run,
    write_cf,
)
from tests.conftest import RunningServer, backdate, write_confdir

pytestmark = pytest.mark.backends

KEY, VALUE = b"bob@example.com", b"bob@mail2.example.com"
PASSWORD = "s3cret-pw"


@pytest.fixture(params=["pgsql", "mysql"])
def server_db(request: pytest.FixtureRequest) -> Iterator[tuple[Database, str]]:
    """A database server and a table in it holding KEY -> VALUE."""
    db: Database = request.getfixturevalue({"pgsql": "postgres", "mysql": "mariadb"}[request.param])
    table = f"faults_{secrets.token_hex(3)}"
    db.execute(f"CREATE TABLE {table} (addr text, dest text)")
    db.insert(table, [(KEY.decode(), VALUE.decode())])
    yield db, table
    db.execute(f"DROP TABLE {table}")


def relayed_cf(db: Database, table: str, path: Path, port: int) -> Path:
    params = db.connection_params() | {
        "hosts": f"inet:127.0.0.1:{port}",
        "query": f"SELECT dest FROM {table} WHERE addr='%s'",
    }
    return write_cf(path, params)


async def expect_retry(table: Table) -> str:
    """A lookup must fail with RETRY (a NOKEY would bounce mail)."""
    with pytest.raises(TableRetry) as failed:
        await lookup(table, KEY)
    return str(failed.value)


async def recovery_time(table: Table, limit: float = 3.0) -> float:
    """Seconds until a lookup answers again (asked every 20 ms); every failure is RETRY."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            assert await lookup(table, KEY) == VALUE
            return time.monotonic() - started
        except TableRetry:
            await asyncio.sleep(0.02)
    raise AssertionError("no recovery")


def test_refused_connection_is_retry_naming_table_host_and_cause(
    server_db: tuple[Database, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db, table = server_db
    port = free_port()  # nothing listens there
    cf = relayed_cf(db, table, tmp_path / "down.cf", port)
    if db.kind == "pgsql":  # a URI with a password too
        uri = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/x"
        cf.write_text(cf.read_text().replace("hosts = ", f"hosts = {uri} ") + "password = x\n")
    else:
        cf.write_text(cf.read_text() + f"password = {PASSWORD}\n")
    spec = f"{db.kind}:{cf}"

    async def scenario() -> str:
        table = open_table(db.kind, cf)
        try:
            return await expect_retry(table)
        finally:
            table.close()

    message = run(scenario())
    assert message.startswith(f"{spec}: ")
    assert f"127.0.0.1:{port}: " in message and "Connection refused" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        spec in w and f"connect to {db.kind} server" in w and f"127.0.0.1:{port}" in w
        for w in warnings
    ), warnings
    assert PASSWORD not in caplog.text and PASSWORD not in message


def test_outage_restart_and_recovery(
    server_db: tuple[Database, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db, table = server_db
    relay = Relay(PG_PORT if db.kind == "pgsql" else MY_PORT)
    cf = relayed_cf(db, table, tmp_path / "relayed.cf", relay.port)

    async def scenario() -> None:
        table = open_table(db.kind, cf)
        try:
            assert await lookup(table, KEY) == VALUE
            relay.stop()  # the server goes away, its connections are cut
            for _ in range(5):
                assert f"127.0.0.1:{relay.port}" in await expect_retry(table)
                await asyncio.sleep(0.05)
            relay.start()
            assert await recovery_time(table) < 1.0
            # A restart between two lookups goes unnoticed: the host is listed twice.
            relay.stop()
            relay.start()
            assert await lookup(table, KEY) == VALUE
        finally:
            table.close()

    try:
        run(scenario())
    finally:
        relay.stop()
    assert f"{db.kind}:{cf}" in caplog.text


def test_idle_connection_to_a_restarted_server_is_replaced_unseen(
    server_db: tuple[Database, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection idle for over a second is pinged before use: no failed query."""
    db, table = server_db
    relay = Relay(PG_PORT if db.kind == "pgsql" else MY_PORT)
    cf = relayed_cf(db, table, tmp_path / "idle.cf", relay.port)

    async def scenario() -> None:
        table = open_table(db.kind, cf)
        try:
            assert await lookup(table, KEY) == VALUE
            relay.stop()
            relay.start()
            await asyncio.sleep(CHECK_AFTER + 0.1)
            assert await lookup(table, KEY) == VALUE
            assert table.stats()["pool_idle"] == 1
        finally:
            table.close()

    try:
        run(scenario())
    finally:
        relay.stop()
    assert "failed" not in caplog.text


def test_hung_server_times_out_and_others_keep_answering(
    server_db: tuple[Database, str], sqlite_db: Database, tmp_path: Path
) -> None:
    db, table = server_db
    relay = Relay(PG_PORT if db.kind == "pgsql" else MY_PORT)
    cf = relayed_cf(db, table, tmp_path / "hung.cf", relay.port)
    other_table = f"other_{secrets.token_hex(3)}"
    sqlite_db.execute(f"CREATE TABLE {other_table} (k text, v text)")
    sqlite_db.insert(other_table, [("k", "v")])
    other_cf = sqlite_db.cf(tmp_path / "other.cf", query=f"SELECT v FROM {other_table}")

    async def scenario() -> None:
        hung, other = open_table(db.kind, cf, timeout=0.5), open_table("sqlite", other_cf)
        try:
            assert await lookup(hung, KEY) == VALUE
            relay.freeze()
            started = time.monotonic()
            pending = asyncio.ensure_future(expect_retry(hung))
            while not pending.done():  # the other table is not held up meanwhile
                before = time.monotonic()
                assert await lookup(other, b"k") == b"v"
                assert time.monotonic() - before < 0.2
                await asyncio.sleep(0.05)
            assert "timed out" in await pending
            assert 0.45 < time.monotonic() - started < 1.0
            relay.thaw()
            assert await recovery_time(hung) < 1.0
        finally:
            hung.close()
            other.close()

    try:
        run(scenario())
    finally:
        relay.thaw()
        relay.stop()


def test_locked_sqlite_is_retry(sqlite_db: Database, tmp_path: Path) -> None:
    table = f"locked_{secrets.token_hex(3)}"
    sqlite_db.execute(f"CREATE TABLE {table} (addr text, dest text)")
    sqlite_db.insert(table, [(KEY.decode(), VALUE.decode())])
    cf = sqlite_db.cf(tmp_path / "locked.cf", query=f"SELECT dest FROM {table} WHERE addr='%s'")
    writer = sqlite3.connect(sqlite_db.connection_params()["dbpath"], isolation_level=None)

    async def scenario() -> None:
        sql_table = open_table("sqlite", cf, timeout=0.3)
        try:
            assert await lookup(sql_table, KEY) == VALUE
            writer.execute("BEGIN EXCLUSIVE")
            message = await expect_retry(sql_table)
            assert f"sqlite:{cf}" in message and sqlite_db.connection_params()["dbpath"] in message
            writer.execute("COMMIT")
            assert await recovery_time(sql_table) < 1.0
        finally:
            sql_table.close()

    try:
        run(scenario())
    finally:
        writer.close()


@pytest.mark.interop
def test_retry_reaches_postfix_through_the_server(
    server_db: tuple[Database, str], tmp_path: Path
) -> None:
    """postmap sees a query error, never "not found"; the server answers again within a
    second of the database's return."""
    db, table = server_db
    if not has_map_type(db.kind):
        pytest.skip(f"Postfix has no {db.kind} support")
    relay = Relay(PG_PORT if db.kind == "pgsql" else MY_PORT)
    cf = relayed_cf(db, table, tmp_path / "proxied.cf", relay.port)
    spec = f"proxy:{db.kind}:{cf}"
    conf = write_confdir(tmp_path / "conf", f"proxy_read_maps = {spec}\n")
    backdate(conf / "main.cf")
    server = RunningServer(conf)

    def postmap() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["postmap", "-c", str(conf), "-q", KEY, spec], capture_output=True, timeout=30
        )

    try:
        assert postmap().stdout == VALUE + b"\n"
        relay.stop()
        failed = postmap()
        assert failed.returncode != 0 and b"fatal:" in failed.stderr, failed
        relay.start()
        started = time.monotonic()
        with Client(server.socket("proxymap")) as client:  # asks without postmap's pauses
            while (reply := client.request(LOOKUP, spec, key=KEY)).status != Status.OK:
                assert reply.status == Status.RETRY
                assert time.monotonic() - started < 1.0
                time.sleep(0.02)
        assert postmap().stdout == VALUE + b"\n"
    finally:
        relay.stop()
        server.stop()
    log = server.log()
    assert "Traceback" not in log
    assert any(
        f"{db.kind}:{cf}" in line and f"127.0.0.1:{relay.port}" in line for line in log.splitlines()
    ), log
