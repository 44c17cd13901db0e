"""Reading Postfix "source" text: table files and ``{ ... }`` table names.

Postfix parses these with a handful of small C routines (readlline, extpar,
balpar, mystrtokq, split_qnameval, dict_file); this module reproduces their
behaviour, warnings and error texts so every table type built from text parses
exactly as Postfix does. Whitespace means C ``isspace()`` in the C locale,
never Unicode whitespace.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Iterator

from .base import OpenContext, TableConfigError, ascii_fold

#: Postfix's ISSPACE() set, as str and bytes.
WHITESPACE = " \t\n\v\f\r"
_WS = WHITESPACE.encode()
#: Postfix's CHARS_COMMA_SP: list separators in ``{a=b, c=d}`` and file lists.
CHARS_COMMA_SP = ", \t\r\n"
#: Postfix's CHARS_BRACE.
CHARS_BRACE = "{}"


class SourceError(ValueError):
    """Bad source text or an unreadable file it names; the message is Postfix's wording."""


#: What tells that a file was replaced or rewritten: (device, inode, size, mtime).
Identity = tuple[int, int, int, int]


def file_identity(st: os.stat_result) -> Identity:
    """The identity of a stat result, compared by tables' ``changed()``."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def utf8_enabled(ctx: OpenContext) -> bool:
    """Whether this server runs with smtputf8_enable=yes (Postfix's util_utf8_enable).

    OpenContext carries this only as its choice of fold function.
    """
    return ctx.fold is not ascii_fold


def refuse_writes(ctx: OpenContext) -> None:
    """Postfix opens this type read-only: listed in proxy_write_maps, it is unavailable."""
    if ctx.writable:
        spec = printable(ctx.spec, utf8_enabled(ctx))
        raise TableConfigError(f"{spec} map requires O_RDONLY access mode")


def as_bytes(text: str) -> bytes:
    """The bytes a table name was decoded from (UTF-8 with surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


def valid_utf8(data: bytes) -> bool:
    """Postfix's valid_utf8_string(): strict UTF-8, no surrogates or over-long forms."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def printable(text: bytes | str, utf8: bool = True) -> str:
    """Render text as Postfix's logger does (printable()): unsafe bytes become '?'.

    Text stops at a null byte, as a C string does; with UTF-8 enabled, multi-byte
    sequences are kept. A str is taken as the bytes it was decoded from
    (UTF-8 with surrogateescape, as table names are).
    """
    data = as_bytes(text) if isinstance(text, str) else text
    data = data.split(b"\0", 1)[0]
    out = bytearray()
    i = 0
    while i < len(data):
        ch = data[i]
        if 0x20 <= ch <= 0x7E:
            out.append(ch)
        elif utf8 and 0xC2 <= ch <= 0xFE and i + 1 < len(data) and 0x80 <= data[i + 1] < 0xC0:
            out.append(ch)
            while i + 1 < len(data) and 0x80 <= data[i + 1] < 0xC0:
                i += 1
                out.append(data[i])
        else:
            out.append(ord("?"))
        i += 1
    return out.decode("utf-8", "replace")


def logical_lines(
    data: bytes, path: str, log: logging.Logger, utf8: bool = True
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(lineno, text)`` per logical line, as Postfix's readllines() reads them.

    Comment lines (first non-white character '#') and blank lines are dropped
    wherever they are, even between a line and its continuation; a line that
    starts with whitespace continues the previous one and is appended as is.
    ``lineno`` is the physical line where the logical line starts. Text that
    continues nothing (whitespace at the start of the file) is dropped with
    Postfix's warning. Null bytes are kept; callers treat text as C strings.
    """
    lines = data.split(b"\n")
    if lines[-1] == b"":  # a final newline ends the last line; it starts none
        lines.pop()
    text: bytes | None = None
    first = 0
    for lineno, line in enumerate(lines, 1):
        content = line.lstrip(_WS)
        if not content or content.startswith(b"#"):
            continue
        if text is not None and line[0] in _WS:
            text += line
            continue
        if text is not None:
            yield from _checked(first, text, path, log, utf8)
        first, text = lineno, line
    if text is not None:
        yield from _checked(first, text, path, log, utf8)


def _checked(
    lineno: int, text: bytes, path: str, log: logging.Logger, utf8: bool
) -> Iterator[tuple[int, bytes]]:
    """Pass a logical line on, unless it starts with whitespace (Postfix warns and skips)."""
    if text[0] in _WS:
        more = "..." if len(text) > 30 else ""
        log.warning(
            '%s: logical line must not start with whitespace: "%s%s"',
            path,
            printable(text[:30], utf8),
            more,
        )
        return
    yield lineno, text


def balpar(text: str, parens: str = CHARS_BRACE) -> int:
    """Length of the balanced ``{...}`` at the start of ``text``, or 0 (Postfix's balpar())."""
    if not text.startswith(parens[0]):
        return 0
    level = 1
    for i, ch in enumerate(text[1:], 2):
        if ch == parens[1]:
            level -= 1
            if level == 0:
                return i
        elif ch == parens[0]:
            level += 1
    return 0


def extpar(text: str, parens: str = CHARS_BRACE, strip: bool = True) -> str:
    """The text inside ``{ ... }`` (Postfix's extpar()); ``strip`` trims whitespace inside.

    Raises SourceError with Postfix's message when the text does not start with
    the opening brace, the closing brace is missing, or text follows it.
    """
    if not text.startswith(parens[0]):
        raise SourceError(f"no '{parens[0]}' at start of text in \"{text}\"")
    length = balpar(text, parens)
    if length == 0:
        raise SourceError(f"missing '{parens[1]}' in \"{text}\"")
    if length != len(text):
        raise SourceError(f"syntax error after '{parens[1]}' in \"{text}\"")
    inner = text[1 : length - 1]
    return inner.strip(WHITESPACE) if strip else inner


def brace_tokens(text: str, sep: str = CHARS_COMMA_SP, parens: str = CHARS_BRACE) -> Iterator[str]:
    """Split on any of ``sep``, but not inside ``{...}`` (Postfix's mystrtokq()).

    Empty tokens are skipped; a stray closing brace is an ordinary character.
    """
    level = 0
    start: int | None = None
    for i, ch in enumerate(text):
        if start is None:
            if ch in sep:
                continue
            start = i
        if ch == parens[0]:
            level += 1
        elif level > 0 and ch == parens[1]:
            level -= 1
        elif level == 0 and ch in sep:
            yield text[start:i]
            start = None
    if start is not None:
        yield text[start:]


def split_qnameval(text: str) -> tuple[str, str]:
    """Split ``key = value`` (Postfix's split_qnameval()).

    The key may be double-quoted or contain backslash-escaped characters; it
    is returned in its quoted form, as Postfix stores it. The value is trimmed.
    """
    key = text.lstrip(WHITESPACE)
    if not key:
        raise SourceError("no key found; expected format: key = value")
    end, in_quotes = _key_end(key, "=")
    if in_quotes:
        raise SourceError("unbalanced '\"'")
    rest = key[end:].lstrip(WHITESPACE)
    if not rest.startswith("="):
        raise SourceError("missing '=' after attribute name")
    return key[:end], rest[1:].strip(WHITESPACE)


def split_key_value(line: bytes) -> tuple[bytes, bytes, bool]:
    """Split ``key whitespace value`` as Postfix's texthash and postmap do.

    Returns ``(key, value, unbalanced)``: the key keeps its quotes and
    backslashes, the value is trimmed; ``unbalanced`` is true when a double
    quote in the key is not closed.
    """
    text = line.decode("latin-1")  # byte-transparent: only ASCII is special here
    end, in_quotes = _key_end(text, "")
    key, value = text[:end], text[end + 1 :].strip(WHITESPACE)
    return key.encode("latin-1"), value.encode("latin-1"), in_quotes


def _key_end(text: str, stop: str) -> tuple[int, bool]:
    """Where an unquoted whitespace (or ``stop`` char) ends the key; and if a quote is open.

    A backslash protects the next character; a backslash at the very end ends the
    text there.
    """
    in_quotes = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 1
            if i == len(text):
                break
        elif ch in WHITESPACE or ch in stop:
            if not in_quotes:
                break
        elif ch == '"':
            in_quotes = not in_quotes
        i += 1
    return i, in_quotes


def read_fd(fd: int) -> tuple[bytes, os.stat_result]:
    """Read an open file to its end and close it; also return its fstat().

    Callers open the file themselves because Postfix words open errors and
    read errors differently (a directory opens fine and fails on read).
    """
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def rhs_files_to_b64(pathnames: bytes) -> bytes:
    """The base64 content of the files a value names (Postfix's dict_file_to_b64()).

    Used when a table is opened with SRC_RHS_IS_FILE: the value lists files
    separated by commas or whitespace, their contents are joined with newlines.
    """
    names = [name for name in re.split(rb"[, \t\r\n]", pathnames) if name]
    if not names:
        raise SourceError(f"empty pathname list: >>{printable(pathnames)}<<'")
    contents = []
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"open {printable(name)}: {e.strerror}") from e
        try:
            contents.append(read_fd(fd)[0])
        except OSError as e:
            raise SourceError(f"read {printable(name)}: {e.strerror}") from e
    return base64.b64encode(b"\n".join(contents))
