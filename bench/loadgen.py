"""Closed-loop proxymap load generator and CPU meter (stdlib only).

One process per connection. Each reads the server's protocol announcement,
sends ``open`` like Postfix's dict_proxy client, does untimed warm-up lookups,
waits at a barrier, then loops "send one lookup, read the whole reply" (no
pipelining, as every Postfix client behaves) until a shared deadline. Every
reply is compared byte for byte with the expected ``value-<i>`` answer.
"""

from __future__ import annotations

import bisect
import functools
import multiprocessing as mp
import os
import queue
import random
import resource
import socket
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ANNOUNCE = b"protocol\0proxymap_protocol\0\0"
#: Lookup flags postmap -q sends with smtputf8_enable=yes: UTF8_REQUEST|LOCK|DUP_WARN.
LOOKUP_FLAGS = 524353
#: What verify(8) sends to proxywrite (open, lookup and update alike):
#: UTF8_REQUEST|OPEN_LOCK|SYNC_UPDATE|DUP_REPLACE|LOCK.
WRITE_FLAGS = 590272
KEY_FMT = "user{i}@example.com"
VALUE_FMT = "value-{i}"
IO_TIMEOUT = 30.0


# ---------------------------------------------------------------- wire
def encode(*pairs: tuple[str, str | int | bytes]) -> bytes:
    """Encode one attr_print0 record: ``name\\0value\\0`` pairs, then ``\\0``."""
    out = bytearray()
    for name, value in pairs:
        raw = value if isinstance(value, bytes) else str(value).encode()
        out += name.encode() + b"\0" + raw + b"\0"
    return bytes(out + b"\0")


def record_end(buf: bytes) -> int:
    """Index just past the first complete record in ``buf``, or -1."""
    pos = 0
    while True:
        nul = buf.find(b"\0", pos)
        if nul < 0:
            return -1
        if nul == pos:  # empty name: end of record
            return nul + 1
        nul2 = buf.find(b"\0", nul + 1)
        if nul2 < 0:
            return -1
        pos = nul2 + 1


def decode(rec: bytes) -> dict[bytes, bytes]:
    """Decode one complete record into a dict (debugging and guards only)."""
    parts = rec.split(b"\0")
    return {parts[i]: parts[i + 1] for i in range(0, len(parts) - 2, 2) if parts[i]}


def read_record(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read until one record is complete; return (record, leftover)."""
    while (end := record_end(buf)) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf[:end], buf[end:]


def connect(path: str, table: str, flags: int = 0) -> socket.socket:
    """Connect, check the announcement and send ``open`` as dict_proxy does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.connect(path)
    rec, rest = read_record(sock)
    if rec != ANNOUNCE or rest:
        raise ConnectionError(f"unexpected announcement {rec + rest!r}")
    sock.sendall(encode(("request", "open"), ("table", table), ("flags", flags)))
    rec, _ = read_record(sock)
    if decode(rec).get(b"status") != b"0":
        raise ConnectionError(f"open {table} failed: {rec!r}")
    return sock


def lookup(
    sock: socket.socket, table: str, key: str, flags: int = LOOKUP_FLAGS
) -> tuple[int, bytes]:
    """One lookup; returns (status, value)."""
    sock.sendall(encode(("request", "lookup"), ("table", table), ("flags", flags), ("key", key)))
    rec, _ = read_record(sock)
    d = decode(rec)
    return int(d.get(b"status", b"-1")), d.get(b"value", b"")


def check_answers(
    path: str, table: str, nkeys: int, open_flags: int = 0, flags: int = LOOKUP_FLAGS
) -> list[str]:
    """Correctness guard: a few hits must return ``value-<i>``, a miss NOKEY."""
    problems = []
    sock = connect(path, table, open_flags)
    try:
        for i in sorted({0, 1, nkeys // 2, nkeys - 1, *random.sample(range(nkeys), 8)}):
            got = lookup(sock, table, KEY_FMT.format(i=i), flags)
            want = (0, VALUE_FMT.format(i=i).encode())
            if got != want:
                problems.append(f"key {i}: got {got!r}, want {want!r}")
        got = lookup(sock, table, KEY_FMT.format(i=nkeys + 7), flags)
        if got[0] != 1:
            problems.append(f"missing key: got {got!r}, want status 1 (NOKEY)")
    finally:
        sock.close()
    return problems


# ---------------------------------------------------------------- worker
@dataclass(frozen=True)
class Load:
    """What each client connection does."""

    socket: str
    table: str
    nkeys: int
    warmup: int = 200
    seed: int = 1
    zipf_s: float = 0.0  # 0: uniform keys; else zipf with this exponent (key 0 most popular)
    #: ``lookup``, or ``update`` (writes ``value-<i>`` under key i, expects status 0).
    op: str = "lookup"
    open_flags: int = 0  # WRITE_FLAGS for proxywrite, as verify(8) opens its cache
    flags: int = LOOKUP_FLAGS  # of each lookup or update request


@functools.cache
def zipf_cdf(n: int, s: float) -> array:
    """Cumulative distribution of ranks 0..n-1 with weight 1/(rank+1)**s, last = 1.0."""
    cdf, total = array("d"), 0.0
    for k in range(1, n + 1):
        total += k**-s
        cdf.append(total)
    for k in range(n):
        cdf[k] /= total
    return cdf


def key_picker(load: Load, idx: int) -> Callable[[], int]:
    """Random key indices for connection ``idx``: uniform, or zipf via bisect on the CDF."""
    rng = random.Random(load.seed * 100_003 + idx)
    if not load.zipf_s:
        return functools.partial(rng.randrange, load.nkeys)
    cdf, rnd, last = zipf_cdf(load.nkeys, load.zipf_s), rng.random, load.nkeys - 1
    return lambda: min(bisect.bisect_right(cdf, rnd()), last)


def _worker(idx: int, load: Load, barrier: Any, deadline: Any, q: Any) -> None:
    """One client connection; puts a result dict on ``q``."""
    try:
        q.put(_run_worker(idx, load, barrier, deadline))
    except Exception as e:  # report, and never leave the others at the barrier
        barrier.abort()
        q.put({"error": f"conn {idx}: {e!r}"})


def _run_worker(idx: int, load: Load, barrier: Any, deadline: Any) -> dict[str, Any]:
    rand = key_picker(load, idx)
    sock = connect(load.socket, load.table, load.open_flags)
    for _ in range(load.warmup):
        i = rand()
        want = (0, VALUE_FMT.format(i=i).encode())
        if lookup(sock, load.table, KEY_FMT.format(i=i), load.flags) != want:
            raise RuntimeError(f"wrong answer for key {i} during warm-up")
    # The hot loop builds request and expected reply with %-formatting: cheap,
    # and no 100k-entry lists that 64 forked children would copy-on-write.
    # An update writes value-<i> again, so lookups stay checkable in any order.
    update = load.op == "update"
    req_head = (
        b"request\0%s\0table\0%s\0flags\0%d\0key\0"
        % (load.op.encode(), load.table.encode(), load.flags)
        + KEY_FMT.split("{i}")[0].encode()
    )
    req_fmt = req_head.replace(b"%", b"%%") + b"%d" + KEY_FMT.split("{i}")[1].encode() + b"\0"
    if update:
        req_fmt += b"value\0" + VALUE_FMT.split("{i}")[0].encode() + b"%d\0\0"
        rep_fmt = b"status\x000\x00\x00"
    else:
        req_fmt += b"\0"
        rep_fmt = b"status\x000\x00value\x00" + VALUE_FMT.split("{i}")[0].encode() + b"%d\0\0"
    nuls = rep_fmt.count(b"\0")  # every NUL of a good reply; fewer means read on
    send, recv, now = sock.sendall, sock.recv, time.monotonic
    lat = array("d")
    record = lat.append
    bad = 0
    barrier.wait()
    end = deadline.value
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        i = rand()
        t0 = now()
        send(req_fmt % (i, i) if update else req_fmt % i)
        buf = recv(4096)
        while buf.count(b"\0") < nuls and record_end(buf) < 0:
            chunk = recv(4096)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        if buf != (rep_fmt if update else rep_fmt % i):
            bad += 1
            while record_end(buf) < 0:
                chunk = recv(4096)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buf += chunk
        t1 = now()
        record(t1 - t0)
        if t1 >= end:
            break
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    sock.close()
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    return {"lat": lat.tobytes(), "bad": bad, "cpu": cpu}


# ---------------------------------------------------------------- CPU
@dataclass
class ProcInfo:
    """The /proc/<pid>/stat fields we use (times in seconds)."""

    pid: int
    ppid: int
    comm: str
    cpu: float  # utime + stime
    child_cpu: float  # cutime + cstime (reaped children)


_TICK = os.sysconf("SC_CLK_TCK")


def scan_procs() -> dict[int, ProcInfo]:
    """All processes on the machine, by pid."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        head, _, tail = raw.rpartition(b")")
        f_ = tail.split()
        pid = int(name)
        procs[pid] = ProcInfo(
            pid,
            int(f_[1]),
            head.partition(b"(")[2].decode(errors="replace"),
            (int(f_[11]) + int(f_[12])) / _TICK,
            (int(f_[13]) + int(f_[14])) / _TICK,
        )
    return procs


#: Picks a server's root pid and member pids out of a process snapshot.
Selector = Callable[[dict[int, ProcInfo]], tuple[int, set[int]]]


def descendants(root: int) -> Selector:
    """Selector for ``root`` and its whole process tree (our server)."""

    def select(procs: dict[int, ProcInfo]) -> tuple[int, set[int]]:
        members, frontier = {root}, [root]
        kids: dict[int, list[int]] = {}
        for p in procs.values():
            kids.setdefault(p.ppid, []).append(p.pid)
        while frontier:
            for k in kids.get(frontier.pop(), ()):
                members.add(k)
                frontier.append(k)
        return root, members & procs.keys()

    return select


def master_and(master: int, comm: str = "proxymap") -> Selector:
    """Selector for a Postfix master plus its children named ``comm``."""

    def select(procs: dict[int, ProcInfo]) -> tuple[int, set[int]]:
        kids = {p.pid for p in procs.values() if p.ppid == master and p.comm == comm}
        return master, ({master} | kids) & procs.keys()

    return select


def backends_of(role: str) -> Selector:
    """Selector for PostgreSQL's backend processes of database role ``role`` (their
    title: ``postgres: CLUSTER: ROLE DB HOST ...``). A backend that exits counts up to
    its last sample (the postmaster reaps every role's backends, so its child time
    cannot tell them apart)."""
    marker = f" {role} ".encode()

    def select(procs: dict[int, ProcInfo]) -> tuple[int, set[int]]:
        members = set()
        for p in procs.values():
            if p.comm != "postgres":
                continue
            try:
                with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if marker in title:
                members.add(p.pid)
        return 0, members

    return select


@dataclass
class CpuMeter:
    """CPU seconds of a changing set of server processes over a window.

    New pids count from 0. A member that exits and is reaped by the root shows
    up in the root's cutime/cstime; we count that and drop its last sample, so
    it is counted once.
    """

    select: Selector
    base: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    info: dict[int, ProcInfo] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)
    root: int = 0
    root_child0: float = 0.0
    root_child1: float = 0.0

    def _sample(self) -> None:
        procs = scan_procs()
        self.root, self.alive = self.select(procs)
        for pid in self.alive:
            self.last[pid] = procs[pid].cpu
            self.info[pid] = procs[pid]
        if self.root in procs:
            self.root_child1 = procs[self.root].child_cpu

    def begin(self) -> None:
        self._sample()
        self.base = dict(self.last)
        self.root_child0 = self.root_child1

    def poll(self) -> None:
        self._sample()

    def end(self) -> tuple[dict[str, float], int]:
        """Return (CPU seconds by process name, number of server processes seen)."""
        self._sample()
        by_comm: dict[str, float] = {}
        for pid, v in self.last.items():
            comm = self.info[pid].comm
            by_comm[comm] = by_comm.get(comm, 0.0) + v - self.base.get(pid, 0.0)
        gone = [p for p in self.last if p not in self.alive and self.info[p].ppid == self.root]
        reaped = self.root_child1 - self.root_child0 - sum(self.last[p] for p in gone)
        if reaped:
            by_comm["(exited)"] = reaped
        return by_comm, len(self.last)


def box_cpu() -> tuple[int, int]:
    """(total, idle) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals), vals[3] + vals[4]


# ---------------------------------------------------------------- one row
def _pct(sorted_vals: array, p: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, round(p / 100 * (len(sorted_vals) - 1)))]


def run_row(
    load: Load, conns: int, duration: float, meter: CpuMeter, db: CpuMeter | None = None
) -> dict[str, Any]:
    """Run ``conns`` client processes for ``duration`` s; return one result row. ``db``
    also measures the database processes the server queries."""
    meters = [meter] if db is None else [meter, db]
    if load.zipf_s:
        zipf_cdf(load.nkeys, load.zipf_s)  # once, before forking: children share it
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    deadline = ctx.RawValue("d", 0.0)

    def start_clock() -> None:  # run by whichever party reaches the barrier last
        deadline.value = time.monotonic() + duration

    barrier = ctx.Barrier(conns + 1, action=start_clock)
    procs = [
        ctx.Process(target=_worker, args=(i, load, barrier, deadline, q), daemon=True)
        for i in range(conns)
    ]
    for p in procs:
        p.start()
    errors: list[str] = []
    try:
        barrier.wait(timeout=60 + load.warmup * conns / 500)
    except threading.BrokenBarrierError:
        errors.append("start barrier broken (a client failed before timing)")
    if not errors:
        for m in meters:
            m.begin()
        box0 = box_cpu()
        t0 = time.monotonic()
        # Stop sampling a little before the clients do: at disconnect, Postfix
        # processes that reached max_use exit and take their counters along.
        t_stop = deadline.value - min(0.5, 0.1 * duration)
        while (left := t_stop - time.monotonic()) > 0:
            time.sleep(min(0.25, left))
            for m in meters:
                m.poll()
        by_comm, nproc = meter.end()
        db_cpu = sum(db.end()[0].values()) if db is not None else float("nan")
        window = time.monotonic() - t0
        box1 = box_cpu()
    results = []
    for _ in procs:
        try:
            results.append(q.get(timeout=duration + 120))
        except queue.Empty:
            results.append({"error": "a client process vanished without a result"})
            break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    errors += [r["error"] for r in results if "error" in r]
    if errors:
        return {"conns": conns, "errors": errors}
    lat = array("d")
    for r in results:
        lat.frombytes(r["lat"])
    lat = array("d", sorted(lat))
    busy = 1 - (box1[1] - box0[1]) / max(1, box1[0] - box0[0])
    rate = len(lat) / duration
    srv_cores = sum(by_comm.values()) / window
    return {
        "conns": conns,
        "duration_s": duration,
        "lookups": len(lat),
        "lookups_per_s": rate,
        "p50_us": _pct(lat, 50) * 1e6,
        "p99_us": _pct(lat, 99) * 1e6,
        "p999_us": _pct(lat, 99.9) * 1e6,
        "max_us": lat[-1] * 1e6 if lat else float("nan"),
        "server_cpu_cores": srv_cores,
        "server_cpu_us_per_lookup": srv_cores / rate * 1e6 if rate else float("nan"),
        "server_cpu_cores_by_comm": {k: v / window for k, v in sorted(by_comm.items())},
        "server_procs": nproc,
        "db_cpu_us_per_lookup": db_cpu / window / rate * 1e6 if rate else float("nan"),
        "client_cpu_cores": sum(r["cpu"] for r in results) / duration,
        "box_busy_pct": busy * 100,
        "bad_replies": sum(r["bad"] for r in results),
        "errors": [],
    }
