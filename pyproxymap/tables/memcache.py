"""memcache: a memcached server, optionally in front of a backup table (memcache_table(5)).

The ``memcache:/file.cf`` file is read as Postfix's dict_memcache reads it
(memcache, backup, key_format, key_digest, domain, ttl, flags,
data_size_limit, line_size_limit, max_try, retry_pause, timeout). The text
protocol is Postfix's: ``get``, ``set`` and ``delete``, a command tried up to
``max_try`` times ``retry_pause`` seconds apart but not when the server
accepts no connection. A lookup that misses memcache asks the backup table
and stores what it finds; an update or delete goes to memcache first and to
the backup last, whose outcome is the answer. Without a backup, a memcache
failure is RETRY; with one, the backup's answer stands, as in Postfix.

Connections come from a pool of this table's own (at most
``max_connections``, a lookup waits ``pool_wait`` seconds for one), so a hung
server delays no other table; after a refused connection, lookups fail fast
for a moment (at most half a second) instead of reconnecting each time.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import TypeVar

from ..wire.proxymap import FIXED, MULTI_WRITER, NO_UNAUTH
from .backoff import Backoff
from .base import Maybe, OpenContext, Table, TableConfigError, TableRetry, Unsupported
from .netclient import ConnectError, Link, Pool, service_endpoint
from .source import printable, utf8_enabled
from .sql.config import CfgFile
from .sql.query import DomainList, Templates
from .utf8layer import checked_value, key_rejected

_T = TypeVar("_T")
#: One command and its reply on a connection: (result, None), or (result, why it is wrong).
Exchange = Callable[["Link", "_Reader"], Awaitable[tuple[_T, str | None]]]
_VALUE = re.compile(rb"VALUE\s*\S+\s+\S+\s+([+-]?[0-9]+)")
#: Bytes a key may not contain: memcached would reject the command.
_BAD_KEY_BYTES = frozenset(range(0x21)) | {0x7F}
_PROXY = "proxy:"


class _IOError(Exception):
    """The exchange failed (dropped connection, timeout, overlong line); try again."""


class _Reader:
    """Reply lines and data blocks from one connection, as memcache_proto(3) reads them."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._buf = bytearray()

    async def _more(self) -> None:
        data = await self._link.recv()
        if not data:
            raise _IOError(self._link.lost_cause or "EOF")
        self._buf += data

    async def line(self, bound: int) -> bytes:
        """One line without CRLF or LF; at most ``bound`` bytes are read for it."""
        while True:
            end = self._buf.find(b"\n", 0, bound)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) >= bound:
                if self._buf[bound - 1] != 0x0D:  # "\r": Postfix repairs a split CRLF
                    raise _IOError("input too long")
                if len(self._buf) > bound:
                    if self._buf[bound] != 0x0A:
                        raise _IOError("input too long")
                    line = bytes(self._buf[: bound - 1])
                    del self._buf[: bound + 1]
                    return line
            await self._more()

    async def data(self, size: int) -> bytes:
        """``size`` bytes followed by CRLF."""
        while len(self._buf) < size + 2:
            await self._more()
        if self._buf[size : size + 2] != b"\r\n":
            raise _IOError("missing CRLF after data")
        data = bytes(self._buf[:size])
        del self._buf[: size + 2]
        return data

    @property
    def pending(self) -> bool:
        return bool(self._buf)


class MemcacheTable(Table):
    """Lookup, update, delete; sequence through the backup table."""

    impl_flags = FIXED | MULTI_WRITER

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self._utf8 = utf8_enabled(ctx)
        self._spec = printable(ctx.spec, self._utf8)
        self._cfg = cfg = CfgFile(ctx.name, ctx.log)
        digest = cfg.get_str("key_digest", "")
        self._digest: str | None = None
        if digest:
            try:
                hashlib.new(digest)
            except ValueError as e:
                raise TableConfigError(
                    f"open {ctx.name}: key digest {digest} is not available"
                ) from e
            self._digest = digest
        key_format = cfg.get_str("key_format", "%s")
        self._plain_key = key_format == "%s"  # Postfix skips the expansion then
        self._timeout = cfg.get_int("timeout", 2)
        self._ttl = cfg.get_int("ttl", 3600)
        self._mc_flags = cfg.get_int("flags", 0)
        self._retry_pause = cfg.get_int("retry_pause", 1, 1)
        self._max_try = cfg.get_int("max_try", 2, 1)
        self._max_line = cfg.get_int("line_size_limit", 1024, 1)
        self._max_data = cfg.get_int("data_size_limit", 10240, 1)
        server = cfg.get_str("memcache", "inet:localhost:11211")
        try:
            endpoint = service_endpoint(server, self._utf8)
        except ValueError as e:
            raise TableConfigError(f"{self._spec}: memcache = {server}: {e}") from e
        self._templates = Templates(key_format, "%s", 0, ctx.spec, cfg.path, ctx.log)
        domains = cfg.get_str("domain")
        backup = cfg.get_optional("backup")
        self._domains: DomainList | None = None
        self._backup: Table | None = None
        self.pool = Pool(endpoint, size=ctx.options.max_connections)
        self._backoff = Backoff()
        self._stores: set[asyncio.Task[str | None]] = set()
        try:
            if domains:
                self._domains = DomainList(domains, ctx, cfg.path)
            if backup:
                self._backup = self._open_backup(backup)
        except BaseException:
            self.close()
            raise

    def _open_backup(self, name: str) -> Table:
        """The backup table, opened directly: we are the proxymap server a
        ``proxy:`` backup would go through."""
        while name.startswith(_PROXY):
            name = name[len(_PROXY) :]
        if self.ctx.open_nested is None:
            raise TableConfigError(f"{self._spec}: cannot open backup {name} here")
        return self.ctx.open_nested(name, self.ctx.instance_flags)

    # -- the operations ------------------------------------------------------------

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        self._paranoid(flags)
        if key_rejected(self.ctx, key):
            return None
        return self._bounded(self._lookup(key, flags))

    async def _lookup(self, key: bytes, flags: int) -> bytes | None:
        mkey = await self._memcache_key(key, "lookup", warn=False)
        if mkey is None:
            return None
        value, error = await self._get(mkey)
        if self._backup is None:
            if error:
                raise TableRetry(f"table {self._spec}: lookup error: {error}")
        elif value is None:
            value = await _answer(self._backup.lookup(self._backup.folded(key, flags), flags))
            if value is not None:
                self._store_later(mkey, value)
        return checked_value(self.ctx, key, value)

    def update(self, key: bytes, value: bytes, flags: int) -> Maybe[None]:
        self._paranoid(flags)
        if not self.ctx.writable:
            raise Unsupported(f"table {self.ctx.spec}: update operation is not supported")
        return self._bounded(self._update(key, value, flags))

    async def _update(self, key: bytes, value: bytes, flags: int) -> None:
        """Postfix answers "not found" for an update it skips; the service has no
        such answer for updates, so a skipped update is OK here."""
        mkey = await self._memcache_key(key, "update", warn=True)
        if mkey is None:
            return
        error = await self._set(mkey, value.split(b"\0", 1)[0])
        if self._backup is not None:
            await _answer(self._backup.update(self._backup.folded(key, flags), value, flags))
        elif error:
            raise TableRetry(f"table {self._spec}: update error: {error}")

    def delete(self, key: bytes, flags: int) -> Maybe[bool]:
        self._paranoid(flags)
        if not self.ctx.writable:
            raise Unsupported(f"table {self.ctx.spec}: delete operation is not supported")
        return self._bounded(self._delete(key, flags))

    async def _delete(self, key: bytes, flags: int) -> bool:
        mkey = await self._memcache_key(key, "delete", warn=False)
        if mkey is None:
            return False
        deleted, error = await self._del(mkey)
        if self._backup is not None:
            return await _answer(self._backup.delete(self._backup.folded(key, flags), flags))
        if error:
            raise TableRetry(f"table {self._spec}: delete error: {error}")
        return deleted

    def sequence(self, function: int, flags: int) -> Maybe[tuple[bytes, bytes] | None]:
        if self._backup is None:
            self.ctx.log.warning(
                "database %s: first/next support requires backup database", self._spec
            )
            return None
        return self._backup.sequence(function, flags)

    def changed(self) -> bool:
        return self._cfg.changed() or (self._backup is not None and self._backup.changed())

    def stats(self) -> dict[str, int]:
        return self.pool.stats()

    def _paranoid(self, flags: int) -> None:
        if flags & NO_UNAUTH:
            raise TableConfigError(f"{self._spec} map is not allowed for security-sensitive data")

    def _bounded(self, work: Awaitable[_T]) -> Awaitable[_T]:
        """The operation, RETRY when it takes longer than this table's timeout option."""

        async def run() -> _T:
            try:
                async with asyncio.timeout(self.ctx.options.timeout):
                    return await work
            except TimeoutError as e:
                raise TableRetry(
                    f"table {self._spec}: memcache {self.pool.endpoint}: "
                    f"{os.strerror(errno.ETIMEDOUT)}"
                ) from e

        return run()

    # -- keys ----------------------------------------------------------------------

    async def _memcache_key(self, name: bytes, operation: str, warn: bool) -> bytes | None:
        """The key to send, or None when this name is skipped (Postfix's valid_key)."""
        why = None
        mkey = b""
        if not name:
            why = "empty lookup key"
        elif self._domains is not None and not await self._domains.allows(name):
            why = "domain mismatch"
        else:
            mkey = name if self._plain_key else self._templates.query(name) or b""
            if self._digest and mkey:
                mkey = hashlib.new(self._digest, mkey).hexdigest().encode()
            if not mkey:
                why = "empty lookup key expansion"
            elif not _BAD_KEY_BYTES.isdisjoint(mkey):
                why = "name contains space or controls"
        if why is None:
            return mkey
        if warn:
            self.ctx.log.warning(
                '%s: skipping %s for name "%s": %s',
                self.ctx.name,
                operation,
                printable(name, self._utf8),
                why,
            )
        return None

    # -- the protocol ----------------------------------------------------------------

    async def _get(self, mkey: bytes) -> tuple[bytes | None, str | None]:
        """(value, None), (None, None) when not found, or (None, why it failed)."""

        async def get(link: Link, reader: _Reader) -> tuple[bytes | None, str | None]:
            link.send(b"get " + mkey + b"\r\n")
            line = await reader.line(self._max_line)
            if line == b"END":
                return None, None
            match = _VALUE.match(line)
            size = int(match.group(1)) if match else -1
            if not 0 <= size <= self._max_data:
                return None, f"unexpected memcache server reply: {printable(line[:30])}"
            try:
                data = await reader.data(size)
            except _IOError:
                return None, "EOF receiving memcache server reply"
            try:
                clean = await reader.line(self._max_line) == b"END" and not reader.pending
            except _IOError:
                clean = False
            if not clean:
                link.close()
            return data.split(b"\0", 1)[0], None

        return await self._command(get, (None, None))

    async def _set(self, mkey: bytes, value: bytes) -> str | None:
        """Store; None when stored (or too long to store: Postfix drops it), else why not."""
        if len(value) > self._max_data:
            self.ctx.log.warning(
                "database %s: data for key %s is too long (data_size_limit=%d) -- not stored",
                self._spec,
                printable(mkey, self._utf8),
                self._max_data,
            )
            return None
        command = b"set %s %d %d %d\r\n%s\r\n" % (
            mkey,
            self._mc_flags,
            self._ttl,
            len(value),
            value,
        )

        async def store(link: Link, reader: _Reader) -> tuple[bool, str | None]:
            link.send(command)
            line = await reader.line(self._max_line)
            if line == b"STORED":
                return True, None
            return False, f"update failed: {printable(line[:100])}"

        _, error = await self._command(store, (False, None))
        return error

    async def _del(self, mkey: bytes) -> tuple[bool, str | None]:
        async def delete(link: Link, reader: _Reader) -> tuple[bool, str | None]:
            link.send(b"delete " + mkey + b"\r\n")
            line = await reader.line(self._max_line)
            if line == b"DELETED":
                return True, None
            if line == b"NOT_FOUND":
                return False, None
            return False, f"delete failed: {printable(line[:30])}"

        return await self._command(delete, (False, None))

    async def _command(
        self, exchange: Exchange[_T], nothing: tuple[_T, None]
    ) -> tuple[_T, str | None]:
        """Run ``exchange`` up to max_try times; its result, or (``nothing``[0], why it failed).

        ``exchange(link, reader)`` returns (result, None) on success or
        (result, reason) for a reply that is wrong; an I/O error or timeout is
        a failed try too. Refused connections are not tried again.
        """
        endpoint = self.pool.endpoint
        cause = "no attempt"
        for count in range(self._max_try):
            if count:
                await asyncio.sleep(self._retry_pause)
            blocked = self._backoff.blocked()
            if blocked is not None:
                return nothing[0], f"memcache {endpoint}: {blocked}"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.ctx.options.pool_wait + self._timeout
            try:
                async with self.pool.connection(deadline, self.ctx.log) as link:
                    self._backoff.succeeded()
                    reader = _Reader(link)
                    try:
                        async with asyncio.timeout(self._timeout):
                            result, why = await exchange(link, reader)
                    except TimeoutError as e:
                        raise _IOError(os.strerror(errno.ETIMEDOUT)) from e
                    if why is None:
                        return result, None
                    link.close()
                    cause = why
            except ConnectError as e:
                self._backoff.failed(str(e))
                self.ctx.log.warning("%s: connect to memcache %s: %s", self._spec, endpoint, e)
                return nothing[0], f"memcache {endpoint}: {e}"
            except _IOError as e:
                cause = f"I/O error: {e}"
            if count:
                self.ctx.log.warning("database %s: memcache %s: %s", self._spec, endpoint, cause)
        return nothing[0], f"memcache {endpoint}: {cause}"

    def _store_later(self, mkey: bytes, value: bytes) -> None:
        """Copy a backup answer into memcache without making the client wait for it."""
        task = asyncio.get_running_loop().create_task(self._set(mkey, value))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    def close(self) -> None:
        for task in list(self._stores):
            task.cancel()
        self.pool.close()
        if self._backup is not None:
            self._backup.close()
        if self._domains is not None:
            self._domains.close()


async def _answer(result: Maybe[_T]) -> _T:
    """A component table's answer, awaited when it comes later."""
    return await result if isawaitable(result) else result  # type: ignore[misc]
