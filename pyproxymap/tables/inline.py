"""inline: a table written in its own name, ``inline:{key=value, { key = text, with comma }}``.

Parsed as Postfix's dict_inline: entries are separated by commas or
whitespace; an entry in braces may hold both; a repeated key takes the later
value (Postfix does no duplicate check here).
"""

from __future__ import annotations

from ..wire.proxymap import SRC_RHS_IS_FILE
from .base import OpenContext, TableConfigError, TableRetry
from .source import (
    SourceError,
    as_bytes,
    balpar,
    brace_tokens,
    extpar,
    printable,
    refuse_writes,
    rhs_files_to_b64,
    split_qnameval,
    utf8_enabled,
    valid_utf8,
)
from .texthash import HashTable


class InlineTable(HashTable):
    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        utf8 = utf8_enabled(ctx)
        spec = printable(ctx.spec, utf8)
        refuse_writes(ctx)
        name = ctx.name
        need = 'need "inline:{name=value...}"'
        if utf8 and not valid_utf8(as_bytes(name)):
            raise TableConfigError(f'bad UTF-8 syntax: "{spec}"; {need}')
        length = balpar(name)
        if length in (0, 2) or length != len(name):
            raise TableConfigError(f'bad syntax: "{spec}"; {need}')
        if ctx.instance_flags & SRC_RHS_IS_FILE:
            need = 'need "inline:{name=filename...}"'
        for token in brace_tokens(name[1:-1]):
            try:
                key, value = split_qnameval(extpar(token) if token.startswith("{") else token)
            except SourceError as e:
                raise TableConfigError(f'{e}: "{spec}"; {need}') from e
            data = as_bytes(value)
            if ctx.instance_flags & SRC_RHS_IS_FILE:
                try:
                    data = rhs_files_to_b64(data)
                except SourceError as e:  # a missing file may yet appear: retry
                    raise TableRetry(f'{e}: "{spec}"; {need}') from e
            self.entries[ctx.fold(as_bytes(key))] = data
        if not self.entries:
            raise TableConfigError(f'empty table: "{spec}"; {need}')
