"""randmap: a value chosen at random from the table's name, as Postfix's dict_random.

``randmap:{a, b, {c d}}``: the key is ignored; values are separated by commas
or whitespace, and a braced value keeps its braces, as in Postfix. With
src_rhs_is_file each value names files whose base64 content is the answer.
"""

from __future__ import annotations

import random

from ..wire.proxymap import PATTERN, SRC_RHS_IS_FILE
from .base import OpenContext, Table, TableConfigError, TableRetry
from .source import (
    SourceError,
    as_bytes,
    balpar,
    brace_tokens,
    printable,
    refuse_writes,
    rhs_files_to_b64,
)
from .utf8layer import checked_value, key_rejected


class RandmapTable(Table):
    """No sequence, as in Postfix."""

    impl_flags = PATTERN

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        spec = printable(ctx.spec)
        refuse_writes(ctx)
        name = ctx.name
        length = balpar(name)
        inside = name[1 : length - 1] if 2 < length == len(name) else ""
        self.values = [as_bytes(token) for token in brace_tokens(inside)]
        if not self.values:
            raise TableConfigError(f'bad syntax: "{spec}"; need "randmap:{{value...}}"')
        if ctx.instance_flags & SRC_RHS_IS_FILE:
            try:
                self.values = [rhs_files_to_b64(value) for value in self.values]
            except SourceError as e:  # a missing file may yet appear: retry
                raise TableRetry(str(e)) from e

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        if key_rejected(self.ctx, key):
            return None
        return checked_value(self.ctx, key, random.choice(self.values))
