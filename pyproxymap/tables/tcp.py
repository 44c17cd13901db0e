"""tcp: ask a tcp_table(5) server (``tcp:host:port``), as Postfix's dict_tcp does.

The request is ``get <%XX-quoted key>``; a ``2xx`` reply is a hit with the
unquoted value, ``5xx`` a miss, ``4xx`` RETRY. A connect failure, a dropped
connection or a reply line longer than 4096 bytes is tried again, up to 10
times one second apart, then RETRY; a malformed reply or another status code is
RETRY at once. Lookups run on the event loop over the connection pool of
:mod:`.netclient`.
"""

from __future__ import annotations

import asyncio
import errno
import os

from ..wire.proxymap import PATTERN
from ..wire.tcptable import LineReader, Reply, ReplyError, encode_request, parse_reply
from .base import Maybe, OpenContext, Table, TableConfigError, TableRetry
from .netclient import ConnectError, inet_endpoint, share, unshare
from .source import printable, refuse_writes, utf8_enabled
from .utf8layer import checked_value, key_rejected

#: Postfix's DICT_TCP_MAXTRY: attempts to get a reply line before RETRY.
MAX_TRIES = 10
#: Seconds between attempts (Postfix sleeps 1 s, "instead of hammering the server").
RETRY_DELAY = 1.0
#: Seconds to connect, send and read one reply line. Postfix allows 100 s;
#: see socketmap.TIMEOUT for why ours is shorter.
TIMEOUT = 10.0

_PROTOCOL = "tcp"


class TcpTable(Table):
    """Lookup only; the key is folded by the service (Postfix sets PATTERN: FOLD_MUL folds)."""

    impl_flags = PATTERN

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self._utf8 = utf8_enabled(ctx)
        self._spec = printable(ctx.spec, self._utf8)
        refuse_writes(ctx)
        try:
            endpoint = inet_endpoint(ctx.name, self._utf8)
        except ValueError as e:
            raise TableConfigError(str(e)) from e
        self.pool = share(_PROTOCOL, endpoint)

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        if key_rejected(self.ctx, key):
            return None
        return self._lookup(key)

    async def _lookup(self, key: bytes) -> bytes | None:
        request = encode_request(key)
        endpoint = self.pool.endpoint
        for tries in range(1, MAX_TRIES + 1):
            try:
                reply = await self._exchange(request)
                break
            except ConnectError as e:
                cause = f"connect to TCP map {endpoint}: {e}"
            except ReplyError as e:
                cause = f"read TCP map reply from {endpoint}: {e}"
            if tries == MAX_TRIES:
                raise TableRetry(f"table {self._spec} lookup error: {cause}")
            self.ctx.log.warning("%s", cause)
            await asyncio.sleep(RETRY_DELAY)
        status = reply.code // 100
        if status == 2:
            return checked_value(self.ctx, key, reply.text.split(b"\0", 1)[0])
        return None  # 5xx: _exchange raised for every other status

    async def _exchange(self, request: bytes) -> Reply:
        """Send one request, read and check one reply line.

        Raises ReplyError when the line cannot be read (Postfix tries again),
        TableRetry when it is malformed or not 2xx/5xx (Postfix gives up at once).
        The connection is kept only after a clean 2xx or 5xx, as in Postfix.
        """
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        async with self.pool.connection(deadline, self.ctx.log) as link:
            reader = LineReader()
            link.send(request)
            try:
                async with asyncio.timeout_at(deadline):
                    line = None
                    while line is None:
                        data = await link.recv()
                        if not data:
                            reader.feed_eof(link.lost_cause or "connection closed")
                        line = reader.feed(data)
            except TimeoutError:
                reader.feed_eof(os.strerror(errno.ETIMEDOUT))
            try:
                reply = parse_reply(line)
            except ReplyError as e:
                raise self._failed(e, line) from e
            if reply.code // 100 not in (2, 5):
                raise self._failed(
                    "soft error" if reply.code // 100 == 4 else "bad status code", line
                )
            if reader.rest:
                link.close()  # the server sent more than asked: do not reuse
            return reply

    def _failed(self, what: object, line: bytes) -> TableRetry:
        """Postfix's warning for a reply it rejects (RETRY); unsafe bytes show as '_'."""
        return TableRetry(
            f"read TCP map reply from {self.pool.endpoint}: {what}: {self._quoted(line)}"
        )

    def _quoted(self, line: bytes) -> str:
        """printable(line, '_') cut at 100 bytes, as dict_tcp logs a reply."""
        text = line.split(b"\0", 1)[0][:100]
        return "?".join(printable(part, self._utf8).replace("?", "_") for part in text.split(b"?"))

    def close(self) -> None:
        unshare(_PROTOCOL, self.pool)

    def stats(self) -> dict[str, int]:
        return self.pool.stats()
