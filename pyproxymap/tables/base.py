"""The one interface every table type implements, and the errors it may raise.

A table never knows about sockets, requests or status codes: it answers
lookups and raises one of the errors below, and the service maps outcomes to
status codes in one place. Methods may answer at once (return the result) or
later (return an awaitable): in-memory tables answer at once so the server can
reply without scheduling a task; a table that waits on a backend returns a
coroutine and the server awaits it without blocking other tables.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from ..wire.proxymap import FIXED, FOLD_FIX, FOLD_MUL, PATTERN

_T = TypeVar("_T")
#: A result that is either ready or still to come.
Maybe = _T | Awaitable[_T]


class TableError(Exception):
    """Base class of what a table may raise."""


class TableRetry(TableError):
    """A transient failure (file unreadable, backend down, timeout): status RETRY.

    Never answer "not found" for a failure: a wrong NOKEY bounces mail.
    """


class TableConfigError(TableError):
    """The table is configured wrongly (bad syntax, bad parameter): status CONFIG."""


class Unsupported(TableError):
    """The table type cannot do this operation (say, update a texthash): status CONFIG.

    Postfix's proxymap dies on these; we answer and keep serving.
    """


def ascii_fold(key: bytes) -> bytes:
    """Postfix's lowercase(): ASCII letters only, as its table drivers fold with FOLD_FIX."""
    return key.lower()


def utf8_fold(key: bytes) -> bytes:
    """Postfix's casefold() with smtputf8_enable=yes: full Unicode case folding.

    Keys that are not valid UTF-8 fall back to ASCII folding.
    """
    if key.isascii():
        return key.lower()
    try:
        return key.decode("utf-8").casefold().encode("utf-8")
    except UnicodeDecodeError:
        return key.lower()


@dataclass(frozen=True, slots=True)
class TableOptions:
    """Our own per-table settings: what Postfix has no word for.

    Set in pyproxymap.toml, ``[table_defaults]`` for every table and
    ``[tables."type:name"]`` for one; backend drivers read the pool and timeout
    bounds, the server applies the cache.
    """

    max_connections: int = 4  # backend connections one table instance may hold
    pool_wait: float = 5.0  # seconds a lookup may wait for a free connection
    timeout: float = 10.0  # seconds a backend lookup may take (then RETRY)
    cache_ttl: float = 0.0  # seconds a found answer is cached (0: no cache)
    cache_negative_ttl: float = 0.0  # seconds a "not found" is cached
    cache_size: int = 10000  # answers cached per table, at most
    cache_stale: float = 0.0  # seconds the last good answer serves while the backend fails
    slow_lookup: float = 1.0  # seconds after which a request is logged as slow (0: never)


@dataclass(frozen=True, slots=True)
class OpenContext:
    """Everything a table type needs to open one instance."""

    type: str  # "texthash"
    name: str  # what follows "type:", e.g. "/etc/postfix/aliases" or "{a=1, b=2}"
    instance_flags: int = 0  # INST bits the client asked for (TRY0NULL, OPEN_LOCK, ...)
    writable: bool = False  # opened for the proxywrite service (O_RDWR|O_CREAT)
    fold: Callable[[bytes], bytes] = utf8_fold  # how this server folds keys (smtputf8_enable)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pyproxymap"))
    #: Opens a component table ("type:name", instance flags) for types made of other
    #: tables (unionmap, pipemap): a private instance, opened directly as Postfix does
    #: (components need no approval of their own). Raises TableError when it fails.
    open_nested: Callable[[str, int], Table] | None = None
    options: TableOptions = field(default_factory=TableOptions)

    @property
    def spec(self) -> str:
        return f"{self.type}:{self.name}"


class Table:
    """One open table instance, shared by every connection that asks for it.

    ``flags`` is what Postfix keeps in ``dict->flags`` for a fresh instance: the
    instance flags it was opened with plus the implementation bits (FIXED or
    PATTERN, MULTI_WRITER) and anything the type adds (TRY0NULL/TRY1NULL). The
    open reply carries it.
    """

    impl_flags: ClassVar[int] = FIXED

    def __init__(self, ctx: OpenContext) -> None:
        self.ctx = ctx
        self.flags = ctx.instance_flags | self.impl_flags

    def folded(self, key: bytes, flags: int) -> bytes:
        """The key as Postfix folds it for this table: when the request asks (FOLD_FIX
        for a FIXED table, FOLD_MUL for a PATTERN table), with this server's folding."""
        if (flags & FOLD_FIX and self.flags & FIXED) or (flags & FOLD_MUL and self.flags & PATTERN):
            return self.ctx.fold(key)
        return key

    @classmethod
    def open(cls, ctx: OpenContext) -> Table:
        """Open an instance. May block (read a file): the server calls it in a thread."""
        return cls(ctx)

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        """The value for ``key`` (already folded when the request asked), or None."""
        raise Unsupported(f"table {self.ctx.spec}: lookup operation is not supported")

    def update(self, key: bytes, value: bytes, flags: int) -> Maybe[None]:
        raise Unsupported(f"table {self.ctx.spec}: update operation is not supported")

    def delete(self, key: bytes, flags: int) -> Maybe[bool]:
        """Delete ``key``; False when it was not there."""
        raise Unsupported(f"table {self.ctx.spec}: delete operation is not supported")

    def sequence(self, function: int, flags: int) -> Maybe[tuple[bytes, bytes] | None]:
        """SEQ_FIRST / SEQ_NEXT over the shared instance's cursor; None at the end."""
        raise Unsupported(f"table {self.ctx.spec}: sequence operation is not supported")

    def changed(self) -> bool:
        """True when the data behind the table changed and a fresh open would differ."""
        return False

    def close(self) -> None:
        """Release what the instance holds."""

    def stats(self) -> dict[str, int]:
        """Figures for ``pyproxymap status`` and the metrics, read when asked: a result
        cache gives ``cache_hits``, ``cache_misses``, ``cache_stale``, ``cache_entries``;
        a table with a connection pool ``pool_in_use``, ``pool_idle``, ``pool_waiting``."""
        return {}
