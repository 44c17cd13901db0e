"""The pgsql driver on a real PostgreSQL: what PQexec() would answer (several statements,
raw text, NULL, the client encoding), and a query given up on (deadline, cancelled
lookup, server hang-up) that is stopped on the server and leaves the pool usable."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pyproxymap.tables.base import OpenContext, Table, TableRetry, ascii_fold
from pyproxymap.tables.sql import pgsql
from pyproxymap.tables.sql.pgsql import PgConn, PgsqlBackend, PgsqlTable, Query
from tests.backends.conftest import PG_PORT, RUN_DB, Postgres, lookup, open_table, run

pytestmark = pytest.mark.backends

#: Sleeps 30 s for the key "slow"; answers with the key at once for any other.
SLEEPY = "SELECT '%s' FROM pg_sleep(CASE WHEN '%s' = 'slow' THEN 30 ELSE 0 END)"


@pytest.fixture
def pg(postgres: Postgres) -> Iterator[Postgres]:
    yield postgres
    # No test leaves a query running on the server.
    assert sleeping(postgres) == 0


@pytest.fixture(params=["sync with the next write", "sync at once"])
def sync(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a pipelined query's Sync is sent: queued until the connection's next
    write (PQsendPipelineSync, libpq 17 and later) or written at once (PQpipelineSync)."""
    if request.param == "sync at once":
        monkeypatch.setattr(pgsql, "_send_sync", None)
    elif pgsql._send_sync is None:
        pytest.skip("this libpq has no PQsendPipelineSync (libpq 17 and later)")


def sleeping(db: Postgres) -> int:
    """Queries of SLEEPY still running on the server, after a moment to end."""
    deadline = time.monotonic() + 2
    with db._connect() as conn:
        while True:
            (count,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE %s AND pid <> pg_backend_pid()",
                ("%pg_sleep(CASE%",),
            ).fetchone()
            if count == 0 or time.monotonic() > deadline:
                return int(count)
            time.sleep(0.02)


def answers(db: Postgres, path: Path, query: str, keys: list[bytes], **params: str) -> list[Any]:
    """Each key's answer, or the TableRetry it raised."""

    async def scenario() -> list[Any]:
        table = open_table("pgsql", db.cf(path, query=query, **params))
        try:
            return list(
                await asyncio.gather(*(lookup(table, k) for k in keys), return_exceptions=True)
            )
        finally:
            table.close()

    return run(scenario())


def test_several_statements_answer_with_the_last(pg: Postgres, tmp_path: Path) -> None:
    cf = tmp_path / "multi.cf"
    assert answers(pg, cf, "SELECT 'first' WHERE '%s' <> ''; SELECT 'last'", [b"k"]) == [b"last"]
    # The last statement returns no rows: not found, as PQexec() gives its result.
    assert answers(pg, cf, "SELECT 'x' WHERE '%s' <> ''; SET application_name = 'y'", [b"k"]) == [
        None
    ]


def test_values_are_raw_text_and_null_is_skipped(
    pg: Postgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    query = (
        "SELECT v FROM (VALUES (1, 1.50::numeric::text), (2, NULL), (3, true::text), "
        "(4, '{1,2}'::int[]::text)) AS t(n, v) WHERE '%s' <> '' ORDER BY n"
    )
    assert answers(pg, tmp_path / "raw.cf", query, [b"k"]) == [b"1.50,true,{1,2}"]
    assert "empty lookup result" in caplog.text
    typed = "SELECT 1.50::numeric, true, '{1,2}'::int[], NULL::int WHERE '%s' <> ''"
    assert answers(pg, tmp_path / "typed.cf", typed, [b"k"]) == [b"1.50,t,{1,2}"]


def open_without_smtputf8(cf: Path) -> PgsqlTable:
    """A table that gets keys that are not UTF-8 (smtputf8_enable=no)."""
    return PgsqlTable(OpenContext(type="pgsql", name=str(cf), fold=ascii_fold))


async def unfolded(table: Table, key: bytes) -> bytes | None:
    """A lookup of ``key`` as it is (the table's lookup runs in the event loop)."""
    return await table.lookup(key, 0)  # type: ignore[misc, no-any-return]


def test_client_encoding(pg: Postgres, tmp_path: Path) -> None:
    query = "SELECT '%s' || chr(233)"
    assert answers(pg, tmp_path / "utf8.cf", query, [b"x"]) == ["xé".encode()]
    latin1 = open_without_smtputf8(pg.cf(tmp_path / "latin1.cf", query=query, encoding="LATIN1"))
    try:
        assert run(unfolded(latin1, b"x\xfc")) == b"x\xfc\xe9"
    finally:
        latin1.close()


def test_key_that_cannot_be_escaped_fails_that_lookup_only(pg: Postgres, tmp_path: Path) -> None:
    table = open_without_smtputf8(pg.cf(tmp_path / "escape.cf", query="SELECT '%s'"))

    async def scenario() -> None:
        with pytest.raises(TableRetry, match="cannot escape input string"):
            await table.lookup(b"\xff\xfe", 0)  # type: ignore[misc]
        assert await table.lookup(b"ok", 0) == b"ok"  # type: ignore[misc]
        assert table.stats()["pool_idle"] == 1

    try:
        run(scenario())
    finally:
        table.close()


def test_sql_error_is_retry_naming_table_host_and_cause(
    pg: Postgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cf = tmp_path / "error.cf"
    (failed,) = answers(pg, cf, "SELECT nosuchcolumn WHERE '%s' <> ''", [b"k"])
    assert isinstance(failed, TableRetry)
    assert 'column "nosuchcolumn" does not exist' in caplog.text
    assert any(
        f"pgsql:{cf}" in r.getMessage() and "query failed on pgsql server" in r.getMessage()
        for r in caplog.records
    )


def test_query_longer_than_the_socket_buffer(pg: Postgres, tmp_path: Path, sync: None) -> None:
    key = b"x" * 8_000_000
    assert answers(pg, tmp_path / "long.cf", "SELECT length('%s')::text", [key]) == [b"8000000"]


def test_query_past_its_deadline_is_cancelled_on_the_server(pg: Postgres, tmp_path: Path) -> None:
    cf = pg.cf(tmp_path / "deadline.cf", query=SLEEPY)

    async def scenario() -> None:
        table = open_table("pgsql", cf, timeout=0.3, max_connections=1)
        try:
            started = time.monotonic()
            with pytest.raises(TableRetry, match="timed out"):
                await lookup(table, b"slow")
            assert time.monotonic() - started < 1.0
            await stopped_and_recovered(pg, table)
        finally:
            table.close()

    run(scenario())


def test_cancelled_lookup_frees_its_connection(pg: Postgres, tmp_path: Path) -> None:
    """A client that goes away cancels its lookup: the server stops the query and the
    one connection serves the next lookup at once."""
    cf = pg.cf(tmp_path / "cancel.cf", query=SLEEPY)

    async def scenario() -> None:
        table = open_table("pgsql", cf, max_connections=1, pool_wait=5)
        try:
            slow = asyncio.ensure_future(lookup(table, b"slow"))
            await asyncio.sleep(0.2)
            slow.cancel()
            started = time.monotonic()
            assert await lookup(table, b"fast") == b"fast"
            assert time.monotonic() - started < 1.0
            assert slow.cancelled()
            await asyncio.to_thread(lambda: assert_stopped(pg))
        finally:
            table.close()

    run(scenario())


def test_connection_ended_by_the_server_is_replaced(pg: Postgres, tmp_path: Path) -> None:
    cf = pg.cf(tmp_path / "terminated.cf", query="SELECT pg_backend_pid()::text WHERE '%s' <> ''")

    async def scenario() -> None:
        table = open_table("pgsql", cf)
        try:
            pid = await lookup(table, b"k")
            assert pid is not None
            await asyncio.to_thread(pg.execute, f"SELECT pg_terminate_backend({pid.decode()})")
            await asyncio.sleep(0.1)  # the idle connection sees the server hang up
            started = time.monotonic()
            while (answer := await lookup_or_none(table, b"k")) is None:
                assert time.monotonic() - started < 1.0
                await asyncio.sleep(0.02)
            assert answer != pid
        finally:
            table.close()

    run(scenario())


def assert_stopped(db: Postgres) -> None:
    assert sleeping(db) == 0


async def lookup_or_none(table: Table, key: bytes) -> bytes | None:
    """The answer, or None for a RETRY."""
    try:
        return await lookup(table, key)
    except TableRetry:
        return None


async def recovered(table: Table, key: bytes) -> float:
    """Seconds until ``key`` is answered again (its host was marked down)."""
    started = time.monotonic()
    while await lookup_or_none(table, key) != key:
        assert time.monotonic() - started < 3.0
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def stopped_and_recovered(pg: Postgres, table: Table) -> None:
    """The queries given up on were stopped on the server, the table answers again
    within a second, and every connection went back to the pool."""
    await asyncio.to_thread(lambda: assert_stopped(pg))
    assert await recovered(table, b"fast") < 1.0
    assert table.stats()["pool_in_use"] == 0


def backends(db: Postgres) -> int:
    """Connections to the test database, besides the one counting them."""
    with db._connect() as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(count)


def test_lookups_share_a_connection_pipelined(pg: Postgres, tmp_path: Path, sync: None) -> None:
    """Many lookups at once on one connection: each gets its own answer, in any order."""
    cf = pg.cf(tmp_path / "piped.cf", query="SELECT '%s' || '=' || pg_backend_pid()")
    keys = [f"k{i}".encode() for i in range(60)]

    async def scenario() -> None:
        table = open_table("pgsql", cf, max_connections=1)
        try:
            got = await asyncio.gather(*(lookup(table, k) for k in keys))
            pids = {answer.split(b"=")[1] for answer in got if answer}
            assert [answer.split(b"=")[0] for answer in got if answer] == keys
            assert len(pids) == 1
            assert await asyncio.to_thread(backends, pg) == 1
            assert table.stats() == {"pool_in_use": 0, "pool_idle": 1, "pool_waiting": 0}
        finally:
            table.close()

    run(scenario())


def test_lookups_arriving_together_leave_in_one_write(
    pg: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries for one connection submitted in the same turn of the event loop are
    written together, so the server reads them in one go."""
    if pgsql._send_sync is None:
        pytest.skip("this libpq has no PQsendPipelineSync (libpq 17 and later)")
    writes = 0
    flush = PgConn._flush

    def counted(conn: PgConn) -> None:
        nonlocal writes
        writes += 1
        flush(conn)

    monkeypatch.setattr(PgConn, "_flush", counted)
    cf = pg.cf(tmp_path / "together.cf", query="SELECT '%s'")

    async def scenario() -> None:
        table = open_table("pgsql", cf, max_connections=1)
        try:
            assert await lookup(table, b"warm") == b"warm"
            before = writes
            keys = [b"k%d" % i for i in range(10)]
            assert await asyncio.gather(*(lookup(table, k) for k in keys)) == keys
            assert writes - before == 1
        finally:
            table.close()

    run(scenario())


def test_several_statements_and_pipelined_ones_on_one_pool(
    pg: Postgres, tmp_path: Path, sync: None
) -> None:
    """Tables with the same settings share the pool: a query of several statements (sent
    as PQexec() sends it) waits for a connection of its own, between pipelined ones."""
    single = pg.cf(tmp_path / "single.cf", query="SELECT 'one:%s';")
    multi = pg.cf(tmp_path / "multi.cf", query="SELECT 'first'; SELECT 'last:%s'")

    async def scenario(connections: int) -> None:
        one = open_table("pgsql", single, max_connections=connections)
        several = open_table("pgsql", multi, max_connections=connections)
        assert one.pool is several.pool  # type: ignore[attr-defined]
        expected = [(b"one:%d" if i % 3 else b"last:%d") % i for i in range(30)]
        try:
            lookups = [lookup(one if i % 3 else several, b"%d" % i) for i in range(30)]
            assert await asyncio.gather(*lookups) == expected
            # One after the other on one connection: in and out of pipeline mode.
            for i in range(6):
                assert await lookup(one if i % 3 else several, b"%d" % i) == expected[i]
        finally:
            one.close()
            several.close()

    run(scenario(1))
    run(scenario(4))


def test_a_key_with_a_semicolon_is_sent_as_pqexec_sends_it(pg: Postgres, tmp_path: Path) -> None:
    """An unquoted %s lets a key add statements: Postfix's PQexec() runs them all and
    answers with the last one's rows, so we do too (the extended protocol would refuse)."""
    cf = tmp_path / "unquoted.cf"
    assert answers(pg, cf, "SELECT %s", [b"1; SELECT 2", b"3;"]) == [b"2", b"3"]


def test_an_error_fails_only_its_own_pipelined_lookup(
    pg: Postgres, tmp_path: Path, sync: None
) -> None:
    query = "SELECT CASE WHEN '%s' = 'bad' THEN (1/0)::text ELSE '%s' END"
    cf = pg.cf(tmp_path / "error.cf", query=query)

    async def scenario() -> list[Any]:
        table = open_table("pgsql", cf, max_connections=1)
        try:
            assert await lookup(table, b"warm") == b"warm"
            keys = [b"a", b"bad", b"c"]
            return await asyncio.gather(*(lookup(table, k) for k in keys), return_exceptions=True)
        finally:
            table.close()

    got = run(scenario())
    assert got[0] == b"a" and got[2] == b"c"
    assert isinstance(got[1], TableRetry)


def test_pipelined_lookups_past_their_deadline_are_cancelled(pg: Postgres, tmp_path: Path) -> None:
    """A fast lookup sent behind a slow one on the same connection waits for it: both are
    RETRY at their deadline, the server stops both queries, and the pool recovers."""
    cf = pg.cf(tmp_path / "stuck.cf", query=SLEEPY)

    async def scenario() -> None:
        table = open_table("pgsql", cf, timeout=0.3, max_connections=1)
        try:
            assert await lookup(table, b"warm") == b"warm"  # the connection is open and idle
            started = time.monotonic()
            got = await asyncio.gather(
                lookup(table, b"slow"), lookup(table, b"fast"), return_exceptions=True
            )
            assert all(isinstance(g, TableRetry) for g in got)
            assert time.monotonic() - started < 1.0
            await stopped_and_recovered(pg, table)
        finally:
            table.close()

    run(scenario())


def test_a_stalled_connection_takes_no_more_lookups(pg: Postgres, tmp_path: Path) -> None:
    """Once a query has run for PIPELINE_STALL, later lookups wait in line (pool_wait)
    rather than queue behind it on the server."""
    cf = pg.cf(tmp_path / "stalled.cf", query=SLEEPY)

    async def scenario() -> None:
        table = open_table("pgsql", cf, max_connections=1, pool_wait=0.2)
        try:
            slow = asyncio.ensure_future(lookup(table, b"slow"))
            await asyncio.sleep(0.3)
            with pytest.raises(TableRetry, match="no free pgsql connection"):
                await lookup(table, b"fast")
            slow.cancel()
            assert await recovered(table, b"fast") < 1.0
        finally:
            table.close()

    run(scenario())


def loop_errors() -> list[dict[str, Any]]:
    """What reaches the running loop's exception handler from now on: an exception in a
    callback, a failure nobody retrieved."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


def sent_queries(monkeypatch: pytest.MonkeyPatch) -> list[Query]:
    """The queries submitted from now on, in order."""
    sent: list[Query] = []
    submit = PgConn.submit

    def recorded(conn: PgConn, sql: bytes) -> Query:
        sent.append(submit(conn, sql))
        return sent[-1]

    monkeypatch.setattr(PgConn, "submit", recorded)
    return sent


def test_a_lookup_given_up_as_its_answer_comes_in(
    pg: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes away after the answer was read but before the lookup heard of it:
    its seats are given back once, nothing fails in the event loop."""
    cf = pg.cf(tmp_path / "late.cf", query="SELECT '%s'")
    sent = sent_queries(monkeypatch)

    async def scenario() -> None:
        errors = loop_errors()
        table = open_table("pgsql", cf, max_connections=1)
        try:
            assert await lookup(table, b"warm") == b"warm"
            answer = table.lookup(b"k", 0)
            assert isinstance(answer, asyncio.Future)
            while not sent[-1].done():
                await asyncio.sleep(0)
            assert not answer.done()  # its callback is still to run
            answer.cancel()
            assert await lookup(table, b"next") == b"next"
            assert table.stats()["pool_in_use"] == 0
            assert errors == []
        finally:
            table.close()

    run(scenario())


def test_an_answer_read_as_the_deadline_passes_is_the_answer(pg: Postgres, tmp_path: Path) -> None:
    """The loop was busy past the deadline and then reads the answer and runs the deadline
    timer in the same pass (asyncio's loop runs I/O callbacks first): the answer is
    given, the host is not marked down, nothing fails in the event loop."""
    cf = pg.cf(tmp_path / "edge.cf", query="SELECT '%s'")

    async def scenario() -> None:
        errors = loop_errors()
        table = open_table("pgsql", cf, timeout=0.2, max_connections=1)
        try:
            assert await lookup(table, b"warm") == b"warm"
            answer = table.lookup(b"k", 0)
            assert isinstance(answer, asyncio.Future)
            await asyncio.sleep(0)  # the query leaves
            time.sleep(0.4)  # the loop is busy until after the answer and the deadline
            assert await answer == b"k"
            assert table.stats() == {"pool_in_use": 0, "pool_idle": 1, "pool_waiting": 0}
            assert errors == []
        finally:
            table.close()

    run(scenario())


def test_a_failed_lookup_whose_client_went_away_is_not_reported_unretrieved(
    pg: Postgres, tmp_path: Path
) -> None:
    """A session cancels the lookup of a client that went away; when it had just failed,
    the failure is dropped as any future's is, not logged as never retrieved."""
    cf = pg.cf(tmp_path / "failed.cf", query="SELECT nosuchcolumn WHERE '%s' <> ''")

    async def scenario() -> None:
        errors = loop_errors()
        table = open_table("pgsql", cf)
        try:
            answer = table.lookup(b"k", 0)
            assert isinstance(answer, asyncio.Future)
            await asyncio.wait([answer])
            assert not answer.cancel()
            del answer
            gc.collect()
            assert errors == []
        finally:
            table.close()

    run(scenario())


def test_a_driver_that_raises_is_retry_not_a_lookup_that_never_ends(
    pg: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception from the driver while sending the query (a bug) fails that
    lookup, also when it waited for a connection, and frees the connection's seat."""
    cf = pg.cf(tmp_path / "bug.cf", query="SELECT '%s'")

    def query(self: PgsqlBackend, conn: PgConn, sql_for: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(PgsqlBackend, "query", query)

    async def scenario() -> None:
        table = open_table("pgsql", cf, max_connections=1)
        try:
            for _ in range(2):  # a new connection, then the idle one
                with pytest.raises(RuntimeError, match="a bug"):
                    await asyncio.wait_for(lookup(table, b"k"), 2)
                assert table.stats()["pool_in_use"] == 0
        finally:
            table.close()

    run(scenario())


def test_a_flush_due_on_a_closed_connection_does_nothing(pg: Postgres) -> None:
    """A query queued in this turn of the event loop, then the connection closed before
    the turn ends: the flush that was due must not touch the closed connection (nor its
    file descriptor number, which another socket may have by then)."""

    async def scenario() -> None:
        driver = await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=PG_PORT, user="postgres", dbname=RUN_DB
        )
        conn = PgConn(driver)
        query = conn.submit(b"SELECT 1")
        conn.close()
        await asyncio.sleep(0.05)
        assert not query.done()  # nothing was written, so nothing failed either
        await driver.close()

    run(scenario())
