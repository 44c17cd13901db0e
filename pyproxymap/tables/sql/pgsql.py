"""pgsql: PostgreSQL lookups (pgsql_table(5)), through libpq as Postfix uses it.

As Postfix 3.8 and later: ``hosts`` entries are connection URIs
(``postgresql://...``, any ``scheme://``) or the historical ``inet:host:port``,
``host:port``, ``host``, ``unix:/dir`` and ``/dir``; ``dbname`` is required only
when some entry is not a URI (URIs carry their own database, user and
password); the client encoding is ``encoding`` (default UTF8, where Postfix 3.7
forced LATIN1). The key is escaped by libpq's PQescapeStringConn() on the
connection the query runs on, as Postfix escapes it, so quoting follows that
connection's encoding and standard_conforming_strings. Values are the text
PostgreSQL sends, untouched (no Python type conversion); a NULL is an empty
value, skipped with Postfix's warning. The query is sent with the simple query
protocol, as PQexec() sends it, so several statements may be given; the last
one's rows are the answer.

psycopg 3 makes the connections (asynchronous DNS, every libpq connection
parameter, cancellation); queries bypass its cursors and go to libpq through
``psycopg.pq`` in non-blocking mode, woken by the event loop when the socket is
readable: a lookup then costs a fraction of the CPU of an ``AsyncCursor.execute``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Hashable
from typing import Any

from ..base import TableConfigError, TableRetry
from .config import CfgFile, LookupConfig, ServerConfig, lookup_config, server_config
from .pool import INET, UNIX, URI, Backend, ConnectFailed, Host, Pool, QueryFailed, SqlFor
from .query import Quote, Rows
from .table import SqlTable

_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+-]*://")
_URI_PASSWORD = re.compile(r"(://[^/@?#]*?:)[^/@?#]*@")
_PARAM_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)

#: Seconds a query given up on may take to stop once the server is asked to cancel it.
CANCEL_WAIT = 5.0

try:
    import psycopg
    from psycopg import pq
except ImportError:  # optional dependency: pip install 'pyproxymap[pgsql]'
    psycopg = None  # type: ignore[assignment]
else:
    _TUPLES_OK = pq.ExecStatus.TUPLES_OK
    _NO_ROWS = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.EMPTY_QUERY)
    _FATAL_ERROR = pq.ExecStatus.FATAL_ERROR


def redact(uri: str) -> str:
    """A connection URI fit for logs: any password replaced with ``***``."""
    return _PARAM_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1***@", uri))


def parse_host(entry: str) -> tuple[int, str, str]:
    """(kind, host or URI, port) of a ``hosts`` entry, as Postfix's host_init() reads it."""
    if _URI_SCHEME.match(entry):
        return URI, entry, ""
    name = entry[5:] if entry.startswith(("unix:", "inet:")) else entry
    if name and not name.startswith("/"):
        host, colon, port = name.rpartition(":")
        return (INET, host, port) if colon else (INET, name, "")
    return UNIX, name, ""


def _words(message: BaseException | str) -> str:
    """libpq's message on one line (it spreads hints over several)."""
    text = " ".join(str(message).split())
    return text or (message if isinstance(message, str) else type(message).__name__) or "error"


class PgConn:
    """One connection: psycopg's, for connecting and cancelling; its libpq handle for
    queries. ``quote`` is PQescapeStringConn() on this connection.

    The socket stays registered with the event loop for the connection's life (one
    registration per query costs two system calls and a poll handle): what arrives
    while no query waits (a notice, the server hanging up) is read at once.
    """

    __slots__ = ("driver", "fd", "loop", "pgconn", "quote", "waiter")

    def __init__(self, driver: psycopg.AsyncConnection[Any]) -> None:
        self.driver = driver
        self.pgconn = driver.pgconn
        self.quote: Quote = pq.Escaping(self.pgconn).escape_string
        self.fd = self.pgconn.socket
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[None] | None = None
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
            return
        try:
            self.pgconn.consume_input()
        except psycopg.Error:  # hung up: the next query or health check fails
            self.loop.remove_reader(self.fd)

    async def ready(self, writing: bool = False) -> None:
        """Until the socket is readable (or writable): libpq then goes on without
        blocking."""
        self.waiter = waiter = self.loop.create_future()
        if writing:
            self.loop.add_writer(self.fd, self._readable)
        try:
            await waiter
        finally:
            self.waiter = None
            if writing:
                self.loop.remove_writer(self.fd)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        finally:
            self.pgconn.finish()


class PgsqlBackend(Backend[PgConn]):
    name = "pgsql"

    def __init__(self, server: ServerConfig, encoding: str) -> None:
        self._server = server
        self._encoding = encoding

    async def connect(self, host: Host[Any]) -> PgConn:
        kind, name, port = host.target
        params: dict[str, str] = {}
        if kind != URI:  # a URI has its own database, user and password (Postfix 3.10)
            server = self._server
            given = {"host": name, "port": port, "dbname": server.dbname, "user": server.user}
            params = {k: v for k, v in given.items() if v}
            if server.password:
                params["password"] = server.password
        try:
            driver = await psycopg.AsyncConnection.connect(
                name if kind == URI else "", client_encoding=self._encoding, **params
            )
        except psycopg.Error as e:
            raise ConnectFailed(_words(e)) from e
        return PgConn(driver)

    async def query(self, conn: PgConn, sql_for: SqlFor) -> Rows:
        try:
            sql = sql_for(conn.quote)
        except psycopg.Error as e:  # a key that is not text in the client encoding
            raise TableRetry(f"cannot escape input string: {_words(e)}") from e
        if sql is None:
            return []
        return await self._execute(conn, sql)

    async def ping(self, conn: PgConn) -> None:
        await self._execute(conn, b"")

    def close(self, conn: PgConn) -> None:
        conn.close()

    async def _execute(self, conn: PgConn, sql: bytes) -> Rows:
        """PQexec() without blocking: every result read, the last one's rows returned.
        A query we stop waiting for is cancelled on the server before we return."""
        pgconn = conn.pgconn
        rows: Rows = []
        error = ""
        try:
            pgconn.send_query(sql)
            while pgconn.flush():  # a query too long for the socket buffer
                await conn.ready(writing=True)
                pgconn.consume_input()
            while True:
                while pgconn.is_busy():
                    await conn.ready()
                    pgconn.consume_input()
                res = pgconn.get_result()
                if res is None:
                    break
                status = res.status
                if status == _TUPLES_OK:
                    get, columns = res.get_value, range(res.nfields)
                    rows = [[get(r, c) or b"" for c in columns] for r in range(res.ntuples)]
                elif status in _NO_ROWS:
                    rows = []
                elif status == _FATAL_ERROR:
                    error = error or _words(res.get_error_message())
                else:  # COPY and the like: the connection is not ours to use any more
                    raise QueryFailed(f"unexpected result: {pq.ExecStatus(status).name}")
        except psycopg.Error as e:
            raise QueryFailed(_words(e)) from e
        except asyncio.CancelledError:
            await self._interrupt(conn)
            raise
        if error:
            raise QueryFailed(error)
        return rows

    @staticmethod
    async def _interrupt(conn: PgConn) -> None:
        """Ask the server to cancel the running query and wait (a while) for it to stop,
        so the connection's slot is not freed while the server still works for it."""
        pgconn = conn.pgconn
        try:
            async with asyncio.timeout(CANCEL_WAIT):
                await conn.driver.cancel_safe(timeout=CANCEL_WAIT)
                while pgconn.is_busy() or pgconn.get_result() is not None:
                    if pgconn.is_busy():
                        await conn.ready()
                        pgconn.consume_input()
        except (TimeoutError, psycopg.Error):
            pass  # the connection is closed all the same


class PgsqlTable(SqlTable):
    def lookup_config(self, cfg: CfgFile) -> LookupConfig:
        """``select_function`` builds the query when ``query`` is not set (pgsql only)."""
        function = None if cfg.get_optional("query") else cfg.get_optional("select_function")
        return lookup_config(cfg, f"SELECT {function}('%s')" if function else None)

    def pool_spec(self, cfg: CfgFile) -> tuple[Hashable, Callable[[], Pool[Any]]]:
        if psycopg is None:
            raise TableConfigError(
                f"{self._spec}: the psycopg package is not installed "
                "(pip install 'pyproxymap[pgsql]')"
            )
        server = server_config(cfg, dbname_min=0)
        encoding = cfg.get_str("encoding", "UTF8", min=1)
        targets = [parse_host(entry) for entry in server.hosts]
        plain = next((name for kind, name, _ in targets if kind != URI), None)
        if plain is not None and not server.dbname:
            raise TableConfigError(f"{self._spec} host target '{plain}' requires dbname setting")
        options = self.ctx.options
        key = ("pgsql", server, encoding, options.max_connections, options.pool_wait)

        def make() -> Pool[Any]:
            hosts = [
                Host(redact(entry), target[0], target)
                for entry, target in zip(server.hosts, targets, strict=True)
            ]
            return Pool(
                PgsqlBackend(server, encoding),
                hosts,
                self.ctx.log,
                size=options.max_connections,
                wait=options.pool_wait,
                idle=server.idle_interval,
                retry_interval=server.retry_interval,
            )

        return key, make
