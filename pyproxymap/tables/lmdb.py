"""lmdb: ``NAME.lmdb`` files, as Postfix's dict_lmdb (over slmdb) reads them.

Postfix opens LMDB files without LMDB's own lock file (MDB_NOLOCK) and
coordinates with fcntl() record locks instead: writers lock exclusively,
readers share the lock around each read. We do the same, with read-only
memory-mapped access through the ``lmdb`` binding. Every read is its own read
transaction, so it sees the last committed transaction and nothing
uncommitted. LMDB never truncates its file (postmap's rebuild empties the
database inside a transaction), so an open map stays valid while writers work;
when a writer grew the file past our map, the map is grown before reading.

py-lmdb refuses to open one file twice in a process, and LMDB itself forbids
it; so instances of the same file (other instance flags, the other service, a
reopen after a change) share one environment, closed with its last user.
"""

from __future__ import annotations

import os
import threading

from ..wire.proxymap import FIXED, MULTI_WRITER, SEQ_FIRST
from .base import OpenContext, TableConfigError, TableRetry
from .indexed import FileLock, LockedTable, c_string
from .source import file_identity

try:
    import lmdb
except ImportError:  # optional dependency: pip install 'pyproxymap[lmdb]'
    lmdb = None

FileKey = tuple[int, int]

_envs: dict[FileKey, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()


def _acquire(path: str, key: FileKey) -> lmdb.Environment:
    """The environment of the file ``key`` (device, inode), opened on first use."""
    with _envs_lock:
        env, users = _envs.get(key) or (None, 0)
        if env is None:
            env = lmdb.open(path, subdir=False, readonly=True, lock=False, create=False)
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
            self._lock = FileLock(self.path, "fcntl")
        except OSError as e:
            raise TableRetry(f"open database {self.shown}: {e.strerror}") from e
        st = os.fstat(self._lock.fd)
        self._key = (st.st_dev, st.st_ino)
        try:
            self._env = _acquire(self.path, self._key)
        except lmdb.Error as e:
            self._lock.close()
            raise TableRetry(f"open database {self.shown}: {_reason(e, self.path)}") from e
        self._identity = file_identity(st)
        self._page_size = self._env.stat()["psize"]
        try:
            self._ready()
        except TableRetry:
            self.close()
            raise
        self._saved: bytes | None = None  # the sequence position: the last key returned

    def _ready(self) -> bool:
        """Refuse a file shorter than its last transaction: reading it would crash the server.

        Memory-mapped pages past the end of a file raise SIGBUS. LMDB never
        shrinks its file, but a file truncated or copied over in place would.
        """
        size = os.fstat(self._lock.fd).st_size
        if size < 2 * self._page_size or (
            size < (self._env.info()["last_pgno"] + 1) * self._page_size
        ):
            raise TableRetry(
                f"{self.shown}: the file is shorter than its data: truncated or overwritten"
            )
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

    def close(self) -> None:
        if self._lock.fd >= 0:
            self._lock.close()
            _release(self._key)
