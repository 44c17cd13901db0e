"""pcre: Perl-compatible regular expression tables, matched by libpcre2-8 as Postfix's dict_pcre.

Patterns are compiled and matched through ctypes by libpcre2-8, the library
Postfix 3.7 and later link (Debian's postfix-pcre depends on it), with the
options dict_pcre.c gives them, so answers and error texts are Postfix's on
the same system. (PyPI's pcre2 bundles a build of its own, another version
than Postfix's, behind an ``re``-like API.) As in Postfix: no UTF mode (bytes,
ASCII case folding) unless a pattern starts with ``(*UTF)``, no JIT.

Flags toggle from Postfix's default CASELESS|DOTALL: i (CASELESS), m
(MULTILINE), s (DOTALL), x (EXTENDED), A (ANCHORED), E (DOLLAR_ENDONLY),
U (UNGREEDY); X (PCRE_EXTRA, gone from PCRE2) is ignored with Postfix's warning.

Unlike Postfix, which uses the library's default limits (10 million steps,
20 GB of backtracking memory), matches are bounded by MATCH_LIMIT and
HEAP_LIMIT_KIB; a lookup that reaches one answers RETRY with a warning,
where Postfix would warn and take the rule as not matching.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref
from functools import cache
from typing import Any

from .base import TableConfigError
from .patterns import (
    Dialect,
    PatternError,
    PatternTable,
    ResourceLimit,
    Spans,
    c_function,
)

#: Backtracking steps per start position (PCRE2's default is 10 000 000).
MATCH_LIMIT = 1_000_000
#: Backtracking memory per match, in KiB (PCRE2's default is 20 000 000).
HEAP_LIMIT_KIB = 128 * 1024

CASELESS, DOLLAR_ENDONLY, DOTALL, EXTENDED = 0x8, 0x10, 0x20, 0x80
MULTILINE, UNGREEDY, ANCHORED = 0x400, 0x40000, 0x80000000
_INFO_CAPTURECOUNT = 4
_ERROR_NOMATCH = -1
#: Errors that mean "gave up", not "cannot match": MATCHLIMIT, NOMEMORY, DEPTHLIMIT, HEAPLIMIT.
_RESOURCE_ERRORS = frozenset({-47, -48, -53, -63})
_UNSET = ctypes.c_size_t(-1).value  # PCRE2_UNSET, ~(PCRE2_SIZE)0


class _Pcre2:
    """The libpcre2-8 functions used, with their C signatures, and the shared match context."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("pcre2-8") or "libpcre2-8.so.0")
        p, size, u32, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_int

        def fn(name: str, restype: object, *argtypes: object) -> Any:
            return c_function(lib, f"pcre2_{name}_8", restype, *argtypes)

        self.compile = fn(
            "compile", p, ctypes.c_char_p, size, u32, ctypes.POINTER(i), ctypes.POINTER(size), p
        )
        self.code_free = fn("code_free", None, p)
        self.pattern_info = fn("pattern_info", i, p, u32, p)
        self.match_data_create = fn("match_data_create_from_pattern", p, p, p)
        self.match_data_free = fn("match_data_free", None, p)
        self.match = fn("match", i, p, ctypes.c_char_p, size, size, u32, p, p)
        self.ovector = fn("get_ovector_pointer", ctypes.POINTER(size), p)
        self.error_message = fn("get_error_message", i, i, ctypes.c_char_p, size)
        self.context = fn("match_context_create", p, p)(None)
        if not self.context:
            raise OSError("pcre2_match_context_create failed")
        fn("set_match_limit", i, p, u32)(self.context, MATCH_LIMIT)
        fn("set_heap_limit", i, p, u32)(self.context, HEAP_LIMIT_KIB)

    def error(self, code: int) -> str:
        """Postfix's dict_pcre_get_error()."""
        buf = ctypes.create_string_buffer(256)
        if self.error_message(code, buf, len(buf)) > 0:
            return buf.value.decode("utf-8", "replace")
        return f"unexpected pcre2 error code {code}"


@cache
def _pcre2() -> _Pcre2:
    try:
        return _Pcre2()
    except (OSError, AttributeError) as e:
        raise TableConfigError(f"pcre tables need libpcre2-8: {e}") from e


class Pcre:
    """A compiled pattern. PCRE2 code is read-only while matching: both sides share it."""

    slow = False  # the match limits bound every start position

    def __init__(self, pattern: bytes, options: int) -> None:
        lib = _pcre2()
        error, offset = ctypes.c_int(), ctypes.c_size_t()
        code = lib.compile(
            pattern, len(pattern), options, ctypes.byref(error), ctypes.byref(offset), None
        )
        if not code:
            raise PatternError(f"error in regex at offset {offset.value}: {lib.error(error.value)}")
        weakref.finalize(self, lib.code_free, code).atexit = False  # see PatternTable
        self._code = code
        count = ctypes.c_uint32()
        lib.pattern_info(code, _INFO_CAPTURECOUNT, ctypes.byref(count))
        self.groups = count.value

    def search(self, subject: bytes, spans: int, background: bool) -> Spans | None:
        lib = _pcre2()
        match_data = lib.match_data_create(self._code, None)
        if not match_data:
            raise ResourceLimit("out of memory for match data")
        try:
            rc = lib.match(self._code, subject, len(subject), 0, 0, match_data, lib.context)
            if rc == _ERROR_NOMATCH:
                return None
            if rc < 0:
                text = lib.error(rc)
                raise ResourceLimit(text) if rc in _RESOURCE_ERRORS else PatternError(text)
            ovector = lib.ovector(match_data)
            return [
                (-1, -1) if ovector[2 * n] == _UNSET else (ovector[2 * n], ovector[2 * n + 1])
                for n in range(spans)
            ]
        finally:
            lib.match_data_free(match_data)


def compile_pcre(pattern: bytes, options: int, nosub: bool) -> Pcre:
    """As dict_pcre_compile(); PCRE2 has no use for ``nosub``."""
    return Pcre(pattern, options)


PCRE = Dialect(
    kind="pcre",
    default_options=CASELESS | DOTALL,
    options={
        ord("i"): CASELESS,
        ord("m"): MULTILINE,
        ord("s"): DOTALL,
        ord("x"): EXTENDED,
        ord("A"): ANCHORED,
        ord("E"): DOLLAR_ENDONLY,
        ord("U"): UNGREEDY,
    },
    obsolete_options=b"X",
    second_pattern=False,
    backslash_at_end_closes=False,
    unclosed="ignoring",
    zero_index="out of range",
    compile=compile_pcre,
)


class PcreTable(PatternTable):
    dialect = PCRE
