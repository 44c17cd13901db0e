"""hash and btree: Berkeley DB ``NAME.db`` files, as Postfix's dict_db reads them.

Uses the ``berkeleydb`` binding over the system libdb (Debian's 5.3, which is
what Debian's postmap writes with), opened as Postfix does: a private memory
pool environment whose home is the file's directory, the database read-only.

postmap and postalias rebuild a ``.db`` file in place (truncate and rewrite)
under an exclusive flock(); readers take a shared flock around each read. After
such a rewrite an open handle would read the new pages through the old cached
metadata, and could answer "not found" for a key that is there. So each read
also checks, under the lock, that the file is the one the handle opened; when
it is not, the request waits while the file is opened again in a worker thread
(once for all waiting requests), then reads the new contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from typing import ClassVar

from ..wire.proxymap import SEQ_FIRST
from .base import OpenContext, TableConfigError, TableRetry
from .indexed import FileLock, LockedTable, c_string
from .source import file_identity

try:
    from berkeleydb import db
except ImportError:  # optional dependency: pip install 'pyproxymap[bdb]'
    db = None

_MAGIC = (0x061561, 0x053162)  # hash, btree
#: After a failed reopen, requests fail at once for this long before it is tried again.
REOPEN_BACKOFF = 1.0


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


class _Handle:
    """One open of the file: the lock descriptor, the database, and which file it was."""

    def __init__(self, path: str, shown: str, access: int) -> None:
        try:
            self.lock = FileLock(path, "flock")
        except OSError as e:
            raise TableRetry(f"open database {shown}: {e.strerror}") from e
        self.env = self.db = self.cursor = None
        try:
            self.lock.wait_shared()  # never open a file that postmap is rewriting
            try:
                self.identity = file_identity(os.fstat(self.lock.fd))
                self.env = db.DBEnv()
                home = os.path.dirname(path) or "."
                self.env.open(home, db.DB_INIT_MPOOL | db.DB_CREATE | db.DB_PRIVATE)
                self.db = db.DB(self.env)
                self.db.open(os.path.basename(path), None, access, db.DB_RDONLY)
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
        """Whether the file still has the size and time it had when opened."""
        return file_identity(os.fstat(self.lock.fd)) == self.identity

    def close(self) -> None:
        for part in (self.cursor, self.db, self.env):
            if part is not None:
                # Postfix only notes a close error ("possible Berkeley DB bug"); close the rest.
                with contextlib.suppress(db.DBError):
                    part.close()
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
        self._handle = self._open_handle()
        self._lock = self._handle.lock
        self._identity = self._handle.identity
        self._reopening: asyncio.Future[None] | None = None
        self._failed: tuple[float, TableRetry] | None = None
        self._closed = False

    def _open_handle(self) -> _Handle:
        return _Handle(self.path, self.shown, getattr(db, self.access))

    def _get(self, key: bytes) -> bytes | None:
        try:
            return self._handle.db.get(key)
        except db.DBError as e:
            raise TableRetry(f"error reading {self.shown}: {_reason(e)}") from e

    def _step(self, function: int) -> tuple[bytes, bytes] | None:
        """One step of the instance's cursor; NEXT without a cursor is the end."""
        handle = self._handle
        try:
            if function == SEQ_FIRST:
                if handle.cursor is None:
                    handle.cursor = handle.db.cursor()
                item = handle.cursor.first()
            elif handle.cursor is None:
                return None
            else:
                item = handle.cursor.next()
        except db.DBError as e:
            raise TableRetry(f"error seeking {self.shown}: {_reason(e)}") from e
        return None if item is None else (c_string(item[0]), c_string(item[1]))

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
        self._lock, self._identity = fresh.lock, fresh.identity
        old.close()

    def close(self) -> None:
        self._closed = True
        self._handle.close()


class BerkeleyHashTable(BerkeleyTable):
    access = "DB_HASH"


class BerkeleyBtreeTable(BerkeleyTable):
    access = "DB_BTREE"
