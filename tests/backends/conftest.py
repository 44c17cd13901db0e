"""Database servers for the pgsql:, mysql: and sqlite: table tests.

The machine's PostgreSQL (127.0.0.1:5432, trust) and MariaDB (127.0.0.1:3306,
root without password) are used when they answer, and started with the
commands that start them on this kind of machine when they do not; a test
skips only when the server binaries (or the Python driver) are absent. Each
run works in its own database, named after the run, dropped at the end; each
test module creates its own tables in it. Faults are made with a TCP relay in
front of the server (stop it, start it, freeze it), so the shared servers are
never stopped.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyproxymap.tables.base import OpenContext, Table, TableOptions, utf8_fold
from pyproxymap.tables.registry import driver_for
from tests.conftest import backdate
from tests.unit.test_builtin_tables import open_spec

_T = TypeVar("_T")

PG_PORT = 5432
MY_PORT = 3306
#: This run's database on both servers.
RUN_DB = f"pyproxymap_{os.getpid()}_{secrets.token_hex(3)}"
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
MY_START = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answering(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def ensure_server(port: int, command: str, installed: bool, what: str) -> None:
    """Start the machine's server with its usual command unless it answers already."""
    if _answering(port):
        return
    if not installed:
        pytest.skip(f"{what} is not installed")
    subprocess.run(command, shell=True, check=False, timeout=60, capture_output=True)
    deadline = time.monotonic() + 30
    while not _answering(port):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not start with: {command}")
        time.sleep(0.1)


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def open_table(kind: str, cf: Path, **options: Any) -> Table:
    """Our table opened directly, as the server would open it."""
    driver = driver_for(kind)
    assert driver is not None
    ctx = OpenContext(
        type=kind, name=str(cf), open_nested=open_nested, options=TableOptions(**options)
    )
    return driver.open(ctx)


def open_nested(spec: str, instance_flags: int) -> Table:
    """Opens the tables of a ``domain`` list, as the table cache does."""
    return open_spec(spec, flags=instance_flags)


async def lookup(table: Table, key: bytes) -> bytes | None:
    """A lookup as postmap -q makes it: the key folded (utf8 casefold)."""
    result = table.lookup(utf8_fold(key), 0)
    return await result if inspect.isawaitable(result) else result  # type: ignore[return-value]


def write_cf(path: Path, params: dict[str, str]) -> Path:
    path.write_text("".join(f"{name} = {value}\n" for name, value in params.items()))
    backdate(path)  # postmap waits for a fresh file to cool down
    return path


class Database:
    """One database of this run, as the tests see it."""

    kind: str

    def connection_params(self) -> dict[str, str]:
        raise NotImplementedError

    def execute(self, *statements: str) -> None:
        raise NotImplementedError

    def insert(self, table: str, rows: Sequence[Sequence[str | None]]) -> None:
        raise NotImplementedError

    def cf(self, path: Path, **params: str) -> Path:
        """A .cf file that reaches this database, with ``params`` added."""
        return write_cf(path, {**self.connection_params(), **params})


class Postgres(Database):
    kind = "pgsql"

    def __init__(self, psycopg: Any) -> None:
        self._psycopg = psycopg

    def connection_params(self) -> dict[str, str]:
        return {"hosts": f"inet:127.0.0.1:{PG_PORT}", "user": "postgres", "dbname": RUN_DB}

    def _connect(self, dbname: str = RUN_DB) -> Any:
        return self._psycopg.connect(
            host="127.0.0.1", port=PG_PORT, user="postgres", dbname=dbname, autocommit=True
        )

    def execute(self, *statements: str) -> None:
        with self._connect() as conn:
            for statement in statements:
                conn.execute(statement)

    def insert(self, table: str, rows: Sequence[Sequence[str | None]]) -> None:
        marks = ", ".join(["%s"] * len(rows[0]))
        with self._connect() as conn:
            conn.cursor().executemany(f"INSERT INTO {table} VALUES ({marks})", rows)


class MariaDB(Database):
    kind = "mysql"

    def __init__(self, pymysql: Any) -> None:
        self._pymysql = pymysql

    def connection_params(self) -> dict[str, str]:
        return {"hosts": f"inet:127.0.0.1:{MY_PORT}", "user": "root", "dbname": RUN_DB}

    def _connect(self, db: str | None = RUN_DB) -> Any:
        return self._pymysql.connect(
            host="127.0.0.1", port=MY_PORT, user="root", database=db, autocommit=True
        )

    def execute(self, *statements: str) -> None:
        conn = self._connect()
        try:
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            conn.close()

    def insert(self, table: str, rows: Sequence[Sequence[str | None]]) -> None:
        marks = ", ".join(["%s"] * len(rows[0]))
        conn = self._connect()
        try:
            with conn.cursor() as cursor:
                cursor.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        finally:
            conn.close()


class SQLite(Database):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def connection_params(self) -> dict[str, str]:
        return {"dbpath": str(self.path)}

    def execute(self, *statements: str) -> None:
        with sqlite3.connect(self.path, isolation_level=None) as conn:
            for statement in statements:
                conn.execute(statement)

    def insert(self, table: str, rows: Sequence[Sequence[str | None]]) -> None:
        marks = ", ".join(["?"] * len(rows[0]))
        with sqlite3.connect(self.path) as conn:
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    psycopg = pytest.importorskip("psycopg")
    installed = os.path.isdir("/etc/postgresql") and bool(os.listdir("/etc/postgresql"))
    ensure_server(PG_PORT, PG_START, installed, "PostgreSQL")
    db = Postgres(psycopg)
    with db._connect("postgres") as admin:
        admin.execute(f"CREATE DATABASE {RUN_DB}")
    yield db
    with db._connect("postgres") as admin:
        admin.execute(f"DROP DATABASE {RUN_DB} WITH (FORCE)")


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    pytest.importorskip("aiomysql")
    pymysql = pytest.importorskip("pymysql")
    ensure_server(MY_PORT, MY_START, os.path.exists("/usr/sbin/mariadbd"), "MariaDB")
    db = MariaDB(pymysql)
    admin = db._connect(None)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {RUN_DB}")
        yield db
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {RUN_DB}")
    finally:
        admin.close()


@pytest.fixture(scope="session")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> SQLite:
    return SQLite(tmp_path_factory.mktemp("sqlite") / f"{RUN_DB}.sqlite")


@pytest.fixture(params=["pgsql", "mysql", "sqlite"])
def database(request: pytest.FixtureRequest) -> Database:
    """Each database in turn (a test using it runs three times)."""
    name = {"pgsql": "postgres", "mysql": "mariadb", "sqlite": "sqlite_db"}[request.param]
    return request.getfixturevalue(name)


def has_map_type(kind: str) -> bool:
    """Whether this Postfix can open ``kind:`` tables (postfix-pgsql, postfix-mysql, ...)."""
    try:
        types = subprocess.run(["postconf", "-m"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return kind in types.split()


class Relay:
    """A TCP relay in front of a database server: stop it (connection refused, open
    connections cut), start it again on the same port, or freeze it (bytes held)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._frozen = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                while self._frozen.is_set():
                    time.sleep(0.01)
                sink.sendall(data)
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a stopped server does."""
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()
