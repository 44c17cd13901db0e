"""Standalone with worker processes (``serve --workers N``): real processes, real
clients, worker kill -9 and a stalled worker under load, reload under load, max_use,
metrics merged across workers, and Postfix's own postmap looking up through it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pyproxymap.client import Client, ProxymapError
from pyproxymap.settings import TableSettings
from pyproxymap.tables.base import TableOptions
from tests.conftest import ROOT, backdate, write_confdir
from tests.server import test_privileges as priv
from tests.server.test_privileges import Serve, _ids, _main_cf, _postfix, _queue, needs_root

parser = pytest.importorskip("prometheus_client.parser")
site = priv.site  # a directory the postfix account can traverse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(confdir: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "pyproxymap.cli", "status", "-c", str(confdir), "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def workers(confdir: Path, service: str = "proxymap", state: str = "available") -> list[int]:
    return [
        w["pid"]
        for w in status(confdir)["workers"]
        if w["service"] == service and w["state"] == state
    ]


def total_ok(confdir: Path, spec: str) -> int:
    tables = status(confdir)["services"]["proxymap"]["tables"]
    return tables[spec]["requests"]["lookup"]["OK"]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pid_of(client: Client) -> int:
    """Which worker holds this client's connection: the process whose socket has ours
    as its peer, as ss(8) shows (SO_PEERCRED names whoever last called listen())."""
    inode = os.fstat(client._sock.fileno()).st_ino
    out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 9 and fields[7] == str(inode) and "pid=" in fields[8]:
            return int(fields[8].split("pid=")[1].split(",")[0])
    raise AssertionError(f"no process holds the peer of socket {inode}")


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("".join(f"user{i} value{i}\n" for i in range(100)))
    backdate(path)
    return path


@pytest.fixture
def conf(tmp_path: Path, table: Path) -> Path:
    return write_confdir(
        tmp_path,
        f"proxy_read_maps = proxy:texthash:{table}\ndaemon_timeout = 2\n",
    )


class Load:
    """Clients looking keys up in a loop, each on its own persistent connection (or a
    new connection per lookup); counts answers and failures by client."""

    def __init__(self, sock: Path, spec: str, clients: int, *, reconnect: bool = False):
        self.sock, self.spec, self.reconnect = sock, spec, reconnect
        self.stop = threading.Event()
        self.ok: Counter[int] = Counter()
        self.failed: Counter[int] = Counter()
        self.peers: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, n: int) -> None:
        client: Client | None = None
        i = 0
        while not self.stop.is_set():
            try:
                if client is None:
                    client = Client(self.sock, timeout=5)
                    client.lookup(self.spec, "user0")  # connect, so the peer is known
                    self.peers[n] = worker_pid_of(client)
                key = f"user{i % 100}"
                assert client.lookup(self.spec, key) == f"value{i % 100}".encode()
                self.ok[n] += 1
            except (OSError, ProxymapError, AssertionError):
                self.failed[n] += 1
                if client is not None:
                    client.close()
                client = None
            if self.reconnect and client is not None:
                client.close()
                client = None
            i += 1
        if client is not None:
            client.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_for(lambda: sum(self.ok.values()) > 20 * len(self.threads), what="load")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_workers_share_the_socket_and_report_one_merged_status(serve, conf, table):
    server = serve(conf, "--workers", "2")
    wait_for(lambda: len(workers(conf)) == 2, what="two proxymap workers")
    assert len(workers(conf, "proxywrite")) == 1
    spec = f"texthash:{table}"
    seen_pids = set()
    for i in range(40):
        with Client(server.socket()) as c:
            assert c.lookup(spec, f"user{i}") == f"value{i}".encode()
            assert c.lookup(spec, "nobody") is None
            seen_pids.add(worker_pid_of(c))
    assert seen_pids <= set(workers(conf))
    data = status(conf)
    mine = data["services"]["proxymap"]["tables"][spec]
    assert mine["requests"] == {"lookup": {"OK": 40, "NOKEY": 40}}
    assert mine["latency"]["lookup"]["count"] == 80
    # Each worker that served it holds its own instance, listed with its pid.
    assert {i["pid"] for i in mine["instances"]} == seen_pids
    assert data["worker_restarts"] == 0


def test_kill_9_of_one_worker_leaves_the_others_clients_alone(serve, conf, table):
    server = serve(conf, "--workers", "2")
    wait_for(lambda: len(workers(conf)) == 2, what="two proxymap workers")
    spec = f"texthash:{table}"
    with Load(server.socket(), spec, clients=8) as load:
        wait_for(lambda: len(set(load.peers.values())) == 2, what="clients on both workers")
        victim = next(iter(load.peers.values()))
        others = [n for n, pid in load.peers.items() if pid != victim]
        answered = total_ok(conf, spec)
        before = dict(load.ok)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        replaced = wait_for(
            lambda: [p for p in workers(conf) if p != victim] * (len(workers(conf)) == 2),
            timeout=5,
            what="a replacement worker",
        )
        back_in = time.monotonic() - killed
        time.sleep(0.5)
    # The clients of the other worker never saw an error and kept going.
    assert others and all(load.failed[n] == 0 for n in others), load.failed
    assert all(load.ok[n] > before.get(n, 0) for n in others)
    # The victim's clients lost their connection once, reconnected, and went on.
    victims = [n for n in load.peers if n not in others]
    assert all(load.failed[n] <= 1 for n in victims), load.failed
    assert victim not in replaced and back_in < 1.5, back_in
    assert status(conf)["worker_restarts"] == 1
    assert f"worker pid {victim} killed by signal 9" in server.log()
    # What the killed worker had answered stays counted: totals never go back.
    assert total_ok(conf, spec) >= answered


def test_a_stalled_worker_is_killed_by_the_watchdog_and_replaced(serve, conf):
    serve(conf, "--workers", "1")
    [stuck] = wait_for(lambda: workers(conf), what="a worker")
    os.kill(stuck, signal.SIGSTOP)  # its event loop and its own watchdog thread stop
    try:
        wait_for(
            lambda: workers(conf) and stuck not in workers(conf),
            timeout=8,  # daemon_timeout = 2
            what="the watchdog",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    assert status(conf)["worker_restarts"] == 1


def test_reload_under_load_drops_no_connection(serve, conf, table, tmp_path):
    server = serve(conf, "--workers", "2")
    wait_for(lambda: len(workers(conf)) == 2, what="two proxymap workers")
    spec = f"texthash:{table}"
    other = tmp_path / "other"
    other.write_text("k v\n")
    backdate(other)
    with Load(server.socket(), spec, clients=6) as load:
        for n in range(3):
            # A changed allow-list: the new table becomes reachable, the old stays.
            (conf / "main.cf").write_text(
                (conf / "main.cf")
                .read_text()
                .replace(
                    f"proxy:texthash:{table}\n",
                    f"proxy:texthash:{table} proxy:texthash:{other}\n",
                )
            )
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_for(lambda n=n: status(conf)["reloads"] == n + 1, what="reload")
        with Client(server.socket()) as c:
            assert c.lookup(f"texthash:{other}", "k") == b"v"
        time.sleep(0.3)
    assert sum(load.failed.values()) == 0, load.failed
    assert sum(load.ok.values()) > 100
    assert status(conf)["worker_restarts"] == 0


def test_a_broken_configuration_is_refused_and_the_old_one_serves(serve, conf, table):
    server = serve(conf, "--workers", "1")
    wait_for(lambda: workers(conf), what="a worker")
    (conf / "pyproxymap.toml").write_text("[table_defaults]\nmax_connections = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "pyproxymap.cli", "reload", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert r.returncode != 0
    assert "reload refused, still serving the previous configuration" in r.stderr
    assert "max_connections must not be negative" in r.stderr
    with Client(server.socket()) as c:
        assert c.lookup(f"texthash:{table}", "user1") == b"value1"
    assert status(conf)["reloads"] == 0


def test_max_use_recycles_a_worker_without_failing_a_client(serve, tmp_path, table):
    conf = write_confdir(
        tmp_path, f"proxy_read_maps = proxy:texthash:{table}\nmax_use = 5\nipc_ttl = 5\n"
    )
    server = serve(conf, "--workers", "1")
    first = wait_for(lambda: workers(conf), what="a worker")
    with Load(server.socket(), f"texthash:{table}", clients=3, reconnect=True) as load:
        wait_for(lambda: first[0] not in [w["pid"] for w in status(conf)["workers"]], timeout=10)
        # Many drains in a row: a connection accepted as a worker stops is still served.
        wait_for(lambda: server.log().count("exited (max_use") >= 8, timeout=30, what="drains")
    assert sum(load.failed.values()) == 0, load.failed
    assert status(conf)["worker_restarts"] == 0  # a recycled worker did not crash


def test_metrics_add_up_the_workers(serve, conf, table):
    port = free_port()
    (conf / "pyproxymap.toml").write_text(f'metrics_address = "127.0.0.1:{port}"\n')
    server = serve(conf, "--workers", "2")
    wait_for(lambda: len(workers(conf)) == 2, what="two proxymap workers")
    spec = f"texthash:{table}"
    for i in range(30):
        with Client(server.socket()) as c:
            assert c.lookup(spec, f"user{i}") == f"value{i}".encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
    }
    lookup = {("service", "proxymap"), ("table", spec), ("request", "lookup")}
    assert samples["pyproxymap_requests_total", frozenset(lookup | {("status", "OK")})] == 30
    assert samples["pyproxymap_lookup_seconds_count", frozenset(lookup)] == 30
    key = frozenset({("service", "proxymap"), ("state", "available")})
    assert samples["pyproxymap_workers", key] == 2
    assert samples["pyproxymap_worker_restarts_total", frozenset()] == 0


def test_postfix_postmap_looks_up_through_the_workers(serve, conf, table):
    serve(conf, "--workers", "2")
    wait_for(lambda: len(workers(conf)) == 2, what="two proxymap workers")
    for i in (1, 42, 99):
        r = subprocess.run(
            ["postmap", "-c", str(conf), "-q", f"user{i}", f"proxy:texthash:{table}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert (r.returncode, r.stdout) == (0, f"value{i}\n"), r.stderr


def test_table_bounds_are_divided_among_the_workers():
    options = TableOptions(max_connections=8, cache_size=10000)
    shared = TableSettings(options, {"pgsql:/x": TableOptions(max_connections=3)}).shared_by(4)
    assert (shared.defaults.max_connections, shared.defaults.cache_size) == (2, 2500)
    # Never below one connection each: more workers than connections gives each one.
    assert shared.options_for("pgsql:/x").max_connections == 1


@needs_root
@pytest.mark.parametrize("chroot", [False, True])
def test_workers_started_as_root_serve_as_mail_owner_optionally_chrooted(site, chroot):
    owner = _postfix()
    queue = _queue(site / "q")
    table = (queue if chroot else site) / "t"
    table.write_text("k v\n")
    backdate(table)
    spec = "texthash:/t" if chroot else f"texthash:{table}"
    _main_cf(site, queue, f"proxy_read_maps = proxy:{spec}\n")
    (site / "pyproxymap.toml").write_text(f"workers = 1\nchroot = {str(chroot).lower()}\n")
    srv = Serve(site, queue).started()
    try:
        [worker] = wait_for(lambda: workers(site), what="a worker")
        assert _ids(worker, "Uid") == [owner.pw_uid] * 4
        assert _ids(srv.proc.pid, "Uid") == [0] * 4  # the supervisor stays root, as master
        root = os.readlink(f"/proc/{worker}/root")
        assert root == (str(queue.resolve()) if chroot else "/")
        with Client(srv.socket()) as c:
            assert c.lookup(spec, "k") == b"v"
        assert srv.stop() == 0
    finally:
        srv.stop()


def test_a_silent_worker_gets_a_replacement_long_before_daemon_timeout(serve, tmp_path, table):
    conf = write_confdir(tmp_path, f"proxy_read_maps = proxy:texthash:{table}\n")
    server = serve(conf, "--workers", "1")  # daemon_timeout: Postfix's 5 hours
    [stuck] = wait_for(lambda: workers(conf), what="a worker")
    os.kill(stuck, signal.SIGSTOP)
    try:
        wait_for(lambda: [p for p in workers(conf) if p != stuck], timeout=8, what="another")
        with Client(server.socket()) as c:  # served by the new one
            assert c.lookup(f"texthash:{table}", "user3") == b"value3"
        assert stuck in [w["pid"] for w in status(conf)["workers"]]  # not killed yet
    finally:
        os.kill(stuck, signal.SIGCONT)
    # Back from its stall, one worker is too many: one of the two is asked to finish.
    wait_for(lambda: len(status(conf)["workers"]) == 2, what="one retired")  # + proxywrite


def test_a_reload_with_bad_limits_is_refused(serve, conf, table):
    server = serve(conf, "--workers", "1")
    wait_for(lambda: workers(conf), what="a worker")
    main_cf = (conf / "main.cf").read_text()
    (conf / "main.cf").write_text(main_cf + "daemon_timeout = 5x\n")
    r = subprocess.run(
        [sys.executable, "-m", "pyproxymap.cli", "reload", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert r.returncode != 0 and "daemon_timeout" in r.stderr, r.stderr
    (conf / "main.cf").write_text(main_cf)
    with Client(server.socket()) as c:
        assert c.lookup(f"texthash:{table}", "user1") == b"value1"
    assert status(conf)["reloads"] == 0


def test_workers_import_nothing_from_the_directory_serve_was_started_in(tmp_path, conf):
    """python -c would put the working directory first on sys.path, while still root."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "imported"
    (cwd / "getopt.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError\n")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "pyproxymap.cli",
            "serve",
            "-c",
            str(conf),
            "--no-unprivileged",
            "--workers",
            "1",
        ],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: "proxymap/proxymap[" in (tmp_path / "serve.log").read_text(),
            timeout=20,
            what="a worker",
        )
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    assert not marker.exists()
