"""static: every key has the same value, the table's name (``static:{ text with spaces }``)."""

from __future__ import annotations

from ..wire.proxymap import SRC_RHS_IS_FILE
from .base import OpenContext, Table, TableConfigError, TableRetry
from .source import (
    SourceError,
    as_bytes,
    extpar,
    printable,
    rhs_files_to_b64,
    utf8_enabled,
    valid_utf8,
)

_NON_UTF8 = "malformed UTF-8 or invalid codepoint"


class StaticTable(Table):
    """No sequence, as in Postfix (the base class answers Unsupported)."""

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self._utf8 = utf8_enabled(ctx)
        name = ctx.name
        if name.startswith("{"):
            try:
                name = extpar(name)
            except SourceError as e:
                err = printable(str(e), self._utf8)
                raise TableConfigError(f"bad static:name syntax: {err}") from e
        self.value = as_bytes(name)
        if ctx.instance_flags & SRC_RHS_IS_FILE:
            try:
                self.value = rhs_files_to_b64(self.value)
            except SourceError as e:  # a missing file may yet appear: retry
                raise TableRetry(str(e)) from e

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        """The value, after the UTF-8 checks that Postfix's dict_utf8 layer makes.

        The value is checked here, not at open, because Postfix opens such a
        table and fails each lookup.
        """
        if self._utf8 and not valid_utf8(key):
            spec = printable(self.ctx.spec)
            self.ctx.log.warning('%s: non-UTF-8 key "%s": %s', spec, printable(key), _NON_UTF8)
            return None
        if self._utf8 and not valid_utf8(self.value):
            raise TableConfigError(
                f'{printable(self.ctx.spec)}: key "{printable(key)}": '
                f'non-UTF-8 value "{printable(self.value)}": {_NON_UTF8}'
            )
        return self.value
