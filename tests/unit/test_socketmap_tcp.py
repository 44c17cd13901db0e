"""socketmap and tcp tables: codecs, tables against real servers, answers compared with postmap.

The servers are small Python socketmap and tcp_table servers on their own event
loop in a thread, so that a blocking postmap can talk to them too. What each
answers depends on the key (see ``SOCKETMAP_REPLIES`` and ``TCP_REPLIES``);
any other key is found, and its value names the server, map and key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyproxymap.tables import socketmap, tcp
from pyproxymap.tables.base import (
    OpenContext,
    Table,
    TableConfigError,
    TableError,
    TableRetry,
    ascii_fold,
    utf8_fold,
)
from pyproxymap.tables.netclient import (
    MAX_CONNECTIONS,
    ConnectError,
    Pool,
    inet_endpoint,
    service_endpoint,
)
from pyproxymap.tables.registry import driver_for
from pyproxymap.wire import tcptable
from pyproxymap.wire.proxymap import PATTERN
from pyproxymap.wire.socketmap import Decoder, Fault, NetstringError, encode
from tests.unit.test_texthash import Postfix, as_postmap_prints
from tests.unit.test_texthash import postfix as postfix  # fixture

# --- netstring codec -----------------------------------------------------------------------

payloads = st.lists(st.binary(max_size=300), max_size=8)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


@given(payloads, st.lists(st.integers(min_value=0, max_value=3000), max_size=10))
def test_netstring_round_trip_in_any_pieces(items: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode(p) for p in items)
    decoder = Decoder(300)
    out = [p for piece in split_at(stream, cuts) for p in decoder.feed(piece)]
    assert out == items
    assert not decoder.pending


@given(st.binary(min_size=2, max_size=50))
def test_netstring_decoder_never_accepts_more_than_its_limit(payload: bytes) -> None:
    with pytest.raises(NetstringError) as info:
        Decoder(len(payload) - 1).feed(encode(payload))
    assert info.value.fault is Fault.SIZE


def fault_of(*pieces: bytes, eof: bool = False, limit: int = 100) -> Fault:
    decoder = Decoder(limit)
    with pytest.raises(NetstringError) as info:
        for piece in pieces:
            decoder.feed(piece)
        if eof:
            decoder.feed_eof()
    return info.value.fault


def test_netstring_errors_as_postfix_classifies_them() -> None:
    assert encode(b"") == b"0:,"
    assert Decoder(10).feed(b":,007:abcdefg,") == [b"", b"abcdefg"]  # empty length is 0
    assert fault_of(b"1x") is Fault.FORMAT
    assert fault_of(b"-1:") is Fault.FORMAT
    assert fault_of(b"2:abc") is Fault.FORMAT  # no comma after the payload
    assert fault_of(b"101:") is Fault.SIZE  # checked when the length is complete
    assert fault_of(b"9" * 20) is Fault.SIZE  # beyond SSIZE_T_MAX
    assert fault_of(b"99999", b"x") is Fault.FORMAT  # a bad length is a format error first
    assert fault_of(b"", eof=True) is Fault.EOF
    assert fault_of(b"12", eof=True) is Fault.EOF
    assert fault_of(b"3:ab", eof=True) is Fault.EOF
    assert fault_of(b"3:abc", eof=True) is Fault.FORMAT  # getc() != ',' at end of file
    assert str(NetstringError(Fault.TIME)) == "time limit exceeded"
    assert str(NetstringError(Fault.EOF)) == "unexpected disconnect"


# --- tcp_table codec -----------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_tcp_quote_round_trip(raw: bytes) -> None:
    quoted = tcptable.quote(raw)
    assert all(0x21 <= c <= 0x7E for c in quoted)
    assert tcptable.unquote(quoted) == raw
    lower = re.sub(rb"%[0-9A-F]{2}", lambda m: m[0].lower(), quoted)
    assert tcptable.unquote(lower) == raw  # either case of hex digit
    assert tcptable.decode_request(tcptable.encode_request(raw)[:-1]) == raw


def test_tcp_quoting_as_hex_quote() -> None:
    assert tcptable.quote(b"a b%c\t\x7f\xc3\xbc~") == b"a%20b%25c%09%7F%C3%BC~"
    assert tcptable.unquote(b"%4a%4A+") == b"JJ+"
    for bad in (b"%", b"%4", b"%4g", b"%g4", b"a%"):
        assert tcptable.unquote(bad) is None
    assert tcptable.encode_reply(200, b"x y") == b"200 x%20y\n"


def test_tcp_reply_syntax() -> None:
    parse = tcptable.parse_reply
    assert parse(b"200 a%20b") == tcptable.Reply(200, b"a b")
    assert parse(b"500\tnot%20found") == tcptable.Reply(500, b"not found")
    assert parse(b"299 ") == tcptable.Reply(299, b"")
    assert parse(b"200 a\0%zz") == tcptable.Reply(200, b"a")  # a C string ends at NUL
    for bad in (b"200", b"20 x", b"2x0 x", b"200x", b"200 %zz", b""):
        with pytest.raises(tcptable.ReplyError, match=r"^malformed reply$"):
            parse(bad)


def test_tcp_line_reader_bound_and_eof() -> None:
    reader = tcptable.LineReader(8)
    assert reader.feed(b"1234") is None
    assert reader.feed(b"567\nrest") == b"1234567"  # 8 bytes with the newline: fits
    assert reader.rest == b"rest"
    with pytest.raises(tcptable.ReplyError, match=r"^text longer than 8$"):
        tcptable.LineReader(8).feed(b"12345678\n")
    with pytest.raises(tcptable.ReplyError, match=r"^unexpected EOF \(why\)$"):
        tcptable.LineReader(8).feed_eof("why")
    partial = tcptable.LineReader(8)
    partial.feed(b"12")
    with pytest.raises(tcptable.ReplyError, match=r"^text longer than 8$"):  # as Postfix
        partial.feed_eof("why")


# --- endpoints -----------------------------------------------------------------------------


def test_endpoint_syntax_as_postfix() -> None:
    e = inet_endpoint("127.0.0.1:25")
    assert (e.host, e.port, str(e)) == ("127.0.0.1", "25", "127.0.0.1:25")
    assert (inet_endpoint(":25").host, inet_endpoint("25").host) == ("localhost", "localhost")
    assert inet_endpoint("[::1]:25").host == "::1"
    assert inet_endpoint("[ipv6:::1]:smtp").port == "smtp"
    assert service_endpoint("unix:/run/x.sock").path == "/run/x.sock"
    assert service_endpoint("local:/run/x.sock").path == "/run/x.sock"
    for bad, message in [
        ("host:", "host:: missing service information"),
        ("[::1:25", '[::1:25: missing "]"'),
        ("[::1]x", '[::1]x: garbage after "]"'),
        ("[ipv6:1.2.3.4]:25", "[ipv6:1.2.3.4]:25: malformed IPv6 address"),
        ("bad host:25", "bad host:25: valid hostname or network address required"),
        ("-x:25", "-x:25: valid hostname or network address required"),
        ("1.2.3:25", "1.2.3:25: valid hostname or network address required"),
        ("h:25x", "h:25x: garbage after numerical service"),
    ]:
        with pytest.raises(ValueError) as info:
            inet_endpoint(bad)
        assert str(info.value) == message
    for bad, message in [
        ("inet", 'need service transport:endpoint instead of "inet"'),
        ("inet:", 'need service transport:endpoint instead of "inet:"'),
        ("tcp:h:1", "invalid transport name: tcp in service: tcp:h:1"),
        ("unix:/" + "x" * 200, "unix-domain name too long: /" + "x" * 200),
    ]:
        with pytest.raises(ValueError) as info:
            service_endpoint(bad)
        assert str(info.value) == message


# --- test servers --------------------------------------------------------------------------

#: The socketmap server's reply (a netstring payload) by key.
SOCKETMAP_REPLIES: dict[bytes, bytes] = {
    b"miss": b"NOTFOUND ",
    b"miss with space": b"NOTFOUND",
    b"temp": b"TEMP \t server busy\x01",
    b"timeout": b"TIMEOUT ",
    b"perm": "PERM nicht gefunden: übel".encode(),
    b"what": b"WHAT is this",
    b"empty-ok": b"OK ",
    b"ok-bare": b"OK",  # found, empty as in the current source (3.7: not found)
    b"spaced": b"OK  two  spaces ",
    b"nul": b"OK a\0b",
    b"non-utf8": b"OK \xff",
    b"long-reason": b"TEMP " + b"r" * 300,
}
#: Keys the socketmap server answers with broken framing.
SOCKETMAP_RAW: dict[bytes, bytes] = {
    b"garbage": b"garbage",
    b"nocomma": b"2:OKx",
    b"big": b"100001:",
    b"close": b"10:OK ab",  # then it closes the connection mid-reply
}
TCP_REPLIES: dict[bytes, bytes] = {
    b"miss": b"500 not%20found\n",
    b"soft": b"400 try%20later\n",
    b"moved": b"300 moved\n",
    b"malformed": b"20 x\n",
    b"badhex": b"200 a%zz\n",
    b"unsafe": b"600 \x01\x02?\xc3\xbc\n",
    b"crlf": b"200 a%20b\r\n",
    b"nul": b"200 a\0b\n",
    b"escaped-nul": b"200 a%00b\n",
    b"long": b"200 " + b"x" * 5000 + b"\n",
}


class Backends:
    """A socketmap server (TCP and UNIX-domain) and a tcp_table server, in a thread.

    ``requests`` counts what they were asked; ``max_active`` is the most
    connections that were open at the same time.
    """

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.requests: Counter[bytes] = Counter()
        self.raw_requests: list[bytes] = []
        self.active = self.max_active = self.accepted = 0
        self.slow = 1.0
        self.unix_path = str(tmp / "socketmap.sock")
        servers = [
            asyncio.start_server(self._socketmap, "127.0.0.1", 0),
            asyncio.start_unix_server(self._socketmap, self.unix_path),
            asyncio.start_server(self._tcp, "127.0.0.1", 0),
        ]
        self.servers = [self.call(s) for s in servers]
        self.socketmap_port = self.servers[0].sockets[0].getsockname()[1]
        self.tcp_port = self.servers[2].sockets[0].getsockname()[1]

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def reset(self) -> None:
        self.requests.clear()
        self.raw_requests.clear()
        self.active = self.max_active = self.accepted = 0

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()

        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _serve(
        self, writer: asyncio.StreamWriter, body: Callable[[], Awaitable[None]]
    ) -> None:
        self.accepted += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await body()
        except (ConnectionError, NetstringError):
            pass
        finally:
            self.active -= 1
            writer.close()

    async def _socketmap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body() -> None:
            decoder = Decoder(1 << 20)
            while data := await reader.read(1 << 16):
                for request in decoder.feed(data):
                    self.raw_requests.append(request)
                    name, _, key = request.partition(b" ")
                    self.requests[key] += 1
                    if key in SOCKETMAP_RAW:
                        writer.write(SOCKETMAP_RAW[key])
                        await writer.drain()
                        return
                    if key == b"slow":
                        await asyncio.sleep(self.slow)
                    if key == b"drop-first" and self.requests[key] == 1:
                        return
                    reply = SOCKETMAP_REPLIES.get(key, b"OK socketmap " + name + b"=" + key)
                    # "extra": an unasked reply in the same write, so that it is
                    # there when the client reads its answer (not a race)
                    unasked = encode(b"OK unasked") if key == b"extra" else b""
                    writer.write(encode(reply) + unasked)

        await self._serve(writer, body)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body() -> None:
            while line := await reader.readline():
                self.raw_requests.append(line)
                key = tcptable.decode_request(line.removesuffix(b"\n")) or b""
                self.requests[key] += 1
                if key == b"close":
                    return
                if key == b"slow":
                    await asyncio.sleep(self.slow)
                reply = TCP_REPLIES.get(key) or tcptable.encode_reply(200, b"tcp " + key)
                writer.write(reply)

        await self._serve(writer, body)


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    servers = Backends(tmp_path_factory.mktemp("backends"))
    yield servers
    servers.stop()


@pytest.fixture
def fresh(backends: Backends) -> Backends:
    backends.reset()
    return backends


def spec_of(backends: Backends, kind: str) -> str:
    return {
        "socketmap": f"socketmap:inet:127.0.0.1:{backends.socketmap_port}:mymap",
        "unix": f"socketmap:unix:{backends.unix_path}:mymap",
        "tcp": f"tcp:127.0.0.1:{backends.tcp_port}",
    }[kind]


def open_table(spec: str, fold: Callable[[bytes], bytes] = utf8_fold, **kw: Any) -> Table:
    type_, _, name = spec.partition(":")
    driver = driver_for(type_)
    assert driver is not None
    return driver.open(OpenContext(type_, name, fold=fold, **kw))


Outcome = bytes | None | TableError


async def outcome(table: Table, key: bytes) -> Outcome:
    try:
        result = table.lookup(key, 0)
        return await result if isinstance(result, Awaitable) else result
    except TableError as e:
        return e


def lookups(spec: str, keys: list[bytes], fold: Callable[[bytes], bytes] = utf8_fold) -> list:
    """Each key's answer (value, None or the TableError), looked up in turn on one table."""

    async def run() -> list[Outcome]:
        table = open_table(spec, fold)
        try:
            return [await outcome(table, key) for key in keys]
        finally:
            table.close()

    return asyncio.run(run())


def lookup(spec: str, key: bytes) -> Outcome:
    return lookups(spec, [key])[0]


# --- socketmap table -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["socketmap", "unix"])
def test_socketmap_answers(fresh: Backends, kind: str) -> None:
    spec = spec_of(fresh, kind)
    keys = [b"alice", b"with space", b"per%cent", "utf8-ключ".encode(), b"miss", b"empty-ok"]
    keys += [b"spaced", b"nul", b"ok-bare"]
    assert lookups(spec, keys) == [
        b"socketmap mymap=alice",
        b"socketmap mymap=with space",
        b"socketmap mymap=per%cent",
        "socketmap mymap=utf8-ключ".encode(),
        None,
        b"",
        b" two  spaces ",  # everything after the first space
        b"a",  # a C string
        b"",
    ]
    assert fresh.raw_requests[:2] == [b"mymap alice", b"mymap with space"]
    assert fresh.accepted == 1  # one connection, reused


def test_socketmap_failures_with_postfix_warnings(fresh: Backends) -> None:
    spec = spec_of(fresh, "socketmap")
    keys = [b"temp", b"timeout", b"perm", b"what", b"garbage", b"nocomma", b"big", b"close"]
    got = lookups(spec, keys)
    expected = [
        (TableRetry, f"{spec} socketmap server temporary error: server busy?"),
        (TableRetry, f"{spec} socketmap server timeout error"),
        (TableConfigError, f"{spec} socketmap server permanent error: nicht gefunden: übel"),
        (TableRetry, f"{spec} socketmap server unknown error: is this"),
        (TableRetry, f"table {spec} lookup error: input format error"),
        (TableRetry, f"table {spec} lookup error: input format error"),
        (TableRetry, f"table {spec} lookup error: input exceeds size limit"),
        (TableRetry, f"table {spec} lookup error: unexpected disconnect"),
    ]
    assert [(type(e), str(e)) for e in got] == expected
    assert fresh.requests[b"close"] == 2  # a broken connection is retried once
    assert fresh.requests[b"garbage"] == 1  # other errors are not


def test_socketmap_reason_is_cut_at_200_and_made_printable_as_postfix_does(
    fresh: Backends,
) -> None:
    spec = spec_of(fresh, "socketmap")
    assert str(lookup(spec, b"long-reason")).endswith("error: " + "r" * 200)
    ascii_only = lookups(spec, [b"perm"], fold=ascii_fold)[0]
    assert str(ascii_only).endswith("error: nicht gefunden: ??bel")


def test_socketmap_dropped_connection_is_retried_transparently(fresh: Backends) -> None:
    assert lookup(spec_of(fresh, "socketmap"), b"drop-first") == b"socketmap mymap=drop-first"
    assert fresh.requests[b"drop-first"] == 2


def test_socketmap_query_too_large_is_not_found(
    fresh: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_of(fresh, "socketmap")
    assert lookup(spec, b"k" * 10000) == b"socketmap mymap=" + b"k" * 10000
    assert lookup(spec, b"k" * 10001) is None
    assert f"table {spec} query too large: '{'k' * 100}', returning 'not found'" in caplog.messages
    assert sum(fresh.requests.values()) == 1


def test_socketmap_utf8_checks(fresh: Backends, caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_of(fresh, "socketmap")
    assert lookup(spec, b"bad-\xff") is None  # never sent
    assert fresh.requests[b"bad-\xff"] == 0
    err = lookup(spec, b"non-utf8")
    assert isinstance(err, TableConfigError)
    assert lookups(spec, [b"bad-\xff", b"non-utf8"], fold=ascii_fold) == [
        b"socketmap mymap=bad-\xff",
        b"\xff",
    ]


def test_socketmap_extra_reply_data_closes_the_connection(fresh: Backends) -> None:
    assert lookups(spec_of(fresh, "socketmap"), [b"extra", b"alice"]) == [
        b"socketmap mymap=extra",
        b"socketmap mymap=alice",
    ]
    assert fresh.accepted == 2


def test_socketmap_open(backends: Backends) -> None:
    table = open_table(spec_of(backends, "socketmap"))
    assert table.flags == PATTERN
    table.close()
    for name, message in [
        ("nocolon", "socketmap requires server:socketmap argument"),
        ("inet:", 'need service transport:endpoint instead of "inet"'),
        ("foo:bar:map", "invalid transport name: foo in service: foo:bar"),
        ("inet:h:25x:map", "h:25x: garbage after numerical service"),
    ]:
        with pytest.raises(TableConfigError) as info:
            open_table(f"socketmap:{name}")
        assert str(info.value) == message
    with pytest.raises(TableConfigError, match=r"^socketmap:unix:/x:m map requires O_RDONLY"):
        open_table("socketmap:unix:/x:m", writable=True)


def test_socketmap_server_down_is_retry_with_endpoint_and_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    err = lookup("socketmap:inet:127.0.0.1:1:m", b"k")
    assert isinstance(err, TableRetry)
    assert str(err) == "table socketmap:inet:127.0.0.1:1:m lookup error: Connection refused"
    assert "connect to 127.0.0.1:1: Connection refused" in caplog.messages
    err = lookup(f"socketmap:unix:{tmp_path}/none:m", b"k")
    assert (
        str(err)
        == f"table socketmap:unix:{tmp_path}/none:m lookup error: No such file or directory"
    )


def test_socketmap_slow_server_times_out_and_blocks_nothing_else(
    fresh: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socketmap, "TIMEOUT", 0.3)
    fresh.slow = 1.0

    async def run() -> tuple[Outcome, list[Outcome], float]:
        slow_table = open_table(spec_of(fresh, "socketmap"))
        other = open_table(spec_of(fresh, "tcp"))
        try:
            started = time.monotonic()
            slow = asyncio.ensure_future(outcome(slow_table, b"slow"))
            quick = [await outcome(other, b"a"), await outcome(slow_table, b"b")]
            elapsed = time.monotonic() - started
            return await slow, quick, elapsed
        finally:
            slow_table.close()
            other.close()

    slow, quick, elapsed = asyncio.run(run())
    assert isinstance(slow, TableRetry)
    assert str(slow).endswith("lookup error: time limit exceeded")
    assert quick == [b"tcp a", b"socketmap mymap=b"]
    assert elapsed < 0.25  # neither waited for the slow lookup


def test_many_concurrent_lookups_share_a_few_connections(fresh: Backends) -> None:
    fresh.slow = 0.02

    async def run() -> list[Outcome]:
        tables = [open_table(spec_of(fresh, "socketmap")) for _ in range(3)]  # one pool
        try:
            keys = [b"slow" if i % 2 else b"k%d" % i for i in range(60)]
            return await asyncio.gather(*(outcome(tables[i % 3], k) for i, k in enumerate(keys)))
        finally:
            for table in tables:
                table.close()

    answers = asyncio.run(run())
    assert answers[:2] == [b"socketmap mymap=k0", b"socketmap mymap=slow"]
    assert all(isinstance(a, bytes) for a in answers)
    assert fresh.max_active <= MAX_CONNECTIONS
    assert fresh.accepted <= MAX_CONNECTIONS


# --- the pool ------------------------------------------------------------------------------


def test_pool_waits_then_times_out_and_closes_idle_and_old_connections(fresh: Backends) -> None:
    endpoint = inet_endpoint(f"127.0.0.1:{fresh.tcp_port}")
    log = logging.getLogger("test")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        pool = Pool(endpoint, size=1, max_idle=0.1, max_ttl=0.3)
        async with pool.connection(loop.time() + 1, log) as link:
            with pytest.raises(ConnectError, match=r"^Connection timed out$"):
                async with pool.connection(loop.time() + 0.05, log):
                    pass  # the only connection is busy: this waits, then gives up
        assert pool.open_connections == 1  # idle now
        await asyncio.sleep(0.2)
        assert (pool.open_connections, link.usable(loop.time(), 100)) == (0, False)
        async with pool.connection(loop.time() + 1, log) as link:
            await asyncio.sleep(0.35)  # older than max_ttl when it is given back
        assert (pool.open_connections, link.usable(loop.time(), 100)) == (0, False)
        pool.close()

    asyncio.run(run())


def test_tables_work_on_uvloop(fresh: Backends) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def run() -> list[Outcome]:
        tables = [open_table(spec_of(fresh, kind)) for kind in ("socketmap", "tcp")]
        try:
            return [await outcome(table, key) for table in tables for key in (b"a", b"miss")]
        finally:
            for table in tables:
                table.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(run()) == [b"socketmap mymap=a", None, b"tcp a", None]


# --- tcp table -----------------------------------------------------------------------------


def test_tcp_answers(fresh: Backends) -> None:
    keys = [b"alice", b"with space", b"per%cent", "utf8-ключ".encode(), b"miss"]
    keys += [b"crlf", b"nul", b"escaped-nul"]
    assert lookups(spec_of(fresh, "tcp"), keys) == [
        b"tcp alice",
        b"tcp with space",
        b"tcp per%cent",
        "tcp utf8-ключ".encode(),
        None,
        b"a b\r",
        b"a",
        b"a",
    ]
    assert fresh.raw_requests[:4] == [
        b"get alice\n",
        b"get with%20space\n",
        b"get per%25cent\n",
        b"get utf8-%D0%BA%D0%BB%D1%8E%D1%87\n",
    ]
    assert fresh.accepted == 1


def test_tcp_failures_with_postfix_warnings(fresh: Backends) -> None:
    spec = spec_of(fresh, "tcp")
    at = f"read TCP map reply from 127.0.0.1:{fresh.tcp_port}"
    got = lookups(spec, [b"soft", b"moved", b"malformed", b"badhex", b"unsafe"])
    assert [str(e) for e in got] == [
        f"{at}: soft error: 400 try%20later",
        f"{at}: bad status code: 300 moved",
        f"{at}: malformed reply: 20 x",
        f"{at}: malformed reply: 200 a%zz",
        f"{at}: bad status code: 600 __?ü",
    ]
    assert all(isinstance(e, TableRetry) for e in got)
    assert fresh.accepted == 5  # Postfix disconnects after each of these


def test_tcp_retries_ten_times_one_interval_apart(
    fresh: Backends, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tcp, "RETRY_DELAY", 0.01)
    spec = spec_of(fresh, "tcp")
    at = f"read TCP map reply from 127.0.0.1:{fresh.tcp_port}"
    got = lookups(spec, [b"close", b"long"])
    assert [str(e) for e in got] == [
        f"table {spec} lookup error: {at}: unexpected EOF (connection closed)",
        f"table {spec} lookup error: {at}: text longer than 4096",
    ]
    assert (fresh.requests[b"close"], fresh.requests[b"long"]) == (10, 10)
    assert caplog.messages.count(f"{at}: text longer than 4096") == 9
    down = lookup("tcp:127.0.0.1:1", b"k")
    assert str(down) == (
        "table tcp:127.0.0.1:1 lookup error: connect to TCP map 127.0.0.1:1: Connection refused"
    )


def test_tcp_timeout(fresh: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(tcp, "MAX_TRIES", 2)
    monkeypatch.setattr(tcp, "TIMEOUT", 0.1)
    fresh.slow = 0.5
    err = lookup(spec_of(fresh, "tcp"), b"slow")
    assert str(err).endswith("unexpected EOF (Connection timed out)")


def test_tcp_open(backends: Backends) -> None:
    table = open_table(spec_of(backends, "tcp"))
    assert table.flags == PATTERN
    table.close()
    with pytest.raises(TableConfigError, match=r"^tcp:h:1 map requires O_RDONLY access mode$"):
        open_table("tcp:h:1", writable=True)
    with pytest.raises(TableConfigError, match=r"^inet:h:1: valid hostname"):
        open_table("tcp:inet:h:1")


# --- real postmap --------------------------------------------------------------------------

KEYS = [b"alice", b"Mixed Case", b"with space", b"per%cent", "utf8-ключ".encode(), b"bad-\xff"]
KEYS += [b"miss", b"miss with space", b"nul", b"spaced", b"empty-ok"]
SOCKETMAP_ERRORS = [b"temp", b"timeout", b"perm", b"what", b"garbage", b"nocomma", b"big"]
SOCKETMAP_ERRORS += [b"close", b"non-utf8", b"long-reason"]
TCP_KEYS = [b"crlf", b"escaped-nul", b"soft", b"moved", b"malformed", b"badhex", b"unsafe"]


def same_as_postmap(postfix: Postfix, spec: str, keys: list[bytes]) -> None:
    """Ours and postmap's: stdout and exit code; and our error is postmap's warning."""
    ours = lookups(spec, keys, postfix.fold)
    theirs = postfix.run_all([("-q", key, spec) for key in keys])
    for key, mine, answer in zip(keys, ours, theirs, strict=True):
        if isinstance(mine, TableError):
            assert (answer.rc, answer.stdout) == (1, b""), key
            if "soft error" not in str(mine):  # Postfix logs that only when verbose
                assert str(mine) in answer.warnings, key
        else:
            assert (answer.rc, answer.stdout) == as_postmap_prints(mine), key


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["socketmap", "unix"])
def test_socketmap_same_as_postmap(backends: Backends, postfix: Postfix, kind: str) -> None:
    same_as_postmap(postfix, spec_of(backends, kind), KEYS + SOCKETMAP_ERRORS)


@pytest.mark.interop
def test_tcp_same_as_postmap(backends: Backends, postfix: Postfix) -> None:
    same_as_postmap(postfix, spec_of(backends, "tcp"), KEYS + TCP_KEYS)


@pytest.mark.interop
def test_we_send_what_postfix_sends(fresh: Backends, postfix: Postfix) -> None:
    keys = [b"a b%c", "ü\t!".encode()]
    for kind in ("socketmap", "tcp"):
        fresh.reset()
        lookups(spec_of(fresh, kind), keys)
        ours = list(fresh.raw_requests)
        fresh.reset()
        for key in keys:
            postfix.run("-q", key, spec_of(fresh, kind))
        assert fresh.raw_requests == ours
