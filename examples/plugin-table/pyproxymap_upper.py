"""``upper:{alice, bob}``: an example third-party table type for pyproxymap.

A listed key is found, and its value is the key in capitals; any other key is
not found. It shows the whole contract of a table type: parse the name at open
time, raise the table errors for bad configuration, answer lookups (here at
once; a table that waits on a backend returns a coroutine instead).
"""

from __future__ import annotations

from pyproxymap.tables.base import OpenContext, Table, TableConfigError
from pyproxymap.tables.source import SourceError, as_bytes, brace_tokens, extpar


class UpperTable(Table):
    """A FIXED table (the default): the server folds keys when the client asks it to."""

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        if ctx.writable:
            raise TableConfigError(f"{ctx.spec} map requires O_RDONLY access mode")
        try:
            names = extpar(ctx.name) if ctx.name.startswith("{") else ctx.name
        except SourceError as e:
            raise TableConfigError(f"bad upper:name syntax: {e}") from e
        # Stored as a folded key arrives, so that "Alice" is found when folding is on.
        self.keys = {ctx.fold(as_bytes(name)) for name in brace_tokens(names)}
        if not self.keys:
            raise TableConfigError(f"{ctx.spec}: no keys listed")

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        return key.upper() if key in self.keys else None
