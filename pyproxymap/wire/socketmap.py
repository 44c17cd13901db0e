"""Netstrings, the framing of Sendmail-style socketmap requests and replies.

A netstring is ``<decimal length>:<payload>,``. The decoder follows Postfix's
netstring.c exactly, because the error class decides what the socketmap client
does next (only a disconnect is retried): an empty length reads as 0, leading
zeros are fine, a non-digit before ``:`` or anything but ``,`` after the payload
is a format error, and a length past the limit is a size error. It is
incremental and bounded: it never buffers more than one payload of ``limit``
bytes, whatever the peer sends.
"""

from __future__ import annotations

from enum import Enum
from typing import NoReturn

#: Postfix's SSIZE_T_MAX on a 64-bit system: a longer length "exceeds size limit".
_SSIZE_MAX = (1 << 63) - 1


class Fault(Enum):
    """Postfix's NETSTRING_ERR_* classes, with netstring_strerror()'s words."""

    EOF = "unexpected disconnect"
    TIME = "time limit exceeded"
    FORMAT = "input format error"
    SIZE = "input exceeds size limit"


class NetstringError(Exception):
    """The stream broke the netstring rules, ended early, or timed out.

    The stream cannot be resynchronised after this: close the connection.
    """

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.value)
        self.fault = fault


def encode(payload: bytes) -> bytes:
    """One netstring, as Postfix's netstring_put() writes it."""
    return b"%d:%s," % (len(payload), payload)


class Decoder:
    """Incremental netstring decoder: ``feed(bytes) -> [payload, ...]``.

    ``limit`` is the largest payload accepted (Postfix's ``netstring_get``
    limit; it must be positive here: an unbounded decoder is not offered).
    """

    __slots__ = ("_buf", "_length", "_limit", "_state")

    _LENGTH, _PAYLOAD, _COMMA = range(3)

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("netstring limit must be positive")
        self._limit = limit
        self._state = self._LENGTH
        self._length = 0
        self._buf = bytearray()  # the digits or payload received so far

    @property
    def pending(self) -> bool:
        """True when a netstring has begun but not ended."""
        return self._state != self._LENGTH or bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The netstrings that ``data`` completes; raises NetstringError on bad input."""
        out: list[bytes] = []
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._state == self._LENGTH:
                i = self._feed_length(view, i)
            elif self._state == self._PAYLOAD:
                take = min(self._length - len(self._buf), len(view) - i)
                self._buf += view[i : i + take]
                i += take
                if len(self._buf) == self._length:
                    self._state = self._COMMA
            else:
                if view[i] != ord(","):
                    raise NetstringError(Fault.FORMAT)
                i += 1
                out.append(bytes(self._buf))
                self._buf.clear()
                self._length = 0
                self._state = self._LENGTH
        return out

    def _feed_length(self, view: memoryview, i: int) -> int:
        """Consume length digits up to ``:``; a length is checked only once it is complete."""
        while i < len(view):
            ch = view[i]
            i += 1
            if ch == ord(":"):
                if self._length > self._limit:
                    raise NetstringError(Fault.SIZE)
                self._buf.clear()
                self._state = self._PAYLOAD if self._length else self._COMMA
                return i
            if not ord("0") <= ch <= ord("9"):
                raise NetstringError(Fault.FORMAT)
            self._length = self._length * 10 + ch - ord("0")
            if self._length > _SSIZE_MAX:
                raise NetstringError(Fault.SIZE)
            self._buf.append(ch)  # only so that ``pending`` sees a length has begun
        return i

    def feed_eof(self) -> NoReturn:
        """The peer closed the stream: raise the error Postfix reports, if any.

        Postfix reads the terminator with one getc() that is not ``,`` at end of
        file, so an end right after the payload is a format error, not a disconnect.
        """
        if self._state == self._COMMA:
            raise NetstringError(Fault.FORMAT)
        raise NetstringError(Fault.EOF)
