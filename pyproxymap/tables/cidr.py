"""cidr: first-match rules on IPv4 and IPv6 networks, as Postfix's dict_cidr and cidr_match.

A rule is ``[!]pattern value``, ``if [!]pattern`` or ``endif``; a pattern is
an address or ``network/length``, optionally in brackets. Addresses are
parsed with the C library's inet_pton(), as Postfix does, so the forms
accepted are exactly Postfix's on the same system: an IPv4 address with a
leading zero, an IPv6 zone id (``fe80::1%eth0``) or a bracketed key never
match; an IPv4-mapped IPv6 key (``::ffff:1.2.3.4``) is IPv6 and matches only
IPv6 rules. A bad rule is skipped with Postfix's warning; a network with
host bits set is such a rule. ``cidr:{{rule}, {rule}}`` is the inline form.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..wire.proxymap import PATTERN, SRC_RHS_IS_FILE
from .base import OpenContext, Table, TableConfigError, TableRetry
from .source import (
    WHITESPACE,
    SourceError,
    as_bytes,
    brace_tokens,
    extpar,
    file_identity,
    logical_lines,
    printable,
    read_fd,
    refuse_writes,
    rhs_files_to_b64,
    utf8_enabled,
)
from .utf8layer import checked_value, key_rejected

MATCH, IF, ENDIF = range(3)
_BITS = {socket.AF_INET: 32, socket.AF_INET6: 128}
#: atoi() of a longer number saturates at LONG_MAX on LP64 systems.
_LONG_MAX = 2**63 - 1


@dataclass(slots=True)
class Rule:
    op: int
    lineno: int
    value: bytes = b""
    family: int = 0
    net: int = 0
    mask: int = 0
    match: bool = True  # False for a negated pattern
    end: int | None = None  # an IF's ENDIF, as an index into the rule list


def _address(family: int, text: str) -> int | None:
    """The address as an integer, or None where inet_pton() refuses it."""
    try:
        return int.from_bytes(socket.inet_pton(family, text))
    except (OSError, ValueError):  # ValueError: a null character
        return None


def _family(text: str) -> int:
    """Postfix's choice: any colon makes it IPv6."""
    return socket.AF_INET6 if ":" in text else socket.AF_INET


def parse_pattern(pattern: str) -> tuple[int, int, int]:
    """``(family, network, mask)`` of a pattern, as Postfix's cidr_match_parse().

    Raises SourceError with Postfix's reason. The mask length goes through
    atoi() into an unsigned char as in Postfix, so ``/288`` is ``/32``.
    """
    mask_text: str | None
    if pattern.startswith("["):
        pattern, closed, after = pattern[1:].partition("]")
        if not closed:
            raise SourceError(f"missing ']' character after \"[{pattern}\"")
        if after.startswith("/"):
            mask_text = after[1:]
        elif after:
            raise SourceError(f'garbage after "[{pattern}]"')
        else:
            pattern, slash, mask_text = pattern.partition("/")
            mask_text = mask_text if slash else None
    else:
        pattern, slash, mask_text = pattern.partition("/")
        mask_text = mask_text if slash else None
    family = _family(pattern)
    bits = _BITS[family]
    if mask_text is None:
        net = _address(family, pattern)
        if net is None:
            raise SourceError(f'bad address pattern: "{pattern}"')
        return family, net, (1 << bits) - 1
    shown = f'"{pattern}/{mask_text}"'
    if not (mask_text.isascii() and mask_text.isdigit()):
        raise SourceError(f"bad mask value in {shown}")
    shift = min(int(mask_text), _LONG_MAX) & 0xFF
    if shift > bits:
        raise SourceError(f"bad mask length in {shown}")
    net = _address(family, pattern)
    if net is None:
        raise SourceError(f"bad network value in {shown}")
    mask = ((1 << shift) - 1) << (bits - shift)
    if net & ~mask:
        suggest = socket.inet_ntop(family, (net & mask).to_bytes(bits // 8))
        raise SourceError(
            f"non-null host address bits in {shown}, perhaps you should use "
            f'"{suggest}/{shift}" instead'
        )
    return family, net, mask


def _negations(text: str) -> tuple[bool, str]:
    """Strip leading ``!`` and whitespace; True when the count of ``!`` is even."""
    match = True
    i = 0
    while i < len(text) and (text[i] == "!" or text[i] in WHITESPACE):
        match ^= text[i] == "!"
        i += 1
    return match, text[i:]


def _keyword(line: str, word: str) -> bool:
    """Whether the line starts with ``word`` (any case) not followed by a letter or digit."""
    head, follows = line[: len(word)], line[len(word) : len(word) + 1]
    return head.isascii() and head.upper() == word and not (follows.isascii() and follows.isalnum())


def parse_rule(line: str, lineno: int, nesting: int) -> Rule:
    """One rule of a table, as Postfix's dict_cidr_parse_rule(); SourceError when it is bad.

    ``line`` is a logical line decoded as table names are (UTF-8, surrogateescape).
    """
    if _keyword(line, "IF"):
        match, pattern = _negations(line[2:])
        if not pattern:
            raise SourceError("no address pattern")
        family, net, mask = parse_pattern(pattern.rstrip(WHITESPACE))
        return Rule(IF, lineno, b"", family, net, mask, match)
    if _keyword(line, "ENDIF"):
        if line[5:].strip(WHITESPACE):
            raise SourceError("garbage after ENDIF")
        if nesting == 0:
            raise SourceError("ENDIF without IF")
        return Rule(ENDIF, lineno)
    match, rest = _negations(line)
    end = next((i for i, ch in enumerate(rest) if ch in WHITESPACE), len(rest))
    pattern, value = rest[:end], rest[end:].strip(WHITESPACE)
    if not pattern:
        raise SourceError("no address pattern")
    family, net, mask = parse_pattern(pattern)
    if not value:
        raise SourceError("no lookup result")
    return Rule(MATCH, lineno, as_bytes(value), family, net, mask, match)


class CidrTable(Table):
    """No sequence, as in Postfix. Matching walks the rules in order, as Postfix does."""

    impl_flags = PATTERN

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        utf8 = utf8_enabled(ctx)
        refuse_writes(ctx)
        self._identity: tuple[int, int, int, int] | None = None
        if ctx.name.startswith("{"):
            data = self._inline_text(ctx.name)
        else:
            data = self._read(ctx.name, utf8)
        self.rules = self._compile(data, printable(ctx.name, utf8), utf8)

    @staticmethod
    def _inline_text(name: str) -> bytes:
        """``{{rule}, {rule}}`` as the lines of a file, as Postfix's dict_stream_open()."""
        try:
            rules = [extpar(token) for token in brace_tokens(extpar(name, strip=False))]
        except SourceError as e:
            raise TableConfigError(f"cidr map: {e}") from e
        return b"".join(as_bytes(rule) + b"\n" for rule in rules)

    def _read(self, path: str, utf8: bool) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise TableRetry(f"open {printable(path, utf8)}: {e.strerror}") from e
        try:
            data, st = read_fd(fd)
        except OSError as e:
            raise TableRetry(f"cidr map {printable(path, utf8)}: read error: {e.strerror}") from e
        self._identity = file_identity(st)
        return data

    def _compile(self, data: bytes, mapname: str, utf8: bool) -> list[Rule]:
        """The rules, with each IF pointing at its ENDIF; bad rules skipped with a warning."""
        log = self.ctx.log
        rhs_is_file = bool(self.ctx.instance_flags & SRC_RHS_IS_FILE)
        rules: list[Rule] = []
        open_ifs: list[int] = []
        for lineno, raw in logical_lines(data, mapname, log, utf8):
            line = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # a C string
            try:
                rule = parse_rule(line, lineno, len(open_ifs))
                if rhs_is_file:  # IF and ENDIF too: their empty value fails, as in Postfix
                    rule.value = rhs_files_to_b64(rule.value)
            except SourceError as e:
                why = printable(str(e), utf8)
                log.warning("cidr map %s, line %d: %s: skipping this rule", mapname, lineno, why)
                continue
            if rule.op == IF:
                open_ifs.append(len(rules))
            elif rule.op == ENDIF:
                rules[open_ifs.pop()].end = len(rules)
            rules.append(rule)
        for index in reversed(open_ifs):
            log.warning(
                "cidr map %s, line %d: IF has no matching ENDIF", mapname, rules[index].lineno
            )
        return rules

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        if key_rejected(self.ctx, key):
            return None
        text = key.decode("latin-1")
        family = _family(text)
        addr = _address(family, text)
        if addr is None:
            return None
        rules = self.rules
        i = 0
        while i < len(rules):
            rule = rules[i]
            hit = rule.family == family and ((addr & rule.mask) == rule.net) == rule.match
            if rule.op == MATCH:
                if hit:
                    return checked_value(self.ctx, key, rule.value)
            elif rule.op == IF and not hit:
                if rule.end is None:  # an IF without ENDIF hides every rule after it
                    return None
                i = rule.end
            i += 1
        return None

    def changed(self) -> bool:
        if self._identity is None:
            return False
        try:
            return file_identity(os.stat(self.ctx.name)) != self._identity
        except OSError:
            return True
