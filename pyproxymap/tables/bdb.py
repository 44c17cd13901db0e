"""hash and btree: Berkeley DB ``NAME.db`` files, as Postfix's dict_db reads and writes them.

Uses the ``berkeleydb`` binding over the system libdb (Debian's 5.3, which is
what Debian's postmap writes with), opened as Postfix does: a private memory
pool environment whose home is the file's directory, the database read-only.

postmap and postalias rebuild a ``.db`` file in place (truncate and rewrite)
under an exclusive flock(); readers take a shared flock around each read. After
such a rewrite an open handle would read the new pages through the old cached
metadata, and could answer "not found" for a key that is there. So each read
also checks, under the lock, that the file is the one the handle opened; when
it is not, the request waits while the file is opened again in a worker thread
(once for all waiting requests), then reads the new contents; a sequence goes
on after the last key it returned.

Writes (proxywrite) never go through that handle: each update or delete opens
the file afresh in the table's writer thread, under an exclusive flock() as
Postfix's writers take, changes it, flushes it (DB->sync, which ends in
fdatasync) and closes it before the reply. A handle that had cached pages
before another process wrote would write stale pages back and corrupt the
file; a fresh open costs some 30 µs. A missing file is created first, as
Postfix's writers create it (mode 0644, a hash sized for 4096 entries).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from ..wire.proxymap import SEQ_FIRST
from .base import OpenContext, TableConfigError, TableRetry
from .indexed import FileLock, LockedTable, WriteQueue, c_string, sync_directory, write_lock
from .source import file_identity

try:
    from berkeleydb import db
except ImportError:  # optional dependency: pip install 'pyproxymap[bdb]'
    db = None

_T = TypeVar("_T")
_MAGIC = (0x061561, 0x053162)  # hash, btree
#: After a failed reopen, requests fail at once for this long before it is tried again.
REOPEN_BACKOFF = 1.0
#: New hash files are sized for this many entries (Postfix's DICT_DB_NELM).
HASH_NELEM = 4096
#: A write needs this many free pages on the file system besides twice its entry, or it
#: is refused (RETRY) before it starts: without a log, a write that fails halfway
#: (no space left) would leave the file damaged.
SPARE_PAGES = 16

#: Writes this process made to each file: a reading handle opened before one is stale
#: even when the file's size and time say nothing (one clock tick, the same size).
_written: Counter[str] = Counter()


def _reason(error: Exception) -> str:
    """Postfix's errno text (%m), then what Berkeley DB said about it, if anything.

    Postfix leaves Berkeley DB's detail (say, "file size not a multiple of the
    pagesize") to stderr; a log line is more useful with it.
    """
    code, message = (*error.args, 0, "")[:2]
    text, _, detail = str(message).partition(" -- ")
    if isinstance(code, int) and code > 0:
        text = os.strerror(code)
    return f"{text} ({detail})" if detail else text or repr(error)


def _check_length(fd: int, size: int, shown: str) -> None:
    """Refuse a file shorter than its metadata page says.

    Berkeley DB reads pages past the end of a truncated file as empty, so every
    key on them would be "not found". The page size and last page number are at
    offsets 20 and 32 of the first page, in the byte order its magic number shows.
    """
    head = os.pread(fd, 36, 0)
    order = "<" if struct.unpack_from("<I", head, 12)[0] in _MAGIC else ">"
    page_size, last_page = struct.unpack_from(order + "I8xI", head, 20)
    if size < (last_page + 1) * page_size:
        raise TableRetry(
            f"open database {shown}: the file is truncated: {size} bytes of "
            f"{(last_page + 1) * page_size}"
        )


def _close(*parts: Any) -> None:
    """Close cursors, databases and environments, in that order.

    Postfix only notes a close error ("possible Berkeley DB bug"); close the rest.
    """
    for part in parts:
        if part is not None:
            with contextlib.suppress(db.DBError):
                part.close()


def _open_database(path: str, access: int, flags: int) -> tuple[Any, Any]:
    """An environment and a database, opened as Postfix opens them (``flags``:
    DB_RDONLY, 0 to write, DB_CREATE to create)."""
    env = db.DBEnv()
    database = None
    try:
        env.open(os.path.dirname(path) or ".", db.DB_INIT_MPOOL | db.DB_CREATE | db.DB_PRIVATE)
        database = db.DB(env)
        if flags & db.DB_CREATE and access == db.DB_HASH:
            database.set_h_nelem(HASH_NELEM)
        database.open(os.path.basename(path), None, access, flags, 0o644)
    except BaseException:
        _close(database, env)
        raise
    return env, database


class _Handle:
    """One read-only open of the file: the lock descriptor, the database, which file
    it was, and where the sequence is."""

    def __init__(self, path: str, shown: str, access: int) -> None:
        try:
            self.lock = FileLock(path, "flock")
        except OSError as e:
            raise TableRetry(f"open database {shown}: {e.strerror}") from e
        self.path = path
        self.env = self.db = self.cursor = None
        self.position: bytes | None = None  # the raw key the sequence returned last
        try:
            self.lock.wait_shared()  # never open a file that postmap is rewriting
            try:
                self.written = _written[path]
                self.identity = file_identity(os.fstat(self.lock.fd))
                self.env, self.db = _open_database(path, access, db.DB_RDONLY)
                _check_length(self.lock.fd, self.identity[2], shown)
            finally:
                self.lock.release()
        except db.DBError as e:
            self.close()
            raise TableRetry(f"open database {shown}: {_reason(e)}") from e
        except BaseException:
            self.close()
            raise

    def current(self) -> bool:
        """Whether the file is as it was when opened: no write of ours since, the same
        size and time."""
        return (
            _written[self.path] == self.written
            and file_identity(os.fstat(self.lock.fd)) == self.identity
        )

    def close(self) -> None:
        _close(self.cursor, self.db, self.env)
        self.lock.close()


class BerkeleyTable(LockedTable):
    """A ``.db`` file of one Berkeley DB access method (``access`` names it)."""

    suffix = ".db"
    access: ClassVar[str]

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        if db is None:
            raise TableConfigError(
                f"{ctx.spec}: the berkeleydb package is not installed "
                "(pip install 'pyproxymap[bdb]')"
            )
        self._access = getattr(db, self.access)
        if ctx.writable and not os.path.exists(self.path):
            self._create()
        self._handle = self._open_handle()
        self._lock = self._handle.lock
        self._identity = self._handle.identity
        self._reopening: asyncio.Future[None] | None = None
        self._failed: tuple[float, TableRetry] | None = None
        self._closed = False
        if ctx.writable:
            self._writes = WriteQueue(os.path.abspath(self.path), self.shown)

    def _open_handle(self) -> _Handle:
        return _Handle(self.path, self.shown, self._access)

    def _get(self, key: bytes) -> bytes | None:
        try:
            return self._handle.db.get(key)
        except db.DBError as e:
            raise TableRetry(f"error reading {self.shown}: {_reason(e)}") from e

    def _step(self, function: int) -> tuple[bytes, bytes] | None:
        """One step of the instance's cursor; NEXT without a sequence is the end."""
        handle = self._handle
        try:
            if function == SEQ_FIRST:
                if handle.cursor is None:
                    handle.cursor = handle.db.cursor()
                item = handle.cursor.first()
            elif handle.position is None:
                return None
            elif handle.cursor is None:  # the file was opened again since the last step
                handle.cursor = handle.db.cursor()
                item = self._after(handle.cursor, handle.position)
            else:
                item = handle.cursor.next()
        except db.DBError as e:
            raise TableRetry(f"error seeking {self.shown}: {_reason(e)}") from e
        handle.position = None if item is None else item[0]
        return None if item is None else (c_string(item[0]), c_string(item[1]))

    def _after(self, cursor: Any, key: bytes) -> tuple[bytes, bytes] | None:
        """The entry after ``key``, for a fresh cursor. A hash has no order in which a
        deleted key has a place: the sequence ends if ``key`` is gone."""
        return None if cursor.set(key) is None else cursor.next()

    def _ready(self) -> bool:
        return self._handle.current()

    async def _refresh(self) -> None:
        if self._failed is not None:
            when, error = self._failed
            if time.monotonic() - when < REOPEN_BACKOFF:
                raise error
        if self._reopening is None:
            self._reopening = asyncio.ensure_future(self._reopen())
        await asyncio.shield(self._reopening)

    async def _reopen(self) -> None:
        try:
            fresh = await asyncio.to_thread(self._open_handle)
        except TableRetry as e:
            self._failed = (time.monotonic(), e)
            raise
        finally:
            self._reopening = None
        if self._closed:
            fresh.close()
            raise TableRetry(f"{self.shown}: table was closed while it was reopened")
        self._failed = None
        old, self._handle = self._handle, fresh
        fresh.position = old.position
        self._lock, self._identity = fresh.lock, fresh.identity
        old.close()

    def _create(self) -> None:
        """Create the missing file (Berkeley DB writes it under a temporary name and
        renames it into place) and make its name durable."""
        try:
            env, database = _open_database(self.path, self._access, db.DB_CREATE)
            try:
                database.close()
            finally:
                env.close()
            sync_directory(self.path)
        except db.DBError as e:
            raise TableRetry(f"open database {self.shown}: {_reason(e)}") from e
        except OSError as e:
            raise TableRetry(f"open database {self.shown}: {e.strerror}") from e

    def _put(self, key: bytes, value: bytes) -> None:
        self._write("writing", len(key) + len(value), lambda database: database.put(key, value))

    def _remove(self, forms: list[bytes]) -> bytes | None:
        def remove(database: Any) -> bytes | None:
            for form in forms:
                with contextlib.suppress(db.DBNotFoundError):
                    database.delete(form)
                    return form
            return None

        return self._write("deleting from", 0, remove)

    def _write(self, doing: str, size: int, change: Callable[[Any], _T]) -> _T:
        """``change(database)`` on the file opened afresh under the exclusive lock, then
        flushed to disk (in the writer thread)."""
        try:
            lock = write_lock(self.path, "flock")
        except FileNotFoundError:  # removed since: create it again, as at open
            self._create()
            return self._write(doing, size, change)
        try:
            env, database = _open_database(self.path, self._access, 0)
            try:
                space = os.fstatvfs(lock.fd)
                needed = SPARE_PAGES * database.get_pagesize() + 2 * size
                if space.f_bavail * space.f_frsize < needed:
                    raise TableRetry(f"error {doing} {self.shown}: {os.strerror(errno.ENOSPC)}")
                result = change(database)
                database.sync()
            finally:
                _written[self.path] += 1
                with contextlib.suppress(db.DBError):  # synced, or failed: write nothing more
                    database.close(db.DB_NOSYNC)
                _close(env)
            return result
        except (db.DBError, MemoryError) as e:  # ENOMEM: the cache could not write pages out
            raise TableRetry(f"error {doing} {self.shown}: {_reason(e)}") from e
        finally:
            lock.close()

    def close(self) -> None:
        self._closed = True
        if self._writes is not None:
            self._writes.close()
        self._handle.close()


class BerkeleyHashTable(BerkeleyTable):
    access = "DB_HASH"


class BerkeleyBtreeTable(BerkeleyTable):
    access = "DB_BTREE"

    def _after(self, cursor: Any, key: bytes) -> tuple[bytes, bytes] | None:
        """The entry after ``key`` in key order, whether or not ``key`` is still there."""
        item = cursor.set_range(key)
        return cursor.next() if item is not None and item[0] == key else item
