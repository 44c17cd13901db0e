"""A Python client for proxymap-protocol servers (ours or Postfix's), sync and async.

Both clients share the sans-I/O codec of ``pyproxymap.wire``::

    with Client("/var/spool/postfix/private/proxymap") as c:
        c.lookup("hash:/etc/aliases", "postmaster")      # b"root", or None

    async with AsyncClient(path) as c:
        await c.lookup("texthash:/etc/postfix/virtual", "a@example.com")

``lookup`` returns the value or None (not found) and raises ProxymapError for
every other status; ``request`` returns the raw Reply for any request.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from .wire.attr import Decoder, Record
from .wire.proxymap import (
    DELETE,
    DUP_WARN,
    FOLD_FIX,
    GREETING,
    LOCK,
    LOOKUP,
    OLD_DIALECT,
    OPEN,
    SEQ_FIRST,
    SEQ_NEXT,
    SEQUENCE,
    UPDATE,
    UTF8_REQUEST,
    Reply,
    Request,
    Status,
    encode_request,
    parse_reply,
)

#: What postmap -q sends with a lookup, plus FOLD_FIX so the server folds the key.
LOOKUP_FLAGS = DUP_WARN | LOCK | UTF8_REQUEST | FOLD_FIX


class ProxymapError(Exception):
    """The server answered a status other than OK or NOKEY."""

    def __init__(self, op: str, table: str, status: int) -> None:
        name = Status(status).name if status in Status._value2member_map_ else str(status)
        super().__init__(f"{op} {table}: status {status} ({name})")
        self.status = status


class _Codec:
    """What both clients share: request encoding and reply decoding."""

    def __init__(self, dialect: int) -> None:
        self.dialect = dialect
        self.decoder = Decoder()
        self.records: list[Record] = []

    def request(self, op: str, table: str, flags: int, **fields: object) -> tuple[Request, bytes]:
        req = Request(op, table, self.dialect, instance_flags=0, flags=flags, **fields)  # type: ignore[arg-type]
        return req, encode_request(req)

    def take(self, data: bytes) -> Record | None:
        self.records.extend(self.decoder.feed(data))
        return self.records.pop(0) if self.records else None

    @staticmethod
    def check_greeting(record: Record) -> None:
        if record != [b"protocol", b"proxymap_protocol"]:
            raise ConnectionError(f"unexpected protocol announcement {record!r}")


def _value(op: str, table: str, reply: Reply) -> bytes | None:
    if reply.status == Status.OK:
        return reply.value
    if reply.status == Status.NOKEY:
        return None
    raise ProxymapError(op, table, reply.status)


def _as_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


class Client:
    """Blocking client: one connection, one request at a time."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0, dialect: int = OLD_DIALECT):
        self._codec = _Codec(dialect)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            self._codec.check_greeting(self._read())
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> Record:
        record = self._codec.take(b"")
        while record is None:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            record = self._codec.take(data)
        return record

    def request(self, op: str, table: str, flags: int = LOOKUP_FLAGS, **fields: object) -> Reply:
        req, data = self._codec.request(op, table, flags, **fields)
        self._sock.sendall(data)
        return parse_reply(op, req.dialect, self._read())

    def open(self, table: str, flags: int = 0) -> Reply:
        return self.request(OPEN, table, flags)

    def lookup(self, table: str, key: str | bytes, flags: int = LOOKUP_FLAGS) -> bytes | None:
        return _value(LOOKUP, table, self.request(LOOKUP, table, flags, key=_as_bytes(key)))

    def update(self, table: str, key: str | bytes, value: str | bytes, flags: int = 0) -> None:
        reply = self.request(UPDATE, table, flags, key=_as_bytes(key), value=_as_bytes(value))
        _value(UPDATE, table, reply)

    def delete(self, table: str, key: str | bytes, flags: int = 0) -> bool:
        return (
            _value(DELETE, table, self.request(DELETE, table, flags, key=_as_bytes(key)))
            is not None
        )

    def items(self, table: str, flags: int = 0) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of the table, by sequence FIRST / NEXT."""
        out, function = [], SEQ_FIRST
        while True:
            reply = self.request(SEQUENCE, table, flags, function=function)
            if _value(SEQUENCE, table, reply) is None:
                return out
            out.append((reply.key, reply.value))
            function = SEQ_NEXT

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client: one connection, one request at a time (requests are serialized)."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0, dialect: int = OLD_DIALECT):
        self._path = str(path)
        self._timeout = timeout
        self._codec = _Codec(dialect)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> AsyncClient:
        async with asyncio.timeout(self._timeout):
            self._reader, self._writer = await asyncio.open_unix_connection(self._path)
            self._codec.check_greeting(await self._read())
        return self

    async def _read(self) -> Record:
        assert self._reader is not None
        record = self._codec.take(b"")
        while record is None:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            record = self._codec.take(data)
        return record

    async def request(
        self, op: str, table: str, flags: int = LOOKUP_FLAGS, **fields: object
    ) -> Reply:
        assert self._writer is not None, "call connect() first"
        req, data = self._codec.request(op, table, flags, **fields)
        async with self._lock, asyncio.timeout(self._timeout):
            self._writer.write(data)
            await self._writer.drain()
            return parse_reply(op, req.dialect, await self._read())

    async def open(self, table: str, flags: int = 0) -> Reply:
        return await self.request(OPEN, table, flags)

    async def lookup(self, table: str, key: str | bytes, flags: int = LOOKUP_FLAGS) -> bytes | None:
        return _value(LOOKUP, table, await self.request(LOOKUP, table, flags, key=_as_bytes(key)))

    async def update(
        self, table: str, key: str | bytes, value: str | bytes, flags: int = 0
    ) -> None:
        reply = await self.request(UPDATE, table, flags, key=_as_bytes(key), value=_as_bytes(value))
        _value(UPDATE, table, reply)

    async def delete(self, table: str, key: str | bytes, flags: int = 0) -> bool:
        reply = await self.request(DELETE, table, flags, key=_as_bytes(key))
        return _value(DELETE, table, reply) is not None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["GREETING", "LOOKUP_FLAGS", "AsyncClient", "Client", "ProxymapError"]
