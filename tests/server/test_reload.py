"""Live reload under load: every lookup during repeated rewrites sees one whole version."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pyproxymap.client import Client, ProxymapError
from tests.conftest import RunningServer, write_confdir

KEYS = 3000
VERSIONS = 4


def write_version(path, version: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"key{i} v{version}-{i}\n" for i in range(KEYS)))
    # Postfix (and so we) wait until a fresh file is a second or two old before reading
    # it; date it back so that every version is read at once.
    past = time.time() - 10
    os.utime(tmp, (past, past))
    os.rename(tmp, path)  # as postmap and editors replace a file


def test_rewrites_under_load_are_atomic_and_drop_no_connection(tmp_path):
    table = tmp_path / "big"
    write_version(table, 0)
    (tmp_path / "other").write_text("k v\n")
    conf = write_confdir(
        tmp_path,
        f"proxy_read_maps = proxy:texthash:{table} proxy:texthash:{tmp_path}/other\n",
    )
    server = RunningServer(conf, "--reload-check-interval", "0.2")
    spec = f"texthash:{table}"
    failures: list[str] = []
    seen: list[set[int]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        versions: set[int] = set()
        last = 0
        with Client(server.socket()) as c:
            i = n
            while not stop.is_set():
                i = (i * 7919 + 13) % KEYS
                value = c.lookup(spec, f"key{i}", flags=0)
                if value is None or not value.endswith(f"-{i}".encode()):
                    failures.append(f"key{i}: {value!r}")
                    return
                version = int(value[1 : value.index(b"-")])
                if version < last:  # an older table after a newer one: not atomic
                    failures.append(f"key{i}: v{version} after v{last}")
                    return
                last = version
                versions.add(version)
                if c.lookup(f"texthash:{tmp_path}/other", "k", flags=0) != b"v":
                    failures.append("other table")
                    return
        seen.append(versions)

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for version in range(1, VERSIONS):
            time.sleep(0.6)
            write_version(table, version)
        deadline = time.monotonic() + 10  # the last version must arrive, after cool-down
        with Client(server.socket()) as c:
            while c.lookup(spec, "key1", flags=0) != f"v{VERSIONS - 1}-1".encode():
                assert time.monotonic() < deadline, "the last version never arrived"
                time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        server.stop()
    assert not failures, failures[:5]
    assert len(seen) == 4  # every client kept its connection to the end
    assert all(VERSIONS - 1 in v and len(v) >= 2 for v in seen), seen
    assert "has changed -- reloaded" in server.log()


def test_sighup_swaps_the_configuration_and_keeps_connections(tmp_path):
    (tmp_path / "a").write_text("k a-value\n")
    (tmp_path / "b").write_text("k b-value\n")
    a, b = f"texthash:{tmp_path}/a", f"texthash:{tmp_path}/b"
    conf = write_confdir(tmp_path, f"proxy_read_maps = proxy:{a}\n")
    server = RunningServer(conf)
    try:
        with Client(server.socket()) as c:
            assert c.lookup(a, "k") == b"a-value"
            with pytest.raises(ProxymapError):
                c.lookup(b, "k")  # not approved yet
            write_confdir(tmp_path, f"proxy_read_maps = proxy:{b}\n")
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_until(lambda: "reloaded configuration" in server.log())
            assert c.lookup(b, "k") == b"b-value"  # same connection, new allow-list
            with pytest.raises(ProxymapError):
                c.lookup(a, "k")
            (tmp_path / "main.cf").write_text("this line has no equals sign\n")
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_until(lambda: "reload refused" in server.log())
            assert c.lookup(b, "k") == b"b-value"  # the old configuration keeps serving
    finally:
        server.stop()


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
