"""What Postfix's regexp and pcre tables share (dict_regexp.c, dict_pcre.c, mac_parse.c).

A table is a list of rules tried in order: ``[!]/pattern/flags result``,
``if [!]/pattern/flags`` ... ``endif``; the first rule that applies answers,
with ``$1``..``$9``/``${n}``/``$(n)`` replaced by what the groups matched
(``$$`` is a dollar). The file, or the inline ``TYPE:{{rule}, {rule}}`` form,
is parsed here with Postfix's warnings; a bad rule is skipped and the rest of
the table answers. The two types differ only in the pattern engine and in a
few details of syntax and wording, which a :class:`Dialect` spells out.

Matching runs on the event loop for short keys. A long key is matched in a
background thread with a time limit, because no engine bounds its own time
on a long key (glibc's regexec is quadratic and worse; PCRE's match limit
counts per start position), and so is every key for a table whose patterns
can take exponential time on short keys (back-references in glibc).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

from ..wire.proxymap import NO_REGSUB, PATTERN, SRC_RHS_IS_FILE
from .base import Maybe, OpenContext, Table, TableRetry
from .source import (
    WHITESPACE,
    Identity,
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

#: Keys up to this length are matched on the event loop; longer ones in the background.
INLINE_KEY_MAX = 512
#: How long a background match may take before the lookup answers RETRY.
MATCH_TIMEOUT = 10.0

_WS = WHITESPACE.encode()
#: Group spans of one match, ``(start, end)`` per group; ``start < 0`` when unset.
Spans = Sequence[tuple[int, int]]


class PatternError(Exception):
    """Postfix's complaint about one pattern; logged after ``TYPE map NAME, line N: ``."""


class ResourceLimit(PatternError):
    """The engine gave up on a match (match limit, no memory): the lookup answers RETRY."""


class Compiled(Protocol):
    """One compiled pattern."""

    #: Number of capture groups.
    groups: int
    #: True when the pattern may take exponential time even on a short key.
    slow: bool

    def search(self, subject: bytes, spans: int, background: bool) -> Spans | None:
        """Spans of groups 0..spans-1 (empty when ``spans`` is 0), or None: no match.

        ``background`` is true in the background match thread; an engine whose
        compiled form cannot be used by two threads at once keeps one per side.
        Raises PatternError (Postfix warns, the rule does not apply) or
        ResourceLimit.
        """
        ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one table type spells rules and words its warnings."""

    kind: str  # "regexp" or "pcre"
    default_options: int
    options: Mapping[int, int]  # option letter -> the bit it toggles
    obsolete_options: bytes  # letters warned about and ignored
    second_pattern: bool  # "/p1/!/p2/": '!' also ends the option letters
    backslash_at_end_closes: bool  # dict_regexp ends "/abc\" at the backslash
    unclosed: str  # what the unclosed-delimiter warning says it does with the rule
    zero_index: str  # how the warning about "$0" spells "out of range"
    #: Compile ``(pattern, options, nosub)`` or raise PatternError; ``nosub`` tells
    #: that no group spans will be asked for.
    compile: Callable[[bytes, int, bool], Compiled]


@dataclass(slots=True)
class Condition:
    """A pattern and its sense: ``!/p/`` applies when the pattern does not match."""

    expr: Compiled
    positive: bool


@dataclass(slots=True)
class MatchRule:
    lineno: int
    first: Condition
    second: Condition | None
    max_sub: int  # the largest $number, 0 for a constant result
    result: bytes  # the constant result ($$ already a dollar), when max_sub is 0
    parts: tuple[bytes | int, ...]  # literal text and group numbers, when max_sub > 0

    def expand(self, subject: bytes, spans: Spans) -> bytes:
        """The result with $number replaced; an unset or empty group gives nothing."""
        if not self.max_sub:
            return self.result
        out = []
        for part in self.parts:
            if isinstance(part, int):
                start, end = spans[part]
                if end > start >= 0:
                    out.append(subject[start:end])
            else:
                out.append(part)
        return b"".join(out)


@dataclass(slots=True)
class IfRule:
    lineno: int
    cond: Condition
    endif: int | None = None  # index of the matching ENDIF rule


@dataclass(slots=True)
class EndifRule:
    lineno: int


Rule = MatchRule | IfRule | EndifRule


class _Pattern(NamedTuple):
    """A pattern as written, before compiling."""

    regexp: bytes
    options: int
    positive: bool
    end: int  # where its option letters end in the line


class PatternTable(Table):
    """A regexp or pcre table: rules compiled at open, matched per lookup.

    Native memory of compiled patterns is released when the last lookup that
    uses it is done (the engines free it from finalizers), so ``close()`` may
    come while a background match still runs; never at exit, when one may
    still run in its daemon thread.
    """

    impl_flags = PATTERN
    dialect: ClassVar[Dialect]

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        kind = self.dialect.kind
        self._utf8 = utf8_enabled(ctx)
        refuse_writes(ctx)
        self._where = f"{kind} map {printable(ctx.name, self._utf8)}"
        self._identity: Identity | None = None
        if ctx.name.startswith("{"):
            data, stream = self._inline_text(), "unknown_stream"
        else:
            data, stream = self._read_file(), printable(ctx.name, self._utf8)
        with self._engine_context():
            self.rules = self._parse(data, stream)
        slow = any(cond.expr.slow for cond in self._conditions())
        self._inline_max = -1 if slow else INLINE_KEY_MAX

    def _engine_context(self) -> contextlib.AbstractContextManager[object]:
        """What compiling and matching must run inside (the C locale, for regexp)."""
        return contextlib.nullcontext()

    def _read_file(self) -> bytes:
        shown = printable(self.ctx.name, self._utf8)
        try:
            fd = os.open(self.ctx.name, os.O_RDONLY)
        except OSError as e:
            raise TableRetry(f"open {shown}: {e.strerror}") from e
        try:
            data, st = read_fd(fd)
        except OSError as e:  # Postfix reads a directory as an empty table; we retry
            raise TableRetry(f"read {shown}: {e.strerror}") from e
        self._identity = file_identity(st)
        return data

    def _inline_text(self) -> bytes:
        """The rules of ``{{rule}, {rule}}`` as lines of a file (Postfix's dict_stream)."""
        lines = []
        try:
            for token in brace_tokens(extpar(self.ctx.name, strip=False)):
                lines.append(as_bytes(extpar(token)) + b"\n")
        except SourceError as e:
            raise TableRetry(f"{self.dialect.kind} map: {e}") from e
        return b"".join(lines)

    # --- parsing ----------------------------------------------------------------------------

    def _warn(self, lineno: int, text: str) -> None:
        self.ctx.log.warning("%s, line %d: %s", self._where, lineno, text)

    def _parse(self, data: bytes, stream: str) -> list[Rule]:
        rules: list[Rule] = []
        open_ifs: list[IfRule] = []
        for lineno, text in logical_lines(data, stream, self.ctx.log, self._utf8):
            line = text.split(b"\0", 1)[0].rstrip(_WS)  # C string, trailing blanks trimmed
            if not line:
                continue
            rule = self._parse_rule(lineno, line, len(open_ifs))
            if isinstance(rule, IfRule):
                open_ifs.append(rule)
            elif isinstance(rule, EndifRule):
                open_ifs.pop().endif = len(rules)
            if rule is not None:
                rules.append(rule)
        for if_rule in reversed(open_ifs):  # innermost first, as Postfix reports them
            self._warn(if_rule.lineno, "IF has no matching ENDIF")
        return rules

    def _parse_rule(self, lineno: int, line: bytes, nesting: int) -> Rule | None:
        if not _isalnum(line[0]):
            return self._parse_match(lineno, line)
        if line[:2].upper() == b"IF" and not _isalnum(_at(line, 2)):
            return self._parse_if(lineno, line)
        if line[:5].upper() == b"ENDIF" and not _isalnum(_at(line, 5)):
            if nesting == 0:
                self._warn(lineno, "ignoring ENDIF without matching IF")
                return None
            if line[5:].strip(_WS):
                self._warn(lineno, "ignoring extra text after ENDIF")
            return EndifRule(lineno)
        self._warn(lineno, "ignoring unrecognized request")
        return None

    def _parse_match(self, lineno: int, line: bytes) -> MatchRule | None:
        first = self._pattern(lineno, line, 0)
        if first is None:
            return None
        second = None
        if self.dialect.second_pattern and _at(line, first.end) == ord("!"):
            second = self._pattern(lineno, line, first.end)
            if second is None:
                return None
        rhs = line[(second or first).end :].lstrip(_WS)
        if not rhs:
            self._warn(lineno, "no replacement text: using empty string")
        if self.ctx.instance_flags & SRC_RHS_IS_FILE:
            try:
                rhs = rhs_files_to_b64(rhs)
            except SourceError as e:
                self._warn(lineno, f"{e}: skipping this rule")
                return None
        parts = self._prescan(lineno, rhs)
        if parts is None:
            self._warn(lineno, "bad replacement syntax: skipping this rule")
            return None
        max_sub = max((p for p in parts if isinstance(p, int)), default=0)
        if max_sub and not first.positive:
            self._warn(
                lineno, "$number found in negative match replacement text: skipping this rule"
            )
            return None
        if max_sub and self.ctx.instance_flags & NO_REGSUB:
            self._warn(lineno, "regular expression substitution is not allowed: skipping this rule")
            return None
        expr = self._compile(lineno, first, nosub=not max_sub)
        if expr is None:
            return None
        if max_sub > expr.groups:
            index = _c_int(max_sub)
            self._warn(lineno, f'out of range replacement index "{index}": skipping this rule')
            return None
        other = None
        if second is not None:
            expr2 = self._compile(lineno, second, nosub=True)
            if expr2 is None:
                return None
            other = Condition(expr2, second.positive)
        constant = b"".join(p for p in parts if isinstance(p, bytes)) if not max_sub else b""
        return MatchRule(lineno, Condition(expr, first.positive), other, max_sub, constant, parts)

    def _parse_if(self, lineno: int, line: bytes) -> IfRule | None:
        pos = len(line) - len(line[2:].lstrip(_WS))
        found = self._pattern(lineno, line, pos)
        if found is None:
            return None
        extra = line[found.end :].lstrip(_WS)
        if extra:
            shown = printable(extra, self._utf8)
            self._warn(lineno, f'ignoring extra text after IF statement: "{shown}"')
            self._warn(lineno, "do not prepend whitespace to statements between IF and ENDIF")
        expr = self._compile(lineno, found, nosub=False)
        return None if expr is None else IfRule(lineno, Condition(expr, found.positive))

    def _pattern(self, lineno: int, line: bytes, pos: int) -> _Pattern | None:
        """``[!]/pattern/flags`` at ``pos``, or None after Postfix's warning."""
        dialect = self.dialect
        positive = True
        while pos < len(line) and (line[pos] == ord("!") or line[pos] in _WS):
            positive ^= line[pos] == ord("!")
            pos += 1
        if pos == len(line):
            self._warn(lineno, "no regexp: skipping this rule")
            return None
        delim = line[pos]
        start = pos = pos + 1
        while pos < len(line):  # a backslash escapes the next byte, even a delimiter
            if line[pos] == ord("\\"):
                if pos + 1 < len(line):
                    pos += 1
                elif dialect.backslash_at_end_closes:
                    break
            elif line[pos] == delim:
                break
            pos += 1
        if pos >= len(line):
            shown = printable(bytes([delim]), self._utf8)
            self._warn(
                lineno, f'no closing regexp delimiter "{shown}": {dialect.unclosed} this rule'
            )
            return None
        regexp = line[start:pos]
        options = dialect.default_options
        pos += 1
        while pos < len(line) and line[pos] not in _WS:
            letter = line[pos]
            if letter == ord("!") and dialect.second_pattern:
                break
            if letter in dialect.options:
                options ^= dialect.options[letter]
            elif letter in dialect.obsolete_options:
                self._warn(lineno, f'ignoring obsolete regexp option "{chr(letter)}"')
            else:
                shown = printable(bytes([letter]), self._utf8)
                self._warn(lineno, f'unknown regexp option "{shown}": skipping this rule')
                return None
            pos += 1
        return _Pattern(regexp, options, positive, pos)

    def _prescan(self, lineno: int, rhs: bytes) -> tuple[bytes | int, ...] | None:
        """Literal text and $number group indexes of a result; None after a warning.

        As Postfix's pre-scan, a bad name does not stop the scan: each is reported.
        """
        parts: list[bytes | int] = []
        ok = True
        try:
            for literal, name in mac_parse(rhs, self._utf8):
                if name is None:
                    parts.append(literal)
                elif not name.isdigit():  # ASCII digits only, as alldig()
                    shown = printable(name, self._utf8)
                    self._warn(lineno, f'non-numeric replacement index "{shown}"')
                    ok = False
                elif (index := _c_atoi(name)) < 1:
                    zero = self.dialect.zero_index
                    self._warn(lineno, f'{zero} replacement index "{name.decode()}"')
                    ok = False
                else:
                    parts.append(index)
        except MacroSyntaxError as e:
            self.ctx.log.warning("%s", e)
            return None
        return tuple(parts) if ok else None

    def _compile(self, lineno: int, pattern: _Pattern, nosub: bool) -> Compiled | None:
        try:
            return self.dialect.compile(pattern.regexp, pattern.options, nosub)
        except PatternError as e:
            self._warn(lineno, str(e))
            return None

    def _conditions(self) -> Iterator[Condition]:
        for rule in self.rules:
            if isinstance(rule, MatchRule):
                yield rule.first
                if rule.second is not None:
                    yield rule.second
            elif isinstance(rule, IfRule):
                yield rule.cond

    # --- lookup -----------------------------------------------------------------------------

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        subject = key.split(b"\0", 1)[0]  # Postfix matches a C string
        if key_rejected(self.ctx, subject):
            return None
        if len(subject) <= self._inline_max:
            return checked_value(self.ctx, subject, self._evaluate(subject, False))
        return self._lookup_in_background(subject)

    async def _lookup_in_background(self, subject: bytes) -> bytes | None:
        job = asyncio.wrap_future(_matcher.submit(self._evaluate, subject, True))
        try:
            value = await asyncio.wait_for(job, MATCH_TIMEOUT)
        except TimeoutError:
            raise TableRetry(
                f"{self._where}: no answer within {MATCH_TIMEOUT:g}s for a key of "
                f"{len(subject)} bytes"
            ) from None
        return checked_value(self.ctx, subject, value)

    def _evaluate(self, subject: bytes, background: bool) -> bytes | None:
        """The first rule that applies answers, as in dict_regexp_lookup()."""
        rules, i = self.rules, 0
        with self._engine_context():
            while i < len(rules):
                rule = rules[i]
                i += 1
                if isinstance(rule, MatchRule):
                    value = self._apply(rule, subject, background)
                    if value is not None:
                        return value
                elif isinstance(rule, IfRule):
                    if self._holds(rule.lineno, rule.cond, subject, 0, background) is not None:
                        continue
                    if rule.endif is None:  # an IF without ENDIF hides every rule after it
                        return None
                    i = rule.endif + 1
        return None

    def _apply(self, rule: MatchRule, subject: bytes, background: bool) -> bytes | None:
        """The rule's result when both its patterns hold, else None."""
        wanted = rule.max_sub + 1 if rule.max_sub else 0  # as few spans as the result uses
        spans = self._holds(rule.lineno, rule.first, subject, wanted, background)
        if spans is None:
            return None
        if rule.second and self._holds(rule.lineno, rule.second, subject, 0, background) is None:
            return None
        return rule.expand(subject, spans)

    def _holds(
        self, lineno: int, cond: Condition, subject: bytes, spans: int, background: bool
    ) -> Spans | None:
        """Group spans (or ``()``) when the condition holds, None when it does not.

        A match error makes the condition false after Postfix's warning, whatever
        its sense; an engine that gives up fails the lookup (RETRY) instead of
        answering as if the rule did not match.
        """
        try:
            found = cond.expr.search(subject, spans, background)
        except ResourceLimit as e:
            raise TableRetry(f"{self._where}, line {lineno}: {e}") from None
        except PatternError as e:
            self._warn(lineno, str(e))
            return None
        if cond.positive:
            return found
        return () if found is None else None

    def changed(self) -> bool:
        if self._identity is None:  # inline rules never change
            return False
        try:
            return file_identity(os.stat(self.ctx.name)) != self._identity
        except OSError:
            return True


class MacroSyntaxError(ValueError):
    """A result that mac_parse() refuses; the message is Postfix's (no map name in it)."""


def mac_parse(text: bytes, utf8: bool = True) -> Iterator[tuple[bytes, bytes | None]]:
    """Split a result into ``(literal, None)`` and ``(b"", name)`` for each ``$name``.

    As Postfix's mac_parse(): ``$$`` is a literal dollar; ``$name`` takes
    letters, digits and underscores; ``${name}`` and ``$(name)`` nest. A
    syntax error raises MacroSyntaxError where the parse stops, after the
    parts before it.
    """
    buf = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != ord("$"):
            buf.append(ch)
            i += 1
            continue
        if i + 1 < n and text[i + 1] == ord("$"):
            buf.append(ch)
            i += 2
            continue
        if buf:
            yield bytes(buf), None
            buf.clear()
        i += 1
        if i < n and text[i] in b"({":
            opening, closing = text[i], b")}"[b"({".index(text[i])]
            level, end = 1, i + 1
            while level > 0:
                if end == n:
                    raise MacroSyntaxError(f'truncated macro reference: "{printable(text, utf8)}"')
                level += (text[end] == opening) - (text[end] == closing)
                end += 1
            name, i = text[i + 1 : end - 1], end
        else:
            end = i
            while end < n and (_isalnum(text[end]) or text[end] == ord("_")):
                end += 1
            name, i = text[i:end], end
        if not name:
            raise MacroSyntaxError(f'empty macro name: "{printable(text, utf8)}"')
        yield b"", name
    if buf:
        yield bytes(buf), None


def c_function(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> Any:
    """A C function of ``lib`` with its signature declared, for the engines' bindings."""
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _isalnum(ch: int) -> bool:
    """Postfix's ISALNUM(): ASCII letters and digits only."""
    return ch < 0x80 and chr(ch).isalnum()


def _at(line: bytes, pos: int) -> int:
    """The byte at ``pos``, or 0 past the end (a C string's terminator)."""
    return line[pos] if pos < len(line) else 0


def _c_atoi(digits: bytes) -> int:
    """atoi() stored in a size_t, as Postfix does with a $number: big numbers wrap."""
    value = min(int(digits), 2**63 - 1)  # strtol() saturates
    return _c_int(value) % 2**64


def _c_int(value: int) -> int:
    """The value as a C int (two's complement, 32 bits)."""
    return (value + 2**31) % 2**32 - 2**31


class _Matcher:
    """One daemon thread that runs background matches in turn.

    A daemon, because a runaway match cannot be interrupted and must not hold
    up the server's exit; one thread, so that runaway matches use one CPU at
    most. A lookup that gave up waiting is cancelled before it starts.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[concurrent.futures.Future[object], Callable[[], object]]
        ]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., object], *args: object) -> concurrent.futures.Future[object]:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pyproxymap-match", daemon=True
                )
                self._thread.start()
        self._jobs.put((future, lambda: fn(*args)))
        return future

    def _run(self) -> None:
        while True:
            future, job = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as e:
                future.set_exception(e)


_matcher = _Matcher()
