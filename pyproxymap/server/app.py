"""One server process: the proxymap and proxywrite services of one Postfix config.

Tests and users start a real server on temporary sockets in a few lines::

    async with ProxymapServer(MainCf.load(confdir), Settings()) as server:
        ...  # server.socket_paths["proxymap"]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from ..config.allowlist import build_allowlist
from ..config.maincf import MainCf
from ..settings import Settings
from ..tables.base import ascii_fold, utf8_fold
from .listener import listen_unix
from .service import Service
from .session import Session
from .tablecache import TableCache

SERVICE_PARAMS = {"proxymap": "proxymap_service_name", "proxywrite": "proxywrite_service_name"}


def socket_path(maincf: MainCf, settings: Settings, service: str) -> Path:
    """Where Postfix clients of this config look for ``service``."""
    explicit = settings.proxymap_socket if service == "proxymap" else settings.proxywrite_socket
    if explicit:
        return Path(explicit)
    name = maincf.get(SERVICE_PARAMS[service]) or service
    return Path(maincf.get("queue_directory") or "/var/spool/postfix") / "private" / name


class ProxymapServer:
    def __init__(self, maincf: MainCf, settings: Settings) -> None:
        self.maincf = maincf
        self.settings = settings
        self.socket_paths: dict[str, Path] = {}
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.Server] = []
        self._caches: list[TableCache] = []
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        utf8 = self.maincf.get_bool("smtputf8_enable")
        fold = utf8_fold if utf8 else ascii_fold
        owner = self.maincf.get("mail_owner")
        try:
            for service_name in self.settings.service_names:
                log = logging.getLogger(f"pyproxymap.{service_name}")
                writer = service_name == "proxywrite"
                tables = TableCache(
                    writable=writer,
                    fold=fold,
                    log=log,
                    reopen_delay=self.settings.reopen_delay,
                    options_for=self.settings.tables.options_for,
                )
                allowlist = build_allowlist(self.maincf, writer, log)
                service = Service(allowlist, tables, log, utf8=utf8)
                path = socket_path(self.maincf, self.settings, service_name)
                server = await listen_unix(
                    path, lambda s=service, lg=log: self._session(s, lg), owner=owner
                )
                self._servers.append(server)
                self._caches.append(tables)
                self.socket_paths[service_name] = path
                self._watchers.append(
                    asyncio.create_task(tables.watch(self.settings.reload_check_interval))
                )
                log.info("listening on %s", path)
        except BaseException:
            await self.stop()
            raise

    def _session(self, service: Service, log: logging.Logger) -> Session:
        session = Session(
            service,
            limits=self.settings.limits,
            timeout=self.settings.request_timeout,
            max_pipelined=self.settings.max_pipelined,
            log=log,
        )
        self.sessions.add(session)
        session.on_lost = self.sessions.discard
        return session

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_grace), close."""
        for server in self._servers:
            server.close()
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
        for cache in self._caches:
            cache.close()
        self._servers.clear()
        self._caches.clear()
        self._watchers.clear()

    async def __aenter__(self) -> ProxymapServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
