"""pgsql: PostgreSQL lookups (pgsql_table(5)), with psycopg 3's asyncio connections.

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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from functools import cache
from typing import Any

from ..base import TableConfigError, TableRetry
from .config import CfgFile, LookupConfig, ServerConfig, lookup_config, server_config
from .pool import INET, UNIX, URI, Backend, ConnectFailed, Host, Pool, QueryFailed, SqlFor
from .query import Rows
from .table import SqlTable

_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+-]*://")
_URI_PASSWORD = re.compile(r"(://[^/@?#]*?:)[^/@?#]*@")
_PARAM_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)

try:
    import psycopg
    from psycopg import pq
    from psycopg.adapt import AdaptersMap, Loader
except ImportError:  # optional dependency: pip install 'pyproxymap[pgsql]'
    psycopg = None  # type: ignore[assignment]


@cache
def _raw_text() -> AdaptersMap:
    """Adapters that give every column as the bytes the server sent, as PQgetvalue()."""

    class Text(Loader):
        def load(self, data: Any) -> bytes:
            return bytes(data)

    adapters = AdaptersMap()
    adapters.register_loader(0, Text)  # the loader of every type without its own: all
    return adapters


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


def _words(error: BaseException) -> str:
    """libpq's message on one line (it spreads hints over several)."""
    return " ".join(str(error).split()) or type(error).__name__


class PgsqlBackend(Backend["psycopg.AsyncConnection[Any]"]):
    name = "pgsql"

    def __init__(self, server: ServerConfig, encoding: str) -> None:
        self._server = server
        self._encoding = encoding

    async def connect(self, host: Host[Any]) -> psycopg.AsyncConnection[Any]:
        kind, name, port = host.target
        params: dict[str, str] = {}
        if kind != URI:  # a URI has its own database, user and password (Postfix 3.10)
            server = self._server
            given = {"host": name, "port": port, "dbname": server.dbname, "user": server.user}
            params = {k: v for k, v in given.items() if v}
            if server.password:
                params["password"] = server.password
        try:
            return await psycopg.AsyncConnection.connect(
                name if kind == URI else "",
                autocommit=True,  # as PQexec(): no transaction left open between lookups
                prepare_threshold=None,  # every query differs: preparing them only costs
                context=_raw_text(),
                client_encoding=self._encoding,
                **params,
            )
        except psycopg.Error as e:
            raise ConnectFailed(_words(e)) from e

    async def query(self, conn: psycopg.AsyncConnection[Any], sql_for: SqlFor) -> Rows:
        escaping = pq.Escaping(conn.pgconn)
        try:
            sql = sql_for(escaping.escape_string)
        except psycopg.Error as e:  # a key that is not text in the client encoding
            raise TableRetry(f"cannot escape input string: {_words(e)}") from e
        if sql is None:
            return []
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(sql)
                rows = await cursor.fetchall() if cursor.description else []
                while cursor.nextset():  # PQexec() answers with the last statement's result
                    rows = await cursor.fetchall() if cursor.description else []
        except psycopg.Error as e:
            raise QueryFailed(_words(e)) from e
        return [tuple(b"" if value is None else value for value in row) for row in rows]

    async def ping(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await conn.execute(b"")
        except psycopg.Error as e:
            raise QueryFailed(_words(e)) from e

    def close(self, conn: psycopg.AsyncConnection[Any]) -> None:
        conn.pgconn.finish()


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
