"""fail: every request fails with a temporary error (RETRY), as Postfix's dict_fail.

Useful to defer mail on purpose, or as the last member of a pipemap or
unionmap. Lookups and sequence always fail; updates and deletes fail too when
the table is opened for writing, and are unsupported otherwise.
"""

from __future__ import annotations

from typing import NoReturn

from ..wire.proxymap import PATTERN
from .base import Table, TableRetry


class FailTable(Table):
    impl_flags = PATTERN

    def _fail(self, operation: str) -> NoReturn:
        raise TableRetry(f"{self.ctx.spec}: {operation} fails, as this table type always does")

    def lookup(self, key: bytes, flags: int) -> None:
        self._fail("lookup")

    def sequence(self, function: int, flags: int) -> None:
        self._fail("sequence")

    def update(self, key: bytes, value: bytes, flags: int) -> None:
        if self.ctx.writable:
            self._fail("update")
        super().update(key, value, flags)

    def delete(self, key: bytes, flags: int) -> bool:
        if self.ctx.writable:
            self._fail("delete")
        return super().delete(key, flags)
