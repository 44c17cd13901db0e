"""proxywrite: real Postfix clients write through us; real postmap reads the files.

Writers are Postfix's own client library (tests/interop/postfix_lib.py, with
verify(8)'s flags), ``postmap -d`` and, at the end, a real verify(8) daemon of a
throwaway Postfix instance whose proxywrite service is our server. The oracle
is the file itself, read by real ``postmap -q`` and ``postmap -s`` without the
proxy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, backdate, throwaway_postfix_main_cf, write_confdir
from tests.interop.postfix_lib import WRITE_FLAGS
from tests.interop.test_postfix_clients import libpostfix

pytestmark = pytest.mark.interop
pytest.importorskip("berkeleydb")
pytest.importorskip("lmdb")

KINDS = ["lmdb", "btree", "hash"]
SUFFIX = {"lmdb": ".lmdb", "btree": ".db", "hash": ".db"}
LIB = str(Path(__file__).with_name("postfix_lib.py"))
OPEN_LOCK = 0x10000


def postmap(*args: str) -> tuple[int, str]:
    r = subprocess.run(["postmap", *args], capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout


def entries(kind: str, name: Path) -> dict[str, str]:
    """The file as real ``postmap -s`` lists it (no proxy); asserts it reads cleanly."""
    r = subprocess.run(
        ["postmap", "-s", f"{kind}:{name}"], capture_output=True, text=True, timeout=30
    )
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    return dict(line.split("\t", 1) for line in r.stdout.splitlines())


def table_approvals(root: Path) -> str:
    return " ".join(
        f"proxy:{kind}:{root}/{name}-{kind}"
        for kind in KINDS
        for name in ("w", "pre", "d", "many", "crash")
    )


def confdir(root: Path, tables: Path) -> Path:
    """A config dir of its own (queue directory, so its own server) approving the tables
    in ``tables``; main.cf backdated, or Postfix's clients wait for it to cool down."""
    conf = write_confdir(root, f"proxy_write_maps = {table_approvals(tables)}\n")
    backdate(conf / "main.cf")
    return conf


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("proxywrite")
    return confdir(root, root)


@pytest.fixture(scope="module")
def server(conf: Path) -> Iterator[RunningServer]:
    srv = RunningServer(conf)
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "kind",
    ["lmdb", "btree", "hash"],
)
def test_postfix_client_library_writes_as_verify_does(conf, server, kind):
    name = conf / f"w-{kind}"
    table = f"{kind}:{name}"
    put = libpostfix(conf, table, "put", "a@example.com", "0:0:1:250 ok", "b@example.com", "x")
    assert put == [
        {"op": "put", "key": "a@example.com", "status": "ok"},
        {"op": "put", "key": "b@example.com", "status": "ok"},
    ]
    assert Path(f"{name}{SUFFIX[kind]}").stat().st_mode & 0o777 == 0o644  # created by us
    put = libpostfix(conf, table, "put", "b@example.com", "replaced", "empty@example.com", "")
    assert [r["status"] for r in put] == ["ok", "ok"]
    got = libpostfix(conf, table, "get", "a@example.com", "empty@example.com", "no@x", "--write")
    assert [(r["status"], r.get("value")) for r in got] == [
        ("found", "0:0:1:250 ok"),
        ("found", ""),
        ("notfound", None),
    ]
    deleted = libpostfix(conf, table, "del", "a@example.com", "a@example.com", "empty@example.com")
    assert [r["status"] for r in deleted] == ["ok", "notfound", "ok"]  # status 1: a missing key
    seq = libpostfix(conf, table, "seq", "--write")
    assert seq == [
        {"op": "seq", "key": "b@example.com", "value": "replaced", "status": "found"},
        {"op": "seq-end", "status": "notfound"},
    ]
    assert entries(kind, name) == {"b@example.com": "replaced"}  # postmap -s reads our file
    assert postmap("-q", "b@example.com", table) == (0, "replaced\n")
    assert postmap("-q", "a@example.com", table) == (1, "")


@pytest.mark.parametrize("kind", KINDS)
def test_postmap_d_through_the_proxy(conf, server, kind):
    name = conf / f"d-{kind}"
    name.write_text("gone@example.com x\nkept@example.com y\n")
    assert postmap("-c", str(conf), f"{kind}:{name}")[0] == 0
    spec = f"proxy:{kind}:{name}"
    assert postmap("-c", str(conf), "-d", "gone@example.com", spec)[0] == 0
    assert postmap("-c", str(conf), "-d", "gone@example.com", spec)[0] == 1  # not there
    assert entries(kind, name) == {"kept@example.com": "y"}


@pytest.mark.parametrize("kind", KINDS)
def test_file_built_by_postmap_is_updated_and_read_back_by_postmap(conf, server, kind):
    """Postfix writes, we write, Postfix reads (and our sequence lists what postmap -s does)."""
    name = conf / f"pre-{kind}"
    name.write_text("".join(f"user{i}@example.com value-{i}\n" for i in range(100)))
    assert postmap("-c", str(conf), f"{kind}:{name}")[0] == 0
    table = f"{kind}:{name}"
    flags = f"--flags={WRITE_FLAGS & ~OPEN_LOCK}"
    put = libpostfix(conf, table, "put", "user7@example.com", "new-7", "new@x", "n", flags)
    assert [r["status"] for r in put] == ["ok", "ok"]
    assert postmap("-q", "user7@example.com", table) == (0, "new-7\n")
    assert postmap("-q", "user8@example.com", table) == (0, "value-8\n")
    assert postmap("-q", "new@x", table) == (0, "n\n")
    seq = libpostfix(conf, table, "seq", "--write", flags)
    listed = "".join(f"{r['key']}\t{r['value']}\n" for r in seq[:-1])
    assert listed == postmap("-s", table)[1] and len(seq) == 102


def put_many(conf: Path, table: str, keys: list[str]) -> subprocess.Popen[str]:
    """One Postfix client process writing ``keys`` (value: the key), one request each."""
    pairs = [part for key in keys for part in (key, key)]
    flags = f"--flags={WRITE_FLAGS & ~OPEN_LOCK}"
    return subprocess.Popen(
        [sys.executable, LIB, str(conf), table, "put", *pairs, flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_writers_in_several_processes_lose_no_update(conf, server, kind, tmp_path):
    """Six client processes, through two server processes, on one file."""
    other = RunningServer(confdir(tmp_path, conf))
    try:
        name = conf / f"many-{kind}"
        table = f"{kind}:{name}"
        clients = [
            put_many(via, table, [f"c{n}-{i}@example.com" for i in range(60)])
            for n, via in enumerate([conf, conf, conf, other.confdir, other.confdir, conf])
        ]
        for client in clients:
            out, err = client.communicate(timeout=60)
            assert out.count('"status": "ok"') == 60, err
    finally:
        other.stop()
    listed = entries(kind, name)
    assert len(listed) == 360 and all(key == value for key, value in listed.items())


@pytest.mark.parametrize("kind", ["lmdb", "btree"])
def test_kill_9_during_a_write_load_loses_no_acknowledged_write(conf, kind, tmp_path):
    """Every write a client saw acknowledged is in the file after the server died of
    SIGKILL in the middle of the load, and the file reads cleanly."""
    crash = confdir(tmp_path, conf)
    name = conf / f"crash-{kind}"
    table = f"{kind}:{name}"
    acknowledged: set[str] = set()
    for cycle in range(2):
        srv = RunningServer(crash)
        clients = [
            put_many(crash, table, [f"k{cycle}-{n}-{i}" for i in range(3000)]) for n in range(3)
        ]
        time.sleep(1.0)
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        srv.stop()
        for client in clients:  # they would retry for ever: Postfix clients do
            client.kill()
            out, _ = client.communicate(timeout=30)
            acknowledged |= {json.loads(line)["key"] for line in out.splitlines()}
        assert len(acknowledged) > 100 * (cycle + 1)  # the kill came in the middle
        listed = entries(kind, name)
        assert acknowledged <= listed.keys()
    restarted = RunningServer(crash)
    try:
        sample = sorted(acknowledged)[:: max(1, len(acknowledged) // 20)]
        got = libpostfix(crash, table, "get", *sample, "--write", f"--flags={0x80000}")
        assert all(r["status"] == "found" and r["value"] == r["key"] for r in got)
    finally:
        restarted.stop()


# --- a real verify(8) ---------------------------------------------------------------------


VERIFY_CF = """\
address_verify_map = proxy:{kind}:$data_directory/verify_cache
address_verify_positive_expire_time = 2s
address_verify_positive_refresh_time = 1h
address_verify_cache_cleanup_interval = 1s
"""
#: No proxymap or proxywrite: ours answers on this instance's private/ sockets.
MASTER_CF = """\
postlog    unix-dgram n - n - 1 postlogd
verify     unix - - n - 1 verify
"""


class InstanceServer(RunningServer):
    """Our server on a Postfix instance: its sockets are in that instance's queue directory."""

    def socket(self, service: str = "proxymap") -> Path:
        return self.confdir.parent / "spool" / "private" / service


@pytest.fixture
def instance() -> Iterator[Path]:
    """A throwaway Postfix instance (own config, queue and data directories, own master),
    where its unprivileged daemons can reach it (not under pytest's 0700 directory)."""
    if os.geteuid() != 0 or shutil.which("postfix") is None:
        pytest.skip("a Postfix instance needs root and postfix")
    root = Path(tempfile.mkdtemp(prefix="pyproxymap-verify-"))
    root.chmod(0o755)
    (root / "etc").mkdir()
    (root / "spool").mkdir(mode=0o755)
    yield root
    subprocess.run(["postfix", "-c", str(root / "etc"), "abort"], capture_output=True, check=False)
    shutil.rmtree(root)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_real_verify_daemon_caches_through_us_and_cleans_up(instance, workers):
    """A real verify(8) cache on btree, filled and cleaned through our proxywrite: one
    process, or a supervisor with two proxymap workers and the proxywrite worker."""
    root, kind = instance, "btree"
    (root / "etc" / "main.cf").write_text(
        throwaway_postfix_main_cf(root, VERIFY_CF.format(kind=kind))
    )
    (root / "etc" / "master.cf").write_text(MASTER_CF)
    subprocess.run(["postfix", "-c", str(root / "etc"), "start"], check=True, timeout=60)
    srv = InstanceServer(root / "etc", "--workers", workers)
    cache = root / "data" / "verify_cache"
    addresses = [f"user{i}@example.com" for i in range(20)]
    try:
        verify = [sys.executable, LIB, str(root / "etc"), "-"]
        triples = [part for address in addresses for part in (address, "0", "250 2.1.5 Ok")]
        r = subprocess.run(  # as delivery agents report probes' outcomes
            [*verify, "verify-update", *triples], capture_output=True, text=True, timeout=30
        )
        assert r.stdout.count('"rc": 0') == 20, r.stderr
        r = subprocess.run(  # as smtpd asks, within the second: answered from the cache file
            [*verify, "verify-query", *addresses[-3:]], capture_output=True, text=True, timeout=30
        )
        assert r.stdout.count('"rc": 0, "status": 0') == 3, r.stderr
        stored = entries(kind, cache)
        assert set(addresses) <= stored.keys()
        assert all(
            stored[a].startswith("0:0:") and stored[a].endswith(":250 2.1.5 Ok") for a in addresses
        )
        # Entries expire after two seconds; the cleanup, every second, walks the cache
        # (sequence) and deletes each expired entry behind it.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and set(entries(kind, cache)) & set(addresses):
            time.sleep(0.5)
        assert set(entries(kind, cache)) == {"_LAST_CACHE_CLEANUP_COMPLETED_"}
        maillog = (root / "maillog").read_text()
        assert sum(map(int, re.findall(r"dropped=(\d+) entries", maillog))) == 20, maillog
        assert "warning" not in srv.log(), srv.log()
    finally:
        srv.stop()
