"""The tables the server may open, collected from main.cf as proxymap(8) collects them.

Postfix approves a table only if some parameter names it with a ``proxy:``
prefix: that is the administrator saying "this table may be reached through
proxymap". We follow authorize_proxied_maps() of the newest Postfix (3.12),
which, unlike 3.7, also reads ``/file/name`` references and the restriction
classes listed in smtpd_restriction_classes, and skips tokens that cannot be
tables before it looks at them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .maincf import MainCf, decode, logical_lines

READ_PARAM = "proxy_read_maps"
WRITE_PARAM = "proxy_write_maps"
REST_CLASSES_PARAM = "smtpd_restriction_classes"

_PROXY = "proxy:"
_SEPARATORS = ", \t\r\n"  # Postfix's CHARS_COMMA_SP
_NESTING_TYPES = ("unionmap:", "pipemap:")

_log = logging.getLogger(__name__)


def strip_proxy(table: str) -> str:
    """The table name without any number of leading "proxy:" prefixes."""
    while table.startswith(_PROXY):
        table = table[len(_PROXY) :]
    return table


@dataclass(frozen=True)
class AllowList:
    """Approved "type:name" strings (without proxy:), each with where it was found."""

    writer: bool
    tables: Mapping[str, str]

    @property
    def parameter(self) -> str:
        """The main.cf parameter an administrator edits to approve more tables."""
        return WRITE_PARAM if self.writer else READ_PARAM

    def approves(self, table: str) -> bool:
        """Exact, case-sensitive match after stripping leading "proxy:", as Postfix matches."""
        return strip_proxy(table) in self.tables

    def hint(self, table: str) -> str:
        """Postfix's advice for a denied table, word for word."""
        access = "read-write" if self.writer else "read-only"
        return (
            f"to approve this table for {access} access, list {_PROXY}{strip_proxy(table)}"
            f" in main.cf:{self.parameter}"
        )


def tokens(text: str) -> Iterator[str]:
    """mystrtokq(3) with ", \\t\\r\\n" separators: a {...} group never splits."""
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _SEPARATORS:
            pos += 1
        if pos >= end:
            return
        start, level = pos, 0
        while pos < end:
            ch = text[pos]
            if ch == "{":
                level += 1
            elif level > 0 and ch == "}":
                level -= 1
            elif level == 0 and ch in _SEPARATORS:
                break
            pos += 1
        yield text[start:pos]
        pos += 1


def extpar(text: str) -> tuple[str, str | None]:
    """The inside of "{...}" and None, or the (truncated) inside and Postfix's complaint."""
    level = 0
    for pos, ch in enumerate(text):
        if ch == "}":
            level -= 1
            if level == 0:
                if pos + 1 < len(text):
                    return text[1:pos], f"syntax error after '}}' in \"{text}\""
                return text[1:pos], None
        elif ch == "{":
            level += 1
    return text[1:], f"missing '}}' in \"{text}\""


class _Collector:
    """authorize_proxied_maps() and its helpers, filling one table -> origin dict."""

    def __init__(self, log: logging.Logger) -> None:
        self.tables: dict[str, str] = {}
        self._log = log
        self._files: list[str] = []  # files being read, to stop include loops

    def scan(self, text: str, origin: str) -> None:
        """Approve each proxy: table named in text; origin is where text came from."""
        for token in tokens(text):
            if token.startswith("{"):
                inner, err = extpar(token)
                if err is not None:
                    self._log.warning("bad syntax in %s content: %s", origin, err)
                    continue
                # Don't second-guess { type:name attr=value }: only the first word counts.
                token = next(tokens(inner), "")
                if not token:
                    continue
            if token.startswith("/"):
                self.scan_file(token)
                continue
            # Skip [ipv6::addr], !negation and other forms that cannot be tables.
            if not (token[0].isascii() and token[0].isalnum()) or ":" not in token:
                continue
            nested = next((token[len(t) :] for t in _NESTING_TYPES if token.startswith(t)), None)
            if nested is not None:
                if not nested.startswith("{"):
                    continue
                inner, err = extpar(nested)
                if err is not None:
                    self._log.warning("bad syntax in %s content: %s", origin, err)
                    continue
                self.scan(inner, origin)
                continue
            if token.startswith(_PROXY):
                self.tables.setdefault(strip_proxy(token), origin)

    def scan_file(self, path: str) -> None:
        """Each logical line of a /file/name reference, scanned like a parameter value."""
        if path in self._files:
            self._log.warning("%s: skipping recursive reference to itself", path)
            return
        try:
            with open(path, "rb") as file:
                text = decode(file.read())
        except OSError as exc:
            self._log.warning("open %s: %s", path, os.strerror(exc.errno or 0))
            return
        self._files.append(path)
        try:
            for _, line in logical_lines(text, path, self._log):
                self.scan(line, path)
        finally:
            self._files.pop()


def build_allowlist(maincf: MainCf, writer: bool, log: logging.Logger | None = None) -> AllowList:
    """The approved tables for the proxywrite (writer) or the proxymap service.

    Only the proxymap service also approves the tables in restriction classes:
    smtpd only ever reads them.
    """
    collector = _Collector(log or _log)
    param = WRITE_PARAM if writer else READ_PARAM
    collector.scan(maincf.get(param) or "", param)
    if not writer:
        for class_name in re.split(f"[{_SEPARATORS}]+", maincf.get(REST_CLASSES_PARAM) or ""):
            value = maincf.get(class_name) if class_name else None
            if value is not None:
                collector.scan(value, REST_CLASSES_PARAM)
    return AllowList(writer=writer, tables=MappingProxyType(collector.tables))
