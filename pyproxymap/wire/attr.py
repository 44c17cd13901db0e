"""Postfix's NUL-terminated attribute format ("attr0", attr_print0/attr_scan0).

A record is ``name\\0value\\0`` repeated, then one more ``\\0`` (an empty name).
There is no escaping and no length prefix, so a value is any bytes except NUL.
The decoder is incremental (bytes arrive in arbitrary pieces) and bounded: a
peer cannot make it buffer more than one record of the configured size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: A decoded record: names and values alternating, ``[name0, value0, name1, value1, ...]``.
#: A flat list is cheaper to build and to match than a list of pairs on the hot path.
Record = list[bytes]


class AttrError(Exception):
    """The peer broke the framing rules (oversized element, too many attributes).

    The stream cannot be resynchronised after this: the only safe answer is to
    close the connection.
    """


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one record may hold.

    Postfix 3.7 enforces none (its comment says 4 x line_length_limit); these
    defaults are far above anything a Postfix client sends (the longest keys are
    header_checks lookups, bounded by header_size_limit = 102400) and far below
    what would let one connection exhaust memory.
    """

    max_name_length: int = 64
    max_value_length: int = 262144
    max_attributes: int = 16

    @property
    def max_record_size(self) -> int:
        return self.max_attributes * (self.max_name_length + self.max_value_length + 2) + 1


DEFAULT_LIMITS = Limits()


def encode(pairs: Iterable[tuple[str | bytes, str | bytes | int]]) -> bytes:
    """Encode name/value pairs as one attr0 record (integers as unsigned decimal)."""
    out = bytearray()
    for name, value in pairs:
        if isinstance(name, str):
            name = name.encode()
        if isinstance(value, int):
            value = str(value & 0xFFFFFFFF).encode()
        elif isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        if b"\0" in name or b"\0" in value or not name:
            raise ValueError(f"attribute {name!r} cannot be encoded in attr0")
        out += name + b"\0" + value + b"\0"
    out += b"\0"
    return bytes(out)


_WHITESPACE = b" \t\n\v\f\r"
_UINT_WRAP = 1 << 32
_ULONG_MAX = (1 << 64) - 1


def parse_uint(text: bytes) -> int | None:
    """Parse an integer attribute exactly as Postfix does (``sscanf("%u%c")``).

    Leading whitespace and one sign are accepted, trailing bytes are not, the
    number is decimal only. Out-of-range values behave as glibc's strtoul
    followed by the cast to ``unsigned int``: ``-1`` is 0xFFFFFFFF, an overflow
    saturates to ULONG_MAX and is then truncated. Returns None when Postfix
    would log "malformed numerical data".
    """
    body = text.lstrip(_WHITESPACE)
    negative = False
    if body[:1] in (b"+", b"-"):
        negative = body[:1] == b"-"
        body = body[1:]
    if not body or not body.isdigit() or not body.isascii():
        return None
    value = int(body)
    if value > _ULONG_MAX:
        value = _ULONG_MAX
    elif negative:
        value = -value & _ULONG_MAX
    return value % _UINT_WRAP


class Decoder:
    """Incremental attr0 decoder: ``feed(bytes) -> [Record, ...]``.

    Complete records come out in order; an incomplete tail is kept for the next
    feed. ``pending`` tells whether a record has started but not finished (the
    server arms its per-request deadline on that).
    """

    __slots__ = ("_buf", "_limits")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of a record that has begun but not ended."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Record]:
        buf = self._buf + data if self._buf else data
        tokens = buf.split(b"\0")
        last = len(tokens) - 1  # tokens[last] is not NUL-terminated yet
        limits = self._limits
        max_name, max_value = limits.max_name_length, limits.max_value_length
        max_items = 2 * limits.max_attributes
        records: list[Record] = []
        start = 0  # token index where the current record starts
        i = 0
        while i < last:
            name = tokens[i]
            if not name:  # the empty name ends a record
                records.append(tokens[start:i])
                i += 1
                start = i
                continue
            if len(name) > max_name:
                raise AttrError(f"attribute name longer than {max_name} bytes")
            if i + 1 >= last:
                break  # the value has not arrived in full
            if len(tokens[i + 1]) > max_value:
                raise AttrError(f"attribute value longer than {max_value} bytes")
            i += 2
            if i - start > max_items:
                raise AttrError(f"more than {limits.max_attributes} attributes in a record")
        # Bound what is still incomplete: the element being received, and the record.
        tail = tokens[last]
        if len(tail) > (max_name if (last - start) % 2 == 0 else max_value):
            raise AttrError("attribute longer than the configured limit")
        if start == last and not tail:
            self._buf = b""
        else:
            self._buf = b"\0".join(tokens[start:])
            if len(self._buf) > limits.max_record_size:
                raise AttrError("record larger than the configured limit")
        return records
