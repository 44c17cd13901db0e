"""lmdb: ``NAME.lmdb`` files, as Postfix's dict_lmdb (over slmdb) reads and writes them.

Postfix opens LMDB files without LMDB's own lock file (MDB_NOLOCK) and
coordinates with fcntl() record locks instead: writers lock exclusively,
readers share the lock around each read. We do the same, through the ``lmdb``
binding. Every read is its own read transaction, so it sees the last committed
transaction and nothing uncommitted. LMDB never truncates its file (postmap's
rebuild empties the database inside a transaction), so an open map stays valid
while writers work; when a writer grew the file past our map, the map is grown
before reading.

Writes (proxywrite) run in the table's writer thread, each in a transaction of
its own under the exclusive lock, committed (LMDB syncs the data, then the
meta page) before the reply, as slmdb does; a full map is grown and the write
tried again. A missing file is created (mode 0644) in the 0.9 format Postfix's
liblmdb reads. A write killed halfway leaves the last commit intact.

py-lmdb refuses to open one file twice in a process, and LMDB itself forbids
it; so instances of the same file (other instance flags, the other service, a
reopen after a change) share one environment, closed with its last user. It is
opened read-write whenever the file may be written, so a reader and a writer
can share it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..wire.proxymap import FIXED, MULTI_WRITER, SEQ_FIRST
from .base import OpenContext, TableConfigError, TableRetry
from .indexed import FileLock, LockedTable, WriteQueue, c_string, sync_directory, write_lock
from .source import file_identity

try:
    import lmdb
except ImportError:  # optional dependency: pip install 'pyproxymap[lmdb]'
    lmdb = None

_T = TypeVar("_T")
FileKey = tuple[int, int]

#: The map size a writer starts with (Postfix's lmdb_map_size), or the file's size and
#: some room when that is more (slmdb's SLMDB_FUDGE).
MAP_SIZE = 16 << 20
MAP_FUDGE = 10240
#: How many times one write doubles a full map before it gives up.
MAP_GROWTHS = 4

_envs: dict[FileKey, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()


def _new_file_format() -> dict[str, int]:
    """The open arguments that make py-lmdb write a new file in LMDB 0.9's format
    (py-lmdb 3 can also write LMDB 1.0's, which Postfix's liblmdb cannot read)."""
    try:
        lmdb.version(lib_version=0)
    except TypeError:  # py-lmdb before 3 has only the 0.9 engine
        return {}
    return {"lib_version": 0}


def _acquire(path: str, key: FileKey, write: bool) -> lmdb.Environment:
    """The environment of the file ``key`` (device, inode), opened on first use.

    Read-write when the file may be written (an empty file only for a writer:
    opening one read-write creates the database); ``write`` requires that.
    """
    with _envs_lock:
        env, users = _envs.get(key) or (None, 0)
        if env is None:
            size = os.stat(path).st_size
            writable = write or (size > 0 and os.access(path, os.W_OK))
            env = lmdb.open(
                path,
                subdir=False,
                readonly=not writable,
                lock=False,
                create=False,
                map_size=max(MAP_SIZE, size + MAP_FUDGE),
                mode=0o644,
                **(_new_file_format() if size == 0 else {}),
            )
        elif write and env.flags()["readonly"]:
            raise TableRetry(f"open database {path}: opened read-only: the file was not writable")
        _envs[key] = (env, users + 1)
        return env


def _release(key: FileKey) -> None:
    with _envs_lock:
        env, users = _envs[key]
        if users > 1:
            _envs[key] = (env, users - 1)
        else:
            del _envs[key]
            env.close()


def _reason(error: Exception, path: str) -> str:
    """py-lmdb's message without the path it starts with: mdb_strerror(), as Postfix prints."""
    return str(error).removeprefix(f"{path}: ")


class LmdbTable(LockedTable):
    suffix = ".lmdb"
    impl_flags = FIXED | MULTI_WRITER

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        if lmdb is None:
            raise TableConfigError(
                f"{ctx.spec}: the lmdb package is not installed (pip install 'pyproxymap[lmdb]')"
            )
        try:
            flags = os.O_RDWR | os.O_CREAT if ctx.writable else os.O_RDONLY
            self._lock = FileLock(self.path, "fcntl", flags)
        except OSError as e:
            raise TableRetry(f"open database {self.shown}: {e.strerror}") from e
        st = os.fstat(self._lock.fd)
        self._key = (st.st_dev, st.st_ino)
        try:
            if st.st_size == 0 and ctx.writable:
                self._env = self._create()
            else:
                self._env = _acquire(self.path, self._key, ctx.writable)
        except lmdb.Error as e:
            self._lock.close()
            raise TableRetry(f"open database {self.shown}: {_reason(e, self.path)}") from e
        except BaseException:
            self._lock.close()
            raise
        self._identity = file_identity(st)
        self._page_size = self._env.stat()["psize"]
        self._checked: tuple[int, int] | None = None  # (size, mtime) last found whole
        try:
            self._ready()
        except TableRetry:
            self.close()
            raise
        self._saved: bytes | None = None  # the sequence position: the last key returned
        if ctx.writable:
            self._writes = WriteQueue(self._key, self.shown)

    def _create(self) -> lmdb.Environment:
        """Write the first pages of a new file, under the exclusive lock so that one
        process does, and make it and its name durable."""
        self._lock.wait_exclusive()
        try:
            env = _acquire(self.path, self._key, True)
            os.fsync(self._lock.fd)
            sync_directory(self.path)
            return env
        finally:
            self._lock.release()

    def _ready(self) -> bool:
        """Refuse a file shorter than its last transaction: reading it would crash the server.

        Memory-mapped pages past the end of a file raise SIGBUS. LMDB never
        shrinks its file, but a file truncated or copied over in place would. Only
        a file whose size or modification time changed since it was last found whole
        is checked again (env.info() is a tenth of an lmdb lookup's instructions).
        """
        st = os.fstat(self._lock.fd)
        seen = (st.st_size, st.st_mtime_ns)
        if seen == self._checked:
            return True
        size = st.st_size
        if size < 2 * self._page_size or (
            size < (self._env.info()["last_pgno"] + 1) * self._page_size
        ):
            raise TableRetry(
                f"{self.shown}: the file is shorter than its data: truncated or overwritten"
            )
        self._checked = seen
        return True

    def _begin(self) -> lmdb.Transaction:
        """A read transaction on the last commit; first grow our map if a writer grew the file."""
        try:
            return self._env.begin()
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # 0: adopt the size the writer set
            return self._env.begin()

    def _get(self, key: bytes) -> bytes | None:
        try:
            with self._begin() as txn:
                return txn.get(key)
        except lmdb.BadValsizeError:
            return None  # a key LMDB cannot store (the empty key) is not there
        except lmdb.Error as e:
            raise TableRetry(f"error reading {self.ctx.spec}: {_reason(e, self.path)}") from e

    def _step(self, function: int) -> tuple[bytes, bytes] | None:
        """One step, in a read transaction of its own, after the last key returned.

        Postfix's slmdb does the same under MDB_NOLOCK: no transaction may
        outlive the lock, so the position is kept as a key.
        """
        after = None if function == SEQ_FIRST else self._saved
        if function != SEQ_FIRST and after is None:
            return None
        try:
            with self._begin() as txn:
                cursor = txn.cursor()
                if after is None:
                    found = cursor.first()
                else:  # the key after the saved one, even if that one was deleted since
                    found = cursor.set_range(after) and (cursor.key() != after or cursor.next())
                key, value = cursor.item() if found else (None, None)
        except lmdb.Error as e:
            raise TableRetry(f"error seeking {self.ctx.spec}: {_reason(e, self.path)}") from e
        self._saved = key
        if key is None:
            return None
        return c_string(key), c_string(value)

    def _put(self, key: bytes, value: bytes) -> None:
        self._write("updating", lambda txn: txn.put(key, value))

    def _remove(self, forms: list[bytes]) -> bytes | None:
        def remove(txn: Any) -> bytes | None:
            for form in forms:
                with contextlib.suppress(lmdb.BadValsizeError):  # too long to be there
                    if txn.delete(form):
                        return form
            return None

        return self._write("deleting from", remove)

    def _write(self, doing: str, change: Callable[[Any], _T]) -> _T:
        """``change(txn)`` in a write transaction, committed under the exclusive lock
        (in the writer thread)."""
        try:
            lock = write_lock(self.path, "fcntl")
        except FileNotFoundError:  # changed() says so too: the instance is opened again
            raise TableRetry(f"open database {self.shown}: No such file or directory") from None
        try:
            if lock.file() != self._key:
                raise TableRetry(f"{self.shown}: the file was replaced while it was open")
            growths = 0
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        return change(txn)
                except lmdb.MapFullError:
                    if growths == MAP_GROWTHS:
                        raise
                    growths += 1
                    self._env.set_mapsize(2 * self._env.info()["map_size"])
                except lmdb.MapResizedError:  # another process grew the file
                    self._env.set_mapsize(0)
        except lmdb.BadValsizeError as e:  # Postfix's writer dies on it; we answer
            raise TableConfigError(f"error {doing} {self.ctx.spec}: {_reason(e, self.path)}") from e
        except lmdb.Error as e:
            raise TableRetry(f"error {doing} {self.ctx.spec}: {_reason(e, self.path)}") from e
        finally:
            lock.close()

    def close(self) -> None:
        if self._lock.fd < 0:
            return
        self._lock.close()
        if self._writes is None:
            _release(self._key)
        else:  # after the writes already queued
            self._writes.close(lambda: _release(self._key))
