"""sqlite: SQLite lookups (sqlite_table(5)), with the standard sqlite3 module in threads.

SQLite calls block, so they run in a thread pool of ``max_connections``
threads, one read-only connection per thread at a time; a lookup past its
deadline interrupts its query (sqlite3_interrupt) and answers RETRY. As
Postfix 3.8 and later: the database is opened read-only (a missing file is an
error, where 3.7 created an empty one); keys that are not UTF-8 are "not
found"; the key is quoted as sqlite3_mprintf("%q") quotes it; only the first
column of each row counts, converted to text as sqlite3_column_text() does;
only the first statement of the query runs; a query SQLite cannot prepare is a
configuration error, one that fails while running (a locked database) RETRY. A
writer's lock is waited for up to ``timeout`` seconds where Postfix fails at
once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from ..base import TableConfigError, TableRetry
from ..source import printable
from .config import CfgFile, LookupConfig, lookup_config
from .pool import UNIX, Backend, ConnectFailed, Host, Pool, SqlFor
from .query import Rows, sqlite_quote
from .table import SqlTable


def column_text(value: object) -> bytes | None:
    """A column as sqlite3_column_text() gives it (None for NULL)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return _real_text(value)
    return str(value).encode()


def _real_text(value: float) -> bytes:
    """SQLite's "%!.15g": like %.15g, but a number always shows a decimal point."""
    if math.isinf(value):
        return b"Inf" if value > 0 else b"-Inf"
    if value == 0:
        return b"0.0"  # SQLite prints no sign for -0.0
    mantissa, e, exponent = format(value, ".15g").partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}{e}{exponent}".encode()


def first_statement(sql: str) -> str:
    """The text sqlite3_prepare_v2() compiles: up to the end of the first statement
    (Postfix ignores the rest; Python's sqlite3 would refuse it)."""
    end = sql.find(";")
    while end >= 0:
        if sqlite3.complete_statement(sql[: end + 1]):
            return sql[: end + 1]
        end = sql.find(";", end + 1)
    return sql


class SqliteBackend(Backend[sqlite3.Connection]):
    name = "sqlite"
    what = "database"

    def __init__(self, threads: int, busy_timeout: float) -> None:
        self._threads = ThreadPoolExecutor(max(1, threads), thread_name_prefix="pyproxymap-sqlite")
        self._busy_timeout = busy_timeout

    async def connect(self, host: Host[Any]) -> sqlite3.Connection:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, self._open, host.target)
        except sqlite3.Error as e:
            raise ConnectFailed(str(e)) from e

    def _open(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, check_same_thread=False)
        conn.text_factory = bytes  # text as stored, whatever its encoding
        return conn

    async def query(self, conn: sqlite3.Connection, sql_for: SqlFor) -> Rows:
        sql = sql_for(sqlite_quote)
        if sql is None:
            return []
        try:
            text = first_statement(sql.decode("utf-8"))
        except UnicodeDecodeError:  # the key is UTF-8: the template is not
            raise TableConfigError(f"query is not UTF-8: {printable(sql)}") from None
        work = asyncio.get_running_loop().run_in_executor(self._threads, _fetch, conn, text)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            conn.interrupt()  # the deadline passed: stop the query, then give the thread back
            await asyncio.wait((work,))
            if not work.cancelled():
                work.exception()  # retrieved: the lookup is over
            raise

    async def ping(self, conn: sqlite3.Connection) -> None:
        """A file needs no health check."""

    def close(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False)


def _fetch(conn: sqlite3.Connection, sql: str) -> Rows:
    """Run the query (in a worker thread): the first column of every row."""
    try:
        return [(column_text(row[0]),) for row in conn.execute(sql)]
    except sqlite3.Error as e:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if isinstance(e, sqlite3.OperationalError) and code == sqlite3.SQLITE_ERROR:
            raise TableConfigError(f"SQL prepare failed: {e}") from e
        raise TableRetry(f"SQL step failed for query '{printable(sql)}': {e}") from e


def warn_unquoted(query: str, path: str, log: logging.Logger) -> None:
    """Postfix 3.8's warning for a %-expansion outside '' quotes (SQL injection risk)."""
    quoted = ""
    i = 0
    while i < len(query):
        ch = query[i]
        if not quoted:
            if ch in "'\"":
                quoted = ch
        elif ch == quoted:
            quoted = ""
        if quoted != "'" and ch == "%":
            if query[i + 1 : i + 2] == "%":
                i += 1
            elif query[i + 1 : i + 2].isascii() and query[i + 1 : i + 2].isalnum():
                log.warning(
                    "sqlite:%s: query >%s< contains >%s< without the recommended '' quotes",
                    path,
                    query,
                    query[i : i + 2],
                )
                i += 1
        i += 1


class SqliteTable(SqlTable):
    utf8_keys_only = True

    def lookup_config(self, cfg: CfgFile) -> LookupConfig:
        config = lookup_config(cfg)
        warn_unquoted(config.query, cfg.path, self.ctx.log)
        return config

    def pool_spec(self, cfg: CfgFile) -> tuple[Hashable, Callable[[], Pool[Any]]]:
        dbpath = cfg.get_str("dbpath", min=1)
        uri = f"file:{quote(dbpath)}?mode=ro"
        try:  # as Postfix, fail the open when the database cannot be opened
            sqlite3.connect(uri, uri=True).close()
        except sqlite3.Error as e:
            raise TableConfigError(f"{self._spec}: open database {dbpath}: {e}") from e
        options = self.ctx.options
        key = ("sqlite", uri, options.max_connections, options.pool_wait, options.timeout)

        def make() -> Pool[Any]:
            return Pool(
                SqliteBackend(options.max_connections, options.timeout),
                [Host(dbpath, UNIX, uri)],
                self.ctx.log,
                size=options.max_connections,
                wait=options.pool_wait,
                idle=60.0,
                retry_interval=0.0,  # a file: no other host to turn to, try again at once
            )

        return key, make
