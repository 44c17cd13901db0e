"""The admin socket: ``pyproxymap status``, ``reload`` and ``flush TABLE``.

A UNIX-domain socket of its own, by default ``$queue_directory/pyproxymap/admin``:
not under ``private/`` or ``public/``, so Postfix clients never reach it, and
mode 0600 in a 0700 directory, so only the server's owner (root) can connect.

The protocol is one JSON object per line each way::

    {"command": "status"}                     -> {"ok": true, "status": {...}}
    {"command": "reload"}                     -> {"ok": true} or {"ok": false, "error": "..."}
    {"command": "flush", "table": "type:name"} -> {"ok": true, "flushed": 2}

The same socket and commands serve one process (``ServerControl``) and the
supervisor of worker processes, which asks each worker's own admin socket and
merges the answers (``merge_status``): counts and latency histograms add up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from ..config.maincf import MainCf
from ..settings import Settings
from ..wire.proxymap import Status
from .app import ProxymapServer
from .latency import Histogram, count, new_histogram, quantile, total_seconds
from .listener import prepare_socket_path
from .service import Service
from .tablecache import UnavailableTable

log = logging.getLogger("pyproxymap")

MAX_LINE = 65536
_request_ids = itertools.count(1)
#: Reload: None when the new configuration is served, else why it was refused.
Reloader = Callable[[], Awaitable[str | None]]


class Control(Protocol):
    """What the admin socket's commands act on: one server, or a supervisor's workers."""

    async def status(self) -> dict[str, Any]: ...

    async def reload(self) -> str | None: ...

    async def flush(self, table: str) -> int: ...


class ServerControl:
    """The admin commands of one in-process ProxymapServer."""

    def __init__(self, server: ProxymapServer, reload: Reloader) -> None:
        self.server = server
        self._reload = reload

    async def status(self) -> dict[str, Any]:
        return status(self.server)

    async def reload(self) -> str | None:
        return await self._reload()

    async def flush(self, table: str) -> int:
        return self.server.flush(table)


class AdminError(Exception):
    """The admin socket cannot be reached, or the server refused the command."""


def admin_path(maincf: MainCf, settings: Settings) -> Path:
    if settings.admin_socket:
        return Path(settings.admin_socket)
    queue = maincf.get("queue_directory") or "/var/spool/postfix"
    return Path(queue) / "pyproxymap" / "admin"


class Running(Protocol):
    """What the head of a status says about a server or a supervisor."""

    maincf: MainCf
    started: float
    reloads: int
    worker_restarts: int


def status_head(running: Running) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "config_dir": str(running.maincf.config_dir),
        "uptime": round(time.time() - running.started, 3),
        "reloads": running.reloads,
        "worker_restarts": running.worker_restarts,
    }


def status(server: ProxymapServer) -> dict[str, Any]:
    """What ``pyproxymap status`` shows, as JSON-ready data."""
    return status_head(server) | {
        "services": {
            name: {"tables": _tables(slot.service)} for name, slot in server.slots.items()
        },
    }


def _tables(service: Service) -> dict[str, Any]:
    """Per table of a service: its open instances, replies by status, latency."""
    tables: dict[str, Any] = {}

    def entry(table: str) -> dict[str, Any]:
        return tables.setdefault(table, {"instances": [], "requests": {}, "latency": {}})

    for (table, instance_flags), instance in service.tables.instances():
        item: dict[str, Any] = {"instance_flags": instance_flags}
        if isinstance(instance, UnavailableTable):
            item.update(state="unavailable", reason=instance.reason)
        else:
            item.update(state="open", stats=instance.stats())
        entry(table)["instances"].append(item)
    for (table, op, code), n in sorted(service.counts.items()):
        entry(table)["requests"].setdefault(op, {})[Status(code).name] = n
    for (table, op), histogram in sorted(service.latency.items()):
        entry(table)["latency"][op] = latency_summary(histogram)
    return tables


def latency_summary(histogram: Histogram) -> dict[str, Any]:
    """Count, mean and quantiles of a histogram, with the histogram itself (to merge)."""
    n = count(histogram)
    return {
        "count": n,
        "mean_ms": total_seconds(histogram) * 1e3 / n if n else 0.0,
        "p50_ms": quantile(histogram, 0.5) * 1e3,
        "p99_ms": quantile(histogram, 0.99) * 1e3,
        "histogram": list(histogram),
    }


def merge_services(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``services`` of several processes' statuses as one: requests and latency
    histograms added up, each table instance listed with the pid that holds it."""
    services: dict[str, Any] = {}
    for part in parts:
        for name, service in part["services"].items():
            tables = services.setdefault(name, {"tables": {}})["tables"]
            for table, info in service["tables"].items():
                into = tables.setdefault(table, {"instances": [], "requests": {}, "latency": {}})
                into["instances"] += [dict(i, pid=part["pid"]) for i in info["instances"]]
                for op, statuses in info["requests"].items():
                    counts = into["requests"].setdefault(op, {})
                    for code, n in statuses.items():
                        counts[code] = counts.get(code, 0) + n
                for op, summary in info["latency"].items():
                    total = into["latency"].get(op, {}).get("histogram") or new_histogram()
                    added = [a + b for a, b in zip(total, summary["histogram"], strict=True)]
                    into["latency"][op] = latency_summary(added)
    return services


class AdminServer:
    """Serves the admin socket: JSON commands applied to a Control."""

    def __init__(self, control: Control, path: Path) -> None:
        self.control = control
        self.path = path
        self._listener: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        prepare_socket_path(self.path)  # a 0700 directory; refuses a live server's socket
        self._listener = await asyncio.start_unix_server(
            self.serve_connection, path=str(self.path), limit=MAX_LINE
        )
        os.chmod(self.path, 0o600)
        log.info("admin socket %s", self.path)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for writer in list(self._clients):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients.add(writer)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    reply = await self._command(request)
                    if "id" in request:  # a reply that came too late is recognised as such
                        reply["id"] = request["id"]
                except (ValueError, TypeError, KeyError) as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):  # ValueError: a line over MAX_LINE
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["command"]
        if command == "status":
            return {"ok": True, "status": await self.control.status()}
        if command == "reload":
            error = await self.control.reload()
            return {"ok": True} if error is None else {"ok": False, "error": error}
        if command == "flush":
            table = str(request["table"])
            flushed = await self.control.flush(table)
            log.info("flushed %s (%d open instance%s)", table, flushed, "s"[: flushed != 1])
            return {"ok": True, "flushed": flushed}
        return {"ok": False, "error": f"unknown command {command!r}"}


def ask(path: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to a running server's admin socket and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AdminError(f"no server is running ({path}: {e.strerror})") from e
        except OSError as e:
            raise AdminError(f"cannot connect to {path}: {e.strerror or e}") from e
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise AdminError(f"{path}: the server closed the connection")
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise AdminError(reply.get("error", "failed"))
    return reply


async def ask_over(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: dict[str, Any],
    who: str,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """``ask`` over an open connection, from an event loop (the supervisor asking a
    worker). The caller sends one request at a time; each carries a new id, so the
    late reply to a request that timed out is skipped, not taken for the next one's."""
    ident = next(_request_ids)
    try:
        async with asyncio.timeout(timeout):
            writer.write(json.dumps(request | {"id": ident}).encode() + b"\n")
            while True:
                line = await reader.readline()
                if not line:
                    raise AdminError(f"{who}: closed the connection")
                reply = json.loads(line)
                if reply.get("id") == ident:
                    break
    except (OSError, TimeoutError) as e:
        raise AdminError(f"{who}: {'timed out' if isinstance(e, TimeoutError) else e}") from e
    if not reply.get("ok"):
        raise AdminError(reply.get("error", "failed"))
    return reply


def _counts(figures: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in figures.items())


def format_status(data: dict[str, Any]) -> str:
    """``pyproxymap status`` for people."""
    up = int(data["uptime"])
    lines = [
        f"pyproxymap pid {data['pid']}, config {data['config_dir']}, "
        f"up {up // 3600}:{up // 60 % 60:02}:{up % 60:02}, "
        f"{data['reloads']} reloads, {data['worker_restarts']} worker restarts"
    ]
    for worker in data.get("workers", []):
        lines.append(
            f"  worker pid {worker['pid']}: {worker['service']}, {worker['state']}, "
            f"up {int(worker['uptime'])} s"
        )
    for name, service in data["services"].items():
        lines.append(f"{name}:" if service["tables"] else f"{name}: no tables")
        for table, info in service["tables"].items():
            states = [i["state"] for i in info["instances"]] or ["not open"]
            lines.append(f"  {table} [{', '.join(states)}]")
            for op, statuses in info["requests"].items():
                text = f"    {op}: {_counts(statuses)}"
                if latency := info["latency"].get(op):
                    text += f"; p50 {latency['p50_ms']:.3f} ms, p99 {latency['p99_ms']:.3f} ms"
                lines.append(text)
            for instance in info["instances"]:
                if "reason" in instance:
                    lines.append(f"    unavailable: {instance['reason']}")
                stats = instance.get("stats", {})
                cache = {k[6:]: v for k, v in stats.items() if k.startswith("cache_")}
                pool = {
                    k[5:].replace("_", " "): v for k, v in stats.items() if k.startswith("pool_")
                }
                if cache:
                    lines.append(f"    cache: {_counts(cache)}")
                if pool:
                    lines.append(f"    pool: {_counts(pool)}")
    return "\n".join(lines)
