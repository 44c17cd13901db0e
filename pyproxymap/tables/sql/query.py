"""Query and result templates, quoting, the ``domain`` list: Postfix's db_common.

``%s %u %d %S %U %D %1..%9 %%`` expand as db_common_expand() expands them, and
a key that lacks a part the templates need (``%d`` of "user", ``%u`` of
"@domain", ``%2`` of "user@com") is "not found" without asking the database.
Every answer column of every row goes through ``result_format``; the results
are joined with commas, and more than ``expansion_limit`` of them is an error.
Templates and keys are bytes, so what reaches the database is byte for byte
what Postfix sends: each database's own quoting is applied to the parts of the
key, never to the template.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from inspect import isawaitable

from ...config.maincf import decode, logical_lines
from ..base import OpenContext, Table, TableConfigError, TableError, TableRetry
from ..source import as_bytes, brace_tokens, printable, read_fd

#: Quotes one expanded part of the key for the database.
Quote = Callable[[bytes], bytes]
#: What a query returns: rows of column values, None for SQL NULL.
Rows = Sequence[Sequence[bytes | None]]

_KEY_DOMAIN = 1  # the templates need the key's domain
_KEY_USER = 2  # ... the key's local part
_VALUE_DOMAIN = 4  # ... a result's domain
_VALUE_USER = 8  # ... a result's local part
_DIGITS = b"123456789"


def _split(address: bytes) -> tuple[bytes | None, bytes | None]:
    """(local part, domain) at the last '@', or (None, None) without one."""
    at = address.rfind(b"@")
    return (None, None) if at < 0 else (address[:at], address[at + 1 :])


class Templates:
    """The ``query`` and ``result_format`` templates of one table, parsed together.

    As in db_common, what one template uses constrains the other: a ``%D`` in
    ``result_format`` makes unqualified keys "not found" before any query. Each
    template is compiled once into literal text and the codes between, so a lookup
    joins a few pieces instead of rescanning the template byte by byte.
    """

    def __init__(
        self,
        query: str,
        result_format: str,
        expansion_limit: int,
        spec: str,
        path: str,
        log: logging.Logger,
    ) -> None:
        self._spec, self._path, self._log = spec, path, log
        self._limit = expansion_limit
        self._flags = 0
        self._nparts = 0
        self._query = self._parse(as_bytes(query), is_query=True)
        self._result = self._parse(as_bytes(result_format), is_query=False)
        # "%s" alone: each result is the value itself (the default result_format)
        self._plain_result = self._result == [b"", b"s", b""]
        literals = self._query[0::2]
        #: No semicolon but trailing ones in the template: with a key without one, the
        #: query is a single statement.
        self.one_statement = b";" not in b"".join(literals[:-1]) + literals[-1].rstrip(
            b" \t\n\r\f\v;"
        )

    def _parse(self, template: bytes, is_query: bool) -> Compiled:
        """db_common_parse(): note which parts of key and result the template needs;
        return the template as literal, code, literal, ..., literal (``%%`` folded
        into the literals)."""
        pieces: Compiled = []
        literal = bytearray()
        i = 0
        while i < len(template):
            if template[i] != ord("%"):
                literal.append(template[i])
                i += 1
                continue
            i += 1
            ch = template[i : i + 1]
            if ch == b"u":
                self._flags |= _KEY_USER if is_query else _VALUE_USER
            elif ch == b"d":
                self._flags |= _KEY_DOMAIN if is_query else _VALUE_DOMAIN
            elif ch == b"U":
                self._flags |= _KEY_USER
            elif ch and ch in _DIGITS:
                self._nparts = max(self._nparts, int(ch))
                self._flags |= _KEY_DOMAIN
            elif ch == b"D":
                self._flags |= _KEY_DOMAIN
            elif not ch or ch not in b"%sS":
                what = "query" if is_query else "result"
                raise TableConfigError(
                    f"db_common_parse: {printable(self._path)}: Invalid {what} template: "
                    f"{printable(template)}"
                )
            if ch == b"%":
                literal += b"%"
            else:
                pieces += (bytes(literal), ch)
                literal.clear()
            i += 1
        pieces.append(bytes(literal))
        return pieces

    def query(self, key: bytes, quote: Quote | None = None) -> bytes | None:
        """The query for ``key``, or None when the key lacks a part the templates need."""
        parts = self.query_parts(key)
        return None if parts is None else self.build_query(parts, quote)

    def query_parts(self, key: bytes) -> Parts | None:
        """What the query template needs of ``key`` (check once, build per connection),
        or None when the key lacks some of it."""
        return self._parts(key, None)

    def build_query(self, parts: Parts, quote: Quote | None = None) -> bytes:
        """The query from ``query_parts()``, each part of the key through ``quote``."""
        return _build(self._query, parts, quote)

    def results(self, rows: Rows, key: bytes) -> bytes | None:
        """Every non-NULL column of every row through ``result_format``, joined by commas.

        Raises TableRetry past ``expansion_limit`` results, as Postfix fails the lookup.
        """
        parts = []
        plain = self._plain_result
        for row in rows:
            for column in row:
                if column is None:
                    continue
                # find(), not `in`: Python 3.11's bytes.__contains__ first tries the
                # operand as an integer and raises and clears a TypeError (~2 µs).
                nul = column.find(b"\0")
                value = column if nul < 0 else column[:nul]
                if plain and value:
                    parts.append(value)
                else:
                    pieces = self._parts(value, key)
                    if pieces is None:
                        continue
                    parts.append(_build(self._result, pieces, None))
                if self._limit and len(parts) > self._limit:
                    raise TableRetry(
                        f"{self._spec}: Expansion limit exceeded for key: '{printable(key)}'"
                    )
        return b",".join(parts) or None

    def _parts(self, value: bytes, key: bytes | None) -> Parts | None:
        """db_common_expand()'s checks: ``value`` is the key (query) or a result (``key``
        given); the values of every code, or None when one is missing."""
        flags = self._flags
        if not value:
            if key is None:
                self._log.warning('table "%s": empty query string -- ignored', self._spec)
            else:
                self._log.warning(
                    'table "%s": empty lookup result for: "%s" -- ignored',
                    self._spec,
                    printable(key),
                )
            return None
        if not flags:  # only %s and %S: the common case
            big = value if key is None else key
            return value, value, b"", big, big, b"", []
        vuser = vdomain = kuser = kdomain = None
        if key is None:
            if flags & (_KEY_DOMAIN | _KEY_USER):
                vuser, vdomain = _split(value)
            if (not vdomain and flags & _KEY_DOMAIN) or (vuser == b"" and flags & _KEY_USER):
                return None
        else:
            if flags & (_VALUE_DOMAIN | _VALUE_USER):
                vuser, vdomain = _split(value)
            if (not vdomain and flags & _VALUE_DOMAIN) or (vuser == b"" and flags & _VALUE_USER):
                return None
            if flags & (_KEY_DOMAIN | _KEY_USER):
                kuser, kdomain = _split(key)
            if (not kdomain and flags & _KEY_DOMAIN) or (kuser == b"" and flags & _KEY_USER):
                self._log.warning(
                    "db_common_expand: %s: lookup key '%s' skipped after query",
                    printable(self._path),
                    printable(value),
                )
                return None
        labels: list[bytes] = []
        if self._nparts:
            domain = kdomain if key is not None else vdomain
            labels = [label for label in (domain or b"").split(b".") if label]
            if len(labels) < self._nparts:
                return None
        user = vuser if vuser is not None else value
        if key is None:
            big_s, big_u, big_d = value, user, vdomain or b""
        else:
            big_s, big_d = key, kdomain or b""
            big_u = kuser if kuser is not None else key
        return value, user, vdomain or b"", big_s, big_u, big_d, labels


#: A compiled template: literal, code, literal, ..., literal.
Compiled = list[bytes]
#: The values of %s %u %d %S %U %D and the domain's labels (%1..%9).
Parts = tuple[bytes, bytes, bytes, bytes, bytes, bytes, list[bytes]]
_SLOT = {b"s": 0, b"u": 1, b"d": 2, b"S": 3, b"U": 4, b"D": 5}


def _build(template: Compiled, parts: Parts, quote: Quote | None) -> bytes:
    """db_common_expand()'s output: the literals with each code's value, quoted."""
    if len(template) == 3:  # one code: the usual query
        code = template[1]
        slot = _SLOT.get(code)
        part = parts[slot] if slot is not None else parts[6][-int(code)]  # type: ignore[index]
        return b"".join((template[0], quote(part) if quote else part, template[2]))
    out = [template[0]]
    for i in range(1, len(template), 2):
        code = template[i]
        slot = _SLOT.get(code)
        part = parts[slot] if slot is not None else parts[6][-int(code)]  # type: ignore[index]
        out += (quote(part) if quote else part, template[i + 1])
    return b"".join(out)


def sqlite_quote(part: bytes) -> bytes:
    """sqlite3_mprintf("%q"): single quotes doubled."""
    return part.replace(b"'", b"''")


_MYSQL_ESCAPES = {
    0x00: b"\\0",
    0x0A: b"\\n",
    0x0D: b"\\r",
    0x5C: b"\\\\",
    0x27: b"\\'",
    0x22: b'\\"',
    0x1A: b"\\Z",
}


def _utf8_valid(data: bytes, i: int, max_len: int) -> int:
    """Length of the valid multi-byte UTF-8 character at ``data[i]``, else 0 (Connector/C's
    check_mb_utf8_valid; ``max_len`` 3 for utf8mb3, 4 for utf8mb4)."""
    c = data[i]
    if c < 0xC2:
        return 0
    tail = data[i + 1 : i + 4]

    def cont(n: int) -> bool:
        return len(tail) >= n and all(b ^ 0x80 < 0x40 for b in tail[:n])

    if c < 0xE0:
        return 2 if cont(1) else 0
    if c < 0xF0:
        return 3 if cont(2) and (c >= 0xE1 or tail[0] >= 0xA0) else 0
    if c < 0xF5 and max_len == 4:
        ok = cont(3) and (c >= 0xF1 or tail[0] >= 0x90) and (c <= 0xF3 or tail[0] <= 0x8F)
        return 4 if ok else 0
    return 0


def _utf8_lead(c: int, max_len: int) -> bool:
    """True for a byte that starts a multi-byte character (Connector/C's mbcharlen > 1)."""
    return 0xC2 <= c < (0xF8 if max_len == 4 else 0xF0)


def mysql_quote(part: bytes, mb_max: int, no_backslash_escapes: bool) -> bytes:
    """mysql_real_escape_string() as MariaDB Connector/C does it.

    ``mb_max`` is the longest character of the connection's character set (1
    for latin1 and other single-byte sets; 3 or 4 for utf8mb3/utf8mb4): valid
    multi-byte characters are copied, and a byte that only looks like the start
    of one is escaped so it cannot swallow the quote after it. When the server
    runs with NO_BACKSLASH_ESCAPES, only single quotes are doubled.
    """
    out = bytearray()
    i = 0
    while i < len(part):
        if mb_max > 1 and (length := _utf8_valid(part, i, mb_max)):
            out += part[i : i + length]
            i += length
            continue
        c = part[i]
        if no_backslash_escapes:
            out += b"''" if c == 0x27 else bytes((c,))
        elif mb_max > 1 and _utf8_lead(c, mb_max):
            out += b"\\" + bytes((c,))
        else:
            out += _MYSQL_ESCAPES.get(c, bytes((c,)))
        i += 1
    return bytes(out)


class _Unreadable:
    """A ``/file/name`` in the domain list that could not be read: matching fails there."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class DomainList:
    """The ``domain`` parameter: Postfix's string_list of domains, ``/file/name``s and
    ``type:table``s, with ``!`` to negate; only keys ``user@domain`` (non-empty user)
    whose domain matches are looked up."""

    def __init__(self, text: str, ctx: OpenContext, where: str) -> None:
        self._ctx = ctx
        self._where = where
        self._tables: list[Table] = []
        self._patterns: list[tuple[bool, bytes | Table | _Unreadable]] = []
        try:
            self._parse(text, True)
        except BaseException:
            self.close()
            raise

    def _parse(self, text: str, match: bool) -> None:
        """match_list_parse(): tokens split at commas and whitespace, outside braces."""
        for token in brace_tokens(text):
            item, negated = token.lstrip("!"), (len(token) - len(token.lstrip("!"))) % 2
            positive = match != bool(negated)
            if not item:
                raise TableConfigError(f"{self._where}: no pattern after '!'")
            if item.startswith("/"):
                self._parse_file(item, positive)
            elif ":" in item and not item.startswith("["):
                if self._ctx.open_nested is None:
                    raise TableConfigError(f"{self._where}: cannot open {item}")
                table = self._ctx.open_nested(item, 0)
                self._tables.append(table)
                self._patterns.append((positive, table))
            else:
                self._patterns.append((positive, self._ctx.fold(as_bytes(item))))

    def _parse_file(self, path: str, match: bool) -> None:
        try:
            data = read_fd(os.open(path, os.O_RDONLY))[0]
        except OSError as e:
            self._patterns.append((match, _Unreadable(f"open file {path}: {e.strerror}")))
            return
        for _, line in logical_lines(decode(data), path, self._ctx.log):
            self._parse(line, match)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    async def allows(self, key: bytes) -> bool:
        """db_common_check_domain(): whether ``key`` may be looked up; TableError when a
        table in the list fails."""
        if not self._patterns:
            return True
        _, domain = _split(key)
        if domain is None or key.startswith(b"@"):
            return False
        domain = self._ctx.fold(domain)
        for match, pattern in self._patterns:
            if isinstance(pattern, bytes):
                hit = pattern == domain
            elif isinstance(pattern, _Unreadable):
                raise TableRetry(f"{self._where}: {pattern.reason}")
            else:
                try:
                    found = pattern.lookup(domain, 0)
                    hit = (await found if isawaitable(found) else found) is not None
                except TableError as e:
                    raise type(e)(
                        f"{self._where}: 'domain' pattern match failed for '{printable(key)}': {e}"
                    ) from e
            if hit:
                return match
        return False

    def close(self) -> None:
        for table in self._tables:
            table.close()
