"""What the indexed-file table types (hash, btree, lmdb, cdb) share, as Postfix's drivers do.

postmap and postalias write these files; Postfix's readers agree on a few
conventions, reproduced here once:

* Keys and values may have been written with a trailing null byte or without
  (DICT_FLAG_TRY1NULL / TRY0NULL). A fresh instance tries both, key plus null
  first, and keeps only the convention of the first hit for the rest of its
  life, exactly as Postfix narrows ``dict->flags`` (so the open reply shows 24
  instead of 28 once it has learned).
* A value is a C string: it ends at its first null byte.
* A file that cannot be opened is named in Postfix's words, "open database
  PATH: reason", and is a temporary error.

Readers of files that writers update in place (Berkeley DB, LMDB) take a
shared lock around each read, as Postfix does, so they never read a file that
postmap or a daemon is halfway through writing. The lock is tried without
waiting; when a writer holds it, the request waits for it on the event loop
(other requests go on) and the lock is released before the reply, whatever
the request's flags say.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import time
from collections.abc import Callable
from typing import ClassVar, Literal, TypeVar

from ..wire.proxymap import TRY0NULL, TRY1NULL
from .base import Maybe, OpenContext, Table, TableRetry
from .source import Identity, file_identity, printable, utf8_enabled

_T = TypeVar("_T")

#: How long a read waits for a writer (say, postmap rebuilding a big table) to finish.
LOCK_WAIT = 30.0
#: Seconds between attempts to take a lock that a writer holds.
LOCK_POLL = 0.005


def c_string(data: bytes) -> bytes:
    """Data as Postfix copies it out of a database: up to the first null byte."""
    return data.partition(b"\0")[0]


class IndexedTable(Table):
    """A table in ``NAME + suffix``, read with Postfix's null-byte conventions.

    Subclasses provide ``_get`` (the raw value stored under a raw key) and set
    ``_identity`` to the file they opened, for ``changed()``.
    """

    suffix: ClassVar[str]

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        if not self.flags & (TRY0NULL | TRY1NULL):
            self.flags |= TRY0NULL | TRY1NULL
        self.path = ctx.name + self.suffix
        self.shown = printable(self.path, utf8_enabled(ctx))
        self._identity: Identity | None = None

    def _get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def _find(self, key: bytes) -> bytes | None:
        """Try the key with a null byte, then without, and learn which one the file uses."""
        if self.flags & TRY1NULL:
            value = self._get(key + b"\0")
            if value is not None:
                self.flags &= ~TRY0NULL
                return c_string(value)
        if self.flags & TRY0NULL:
            value = self._get(key)
            if value is not None:
                self.flags &= ~TRY1NULL
                return c_string(value)
        return None

    def changed(self) -> bool:
        try:
            return file_identity(os.stat(self.path)) != self._identity
        except OSError:
            return True


class FileLock:
    """A shared lock on a table file, of the kind Postfix's writers of that type take.

    Berkeley DB files are locked with flock(), LMDB files with fcntl() record locks
    (Postfix's INTERNAL_LOCK and MYFLOCK_STYLE_FCNTL on Linux).
    """

    def __init__(self, path: str, style: Literal["flock", "fcntl"]) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = fcntl.flock if style == "flock" else fcntl.lockf
        self.path = path

    def try_shared(self) -> bool:
        """Take the shared lock if no writer holds it; False when one does."""
        try:
            self._lock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise TableRetry(f"{self.path}: lock dictionary: {e.strerror}") from e
        return True

    def wait_shared(self) -> None:
        """Take the shared lock, waiting up to LOCK_WAIT (in a worker thread only)."""
        deadline = time.monotonic() + LOCK_WAIT
        while not self.try_shared():
            if time.monotonic() > deadline:
                raise TableRetry(f"{self.path}: still locked by a writer after {LOCK_WAIT:g} s")
            time.sleep(LOCK_POLL)

    def release(self) -> None:
        self._lock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1  # never lock a reused descriptor


class LockedTable(IndexedTable):
    """An indexed table whose every read runs under the file's shared lock."""

    _lock: FileLock

    def _ready(self) -> bool:
        """Whether the open handle still matches the file, checked under the lock.

        False means ``_refresh()`` must open the file again first; a file that
        cannot be read raises TableRetry instead.
        """
        return True

    async def _refresh(self) -> None:
        """Open the file again, so that ``_ready()`` holds (types that return False)."""

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        return self._locked(lambda: self._find(key))

    def sequence(self, function: int, flags: int) -> Maybe[tuple[bytes, bytes] | None]:
        return self._locked(lambda: self._step(function))

    def _step(self, function: int) -> tuple[bytes, bytes] | None:
        """One SEQ_FIRST or SEQ_NEXT step, under the lock."""
        raise NotImplementedError

    def _locked(self, read: Callable[[], _T]) -> Maybe[_T]:
        """``read()`` under the shared lock: now when it is free, else once it is."""
        if self._lock.try_shared():
            try:
                if self._ready():
                    return read()
            finally:
                self._lock.release()
        return self._locked_later(read)

    async def _locked_later(self, read: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT
        while True:
            if self._lock.try_shared():
                try:
                    if self._ready():
                        return read()
                finally:
                    self._lock.release()
                await self._refresh()
                continue
            if loop.time() > deadline:
                raise TableRetry(f"{self.shown}: still locked by a writer after {LOCK_WAIT:g} s")
            await asyncio.sleep(LOCK_POLL)
