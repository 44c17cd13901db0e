"""Connections to lookup servers (socketmap, tcp): bounded, reused, never blocking.

Postfix keeps one connection per endpoint in each process (auto_clnt: opened
on first use, closed after 10 s idle, after 100 s in any case, or as soon as
the server closes it or speaks unasked). One pyproxymap answers for every
Postfix process at once, so an endpoint gets a small shared pool instead: at
most ``MAX_CONNECTIONS`` open connections, with the same idle and age limits;
lookups beyond that wait for a connection, in order, so any number of Postfix
clients never opens more than that many connections to one server. Everything
is asyncio: a slow server delays only the lookups that wait for it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import cast

#: Most connections open to one endpoint at a time.
MAX_CONNECTIONS = 4
#: Seconds an unused connection stays open (Postfix's max_idle).
MAX_IDLE = 10.0
#: Seconds a connection lives at most, busy or not (Postfix's max_ttl).
MAX_TTL = 100.0

_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")
_UNIX_PATH_MAX = 108  # sizeof(sun_path) on Linux


class ConnectError(Exception):
    """No connection could be made; ``str()`` is the cause as Postfix's %m words it."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a server listens: ``host`` and ``port``, or a UNIX-domain ``path``."""

    address: str  # as written in the table name: "host:port" or the path
    host: str = ""
    port: str = ""
    path: str = ""

    def __str__(self) -> str:
        return self.address


def _valid_host(host: str, utf8: bool) -> bool:
    """Postfix's valid_hostname() or valid_hostaddr() (UTF-8 names when SMTPUTF8 is on)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host.isascii():
        if not utf8:
            return False
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    labels = host.split(".")
    return (
        len(host) <= 255
        and not all(label.isdigit() for label in labels)
        and all(len(label) <= 63 and _HOST_LABEL.fullmatch(label) for label in labels)
    )


def inet_endpoint(address: str, utf8: bool = True) -> Endpoint:
    """Parse ``host:port``, ``[host]:port`` or ``:port`` as Postfix's host_port() does.

    Raises ValueError with Postfix's message; Postfix makes this fatal on first use.
    """
    if address.startswith("["):
        rest = address[1:]
        ipv6 = rest[:5].lower() == "ipv6:"
        if ipv6:
            rest = rest[5:]
        host, bracket, after = rest.partition("]")
        if not bracket:
            raise ValueError(f'{address}: missing "]"')
        if after and not after.startswith(":"):
            raise ValueError(f'{address}: garbage after "]"')
        port = after[1:]
        if ipv6 and not _is_ipv6(host):
            raise ValueError(f"{address}: malformed IPv6 address")
        given_host = True
    elif ":" in address:
        host, _, port = address.rpartition(":")
        given_host = bool(host)
        host = host or "localhost"
    else:  # a bare port number or name, on localhost
        host, port, given_host = "localhost", address, False
    if not port:
        raise ValueError(f"{address}: missing service information")
    if given_host and not _valid_host(host, utf8):
        raise ValueError(f"{address}: valid hostname or network address required")
    if port[0].isdigit() and not (port.isdigit() and port.isascii()):
        raise ValueError(f"{address}: garbage after numerical service")
    return Endpoint(address, host=host, port=port)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def service_endpoint(service: str, utf8: bool = True) -> Endpoint:
    """Parse ``inet:host:port``, ``unix:/path`` or ``local:/path`` as Postfix's auto_clnt does."""
    transport, colon, address = service.partition(":")
    if not colon or not transport or not address:
        raise ValueError(f'need service transport:endpoint instead of "{service}"')
    if transport == "inet":
        return inet_endpoint(address, utf8)
    if transport in ("unix", "local"):
        if len(os.fsencode(address)) >= _UNIX_PATH_MAX:
            raise ValueError(f"unix-domain name too long: {address}")
        return Endpoint(address, path=address)
    raise ValueError(f"invalid transport name: {transport} in service: {service}")


class Link(asyncio.Protocol):
    """One connection. Reads hand over whatever arrived; ``b""`` means the stream ended.

    While it sits idle in a pool, any data or end of stream from the server
    closes it, as Postfix's auto_clnt does: such a connection cannot be trusted
    with the next request.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._data = bytearray()
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.idle = False
        self.born = asyncio.get_running_loop().time()
        #: Why the stream ended, when it was an error (``recv()`` gave ``b""``).
        self.lost_cause: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.idle:  # the pool's idle timer takes it out of the pool
            self._ended = True
            if self._transport is not None:
                self._transport.abort()
            return
        self._data += data
        self._wake()

    def eof_received(self) -> None:
        self._ended = True
        self._wake()
        # Returning None closes the transport: a half-closed socket is of no use.

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError) and self.lost_cause is None:
            self.lost_cause = os.strerror(exc.errno) if exc.errno else str(exc)
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def recv(self) -> bytes:
        """The bytes received since the last call; waits for some; ``b""`` at the end."""
        while not self._data and not self._ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._data)
        self._data.clear()
        return data

    def usable(self, now: float, max_ttl: float) -> bool:
        return (
            self._transport is not None
            and not self._transport.is_closing()
            and not self._ended
            and not self._data
            and now - self.born < max_ttl
        )

    def close(self) -> None:
        """Close now; a connection in an unknown state is never reused."""
        self.cancel_idle_timer()
        self._ended = True
        if self._transport is not None:
            self._transport.abort()

    def set_idle_timer(self, timer: asyncio.TimerHandle) -> None:
        self.idle = True
        self._idle_timer = timer

    def cancel_idle_timer(self) -> None:
        self.idle = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


async def _connect(endpoint: Endpoint, log: logging.Logger) -> Link:
    """Connect as Postfix's inet_connect/unix_connect do, trying each address in turn.

    Raises ConnectError with the cause Postfix logs (the last address's error).
    """
    loop = asyncio.get_running_loop()
    try:
        if endpoint.path:
            return (await loop.create_unix_connection(Link, endpoint.path))[1]
        try:
            addresses = await loop.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM
            )
        except socket.gaierror as e:
            log.warning("host or service %s not found: %s", endpoint, e.strerror)
            raise ConnectError(os.strerror(errno.EADDRNOTAVAIL)) from e
        error = OSError(errno.EADDRNOTAVAIL, "no address")
        for family, _, proto, _, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, sockaddr)
                return (await loop.create_connection(Link, sock=sock))[1]
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        raise error
    except OSError as e:
        raise ConnectError(os.strerror(e.errno) if e.errno else str(e)) from e


class Pool:
    """Up to ``size`` reusable connections to one endpoint, shared by every table using it.

    ``_live`` counts connections open, opening, or promised to a waiter, so it
    never exceeds ``size``. A freed connection or slot goes to the longest
    waiter first.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        size: int = MAX_CONNECTIONS,
        max_idle: float = MAX_IDLE,
        max_ttl: float = MAX_TTL,
    ) -> None:
        self.endpoint = endpoint
        self.size = size
        self.max_idle = max_idle
        self.max_ttl = max_ttl
        self._idle: list[Link] = []
        self._waiters: deque[asyncio.Future[Link | None]] = deque()
        self._live = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._live

    def stats(self) -> dict[str, int]:
        """Connections in use (or being opened), idle in the pool, and lookups waiting."""
        waiting = sum(not w.done() for w in self._waiters)
        return {
            "pool_in_use": self._live - len(self._idle),
            "pool_idle": len(self._idle),
            "pool_waiting": waiting,
        }

    @asynccontextmanager
    async def connection(self, deadline: float, log: logging.Logger) -> AsyncIterator[Link]:
        """A connection to use for one exchange; it goes back to the pool afterwards.

        Waiting for a free connection and connecting must end by ``deadline``
        (loop time); when they fail or take longer, ConnectError. Close the
        link before leaving when its stream is not clean.
        """
        link = await self._acquire(deadline, log)
        try:
            yield link
        except BaseException:
            link.close()
            raise
        finally:
            self._release(link)

    async def _acquire(self, deadline: float, log: logging.Logger) -> Link:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests): old connections are gone
            self._loop, self._idle, self._waiters, self._live = loop, [], deque(), 0
        while self._idle:
            link = self._idle.pop()
            link.cancel_idle_timer()
            if link.usable(loop.time(), self.max_ttl):
                return link
            link.close()
            self._live -= 1
        if self._live < self.size:
            self._live += 1
            return await self._open(deadline, log)
        waiter: asyncio.Future[Link | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                link_or_slot = await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():  # handed over just too late
                given = waiter.result()
                if given is None:
                    self._free_slot()
                else:
                    self._release(given)
            else:
                with suppress(ValueError):  # not when _next_waiter dropped it already
                    self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise ConnectError(os.strerror(errno.ETIMEDOUT)) from e
            raise
        if link_or_slot is not None:
            if link_or_slot.usable(loop.time(), self.max_ttl):
                return link_or_slot
            link_or_slot.close()
        return await self._open(deadline, log)

    async def _open(self, deadline: float, log: logging.Logger) -> Link:
        """Connect in a slot already counted in ``_live``; the slot is freed on failure."""
        try:
            async with asyncio.timeout_at(deadline):
                return await _connect(self.endpoint, log)
        except TimeoutError as e:
            self._free_slot()
            raise ConnectError(os.strerror(errno.ETIMEDOUT)) from e
        except BaseException:
            self._free_slot()
            raise

    def _next_waiter(self) -> asyncio.Future[Link | None] | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def _free_slot(self) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)  # the slot passes to the waiter, still counted
        else:
            self._live -= 1

    def _release(self, link: Link) -> None:
        assert self._loop is not None
        if self._closed or not link.usable(self._loop.time(), self.max_ttl):
            link.close()
            self._free_slot()
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(link)
            return
        self._idle.append(link)
        wait = min(self.max_idle, self.max_ttl - (self._loop.time() - link.born))
        link.set_idle_timer(self._loop.call_later(wait, self._expire, link))

    def _expire(self, link: Link) -> None:
        """An idle connection reached its idle or age limit."""
        if link in self._idle:
            self._idle.remove(link)
            link.close()
            self._free_slot()

    def discard_idle(self) -> None:
        """Close the idle connections (after one turned out stale)."""
        for link in self._idle:
            link.close()
        self._live -= len(self._idle)
        self._idle.clear()

    def close(self) -> None:
        """Close the idle connections now and busy ones when their lookup ends."""
        self._closed = True
        self.discard_idle()


_lock = threading.Lock()  # tables are opened in worker threads
_shared: dict[tuple[str, Endpoint], tuple[Pool, int]] = {}


def share(protocol: str, endpoint: Endpoint) -> Pool:
    """The pool for ``endpoint`` spoken to in ``protocol``; release it with :func:`unshare`.

    Like Postfix's reference-counted socketmap handles, every table open on the
    same endpoint uses the same connections.
    """
    with _lock:
        pool, users = _shared.get((protocol, endpoint), (None, 0))
        if pool is None:
            pool = Pool(endpoint)
        _shared[protocol, endpoint] = (pool, users + 1)
        return pool


def unshare(protocol: str, pool: Pool) -> None:
    """One table stopped using ``pool``; the last one closes its idle connections."""
    with _lock:
        key = (protocol, pool.endpoint)
        _, users = _shared[key]
        if users > 1:
            _shared[key] = (pool, users - 1)
            return
        del _shared[key]
    pool.close()
