"""One server process: the proxymap and proxywrite services of one Postfix config.

Tests and users start a real server on temporary sockets in a few lines::

    async with ProxymapServer(MainCf.load(confdir), Settings()) as server:
        ...  # server.socket_paths["proxymap"]

The listening sockets are bound here, or handed in already bound (by Postfix's
master, or by our supervisor to its workers). ``reload`` swaps in services built
from a new configuration while every connection stays open: each session asks
its slot for the current service on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.allowlist import build_allowlist
from ..config.maincf import MainCf
from ..settings import Settings
from ..tables.base import ascii_fold, utf8_fold
from .listener import listen_unix, serve_socket
from .service import Service
from .session import Session
from .tablecache import TableCache

log = logging.getLogger("pyproxymap")

SERVICE_PARAMS = {"proxymap": "proxymap_service_name", "proxywrite": "proxywrite_service_name"}


def socket_path(maincf: MainCf, settings: Settings, service: str) -> Path:
    """Where Postfix clients of this config look for ``service``."""
    explicit = settings.proxymap_socket if service == "proxymap" else settings.proxywrite_socket
    if explicit:
        return Path(explicit)
    name = maincf.get(SERVICE_PARAMS[service]) or service
    return Path(maincf.get("queue_directory") or "/var/spool/postfix") / "private" / name


@dataclass(slots=True)
class ServiceSlot:
    """What a session asks for its current service; reload replaces ``service``."""

    service: Service


def build_services(maincf: MainCf, settings: Settings) -> dict[str, Service]:
    """The services of one configuration, with fresh (empty) table caches.

    Raises on a broken configuration, so a reload can refuse it and keep the old one.
    """
    utf8 = maincf.get_bool("smtputf8_enable")
    services = {}
    for name in settings.service_names:
        log = logging.getLogger(f"pyproxymap.{name}")
        writer = name == "proxywrite"
        tables = TableCache(
            writable=writer,
            fold=utf8_fold if utf8 else ascii_fold,
            log=log,
            reopen_delay=settings.reopen_delay,
            options_for=settings.tables.options_for,
        )
        services[name] = Service(build_allowlist(maincf, writer, log), tables, log, utf8=utf8)
    return services


class ProxymapServer:
    def __init__(
        self,
        maincf: MainCf,
        settings: Settings,
        *,
        listeners: Mapping[str, socket.socket] | None = None,
    ) -> None:
        self.maincf = maincf
        self.settings = settings
        self.socket_paths: dict[str, Path] = {}
        self.sessions: set[Session] = set()
        self.slots: dict[str, ServiceSlot] = {}
        self._listeners = dict(listeners or {})
        self._servers: list[asyncio.Server] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._stopped_accepting: asyncio.Future[None] | None = None
        self.started = time.time()
        self.reloads = 0  # configurations swapped in
        self.worker_restarts = 0  # one process: none (the supervisor counts its workers')

    @property
    def services(self) -> dict[str, Service]:
        return {name: slot.service for name, slot in self.slots.items()}

    async def start(self, *, accepting: bool = True) -> None:
        """Bind (or adopt) the sockets; serve at once, or (``accepting=False``) only
        after ``accept()``: a server started as root binds, drops privileges, then
        accepts, so that no client is ever served as root."""
        owner = self.maincf.get("mail_owner")
        try:
            for name, service in build_services(self.maincf, self.settings).items():
                slot = self.slots[name] = ServiceSlot(service)
                factory = lambda slot=slot: self._session(slot)  # noqa: E731
                sock = self._listeners.get(name)
                if sock is not None:
                    server = await serve_socket(sock, factory, accepting=accepting)
                else:
                    path = socket_path(self.maincf, self.settings, name)
                    server = await listen_unix(path, factory, owner=owner, accepting=accepting)
                    self.socket_paths[name] = path
                self._servers.append(server)
                self._watch(service)
                service.log.info("listening on %s", sock.getsockname() if sock else path)
        except BaseException:
            await self.stop()
            raise

    async def accept(self) -> None:
        """Begin serving, after ``start(accepting=False)``."""
        for server in self._servers:
            await server.start_serving()

    def _watch(self, service: Service) -> None:
        interval = self.settings.reload_check_interval
        self._watchers.append(asyncio.create_task(service.tables.watch(interval)))

    def _session(self, slot: ServiceSlot) -> Session:
        session = Session(
            slot,
            limits=self.settings.limits,
            timeout=self.settings.request_timeout,
            max_pipelined=self.settings.max_pipelined,
            log=slot.service.log,
        )
        self.sessions.add(session)
        session.on_lost = self.sessions.discard
        return session

    async def reload(self, maincf: MainCf, settings: Settings) -> None:
        """Serve a new configuration: new allow-lists and table caches, the same sockets.

        A configuration that cannot be built raises and leaves the running one alone.
        Listening sockets and their paths stay as they are.
        """
        fresh = build_services(maincf, settings)
        old = [slot.service for slot in self.slots.values()]
        self.maincf, self.settings = maincf, settings
        for task in self._watchers:
            task.cancel()
        self._watchers.clear()
        for name, slot in self.slots.items():
            if name in fresh:
                fresh[name].keep_stats(slot.service)
                slot.service = fresh[name]
                self._watch(fresh[name])

        def close_old_tables() -> None:
            for service in old:
                service.tables.close()

        # Requests already in flight still hold the old tables; close them later.
        asyncio.get_running_loop().call_later(settings.shutdown_grace, close_old_tables)
        self.reloads += 1

    async def reload_from(self, reread: Callable[[], tuple[MainCf, Settings]]) -> str | None:
        """SIGHUP or ``pyproxymap reload``: read main.cf, the allow-lists and settings
        again and swap them in. None when done, else why the configuration was refused
        (logged; the previous configuration keeps serving)."""
        try:
            maincf, settings = reread()
            await self.reload(maincf, settings)
        except Exception as e:
            log.error("reload refused, still serving the previous configuration: %s", e)
            return f"reload refused, still serving the previous configuration: {e}"
        log.info("reloaded configuration from %s", maincf.config_dir)
        return None

    def flush(self, name: str) -> int:
        """Drop the open instances of table ``name`` in every service, so the next
        request reopens it (and its result cache starts empty); how many were open."""
        dropped = [t for slot in self.slots.values() for t in slot.service.tables.flush(name)]

        def close_dropped() -> None:
            for table in dropped:
                table.close()

        # As on reload: requests in flight may still use them.
        asyncio.get_running_loop().call_later(self.settings.shutdown_grace, close_dropped)
        return len(dropped)

    async def stop_accepting(self) -> None:
        """Accept no more, without losing a connection accepted a moment ago.

        asyncio's selector loop makes a connection's transport in a task started
        after accept(); when Server.close() runs before that task, the transport
        cannot attach to the closed server (an AssertionError asyncio swallows) and
        the client hangs until we exit. So: stop watching the listening socket, let
        the pending tasks run, then close. Every caller waits for that to be over
        (a second caller returning early would let the process exit before the
        connections accepted meanwhile have their sessions).
        """
        if self._stopped_accepting is None:
            self._stopped_accepting = asyncio.ensure_future(self._stop_accepting())
        await asyncio.shield(self._stopped_accepting)

    async def _stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for server in self._servers:
            for sock in server.sockets:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock.fileno())
        for _ in range(2):
            await asyncio.sleep(0)
        for server in self._servers:
            server.close()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_grace), close."""
        await self.stop_accepting()
        for task in self._watchers:
            task.cancel()
        for session in list(self.sessions):
            session.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.abort()
        for path in self.socket_paths.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for slot in self.slots.values():
            slot.service.tables.close()
        self._servers.clear()
        self._watchers.clear()

    async def __aenter__(self) -> ProxymapServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
