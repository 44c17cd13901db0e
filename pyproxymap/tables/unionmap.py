"""unionmap: every component's answer, joined with commas, as Postfix's dict_union.

Components that miss are left out; the whole misses when the joined text is
empty (Postfix adds a comma only after non-empty text, so ``"" + "a"`` is
``a`` but ``"a" + ""`` is ``a,``). Any component error fails the lookup.
"""

from __future__ import annotations

from .composite import ComposedTable, Steps


class UnionmapTable(ComposedTable):
    def _steps(self, key: bytes, flags: int) -> Steps:
        joined = b""
        for table in self.components:
            value = yield self._ask(table, key, flags)
            if value is not None:
                joined = joined + b"," + value if joined else value
        return joined or None
