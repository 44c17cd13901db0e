"""pipemap: each component's answer is the next one's key, as Postfix's dict_pipe.

The first miss or error ends the lookup, so components after it are never
asked: ``pipemap:{inline:{k1=v1}, fail:x}`` misses k0 and fails k1.
"""

from __future__ import annotations

from .composite import ComposedTable, Steps


class PipemapTable(ComposedTable):
    def _steps(self, key: bytes, flags: int) -> Steps:
        for table in self.components:
            value = yield self._ask(table, key, flags)
            if value is None:
                return None
            key = value
        return key
