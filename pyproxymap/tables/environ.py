"""environ: the server process's environment variables, as Postfix's dict_env.

Postfix folds the key to lower case for a client that asks (postmap -q and
daemons do), so such clients find only variables with lower-case names.
Updates set a variable in the server process, as Postfix's setenv() does;
there is no delete and no sequence.
"""

from __future__ import annotations

import os

from .base import Table, TableConfigError
from .utf8layer import checked_value, key_rejected


class EnvironTable(Table):
    """Reads ``os.environb``: the environment as Python keeps it (and changes it)."""

    def lookup(self, key: bytes, flags: int) -> bytes | None:
        if key_rejected(self.ctx, key):
            return None
        return checked_value(self.ctx, key, os.environb.get(key))

    def update(self, key: bytes, value: bytes, flags: int) -> None:
        try:
            os.environb[key] = value
        except (OSError, ValueError) as e:  # a name with "=", or empty: Postfix dies here
            raise TableConfigError(f"{self.ctx.spec}: setenv: {e}") from e
