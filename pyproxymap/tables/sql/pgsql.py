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
value, skipped with Postfix's warning. Several statements may be given; the last
one's rows are the answer, as from PQexec().

psycopg 3 makes the connections (asynchronous DNS, every libpq connection
parameter) and cancels queries; queries bypass its cursors and go to libpq through
``psycopg.pq`` in non-blocking mode, advanced by the event loop's callbacks when the
socket is readable, with no task per query: a lookup then costs about 55 % of the
CPU it costs through an ``AsyncCursor``. A single statement, the usual query, is
pipelined (the extended query protocol, which runs one statement as the simple
protocol of PQexec() does): up to PIPELINE_DEPTH lookups share a connection, the
queries for one connection that arrive in the same turn of the event loop leave in
one write, the server and we each read several queries or answers per system call,
and both spend less CPU per query (bench/RESULTS.md, Runs 7 and 8). Several
statements go with the simple protocol, as PQexec() sends them, on a connection with
nothing else in flight.
"""

from __future__ import annotations

import asyncio
import ctypes
import re
from collections import deque
from collections.abc import Callable, Hashable
from contextlib import suppress
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
#: Lookups one connection carries at once, pipelined.
PIPELINE_DEPTH = 16
#: Seconds after which a connection's oldest query holds up what would be sent after it:
#: the connection then takes no more lookups until it has answered.
PIPELINE_STALL = 0.1
#: What may end a single statement: trailing semicolons add no statement.
_TRAILING = b" \t\n\r\f\v;"

try:
    import psycopg
    from psycopg import pq
except ImportError:  # optional dependency: pip install 'pyproxymap[pgsql]'
    psycopg = None  # type: ignore[assignment]
else:
    _TUPLES_OK = pq.ExecStatus.TUPLES_OK
    _NO_ROWS = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.EMPTY_QUERY)
    _FAILED = (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.PIPELINE_ABORTED)
    _SYNC = pq.ExecStatus.PIPELINE_SYNC


def _libpq_send_sync() -> Callable[[int], int] | None:
    """PQsendPipelineSync() of the libpq that psycopg loaded (libpq 17 and later): a
    Sync sent with the next flush rather than at once. psycopg does not wrap it; it
    documents ``PGconn.pgconn_ptr`` for calling such functions with ctypes. None
    (each Sync then leaves at once, with its own write) for an older libpq, or when
    not exactly one libpq is loaded."""
    if psycopg is None or pq.version() < 170000:
        return None
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]
    except OSError:
        return None
    paths = {f[5].strip() for f in fields if len(f) == 6 and "/libpq" in f[5]}
    if len(paths) != 1:  # not certainly the library psycopg's connections belong to
        return None
    try:
        function = ctypes.CDLL(paths.pop()).PQsendPipelineSync
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_send_sync = _libpq_send_sync()


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


def one_statement(sql: bytes) -> bool:
    """Whether ``sql`` is certainly a single statement (no semicolon but trailing ones),
    so the extended query protocol runs it as PQexec() would."""
    return sql.rstrip(_TRAILING).find(b";") < 0  # not `in`: see Templates.results


def _words(message: BaseException | str) -> str:
    """libpq's message on one line (it spreads hints over several)."""
    words = " ".join(str(message).split())
    return words or (type(message).__name__ if isinstance(message, BaseException) else "error")


class PgConn:
    """One connection: psycopg's, for connecting and cancelling; its libpq handle for
    queries. ``quote`` is PQescapeStringConn() on this connection.

    A single statement is sent in libpq's pipeline mode (the extended query protocol,
    with a Sync of its own, so an error ends that query only), behind those already in
    flight: the server reads several per system call and stays busy, and one read
    here may bring several answers. Several statements are sent as PQexec() sends
    them (the simple query protocol), on a connection with nothing else in flight.

    Queries are driven by the event loop's callbacks, with no task or coroutine per
    query: the socket stays registered for the connection's life, and what arrives
    advances the queries in flight (or, between queries, is read and set aside: a
    notice, the server hanging up).
    """

    __slots__ = (
        "cancellers",
        "driver",
        "error",
        "fd",
        "giveup",
        "inflight",
        "loop",
        "pgconn",
        "piped",
        "quote",
        "rows",
        "stopping",
        "unflushed",
    )

    def __init__(self, driver: psycopg.AsyncConnection[Any]) -> None:
        self.driver = driver
        self.pgconn = driver.pgconn
        self.quote: Quote = pq.Escaping(self.pgconn).escape_string
        self.fd = self.pgconn.socket
        self.loop = asyncio.get_running_loop()
        self.inflight: deque[Query] = deque()  # oldest first; answers come in this order
        self.piped = False  # libpq is in pipeline mode
        self.unflushed = False  # queries are queued in libpq: a flush is due
        self.stopping = False  # every query in flight was given up on: cancel them all
        self.rows: Rows = []  # of the oldest query, so far
        self.error = ""
        self.giveup: asyncio.TimerHandle | None = None
        self.cancellers: set[asyncio.Future[None]] = set()
        self.loop.add_reader(self.fd, self._readable)

    def submit(self, sql: bytes) -> Query:
        """Send ``sql``; the future gets the last statement's rows, as from PQexec()."""
        query = Query(self)
        pgconn = self.pgconn
        self.inflight.append(query)
        try:
            if one_statement(sql):
                if not self.piped:
                    pgconn.enter_pipeline_mode()
                    self.piped = True
                pgconn.send_query_params(sql, None)
                if _send_sync is not None:
                    if not _send_sync(pgconn.pgconn_ptr):
                        raise psycopg.OperationalError(pgconn.get_error_message())
                    self._flush_soon()
                    return query
                pgconn.pipeline_sync()  # flushes
            else:  # the pool gave us the connection alone
                if self.piped:
                    pgconn.exit_pipeline_mode()
                    self.piped = False
                pgconn.send_query(sql)
            self._flush()
        except psycopg.Error as e:
            self._fail(e)
        return query

    def _flush_soon(self) -> None:
        """Send what is queued once this turn of the event loop is over: the queries
        for this connection that arrive in the same turn leave in one write."""
        if not self.unflushed:
            self.unflushed = True
            self.loop.call_soon(self._flush_queued)

    def _flush_queued(self) -> None:
        if not self.unflushed:  # closed meanwhile: its fd number may be another's now
            return
        self.unflushed = False
        try:
            self._flush()
        except psycopg.Error as e:
            self._fail(e)

    def _flush(self) -> None:
        if self.pgconn.flush():  # more than the socket buffer takes
            self.loop.add_writer(self.fd, self._writable)

    def stalled(self) -> bool:
        return bool(self.inflight) and self.loop.time() - self.inflight[0].sent > PIPELINE_STALL

    def _writable(self) -> None:
        try:
            if not self.pgconn.flush():
                self.loop.remove_writer(self.fd)
        except psycopg.Error as e:
            self._fail(e)

    def _readable(self) -> None:
        pgconn = self.pgconn
        try:
            pgconn.consume_input()
            ended = False  # a query's results ended: in pipeline mode, its Sync is next
            while self.inflight and not pgconn.is_busy():
                res = pgconn.get_result()
                if res is None:
                    if self.piped and not ended:
                        ended = True
                        continue
                    if not self.piped:
                        self._next()
                    break
                ended = False
                status = res.status
                if status == _TUPLES_OK:
                    get, columns = res.get_value, range(res.nfields)
                    self.rows = [[get(r, c) or b"" for c in columns] for r in range(res.ntuples)]
                elif status in _NO_ROWS:
                    self.rows = []
                elif status in _FAILED:
                    self.error = self.error or _words(res.get_error_message())
                elif status == _SYNC:
                    self._next()
                else:  # COPY and the like: the connection is not ours to use any more
                    self._fail(f"unexpected result: {pq.ExecStatus(status).name}")
                    return
        except psycopg.Error as e:
            if self.inflight:
                self._fail(e)
            else:  # the server hung up between queries
                self.loop.remove_reader(self.fd)

    def _next(self) -> None:
        """The oldest query in flight has every result."""
        query = self.inflight.popleft()
        rows, error = self.rows, self.error
        self.rows, self.error = [], ""
        if query.abandoned:
            query.stop()
            if self.stopping:
                if self.inflight:  # the server goes on with the next one: stop it too
                    self._cancel()
                elif self.giveup is not None:
                    self.giveup.cancel()
        elif error:
            query.set_exception(QueryFailed(error))
        else:
            query.set_result(rows)
        if self.inflight and self.inflight[0].abandoned:
            self.abandon()  # what is left was given up on while this one was awaited

    def _fail(self, failure: BaseException | str) -> None:
        """The connection failed: every query in flight with it."""
        self.loop.remove_writer(self.fd)
        if self.giveup is not None:
            self.giveup.cancel()
        cause = _words(failure)
        while self.inflight:
            query = self.inflight.popleft()
            if query.abandoned:
                query.stop()
            else:
                query.set_exception(QueryFailed(self.error or cause))
            self.error = ""

    def abandon(self) -> None:
        """A query was given up on. Once every query in flight was, ask the server to
        cancel them; give up on them after CANCEL_WAIT. (Before then, a cancel request
        could stop another lookup's query.)"""
        if self.stopping or not all(q.abandoned for q in self.inflight):
            return
        self.stopping = True
        self.giveup = self.loop.call_later(CANCEL_WAIT, self._fail, "cancel timed out")
        self._cancel()

    def _cancel(self) -> None:
        task = asyncio.ensure_future(self._request_cancel())
        self.cancellers.add(task)
        task.add_done_callback(self.cancellers.discard)

    async def _request_cancel(self) -> None:
        with suppress(psycopg.Error):  # the queries end by CANCEL_WAIT all the same
            await self.driver.cancel_safe(timeout=CANCEL_WAIT)

    def close(self) -> None:
        self.unflushed = False  # a flush still due finds nothing to do
        try:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        finally:
            self.pgconn.finish()


class Query(asyncio.Future[Rows]):
    """The rows of a query in flight. cancel() (a deadline passed, the client went
    away) gives up on it; the future ends, cancelled, once its answer came in, the
    server stopped it, or CANCEL_WAIT passed: until then the pool keeps the
    connection's place in its count."""

    __slots__ = ("_conn", "abandoned", "sent")

    def __init__(self, conn: PgConn) -> None:
        super().__init__(loop=conn.loop)
        self._conn = conn
        self.sent = conn.loop.time()
        self.abandoned = False

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        if not self.abandoned:
            self.abandoned = True
            self._conn.abandon()
        return True

    def stop(self) -> None:
        """End, cancelled: the answer came, the server stopped the query, or we stopped
        waiting."""
        super().cancel()


def _done(value: Any = None, error: BaseException | None = None) -> asyncio.Future[Any]:
    future = asyncio.get_running_loop().create_future()
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
    return future


class PgsqlBackend(Backend[PgConn]):
    name = "pgsql"
    depth = PIPELINE_DEPTH

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

    def query(self, conn: PgConn, sql_for: SqlFor) -> asyncio.Future[Rows]:
        try:
            sql = sql_for(conn.quote)
        except psycopg.Error as e:  # a key that is not text in the client encoding
            failed = TableRetry(f"cannot escape input string: {_words(e)}")
            return _done(error=failed)
        return _done([]) if sql is None else conn.submit(sql)

    def stalled(self, conn: PgConn) -> bool:
        return conn.stalled()

    def ping(self, conn: PgConn) -> asyncio.Future[Rows]:
        return conn.submit(b"")

    def close(self, conn: PgConn) -> None:
        conn.close()


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
