"""Prometheus metrics on ``metrics_address`` (opt-in; needs ``prometheus_client``).

Nothing is recorded for Prometheus while requests are served: at each scrape the
metrics are made from the same status data ``pyproxymap status`` shows (request
counts, latency histograms, Table.stats()), of one process or merged from a
supervisor's workers. The HTTP side is a few lines of asyncio on the server's
event loop, so a scrape reads those counters between requests, never while they
change (a thread, as prometheus_client's own server uses, could race with them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from .latency import BOUNDS, total_seconds

log = logging.getLogger("pyproxymap")

#: Table.stats() keys exported as counters, and their metric names.
CACHE_COUNTERS = {
    "cache_hits": "pyproxymap_cache_hits",
    "cache_misses": "pyproxymap_cache_misses",
    "cache_stale": "pyproxymap_cache_stale",
}
POOL_STATES = {"pool_in_use": "in_use", "pool_idle": "idle", "pool_waiting": "waiting"}
#: A status snapshot, as ``pyproxymap status --json`` prints it.
Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class StatusCollector:
    """Metrics of the status snapshot taken for the scrape in progress."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {"services": {}, "reloads": 0, "worker_restarts": 0}

    def collect(self) -> Iterator[Metric]:
        data = self.status
        requests = CounterMetricFamily(
            "pyproxymap_requests",
            "Replies sent, by service, table, request and status.",
            labels=["service", "table", "request", "status"],
        )
        latency = HistogramMetricFamily(
            "pyproxymap_lookup_seconds",
            "Time from a request reaching the service to its reply, by request type.",
            labels=["service", "table", "request"],
        )
        caches = {
            key: CounterMetricFamily(
                name, f"Result cache {key[6:]} of the open tables.", labels=["service", "table"]
            )
            for key, name in CACHE_COUNTERS.items()
        }
        pool = GaugeMetricFamily(
            "pyproxymap_pool_connections",
            "Backend connections of the open tables in use or idle, and lookups waiting.",
            labels=["service", "table", "state"],
        )
        tables_open = GaugeMetricFamily(
            "pyproxymap_tables_open", "Open table instances.", labels=["service"]
        )
        unavailable = GaugeMetricFamily(
            "pyproxymap_tables_unavailable",
            "Table instances that failed to open (answering RETRY).",
            labels=["service"],
        )
        for name, service in data["services"].items():
            up = down = 0
            for table, info in service["tables"].items():
                for op, statuses in info["requests"].items():
                    for status, n in statuses.items():
                        requests.add_metric([name, table, op, status], n)
                for op, summary in info["latency"].items():
                    histogram = summary["histogram"]
                    cumulative, buckets = 0, []
                    for bound, n in zip(BOUNDS, histogram, strict=False):
                        cumulative += n
                        buckets.append((repr(bound), cumulative))
                    buckets.append(("+Inf", cumulative + histogram[len(BOUNDS)]))
                    latency.add_metric([name, table, op], buckets, total_seconds(histogram))
                figures: defaultdict[str, int] = defaultdict(int)
                for instance in info["instances"]:
                    if instance["state"] == "open":
                        up += 1
                    else:
                        down += 1
                    for key, value in instance.get("stats", {}).items():
                        figures[key] += value
                for key, family in caches.items():
                    if key in figures:
                        family.add_metric([name, table], figures[key])
                for key, state in POOL_STATES.items():
                    if key in figures:
                        pool.add_metric([name, table, state], figures[key])
            tables_open.add_metric([name], up)
            unavailable.add_metric([name], down)
        yield requests
        yield latency
        yield from caches.values()
        yield pool
        yield tables_open
        yield unavailable
        yield CounterMetricFamily(
            "pyproxymap_reloads", "Configurations reloaded.", value=data["reloads"]
        )
        yield CounterMetricFamily(
            "pyproxymap_worker_restarts",
            "Worker processes restarted after they died or were killed by the watchdog.",
            value=data["worker_restarts"],
        )
        if "workers" in data:
            workers = GaugeMetricFamily(
                "pyproxymap_workers",
                "Worker processes, by service and state.",
                labels=["service", "state"],
            )
            states: defaultdict[tuple[str, str], int] = defaultdict(int)
            for worker in data["workers"]:
                states[worker["service"], worker["state"]] += 1
            for (service, state), n in sorted(states.items()):
                workers.add_metric([service, state], n)
            yield workers


def parse_address(address: str) -> tuple[str | None, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (every address) as (host, port)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"metrics_address {address!r}: expected host:port")
    return host.strip("[]") or None, int(port)


class MetricsServer:
    """Answers ``GET /metrics`` on ``address`` with the server's metrics."""

    def __init__(self, snapshot: Snapshot, address: str) -> None:
        self.address = address
        self.snapshot = snapshot
        self.collector = StatusCollector()
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = parse_address(self.address)
        self._listener = await asyncio.start_server(self._serve, host, port)
        log.info("metrics on http://%s/metrics", self.address)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.split(b"\r\n", 1)[0].partition(b" ")
            path = rest.split(b" ", 1)[0].partition(b"?")[0]
            if method not in (b"GET", b"HEAD"):
                code, body = "405 Method Not Allowed", b"GET only\n"
            elif path not in (b"/metrics", b"/"):
                code, body = "404 Not Found", b"try /metrics\n"
            else:
                self.collector.status = await self.snapshot()
                code, body = "200 OK", generate_latest(self.registry)
            kind = CONTENT_TYPE_LATEST if code == "200 OK" else "text/plain"
            writer.write(
                f"HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + (body if method != b"HEAD" else b"")
            )
            await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()
