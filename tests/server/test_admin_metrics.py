"""Operating a running server: pyproxymap status / reload / flush and the metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pyproxymap.client import Client, ProxymapError
from pyproxymap.logs import redact
from pyproxymap.server.latency import BOUNDS, BOUNDS_NS, new_histogram, quantile
from pyproxymap.tables.netclient import Endpoint, Pool
from pyproxymap.wire.proxymap import Status
from tests.conftest import ROOT, backdate, write_confdir

parser = pytest.importorskip("prometheus_client.parser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyproxymap.cli", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        text = r.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**kw: str) -> frozenset:
    return frozenset(kw.items())


@pytest.fixture
def running(tmp_path, serve):
    """A server with a cached texthash table, a fail: table, a slow static: table and
    metrics on a free port."""
    table = tmp_path / "t"
    table.write_text("alice v1\n")
    backdate(table)
    port = free_port()
    conf = write_confdir(
        tmp_path,
        f"proxy_read_maps = proxy:texthash:{table} proxy:fail:x proxy:static:s\n",
    )
    (tmp_path / "pyproxymap.toml").write_text(
        f'metrics_address = "127.0.0.1:{port}"\n'
        f'[tables."texthash:{table}"]\ncache_ttl = 60\n'
        '[tables."static:s"]\nslow_lookup = 1e-9\n'
    )
    return serve(conf), f"texthash:{table}", port


def test_status_and_metrics_count_exactly_what_was_asked(running):
    server, texthash, port = running
    with Client(server.socket()) as c:
        for _ in range(3):
            assert c.lookup(texthash, "alice") == b"v1"
        for _ in range(2):
            assert c.lookup(texthash, "nobody") is None
        for table, status in (("fail:x", Status.RETRY), ("texthash:/not/approved", Status.DENY)):
            with pytest.raises(ProxymapError) as e:
                c.lookup(table, "k")
            assert e.value.status == status
        assert c.lookup("static:s", "k") == b"s"

    r = cli("status", "-c", str(server.confdir), "--json")
    assert r.returncode == 0, r.stderr
    tables = json.loads(r.stdout)["services"]["proxymap"]["tables"]
    mine = tables[texthash]
    assert mine["requests"] == {"lookup": {"OK": 3, "NOKEY": 2}}
    assert mine["latency"]["lookup"]["count"] == 5
    assert 0 < mine["latency"]["lookup"]["p50_ms"] <= mine["latency"]["lookup"]["p99_ms"]
    [instance] = mine["instances"]
    assert instance["state"] == "open"
    assert instance["stats"] == {
        "cache_hits": 2,
        "cache_misses": 3,  # "not found" is not cached (cache_negative_ttl = 0)
        "cache_stale": 0,
        "cache_entries": 1,
    }
    assert tables["fail:x"]["requests"] == {"lookup": {"RETRY": 1}}
    assert tables["texthash:/not/approved"] == {
        "instances": [],
        "requests": {"lookup": {"DENY": 1}},
        "latency": {},  # never reached a table
    }
    human = cli("status", "-c", str(server.confdir)).stdout
    assert f"{texthash} [open]" in human and "lookup: 3 OK, 2 NOKEY; p50" in human
    assert "cache: 2 hits, 3 misses, 0 stale, 1 entries" in human

    metrics = scrape(port)
    mine = {"service": "proxymap", "table": texthash}
    for status, n in (("OK", 3), ("NOKEY", 2)):
        key = labels(**mine, request="lookup", status=status)
        assert metrics["pyproxymap_requests_total", key] == n
    assert (
        metrics[
            "pyproxymap_requests_total",
            labels(service="proxymap", table="fail:x", request="lookup", status="RETRY"),
        ]
        == 1
    )
    timed = labels(**mine, request="lookup")
    assert metrics["pyproxymap_lookup_seconds_count", timed] == 5
    assert metrics["pyproxymap_lookup_seconds_bucket", timed | {("le", "+Inf")}] == 5
    assert metrics["pyproxymap_cache_hits_total", labels(**mine)] == 2
    assert metrics["pyproxymap_cache_misses_total", labels(**mine)] == 3
    assert metrics["pyproxymap_tables_open", labels(service="proxymap")] == 3
    assert metrics["pyproxymap_reloads_total", labels()] == 0
    assert metrics["pyproxymap_worker_restarts_total", labels()] == 0
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(port, "/elsewhere")
    assert e.value.code == 404

    slow = [line for line in server.log().splitlines() if " took " in line]
    assert len(slow) == 1 and 'warning: static:s: lookup of "k" took' in slow[0]  # 1 ns


def test_flush_reopens_a_table_even_when_its_file_did_not_change(running):
    server, texthash, _ = running
    path = Path(texthash.partition(":")[2])
    with Client(server.socket()) as c:
        assert c.lookup(texthash, "alice") == b"v1"
        before = path.stat()
        path.write_text("alice v2\n")  # same inode, size and (below) mtime: not "changed"
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert c.lookup(texthash, "alice") == b"v1"  # cached, and the file looks the same
        r = cli("flush", "-c", str(server.confdir), f"proxy:{texthash}")
        assert r.returncode == 0 and "flushed" in r.stdout, r.stderr
        assert c.lookup(texthash, "alice") == b"v2"
    r = cli("flush", "-c", str(server.confdir), "texthash:/never/opened")
    assert r.returncode == 0 and "not open" in r.stdout


def test_reload_through_the_admin_socket_and_its_place(running):
    server, texthash, port = running
    with Client(server.socket()) as c:
        assert c.lookup(texthash, "alice") == b"v1"
    r = cli("reload", "-c", str(server.confdir))
    assert r.returncode == 0, r.stderr
    metrics = scrape(port)
    assert metrics["pyproxymap_reloads_total", labels()] == 1
    ok = labels(service="proxymap", table=texthash, request="lookup", status="OK")
    assert metrics["pyproxymap_requests_total", ok] == 1  # counts go on across reloads

    write_confdir(server.confdir, "proxy_read_maps = proxy:texthash:${oops\n")  # unbuildable
    r = cli("reload", "-c", str(server.confdir))
    assert r.returncode == 2 and "reload refused" in r.stderr
    assert scrape(port)["pyproxymap_reloads_total", labels()] == 1

    admin = server.confdir / "q" / "pyproxymap" / "admin"
    mode = admin.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(admin.parent.stat().st_mode) == 0o700
    assert not any(p.name == "admin" for p in (server.confdir / "q" / "private").iterdir())


def test_commands_say_when_no_server_runs(tmp_path):
    conf = write_confdir(tmp_path, "")
    for command in (["status"], ["reload"], ["flush", "static:x"]):
        r = cli(command[0], "-c", str(conf), *command[1:])
        assert r.returncode == 2 and "no server is running" in r.stderr, r


def test_histogram_quantiles():
    histogram = new_histogram()
    assert quantile(histogram, 0.5) == 0.0
    histogram[0] = 99  # 99 requests up to the first bound
    histogram[len(BOUNDS)] = 1  # one above the last
    assert quantile(histogram, 0.5) == pytest.approx(BOUNDS[0] * 50 / 99)
    assert quantile(histogram, 0.999) == BOUNDS[-1]
    assert len(BOUNDS_NS) == len(BOUNDS) and BOUNDS_NS[-1] == 10_000_000_000


def test_passwords_are_masked_in_log_lines():
    assert redact("bind_pw = s3cret, next") == "bind_pw = ***, next"
    assert redact('password="s3cret"') == 'password="***"'
    assert redact("ldap://cn=admin:s3cret@ldap/ down") == "ldap://cn=admin:***@ldap/ down"
    assert redact("alice@example.com: mailbox:/var/mail") == "alice@example.com: mailbox:/var/mail"


def test_pool_stats_count_connections_in_use_idle_and_waiting(tmp_path):
    path = str(tmp_path / "s")
    log = logging.getLogger("test")

    async def go() -> None:
        server = await asyncio.start_unix_server(lambda r, w: None, path=path)
        pool = Pool(Endpoint(path, path=path), size=2)
        deadline = asyncio.get_running_loop().time() + 5
        async with pool.connection(deadline, log), pool.connection(deadline, log):
            third = asyncio.ensure_future(pool._acquire(deadline, log))
            await asyncio.sleep(0.01)
            assert pool.stats() == {"pool_in_use": 2, "pool_idle": 0, "pool_waiting": 1}
        link = await third  # one connection went to the waiter, the other is idle
        assert pool.stats() == {"pool_in_use": 1, "pool_idle": 1, "pool_waiting": 0}
        pool._release(link)
        assert pool.stats() == {"pool_in_use": 0, "pool_idle": 2, "pool_waiting": 0}
        pool.close()
        server.close()

    asyncio.run(go())
