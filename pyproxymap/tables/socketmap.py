"""socketmap: ask a Sendmail-style socketmap server (``socketmap:inet:host:port:name``).

As Postfix's dict_sockmap: the request is the netstring ``name key``; the reply
``OK value`` is a hit, ``NOTFOUND`` a miss, ``TEMP``, ``TIMEOUT`` or anything
else is RETRY and ``PERM`` is CONFIG, each with Postfix's warning. Keys longer
than ``MAX_QUERY`` bytes are misses without asking, replies longer than
``MAX_REPLY`` bytes are errors, and a connection the server dropped is retried
once on a new one, so a server restart goes unnoticed. Lookups run on the
event loop over the connection pool of :mod:`.netclient`.
"""

from __future__ import annotations

import asyncio

from ..wire.proxymap import PATTERN
from ..wire.socketmap import Decoder, Fault, NetstringError, encode
from .base import Maybe, OpenContext, Table, TableConfigError, TableRetry
from .netclient import ConnectError, service_endpoint, share, unshare
from .source import WHITESPACE, as_bytes, printable, refuse_writes, utf8_enabled
from .utf8layer import checked_value, key_rejected

#: Postfix's socketmap_max_query_size: longer keys are "not found".
MAX_QUERY = 10000
#: Postfix's socketmap_max_reply_size.
MAX_REPLY = 100000
#: Seconds to connect, send and receive one reply. Postfix allows 100 s, but
#: here one stuck server would hold a shared connection that long; a lookup
#: that takes more than a few seconds is better answered RETRY.
TIMEOUT = 10.0

_PROTOCOL = "socketmap"
_WHITESPACE = WHITESPACE.encode()
#: Reply status -> (Postfix's error class, what the lookup raises).
_FAILURES: dict[bytes, tuple[str, type[TableConfigError | TableRetry]]] = {
    b"TEMP": ("temporary", TableRetry),
    b"TIMEOUT": ("timeout", TableRetry),
    b"PERM": ("permanent", TableConfigError),
}


class SocketmapTable(Table):
    """Lookup only; the key is folded by the service (Postfix sets PATTERN: FOLD_MUL folds)."""

    impl_flags = PATTERN

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self._utf8 = utf8_enabled(ctx)
        self._spec = printable(ctx.spec, self._utf8)
        refuse_writes(ctx)
        service, colon, mapname = ctx.name.rpartition(":")
        if not colon:
            raise TableConfigError("socketmap requires server:socketmap argument")
        try:
            endpoint = service_endpoint(service, self._utf8)
        except ValueError as e:
            raise TableConfigError(str(e)) from e
        self._mapname = as_bytes(mapname)
        self.pool = share(_PROTOCOL, endpoint)

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        if key_rejected(self.ctx, key):
            return None
        if len(key) > MAX_QUERY:
            self.ctx.log.warning(
                "table %s query too large: '%s', returning 'not found'",
                self._spec,
                printable(key[:100], self._utf8),
            )
            return None
        return self._lookup(key)

    async def _lookup(self, key: bytes) -> bytes | None:
        request = encode(self._mapname + b" " + key)
        try:
            try:
                reply = await self._exchange(request)
            except NetstringError as e:
                if e.fault is not Fault.EOF:
                    raise
                self.pool.discard_idle()  # they may be just as stale: use a new connection
                reply = await self._exchange(request)
        except ConnectError as e:
            self.ctx.log.warning("connect to %s: %s", self.pool.endpoint, e)
            raise TableRetry(f"table {self._spec} lookup error: {e}") from e
        except NetstringError as e:
            raise TableRetry(f"table {self._spec} lookup error: {e}") from e
        return self._answer(key, reply)

    async def _exchange(self, request: bytes) -> bytes:
        """Send one request and read one reply; the connection is closed on any error."""
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        try:
            async with self.pool.connection(deadline, self.ctx.log) as link:
                decoder = Decoder(MAX_REPLY)
                link.send(request)
                async with asyncio.timeout_at(deadline):
                    while True:
                        data = await link.recv()
                        if not data:
                            decoder.feed_eof()
                        if replies := decoder.feed(data):
                            break
                if len(replies) > 1 or decoder.pending:  # unasked data: do not reuse
                    link.close()
                return replies[0]
        except TimeoutError as e:
            raise NetstringError(Fault.TIME) from e

    def _answer(self, key: bytes, reply: bytes) -> bytes | None:
        """Interpret a reply as Postfix does: a C string, split at its first space."""
        status, _, payload = reply.split(b"\0", 1)[0].partition(b" ")
        if status == b"OK":
            return checked_value(self.ctx, key, payload)
        if status == b"NOTFOUND":
            return None
        error_class, error = _FAILURES.get(status, ("unknown", TableRetry))
        reason = payload.lstrip(_WHITESPACE)
        detail = f": {printable(reason[:200], self._utf8)}" if reason else ""
        raise error(f"{self._spec} socketmap server {error_class} error{detail}")

    def close(self) -> None:
        unshare(_PROTOCOL, self.pool)

    def stats(self) -> dict[str, int]:
        return self.pool.stats()
