"""regexp: POSIX regular expression tables, matched by the C library as Postfix's dict_regexp.

Patterns are compiled and matched by glibc's regcomp()/regexec() through
ctypes, the very functions Postfix calls, so every answer is Postfix's on
the same system: glibc's leftmost-longest match and its own choice of group
spans (which is not always POSIX's, nor that of PyPI ``regex`` in POSIX mode:
``(a*)*(b)`` on "ab" gives $1 "a" here and "" there), basic regular
expressions (flag x), REG_NEWLINE (flag m) and glibc's error texts.

Postfix never calls setlocale(), so its patterns work on bytes in the C
locale (ASCII case folding, ``.`` is any byte), while Python takes LC_CTYPE
from the environment; every compile and lookup runs under uselocale(C).

Flags, as Postfix toggles them from its default REG_EXTENDED|REG_ICASE:
i (case), m (REG_NEWLINE), x (REG_EXTENDED). glibc's regexec cannot be
bounded: with group spans it takes quadratic time in the key length, and
back-references exponential time; see patterns.py for how lookups stay
bounded anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import weakref
from collections.abc import Iterator
from functools import cache

from .base import TableConfigError
from .patterns import (
    Dialect,
    PatternError,
    PatternTable,
    ResourceLimit,
    Spans,
    c_function,
)

REG_EXTENDED, REG_ICASE, REG_NEWLINE, REG_NOSUB = 1, 2, 4, 8
REG_NOMATCH, REG_ESPACE = 1, 12
_LC_ALL_MASK = 0x1FBF  # glibc: every LC_*_MASK bit
#: A back-reference (\1 to \9) in a pattern: glibc may take exponential time.
_BACKREF = re.compile(rb"\\[1-9]")


class _RegexT(ctypes.Structure):
    """glibc's regex_t (struct re_pattern_buffer); only re_nsub is read."""

    _fields_ = (
        ("buffer", ctypes.c_void_p),
        ("allocated", ctypes.c_ulong),
        ("used", ctypes.c_ulong),
        ("syntax", ctypes.c_ulong),
        ("fastmap", ctypes.c_void_p),
        ("translate", ctypes.c_void_p),
        ("re_nsub", ctypes.c_size_t),
        ("bits", ctypes.c_uint),  # can_be_null, regs_allocated, ... bit fields
    )


class _RegMatch(ctypes.Structure):
    _fields_ = (("rm_so", ctypes.c_int), ("rm_eo", ctypes.c_int))  # glibc's regoff_t is int


class _Libc:
    """The few glibc functions used, with their C signatures."""

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        preg, size, p = ctypes.POINTER(_RegexT), ctypes.c_size_t, ctypes.c_void_p
        pmatch = ctypes.POINTER(_RegMatch)
        self.regcomp = c_function(
            libc, "regcomp", ctypes.c_int, preg, ctypes.c_char_p, ctypes.c_int
        )
        self.regexec = c_function(
            libc, "regexec", ctypes.c_int, preg, ctypes.c_char_p, size, pmatch, ctypes.c_int
        )
        self.regerror = c_function(
            libc, "regerror", size, ctypes.c_int, preg, ctypes.c_char_p, size
        )
        self.regfree = c_function(libc, "regfree", None, preg)
        self.uselocale = c_function(libc, "uselocale", p, p)
        newlocale = c_function(libc, "newlocale", p, ctypes.c_int, ctypes.c_char_p, p)
        self.c_locale = newlocale(_LC_ALL_MASK, b"C", None)
        if not self.c_locale:
            raise OSError("newlocale(C) failed")


@cache
def _libc() -> _Libc:
    try:
        libc = _Libc()
        probe = _regcomp(libc, b"(a)(b)(c)", REG_EXTENDED)
    except (OSError, AttributeError, PatternError) as e:
        raise TableConfigError(f"regexp tables need the GNU C library: {e}") from e
    if probe.re_nsub != 3:
        raise TableConfigError("regexp tables need the GNU C library: unknown regex_t layout")
    libc.regfree(probe)
    return libc


def _regcomp(libc: _Libc, pattern: bytes, cflags: int) -> _RegexT:
    preg = _RegexT()
    error = libc.regcomp(preg, pattern, cflags)
    if error:
        raise PatternError(_regerror(libc, error, preg))
    return preg


def _regerror(libc: _Libc, error: int, preg: _RegexT) -> str:
    buf = ctypes.create_string_buffer(256)  # as Postfix's errbuf
    libc.regerror(error, preg, buf, len(buf))
    return buf.value.decode("utf-8", "replace")


@contextlib.contextmanager
def c_locale() -> Iterator[None]:
    """Run the block in the C locale, in this thread only."""
    libc = _libc()
    previous = libc.uselocale(libc.c_locale)
    try:
        yield
    finally:
        libc.uselocale(previous)


class Regexp:
    """A compiled pattern, compiled once more for the background match thread.

    glibc's regexec holds a lock on the pattern while it runs: a long match in
    the background must not make the event loop wait on the same pattern.
    """

    def __init__(self, pattern: bytes, cflags: int) -> None:
        self._pattern, self._cflags = pattern, cflags
        self._loop_side = self._compiled()
        self._background: _RegexT | None = None
        self.groups = self._loop_side.re_nsub
        self.slow = _BACKREF.search(pattern) is not None

    def _compiled(self) -> _RegexT:
        libc = _libc()
        preg = _regcomp(libc, self._pattern, self._cflags)
        weakref.finalize(self, libc.regfree, preg).atexit = False  # see PatternTable
        return preg

    def search(self, subject: bytes, spans: int, background: bool) -> Spans | None:
        if not background:
            preg = self._loop_side
        elif self._background is None:  # only the match thread gets here
            preg = self._background = self._compiled()
        else:
            preg = self._background
        libc = _libc()
        matches = (_RegMatch * spans)() if spans else None
        error = libc.regexec(preg, subject, spans, matches, 0)
        if error == REG_NOMATCH:
            return None
        if error:
            text = _regerror(libc, error, preg)
            raise ResourceLimit(text) if error == REG_ESPACE else PatternError(text)
        return [(m.rm_so, m.rm_eo) for m in matches] if matches else ()


def compile_regexp(pattern: bytes, options: int, nosub: bool) -> Regexp:
    """As dict_regexp_compile_pat(); REG_NOSUB when no group spans are wanted."""
    return Regexp(pattern, options | REG_NOSUB if nosub else options)


REGEXP = Dialect(
    kind="regexp",
    default_options=REG_EXTENDED | REG_ICASE,
    options={ord("i"): REG_ICASE, ord("m"): REG_NEWLINE, ord("x"): REG_EXTENDED},
    obsolete_options=b"",
    second_pattern=True,
    backslash_at_end_closes=True,
    unclosed="skipping",
    zero_index="out-of-range",
    compile=compile_regexp,
)


class RegexpTable(PatternTable):
    dialect = REGEXP

    def _engine_context(self) -> contextlib.AbstractContextManager[None]:
        return c_locale()
