"""`pyproxymap serve` on the wire: bytes, dialects, and robustness where proxymap is fragile."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyproxymap.wire.attr import Decoder, encode
from tests.conftest import RunningServer, write_confdir

LOOKUP_FLAGS = 524353  # what postmap -q sends: UTF8_REQUEST|LOCK|DUP_WARN


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wire")
    (root / "t").write_text(
        "alice@example.com alice-value\nbob@example.com  bob value with  spaces\n"
    )
    return write_confdir(
        root,
        f"""\
proxy_read_maps = proxy:texthash:{root}/t proxy:texthash:{root}/missing
    proxy:texthash:{root}/late proxy:texthash:{root}/changing proxy:static:hello
proxy_write_maps = proxy:texthash:{root}/t
""",
    )


@pytest.fixture(scope="module")
def server(conf):
    srv = RunningServer(conf)
    yield srv
    srv.stop()


class Conn:
    def __init__(self, path: Path, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = Decoder()
        self.records: list[list[bytes]] = []
        assert self.read() == [b"protocol", b"proxymap_protocol"]

    def send(self, *pairs) -> None:
        self.sock.sendall(encode(pairs))

    def read(self) -> list[bytes]:
        while not self.records:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.records += self.decoder.feed(data)
        return self.records.pop(0)

    def raw_reply(self, wire: bytes) -> bytes:
        """Send raw bytes, return the next reply re-encoded as it came (attr0)."""
        self.sock.sendall(wire)
        rec = self.read()
        return encode(zip(rec[0::2], rec[1::2], strict=True))

    def close(self) -> None:
        self.sock.close()


def T(conf: Path, name: str = "t") -> str:
    return f"texthash:{conf}/{name}"


def test_greeting_is_the_exact_bytes_postfix_sends(server):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(server.socket()))
    assert s.recv(100) == b"protocol\x00proxymap_protocol\x00\x00"
    s.close()


def test_replies_are_byte_identical_to_proxymap(conf, server):
    c = Conn(server.socket())
    t = T(conf).encode()
    lookup = b"request\x00lookup\x00table\x00" + t + b"\x00flags\x00524353\x00key\x00"
    assert (
        c.raw_reply(b"request\x00open\x00table\x00" + t + b"\x00flags\x000\x00\x00")
        == b"status\x000\x00flags\x0016\x00\x00"
    )  # texthash: FIXED, as proxymap reports it
    assert (
        c.raw_reply(lookup + b"alice@example.com\x00\x00")
        == b"status\x000\x00value\x00alice-value\x00\x00"
    )
    assert (
        c.raw_reply(lookup + b"nosuch@example.com\x00\x00") == b"status\x001\x00value\x00\x00\x00"
    )
    assert c.raw_reply(lookup + b"\x00\x00") == b"status\x001\x00value\x00\x00\x00"  # empty key
    assert c.raw_reply(lookup + b"\xffbad\x00\x00") == b"status\x001\x00value\x00\x00\x00"
    # the server strips proxy: (any number of times)
    assert (
        c.raw_reply(
            b"request\x00lookup\x00table\x00proxy:proxy:"
            + t
            + b"\x00flags\x000\x00key\x00alice@example.com\x00\x00"
        )
        == b"status\x000\x00value\x00alice-value\x00\x00"
    )
    denied = b"texthash:/nonexistent/denied"
    assert (
        c.raw_reply(b"request\x00open\x00table\x00" + denied + b"\x00flags\x000\x00\x00")
        == b"status\x004\x00flags\x000\x00\x00"
    )
    assert (
        c.raw_reply(
            b"request\x00lookup\x00table\x00" + denied + b"\x00flags\x00524353\x00key\x00a\x00\x00"
        )
        == b"status\x004\x00value\x00\x00\x00"
    )
    assert (
        c.raw_reply(
            b"request\x00update\x00table\x00"
            + t
            + b"\x00flags\x00524353\x00key\x00x\x00value\x00y\x00\x00"
        )
        == b"status\x004\x00\x00"
    )
    missing = T(conf, "missing").encode()
    assert (
        c.raw_reply(b"request\x00open\x00table\x00" + missing + b"\x00flags\x000\x00\x00")
        == b"status\x000\x00flags\x0032\x00\x00"
    )  # Postfix's surrogate: OK with PATTERN
    assert (
        c.raw_reply(
            b"request\x00lookup\x00table\x00" + missing + b"\x00flags\x00524353\x00key\x00a\x00\x00"
        )
        == b"status\x002\x00value\x00\x00\x00"
    )
    assert (
        c.raw_reply(
            b"request\x00sequence\x00table\x00" + t + b"\x00flags\x000\x00function\x007\x00\x00"
        )
        == b"status\x003\x00key\x00\x00value\x00\x00\x00"
    )
    assert (
        c.raw_reply(b"request\x00frobnicate\x00table\x00" + t + b"\x00flags\x000\x00\x00")
        == b"status\x003\x00\x00"
    )
    assert (
        c.raw_reply(b"request\x00open\x00table\x00nocolon\x00flags\x000\x00\x00")
        == b"status\x003\x00flags\x000\x00\x00"
    )
    assert (
        c.raw_reply(b"request\x00open\x00table\x00\x00flags\x000\x00\x00")
        == b"status\x003\x00flags\x000\x00\x00"
    )
    # an extra attribute after the expected ones is tolerated, as by Postfix
    assert (
        c.raw_reply(lookup + b"alice@example.com\x00extra\x00x\x00\x00")
        == b"status\x000\x00value\x00alice-value\x00\x00"
    )
    c.close()


def test_fold_fix_folds_server_side(conf, server):
    c = Conn(server.socket())
    c.send(
        ("request", "lookup"),
        ("table", T(conf)),
        ("flags", LOOKUP_FLAGS),
        ("key", "ALICE@Example.COM"),
    )
    assert c.read() == [
        b"status",
        b"1",
        b"value",
        b"",
    ]  # the client folds; without FOLD_FIX we don't
    c.send(
        ("request", "lookup"),
        ("table", T(conf)),
        ("flags", LOOKUP_FLAGS | 0x4000),
        ("key", "ALICE@Example.COM"),
    )
    assert c.read() == [b"status", b"0", b"value", b"alice-value"]


def test_sequence_walks_the_table(conf, server):
    c = Conn(server.socket())
    seen, function = {}, 0
    while True:
        c.send(
            ("request", "sequence"), ("table", T(conf)), ("flags", 540673), ("function", function)
        )
        rec = c.read()
        if rec[1] != b"0":
            break
        assert rec[0::2] == [b"status", b"key", b"value"]
        seen[rec[3]] = rec[5]
        function = 1
    assert rec == [b"status", b"1", b"key", b"", b"value", b""]
    assert seen == {
        b"alice@example.com": b"alice-value",
        b"bob@example.com": b"bob value with  spaces",
    }


def test_postfix_3_11_dialect(conf, server):
    c = Conn(server.socket())
    c.send(("request", "open"), ("table", T(conf)), ("instance_flags", 0x84041))
    assert c.read() == [b"status", b"0", b"flags", str(0x84041 | 0x10).encode()]
    c.send(
        ("request", "lookup"),
        ("table", T(conf)),
        ("instance_flags", 0),
        ("flags", LOOKUP_FLAGS),
        ("key", "bob@example.com"),
    )
    assert c.read() == [b"status", b"0", b"flags", b"524353", b"value", b"bob value with  spaces"]
    c.send(
        ("request", "lookup"),
        ("table", T(conf)),
        ("instance_flags", 0),
        ("flags", LOOKUP_FLAGS),
        ("key", "nobody"),
    )
    assert c.read() == [b"status", b"1", b"flags", b"524353", b"value", b""]
    c.send(
        ("request", "update"),
        ("table", T(conf)),
        ("instance_flags", 0),
        ("flags", LOOKUP_FLAGS),
        ("key", "x"),
        ("value", "y"),
    )
    assert c.read() == [b"status", b"4", b"flags", b"0"]
    c.send(
        ("request", "sequence"),
        ("table", T(conf)),
        ("instance_flags", 0),
        ("flags", 540673),
        ("function", 0),
    )
    assert c.read()[:4] == [b"status", b"0", b"flags", b"540673"]
    # both dialects on one connection, each answered in its own
    c.send(
        ("request", "lookup"),
        ("table", T(conf)),
        ("flags", LOOKUP_FLAGS),
        ("key", "bob@example.com"),
    )
    assert c.read() == [b"status", b"0", b"value", b"bob value with  spaces"]


def test_pipelined_requests_are_all_answered_in_order(conf, server):
    c = Conn(server.socket())
    keys = ["alice@example.com", "nobody", "bob@example.com"] * 50
    wire = b"".join(
        encode([("request", "lookup"), ("table", T(conf)), ("flags", LOOKUP_FLAGS), ("key", k)])
        for k in keys
    )
    # a table not yet open in the middle: its reply must wait, later ones queue behind it
    wire += encode([("request", "lookup"), ("table", "static:hello"), ("flags", 0), ("key", "x")])
    wire += encode(
        [("request", "lookup"), ("table", T(conf)), ("flags", 0), ("key", "alice@example.com")]
    )
    c.sock.sendall(wire)
    got = [c.read()[1] for _ in range(len(keys) + 2)]
    assert got == [b"0", b"1", b"0"] * 50 + [b"0", b"0"]


def test_stalled_request_is_closed_at_the_deadline(conf, server):
    c = Conn(server.socket())
    req = encode(
        [
            ("request", "lookup"),
            ("table", T(conf)),
            ("flags", LOOKUP_FLAGS),
            ("key", "alice@example.com"),
        ]
    )
    c.sock.sendall(req[:20])
    start = time.monotonic()
    with pytest.raises((EOFError, ConnectionError)):
        c.read()
    assert 0.9 < time.monotonic() - start < 3
    assert "stalled" in server.log()


def test_idle_connection_between_requests_is_kept(conf, server):
    c = Conn(server.socket())
    time.sleep(1.5)  # longer than the request deadline, but no request has begun
    c.send(("request", "lookup"), ("table", T(conf)), ("flags", 0), ("key", "alice@example.com"))
    assert c.read()[3] == b"alice-value"


@pytest.mark.parametrize(
    "junk",
    [
        b"\xff" * 70000 + b"\0\0",
        b"request\0lookup\0table\0nocolon\0flags\x00524353\0key\0k\0\0",
        b"request\0lookup\0table\0texthash:/x\0flags\0x\0key\0k\0\0",
        b"request\0open\0table\0static:hello\0flags\0-1\0\0",
        b"key\0v\0\0",
        b"\0",
        b"request\0" + b"x" * 300000,
    ],
)
def test_garbage_gets_status_3_or_a_close_and_the_server_lives_on(conf, server, junk):
    c = Conn(server.socket())
    c.sock.sendall(junk)
    with contextlib.suppress(EOFError, ConnectionError):
        assert c.read()[:2] == [b"status", b"3"]
    c.close()
    d = Conn(server.socket())
    d.send(("request", "lookup"), ("table", T(conf)), ("flags", 0), ("key", "alice@example.com"))
    assert d.read()[3] == b"alice-value"


def test_many_concurrent_clients(conf, server):
    conns = [Conn(server.socket()) for _ in range(200)]
    for c in conns:
        c.send(
            ("request", "lookup"), ("table", T(conf)), ("flags", 0), ("key", "alice@example.com")
        )
    assert all(c.read()[3] == b"alice-value" for c in conns)
    for c in conns:
        c.close()


def test_changed_file_is_reloaded_without_dropping_the_connection(conf, server):
    path = conf / "changing"
    path.write_text("k old\n")
    c = Conn(server.socket())
    c.send(("request", "lookup"), ("table", T(conf, "changing")), ("flags", 0), ("key", "k"))
    assert c.read()[3] == b"old"
    tmp = conf / "changing.new"
    tmp.write_text("k new\n")
    os.rename(tmp, path)  # how postmap and editors replace a file
    deadline = time.monotonic() + 5
    value = b"old"
    while value == b"old" and time.monotonic() < deadline:
        time.sleep(0.1)
        c.send(("request", "lookup"), ("table", T(conf, "changing")), ("flags", 0), ("key", "k"))
        value = c.read()[3]
    assert value == b"new"


def test_table_that_appears_later_is_served_without_restart(conf, server):
    c = Conn(server.socket())
    c.send(("request", "lookup"), ("table", T(conf, "late")), ("flags", 0), ("key", "k"))
    assert c.read()[1] == b"2"
    (conf / "late").write_text("k v\n")
    deadline = time.monotonic() + 5
    status = b"2"
    while status == b"2" and time.monotonic() < deadline:
        time.sleep(0.2)
        c.send(("request", "lookup"), ("table", T(conf, "late")), ("flags", 0), ("key", "k"))
        status = c.read()[1]
    assert status == b"0"


def test_proxywrite_serves_only_proxy_write_maps(conf, server):
    c = Conn(server.socket("proxywrite"))
    c.send(("request", "lookup"), ("table", "static:hello"), ("flags", 0), ("key", "x"))
    assert c.read() == [b"status", b"4", b"value", b""]
    # texthash cannot be opened for writing: as with Postfix, the table is unavailable
    # (RETRY, logged once with Postfix's reason), and the server lives on
    c.send(("request", "update"), ("table", T(conf)), ("flags", 0), ("key", "x"), ("value", "y"))
    assert c.read() == [b"status", b"2"]
    c.send(("request", "lookup"), ("table", T(conf)), ("flags", 0), ("key", "alice@example.com"))
    assert c.read() == [b"status", b"2", b"value", b""]
    assert "map requires O_RDONLY access mode" in server.log()


def test_sigterm_stops_cleanly_and_removes_sockets(tmp_path):
    conf = write_confdir(tmp_path, "proxy_read_maps = proxy:static:x\n")
    srv = RunningServer(conf)
    c = Conn(srv.socket())
    assert srv.stop() == 0
    assert not srv.socket().exists()
    assert "stopped" in srv.log()
    c.close()


def test_refuses_to_steal_a_live_socket(conf, server):
    r = subprocess.run(
        [sys.executable, "-m", "pyproxymap.cli", "serve", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode != 0 and "already listening" in r.stderr
