"""The tcp_table(5) protocol: ``get <key>\\n`` in, ``<code> <value>\\n`` out.

Keys and values are %XX-quoted as Postfix's hex_quote() does it: every byte
that is ``%``, whitespace or not printable ASCII becomes ``%XX`` (upper-case
hex); everything else goes as is. Unquoting takes either case of hex and fails
on a ``%`` without two hex digits. The client reads a reply line of at most
``MAX_LINE`` bytes, newline included (Postfix's DICT_TCP_MAXLEN). Sans-I/O:
bytes in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

#: Postfix's DICT_TCP_MAXLEN: the longest reply line, newline included.
MAX_LINE = 4096
#: C isspace() in the C locale.
WHITESPACE = b" \t\n\v\f\r"

_LITERAL = frozenset(c for c in range(0x21, 0x7F) if c != ord("%"))
_QUOTED = [bytes([c]) if c in _LITERAL else b"%%%02X" % c for c in range(256)]
_DIGIT = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class ReplyError(Exception):
    """The reply line cannot be read or parsed; the message is Postfix's wording."""


def quote(raw: bytes) -> bytes:
    """Postfix's hex_quote() (which stops at a NUL; keys never hold one, so all is quoted)."""
    return b"".join(_QUOTED[c] for c in raw)


def unquote(text: bytes) -> bytes | None:
    """Postfix's hex_unquote(): the raw bytes, or None when a ``%`` lacks two hex digits."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ord("%"):
            hi = _DIGIT.get(text[i + 1]) if i + 1 < len(text) else None
            lo = _DIGIT.get(text[i + 2]) if i + 2 < len(text) else None
            if hi is None or lo is None:
                return None
            ch = hi << 4 | lo
            i += 2
        out.append(ch)
        i += 1
    return bytes(out)


def encode_request(key: bytes) -> bytes:
    """The request line the Postfix client sends for a lookup of ``key``."""
    return b"get " + quote(key) + b"\n"


def decode_request(line: bytes) -> bytes | None:
    """The key of a ``get`` request line (newline removed), or None when it is not one."""
    if not line.startswith(b"get "):
        return None
    return unquote(line[4:])


def encode_reply(code: int, text: bytes) -> bytes:
    """A reply line: 200 with a value, 400/500 with descriptive text."""
    return b"%03d %s\n" % (code, quote(text))


@dataclass(frozen=True, slots=True)
class Reply:
    code: int  # three digits; Postfix looks only at the first
    text: bytes  # the unquoted value (200) or reason (400, 500)


def parse_reply(line: bytes) -> Reply:
    """Check and unquote a reply line (newline removed) as Postfix's dict_tcp does.

    The line is a C string there: it ends at the first NUL. It must be three
    digits, one whitespace byte, then well-formed %XX text; else ReplyError.
    """
    line = line.split(b"\0", 1)[0]
    text = unquote(line[4:])
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in WHITESPACE or text is None:
        raise ReplyError("malformed reply")
    return Reply(int(line[:3]), text)


class LineReader:
    """Reads one reply line the way Postfix's vstring_get_nonl_bound() does.

    At most ``bound`` bytes are read, the newline included; bytes after the
    newline are kept in ``rest`` (a well-behaved server sends none).
    """

    __slots__ = ("_bound", "_buf", "rest")

    def __init__(self, bound: int = MAX_LINE) -> None:
        self._bound = bound
        self._buf = bytearray()
        self.rest = b""

    def feed(self, data: bytes) -> bytes | None:
        """The line without its newline once it is complete, else None; ReplyError if too long."""
        room = self._bound - len(self._buf)
        end = data.find(b"\n", 0, room)
        if end < 0:
            if len(data) >= room:
                raise ReplyError(f"text longer than {self._bound}")
            self._buf += data
            return None
        line = bytes(self._buf) + data[:end]
        self._buf.clear()
        self.rest = data[end + 1 :]
        return line

    def feed_eof(self, cause: str) -> NoReturn:
        """The stream ended (or timed out: ``cause``) before the newline: raise Postfix's error.

        Postfix checks only the last byte read, so a partial line cut off by the
        end of the stream reads as "text longer than" the limit.
        """
        if not self._buf:
            raise ReplyError(f"unexpected EOF ({cause})")
        raise ReplyError(f"text longer than {self._bound}")
