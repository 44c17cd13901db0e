"""mysql: MySQL/MariaDB lookups (mysql_table(5)), with aiomysql's asyncio connections.

aiomysql speaks the protocol natively on the event loop (it is PyMySQL's
protocol code made asynchronous), so a lookup's deadline cancels the query
and a hung server holds a coroutine, not a thread: the same pool drives it as
it drives psycopg. As Postfix: ``hosts`` entries are ``unix:/path``,
``inet:host:port`` or ``host[:port]`` (``localhost`` means the default UNIX
socket); ``charset`` (default utf8mb4, Postfix 3.9) is the connection's
character set; ``require_result_set`` (default yes) makes a statement without a
result set an error; a query must not return more than one result set; rows
are the text the server sent, NULL columns are skipped. The key is escaped as
MariaDB Connector/C's mysql_real_escape_string() escapes it, for the
connection's character set and the server's NO_BACKSLASH_ESCAPES mode.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from ..base import TableConfigError
from .config import CfgFile, ServerConfig, server_config
from .pool import INET, UNIX, Backend, ConnectFailed, Host, Pool, QueryFailed, SqlFor
from .query import Rows, mysql_quote
from .table import SqlTable

try:
    import aiomysql
    import pymysql
except ImportError:  # optional dependency: pip install 'pyproxymap[mysql]'
    aiomysql = None  # type: ignore[assignment]

#: Where MariaDB's client library finds the server for "localhost" (Debian's build).
DEFAULT_SOCKET = "/run/mysqld/mysqld.sock"
_NO_BACKSLASH_ESCAPES = 512  # SERVER_STATUS_NO_BACKSLASH_ESCAPES
#: Longest character of each client character set we quote exactly; other multi-byte
#: sets (gbk, sjis, big5, ...) need their own escaping rules and are refused.
_CHARSET_WIDTH = {"utf8mb4": 4, "utf8mb3": 3, "utf8": 3} | dict.fromkeys(
    [
        "armscii8",
        "ascii",
        "binary",
        "cp1250",
        "cp1251",
        "cp1256",
        "cp1257",
        "cp850",
        "cp852",
        "cp866",
        "dec8",
        "geostd8",
        "greek",
        "hebrew",
        "hp8",
        "keybcs2",
        "koi8r",
        "koi8u",
        "latin1",
        "latin2",
        "latin5",
        "latin7",
        "macce",
        "macroman",
        "swe7",
        "tis620",
    ],
    1,
)


@dataclass(frozen=True, slots=True)
class Tls:
    """The tls_* parameters."""

    cert_file: str | None
    key_file: str | None
    ca_file: str | None
    ca_path: str | None
    ciphers: str | None
    verify_cert: bool | None  # None: not set


@dataclass(frozen=True, slots=True)
class MysqlSettings:
    """Everything besides the server that shapes a connection and its answers."""

    charset: str
    option_file: str | None
    option_group: str
    tls: Tls
    require_result_set: bool


def parse_host(entry: str) -> tuple[int, str, int]:
    """(kind, host or socket path, port) of a ``hosts`` entry, as Postfix's host_init()."""
    kind, name = (UNIX, entry[5:]) if entry.startswith("unix:") else (INET, entry)
    if kind == INET and name.startswith("inet:"):
        name = name[5:]
    port = 0
    name, colon, service = name.rpartition(":") if ":" in name else (name, "", "")
    if colon:
        try:
            port = int(service) if service.isdigit() else socket.getservbyname(service, "tcp")
        except OSError:
            raise TableConfigError(f"unknown service: {service}/tcp") from None
    if name.lower() == "localhost":  # the MySQL way: the default UNIX-domain socket
        return UNIX, DEFAULT_SOCKET, port
    return kind, name, port


def tls_context(tls: Tls) -> ssl.SSLContext | None:
    """The TLS settings as Connector/C applies them; None when none is given.

    Any tls_* file or cipher list turns TLS on; a CA file or directory makes the
    server's certificate checked, and tls_verify_cert also its name.
    """
    cert, key, cafile, capath = tls.cert_file, tls.key_file, tls.ca_file, tls.ca_path
    ciphers, verify = tls.ciphers, tls.verify_cert
    if not any((cert, key, cafile, capath, ciphers, verify)):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = bool(verify)
    context.verify_mode = ssl.CERT_REQUIRED if verify or cafile or capath else ssl.CERT_NONE
    try:
        if cafile or capath:
            context.load_verify_locations(cafile, capath)
        elif verify:
            context.load_default_certs()
        if cert:
            context.load_cert_chain(cert, key)
        if ciphers:
            context.set_ciphers(ciphers)
    except (OSError, ssl.SSLError) as e:
        raise TableConfigError(f"TLS settings: {e}") from e
    return context


def _words(error: BaseException) -> str:
    """The server's or the library's message, and the system error under it."""
    text = str(error.args[-1]) if isinstance(error, pymysql.err.MySQLError) else str(error)
    cause = error.__cause__
    if isinstance(cause, OSError) and (cause.errno or cause.strerror):
        text = f"{text}: {os.strerror(cause.errno) if cause.errno else cause.strerror}"
    return " ".join(text.split()) or type(error).__name__


class MysqlBackend(Backend["aiomysql.Connection"]):
    name = "mysql"

    def __init__(
        self, server: ServerConfig, settings: MysqlSettings, tls: ssl.SSLContext | None
    ) -> None:
        self._server = server
        self._settings = settings
        self._width = _CHARSET_WIDTH[settings.charset.lower()]
        self._ssl = tls

    async def connect(self, host: Host[Any]) -> aiomysql.Connection:
        kind, name, port = host.target
        server, settings = self._server, self._settings
        where: dict[str, Any] = {"unix_socket": name} if kind == UNIX else {"host": name}
        if port:
            where["port"] = port
        if settings.option_file:
            where["read_default_file"] = settings.option_file
            where["read_default_group"] = settings.option_group or "client"
        try:
            return await aiomysql.connect(
                user=server.user or None,
                password=server.password,
                db=server.dbname,
                charset=settings.charset,
                autocommit=True,  # as the C client: each lookup sees the latest data
                use_unicode=False,  # values as the server sent them
                conv={},
                ssl=self._ssl,
                **where,
            )
        except (pymysql.err.MySQLError, OSError, LookupError) as e:
            raise ConnectFailed(_words(e)) from e

    async def query(self, conn: aiomysql.Connection, sql_for: SqlFor) -> Rows:
        no_backslash = bool(conn.server_status & _NO_BACKSLASH_ESCAPES)
        sql = sql_for(lambda part: mysql_quote(part, self._width, no_backslash))
        if sql is None:
            return []
        first: Rows | None = None
        error = None
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(sql)
                while True:  # collect every result set, as Postfix does
                    if cursor.description is not None:
                        rows = await cursor.fetchall()
                        if first is None:
                            first = rows
                        else:
                            error = "multiple result sets returning data are not supported"
                    if not await cursor.nextset():
                        break
        except (pymysql.err.MySQLError, OSError) as e:
            raise QueryFailed(_words(e)) from e
        if error:
            raise QueryFailed(error)
        if first is None and self._settings.require_result_set:
            raise QueryFailed("query returned no result set(require_result_set = yes)")
        return first or []

    async def ping(self, conn: aiomysql.Connection) -> None:
        try:
            await conn.ping(reconnect=False)
        except (pymysql.err.MySQLError, OSError) as e:
            raise QueryFailed(_words(e)) from e

    def close(self, conn: aiomysql.Connection) -> None:
        conn.close()


class MysqlTable(SqlTable):
    def pool_spec(self, cfg: CfgFile) -> tuple[Hashable, Callable[[], Pool[Any]]]:
        if aiomysql is None:
            raise TableConfigError(
                f"{self._spec}: the aiomysql package is not installed "
                "(pip install 'pyproxymap[mysql]')"
            )
        server = server_config(cfg, dbname_min=1)
        settings = MysqlSettings(
            charset=cfg.get_str("charset", "utf8mb4", min=1),
            option_file=cfg.get_optional("option_file"),
            option_group=cfg.get_str("option_group", "client"),
            tls=Tls(
                cfg.get_optional("tls_cert_file"),
                cfg.get_optional("tls_key_file"),
                cfg.get_optional("tls_CAfile"),
                cfg.get_optional("tls_CApath"),
                cfg.get_optional("tls_ciphers"),
                cfg.get_bool("tls_verify_cert", None),
            ),
            require_result_set=cfg.get_bool("require_result_set", True),
        )
        if settings.charset.lower() not in _CHARSET_WIDTH:
            raise TableConfigError(
                f"{self._spec}: charset {settings.charset} is not supported "
                "(use utf8mb4, utf8mb3 or a single-byte character set)"
            )
        targets = [parse_host(entry) for entry in server.hosts]
        tls = tls_context(settings.tls)
        options = self.ctx.options
        key = ("mysql", server, settings, options.max_connections, options.pool_wait)

        def make() -> Pool[Any]:
            hosts = [
                Host(entry, target[0], target)
                for entry, target in zip(server.hosts, targets, strict=True)
            ]
            return Pool(
                MysqlBackend(server, settings, tls),
                hosts,
                self.ctx.log,
                size=options.max_connections,
                wait=options.pool_wait,
                idle=server.idle_interval,
                retry_interval=server.retry_interval,
            )

        return key, make
