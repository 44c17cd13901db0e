"""The proxymap(8) request/reply protocol on top of attr0, both dialects.

Postfix 3.6-3.10 send ``request, table, flags, ...``; Postfix 3.11 and later send
``request, table, instance_flags, flags, ...`` (open: ``instance_flags`` only) and
expect ``flags`` right after ``status`` in every reply. The dialect is detected
per request from the name of the attribute after ``table`` and the reply is
written in the same dialect. Attribute order is strict, as Postfix reads it; an
extra attribute after the expected ones is tolerated, as Postfix tolerates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .attr import Record, parse_uint

GREETING = b"protocol\0proxymap_protocol\0\0"


class Status(IntEnum):
    """Reply status codes (Postfix's dict_proxy.h)."""

    OK = 0  # found / done
    NOKEY = 1  # not found (and no error)
    RETRY = 2  # transient failure: the client tries again later
    BAD = 3  # malformed request: fatal for a Postfix client
    DENY = 4  # table not approved for this service: fatal for a Postfix client
    CONFIG = 5  # configuration error


# DICT_FLAG_* bits (Postfix's util/dict.h).
DUP_WARN = 0x1
DUP_IGNORE = 0x2
TRY0NULL = 0x4
TRY1NULL = 0x8
FIXED = 0x10
PATTERN = 0x20
LOCK = 0x40
DUP_REPLACE = 0x80
SYNC_UPDATE = 0x100
DEBUG = 0x200
NO_REGSUB = 0x800
NO_PROXY = 0x1000
NO_UNAUTH = 0x2000
FOLD_FIX = 0x4000
FOLD_MUL = 0x8000
OPEN_LOCK = 0x10000
BULK_UPDATE = 0x20000
MULTI_WRITER = 0x40000
UTF8_REQUEST = 0x80000
UTF8_ACTIVE = 0x100000
SRC_RHS_IS_FILE = 0x200000

IMPL_MASK = FIXED | PATTERN | MULTI_WRITER
RQST_MASK = 0x8F9C3  # FOLD_ANY | LOCK | DUP_* | SYNC_UPDATE | PARANOID | UTF8_REQUEST
INST_MASK = 0xFFFFFFFF & ~(IMPL_MASK | RQST_MASK)

SEQ_FIRST = 0
SEQ_NEXT = 1

OLD_DIALECT = 0  # Postfix 3.6 - 3.10
NEW_DIALECT = 1  # Postfix 3.11 and later

OPEN, LOOKUP, UPDATE, DELETE, SEQUENCE = "open", "lookup", "update", "delete", "sequence"

# Attributes after "table", per request and dialect, in the order Postfix sends them.
_FIELDS = {
    (OPEN, OLD_DIALECT): (b"flags",),
    (OPEN, NEW_DIALECT): (b"instance_flags",),
    (LOOKUP, OLD_DIALECT): (b"flags", b"key"),
    (LOOKUP, NEW_DIALECT): (b"instance_flags", b"flags", b"key"),
    (UPDATE, OLD_DIALECT): (b"flags", b"key", b"value"),
    (UPDATE, NEW_DIALECT): (b"instance_flags", b"flags", b"key", b"value"),
    (DELETE, OLD_DIALECT): (b"flags", b"key"),
    (DELETE, NEW_DIALECT): (b"instance_flags", b"flags", b"key"),
    (SEQUENCE, OLD_DIALECT): (b"flags", b"function"),
    (SEQUENCE, NEW_DIALECT): (b"instance_flags", b"flags", b"function"),
}
_OPS = {op.encode(): op for op in (OPEN, LOOKUP, UPDATE, DELETE, SEQUENCE)}
_INTEGERS = {b"flags", b"instance_flags", b"function"}


@dataclass(slots=True)
class Request:
    """One decoded request.

    ``instance_flags`` selects the shared table instance (in the old dialect it is
    ``flags`` masked with INST_MASK, as Postfix's server computes it); ``flags``
    carries the per-request bits (folding, locking, duplicates).
    """

    op: str
    table: str
    dialect: int = OLD_DIALECT
    instance_flags: int = 0
    flags: int = 0
    key: bytes = b""
    value: bytes = b""
    function: int = SEQ_FIRST
    extra: tuple[bytes, ...] = ()  # names of tolerated trailing attributes


class ProtocolError(Exception):
    """A request that cannot be served.

    ``reply`` is what to send (status BAD in the reply shape of the request), or
    None when the peer does not speak the protocol and the connection should close.
    """

    def __init__(self, reason: str, reply: bytes | None) -> None:
        super().__init__(reason)
        self.reply = reply


def parse_request(record: Record) -> Request:
    """Turn a decoded record into a Request, or raise ProtocolError."""
    if len(record) < 2 or record[0] != b"request":
        got = record[0].decode(errors="replace") if record else "(empty record)"
        raise ProtocolError(f"unexpected attribute {got} (expecting: request)", None)
    op = _OPS.get(record[1])
    if op is None:
        name = record[1].decode(errors="replace")
        raise ProtocolError(f'unrecognized request: "{name}", ignored', BAD_STATUS_ONLY)
    dialect = NEW_DIALECT if len(record) > 4 and record[4] == b"instance_flags" else OLD_DIALECT
    if len(record) < 4 or record[2] != b"table":
        raise ProtocolError(f"{op}: missing attribute table", encode_reply(op, dialect, Status.BAD))
    fields = _FIELDS[op, dialect]
    req = Request(op, record[3].decode("utf-8", "surrogateescape"), dialect)
    pos = 4
    for name in fields:
        if pos >= len(record) or record[pos] != name:
            got = record[pos].decode(errors="replace") if pos < len(record) else "(none)"
            raise ProtocolError(
                f"{op}: expected attribute {name.decode()}, got {got}",
                encode_reply(op, dialect, Status.BAD),
            )
        raw = record[pos + 1]
        if name in _INTEGERS:
            number = parse_uint(raw)
            if number is None:
                raise ProtocolError(
                    f"{op}: malformed numerical data in {name.decode()}: {raw[:100]!r}",
                    encode_reply(op, dialect, Status.BAD),
                )
            if name == b"flags":
                req.flags = number
            elif name == b"instance_flags":
                req.instance_flags = number
            else:
                req.function = number
        elif name == b"key":
            req.key = raw
        else:
            req.value = raw
        pos += 2
    if dialect == OLD_DIALECT:
        req.instance_flags = req.flags & INST_MASK
    elif op == OPEN:
        req.flags = req.instance_flags
    if pos < len(record):
        req.extra = tuple(record[pos::2])
    return req


BAD_STATUS_ONLY = b"status\x003\x00\x00"

# Pre-encoded reply heads: status is one digit, so every reply starts with one of these.
_STATUS = [b"status\x00" + str(int(s)).encode() + b"\x00" for s in Status]


def encode_reply(
    op: str,
    dialect: int,
    status: Status | int,
    flags: int = 0,
    key: bytes = b"",
    value: bytes = b"",
) -> bytes:
    """The reply to ``op`` in ``dialect``, in exactly the shape proxymap sends it."""
    head = _STATUS[status]
    if dialect == NEW_DIALECT or op == OPEN:
        head += b"flags\x00" + str(flags & 0xFFFFFFFF).encode() + b"\x00"
    if op == LOOKUP:
        return head + b"value\x00" + value + b"\x00\x00"
    if op == SEQUENCE:
        return head + b"key\x00" + key + b"\x00value\x00" + value + b"\x00\x00"
    return head + b"\x00"


def encode_request(req: Request) -> bytes:
    """The request as a Postfix client of ``req.dialect`` sends it (for our client)."""
    out = [
        b"request\x00",
        req.op.encode(),
        b"\x00table\x00",
        req.table.encode("utf-8", "surrogateescape"),
        b"\x00",
    ]
    for name in _FIELDS[req.op, req.dialect]:
        if name == b"flags":
            raw = str(req.flags & 0xFFFFFFFF).encode()
        elif name == b"instance_flags":
            raw = str(req.instance_flags & 0xFFFFFFFF).encode()
        elif name == b"function":
            raw = str(req.function).encode()
        elif name == b"key":
            raw = req.key
        else:
            raw = req.value
        if b"\0" in raw:
            raise ValueError(f"{name.decode()} cannot contain NUL")
        out += (name, b"\x00", raw, b"\x00")
    out.append(b"\x00")
    return b"".join(out)


@dataclass(slots=True)
class Reply:
    """A decoded reply (for clients)."""

    status: int
    flags: int = 0
    key: bytes = b""
    value: bytes = b""


def parse_reply(op: str, dialect: int, record: Record) -> Reply:
    """Decode a reply to ``op``; raise ValueError when it has the wrong shape."""
    names = record[0::2]
    values = dict(zip(names, record[1::2], strict=True))
    if not names or names[0] != b"status":
        raise ValueError(f"reply does not start with status: {record!r}")
    status = parse_uint(values[b"status"])
    if status is None:
        raise ValueError(f"malformed status in {record!r}")
    flags = parse_uint(values.get(b"flags", b"0")) or 0
    return Reply(status, flags, values.get(b"key", b""), values.get(b"value", b""))
