"""The lookup path that pgsql:, mysql: and sqlite: share.

As in Postfix: the key is checked against the ``domain`` list and against what
the templates need before any query; the query runs on the first host that
answers; every column of every row goes through ``result_format`` and the
results are joined with commas. The table is FIXED, so the service folds the
key when the client asks (FOLD_FIX), and lookup is the only operation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any, ClassVar

from ...wire.proxymap import FIXED
from ..base import Maybe, OpenContext, Table
from ..source import printable, refuse_writes, utf8_enabled, valid_utf8
from ..utf8layer import checked_value, key_rejected
from .config import CfgFile, LookupConfig, lookup_config
from .pool import Pool, share, unshare
from .query import DomainList, Rows, Templates


class SqlTable(Table):
    """A table answered by an SQL query; subclasses say how to reach the database."""

    impl_flags = FIXED
    #: sqlite skips keys that are not UTF-8 (Postfix's dict_sqlite does; the others
    #: check only in Postfix's SNAPSHOT builds).
    utf8_keys_only: ClassVar[bool] = False

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self._spec = printable(ctx.spec, utf8_enabled(ctx))
        refuse_writes(ctx)
        self._cfg = CfgFile(ctx.name, ctx.log)
        lookup = self.lookup_config(self._cfg)
        self._templates = Templates(
            lookup.query,
            lookup.result_format,
            lookup.expansion_limit,
            self._spec,
            ctx.name,
            ctx.log,
        )
        self._pool_key, make_pool = self.pool_spec(self._cfg)
        self._domain = DomainList(lookup.domain, ctx, ctx.name)
        self.pool = share(self._pool_key, make_pool)

    def lookup_config(self, cfg: CfgFile) -> LookupConfig:
        """The query, result format, domain list and expansion limit."""
        return lookup_config(cfg)

    def pool_spec(self, cfg: CfgFile) -> tuple[Hashable, Callable[[], Pool[Any]]]:
        """What identifies this table's connections, and how to make their pool."""
        raise NotImplementedError

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        if key_rejected(self.ctx, key) or (self.utf8_keys_only and not valid_utf8(key)):
            return None
        if self._domain:
            return self._lookup_in_domain(key)
        return self._query(key)

    async def _lookup_in_domain(self, key: bytes) -> bytes | None:
        if not await self._domain.allows(key):
            return None
        answer = self._query(key)
        return None if answer is None else await answer

    def _query(self, key: bytes) -> asyncio.Future[bytes | None] | None:
        """The answer to the query for ``key`` (sent now if a connection is ready for it);
        None when a template needs what the key does not have (no query, as Postfix)."""
        parts = self._templates.query_parts(key)
        if parts is None:
            return None
        sql_for = partial(self._templates.build_query, parts)
        # A single statement may share a connection (pipelined); quoting adds no ';'.
        # (find(), not `in`: see Templates.results.)
        shared = self._templates.one_statement and key.find(b";") < 0
        timeout = self.ctx.options.timeout
        return self.pool.query(self._spec, sql_for, timeout, shared, partial(self._value, key))

    def _value(self, key: bytes, rows: Rows) -> bytes | None:
        return checked_value(self.ctx, key, self._templates.results(rows, key))

    def changed(self) -> bool:
        return self._cfg.changed()

    def stats(self) -> dict[str, int]:
        return self.pool.stats()

    def close(self) -> None:
        unshare(self._pool_key)
        self._domain.close()
