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

Instances opened for the proxywrite service also write, as Postfix's writers
do: each update or delete runs in the table file's own writer thread (one at a
time, in order, while the event loop goes on), under an exclusive lock on the
file (which serializes it with every other process), and is on disk before it
is acknowledged.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import ClassVar, Literal, TypeVar

from ..wire.proxymap import TRY0NULL, TRY1NULL
from .base import Maybe, OpenContext, Table, TableRetry
from .source import Identity, file_identity, printable, utf8_enabled

_T = TypeVar("_T")

#: How long a read or a write waits for the lock (say, while postmap rebuilds a big table).
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
        """For a writable instance only another file at the path counts: the instance
        follows its own writes and other writers' (Postfix's writers set no mtime)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        if self.ctx.writable and self._identity is not None:
            return (st.st_dev, st.st_ino) != self._identity[:2]
        return file_identity(st) != self._identity


def _record_lock(fd: int, operation: int) -> None:
    """fcntl() record locking with flock()'s interface, on the open file description.

    Open file description locks (Linux) conflict with the classic fcntl() locks
    of Postfix's processes, and also between two descriptors of this process,
    so our readers and writers exclude each other as well; closing another
    descriptor of the file does not drop them.
    """
    kind = {fcntl.LOCK_SH: fcntl.F_RDLCK, fcntl.LOCK_EX: fcntl.F_WRLCK}
    flock = struct.pack("hhqqi4x", kind.get(operation & ~fcntl.LOCK_NB, fcntl.F_UNLCK), 0, 0, 0, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)


class FileLock:
    """A lock on a table file, of the kind Postfix's writers of that type take.

    Berkeley DB files are locked with flock(), LMDB files with fcntl() record locks
    (Postfix's INTERNAL_LOCK and MYFLOCK_STYLE_FCNTL on Linux). An exclusive
    fcntl() lock needs ``flags`` O_RDWR; with O_CREAT a missing file is created
    empty, mode 0644.
    """

    def __init__(
        self, path: str, style: Literal["flock", "fcntl"], flags: int = os.O_RDONLY
    ) -> None:
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        self._lock = fcntl.flock if style == "flock" else _record_lock
        self.path = path

    def _try(self, operation: int) -> bool:
        try:
            self._lock(self.fd, operation | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise TableRetry(f"{self.path}: lock dictionary: {e.strerror}") from e
        return True

    def try_shared(self) -> bool:
        """Take the shared lock if no writer holds it; False when one does."""
        return self._try(fcntl.LOCK_SH)

    def _wait(self, operation: int, holder: str) -> None:
        """Take the lock, waiting up to LOCK_WAIT (in a worker thread only)."""
        deadline = time.monotonic() + LOCK_WAIT
        while not self._try(operation):
            if time.monotonic() > deadline:
                raise TableRetry(f"{self.path}: still locked by {holder} after {LOCK_WAIT:g} s")
            time.sleep(LOCK_POLL)

    def wait_shared(self) -> None:
        self._wait(fcntl.LOCK_SH, "a writer")

    def wait_exclusive(self) -> None:
        self._wait(fcntl.LOCK_EX, "another reader or writer")

    def release(self) -> None:
        self._lock(self.fd, fcntl.LOCK_UN)

    def file(self) -> tuple[int, int]:
        """The (device, inode) of the locked file."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1  # never lock a reused descriptor


def write_lock(path: str, style: Literal["flock", "fcntl"]) -> FileLock:
    """The file now at ``path``, exclusively locked (in a worker thread only).

    Waits up to LOCK_WAIT for other readers and writers; when the file was
    replaced while we waited, locks the new one. FileNotFoundError when there is
    none; TableRetry for any other failure.
    """
    while True:
        try:
            lock = FileLock(path, style, os.O_RDWR)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise TableRetry(f"open database {path}: {e.strerror}") from e
        try:
            lock.wait_exclusive()
            st = os.stat(path)
        except BaseException:
            lock.close()
            raise
        if (st.st_dev, st.st_ino) == lock.file():
            return lock
        lock.close()


def sync_directory(path: str) -> None:
    """Make a new file's name durable: fsync the directory it is in."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteQueue:
    """The writer thread of one table file: its writes run one at a time, in order.

    Every instance of the file in this process (other instance flags, a reopen,
    a reload) shares the thread; the file lock serializes it with other processes.
    """

    _queues: ClassVar[dict[Hashable, tuple[ThreadPoolExecutor, int]]] = {}
    _queues_lock: ClassVar = threading.Lock()

    def __init__(self, file: Hashable, name: str) -> None:
        with self._queues_lock:
            executor, users = self._queues.get(file) or (
                ThreadPoolExecutor(1, thread_name_prefix=f"write {name}"),
                0,
            )
            self._queues[file] = (executor, users + 1)
        self._file, self._name = file, name
        self._executor: ThreadPoolExecutor | None = executor

    async def run(self, write: Callable[[], _T]) -> _T:
        """``write()`` in the writer thread, after the writes queued before it."""
        if self._executor is None:
            raise TableRetry(f"{self._name}: the table was closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, write)

    def close(self, then: Callable[[], None] | None = None) -> None:
        """Leave the queue; ``then()`` runs in the thread once the queued writes are done."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        with self._queues_lock:
            users = self._queues[self._file][1] - 1
            if users:
                self._queues[self._file] = (executor, users)
            else:
                del self._queues[self._file]
        if then is not None:
            executor.submit(then)
        if not users:
            executor.shutdown(wait=False)


class LockedTable(IndexedTable):
    """An indexed table whose every read runs under the file's shared lock.

    A writable instance sets ``_writes`` and implements ``_put`` and ``_remove``,
    which run in the writer thread.
    """

    _lock: FileLock
    _writes: WriteQueue | None = None

    def update(self, key: bytes, value: bytes, flags: int) -> Maybe[None]:
        if self._writes is None:
            return super().update(key, value, flags)
        if self.flags & TRY1NULL and self.flags & TRY0NULL:
            self.flags &= ~TRY0NULL  # undecided: a null byte, as Postfix's writers on Linux
        if self.flags & TRY1NULL:
            key, value = key + b"\0", value + b"\0"
        return self._writes.run(partial(self._put, key, value))

    def delete(self, key: bytes, flags: int) -> Maybe[bool]:
        if self._writes is None:
            return super().delete(key, flags)
        forms = [key + b"\0"] if self.flags & TRY1NULL else []
        if self.flags & TRY0NULL:
            forms.append(key)
        return self._delete(self._writes, forms)

    async def _delete(self, writes: WriteQueue, forms: list[bytes]) -> bool:
        """Delete the first of the key's ``forms`` that is there, and learn from it."""
        removed = await writes.run(partial(self._remove, forms))
        if removed is None:
            return False
        self.flags &= ~(TRY0NULL if removed.endswith(b"\0") else TRY1NULL)
        return True

    def _put(self, key: bytes, value: bytes) -> None:
        """Store the raw key and value, flushed to disk (in the writer thread)."""
        raise NotImplementedError

    def _remove(self, forms: list[bytes]) -> bytes | None:
        """Delete the first raw key of ``forms`` that is there, flushed; which one, or None."""
        raise NotImplementedError

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
