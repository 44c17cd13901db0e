"""texthash: a ``key whitespace value`` text file read into memory, as Postfix's dict_thash."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from ..wire.proxymap import SEQ_FIRST, SEQ_NEXT, SRC_RHS_IS_FILE
from .base import OpenContext, Table, TableRetry
from .source import (
    SourceError,
    file_identity,
    logical_lines,
    printable,
    read_fd,
    refuse_writes,
    rhs_files_to_b64,
    split_key_value,
    utf8_enabled,
    valid_utf8,
)

#: Postfix re-reads a file modified within about the last second, after this pause.
COOL_DOWN_PAUSE = 0.3
# Indirections so that tests can run the cool-down loop on a fake clock.
_clock = time.time
_doze = time.sleep


class HashTable(Table):
    """A table held in a dict, as Postfix's texthash and inline both reuse dict_ht.

    Keys are stored folded. The sequence cursor belongs to the instance, as in
    Postfix; it walks the entries in the order they were first stored (Postfix's
    own order is that of a randomly seeded hash, so no order is promised).
    """

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self.entries: dict[bytes, bytes] = {}
        self._cursor: Iterator[tuple[bytes, bytes]] | None = None

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        return self.entries.get(key)

    def sequence(self, function: int, flags: int) -> tuple[bytes, bytes] | None:
        if function == SEQ_FIRST:
            self._cursor = iter(self.entries.items())
        elif function != SEQ_NEXT:  # Postfix: any other function ends the sequence
            self._cursor = None
        return None if self._cursor is None else next(self._cursor, None)


class TexthashTable(HashTable):
    """The file is read once at open; ``changed()`` tells when to open it again."""

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        refuse_writes(ctx)
        self.path = ctx.name
        self._utf8 = utf8_enabled(ctx)
        data, st = self._read_when_cool()
        self._identity = file_identity(st)
        self._load(data)

    def _read_when_cool(self) -> tuple[bytes, os.stat_result]:
        """Read the file, again and again while it was modified in the last second or so.

        Postfix does this so that it does not load a file that is still being written.
        """
        shown = printable(self.path, self._utf8)
        while True:
            before = int(_clock())
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise TableRetry(f"open database {shown}: {e.strerror}") from e
            try:
                data, st = read_fd(fd)
            except OSError as e:
                raise TableRetry(f"read {shown}: {e.strerror}") from e
            after = int(_clock())
            if int(st.st_mtime) < before - 1 or int(st.st_mtime) > after:
                return data, st
            _doze(COOL_DOWN_PAUSE)

    def _load(self, data: bytes) -> None:
        """Parse the text as Postfix's dict_thash does, warning about each line it skips."""
        utf8, log, fold = self._utf8, self.ctx.log, self.ctx.fold
        path = printable(self.path, utf8)
        rhs_is_file = bool(self.ctx.instance_flags & SRC_RHS_IS_FILE)
        for lineno, line in logical_lines(data, path, log, utf8):
            where = f"{path}, line {lineno}"
            c_string = line.split(b"\0", 1)[0]  # Postfix sees text up to a null byte
            if utf8 and not (c_string and c_string.isascii()) and not valid_utf8(line):
                shown = printable(line)
                log.warning('%s: non-UTF-8 input "%s" -- ignoring this line', where, shown)
                continue
            key, value, unbalanced = split_key_value(c_string)
            if unbalanced:
                log.warning(
                    "%s: unbalanced '\"' in '%s' -- ignoring this line",
                    where,
                    printable(c_string, utf8),
                )
                continue
            if not key or not value:
                log.warning(
                    "%s: expected format: key whitespace value -- ignoring this line", where
                )
                continue
            if key.endswith(b":"):
                log.warning('%s: record is in "key: value" format; is this an alias file?', where)
            if rhs_is_file:
                try:
                    value = rhs_files_to_b64(value)
                except SourceError as e:
                    log.warning("%s: %s: skipping this entry", where, e)
                    continue
            folded = fold(key)
            if folded in self.entries:  # keep the first, as postmap does (DUP_WARN)
                log.warning('%s: duplicate entry: "%s"', where, printable(key, utf8))
                continue
            self.entries[folded] = value

    def changed(self) -> bool:
        try:
            return file_identity(os.stat(self.path)) != self._identity
        except OSError:
            return True
