"""pgsql tables: pyproxymap (cache off / on) vs Postfix proxy:pgsql, and slow-backend isolation.

Usage (as root, from the repository):  .venv/bin/python bench/pgsql.py [--conns 16,64]

Creates (once) a PostgreSQL database with a 100k-row table ``t(k, v)``
(``user<i>@example.com`` -> ``value-<i>``) and pgsql_table(5) files for it,
then runs the client of loadgen.py with zipf-distributed keys against three
servers that query the same table: ours without cache, ours with the result
cache, and a throwaway Postfix proxymap. Each server logs in as its own
database role, so a poller (every 50 ms) can count each one's connections in
pg_stat_activity. Then, the isolation part: p99 of lmdb lookups through ours and
through Postfix, alone and while other clients hammer a pgsql table whose query
sleeps (``pg_sleep``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from compare import (
    CACHE_DIR,
    Target,
    _readable_dir,
    build_table,
    fmt_row,
    machine,
    our_server,
    throwaway_postfix,
    work_dir,
)
from loadgen import (
    KEY_FMT,
    VALUE_FMT,
    CpuMeter,
    Load,
    backends_of,
    check_answers,
    connect,
    lookup,
    run_row,
)

DSN = "host=127.0.0.1 user=postgres dbname={db}"
#: Database role of each target, so pg_stat_activity tells their connections apart.
ROLES = {"ours": "bench_ours", "ours-cache": "bench_cache", "postfix": "bench_postfix"}


def psql(sql: str, db: str = "postgres") -> str:
    """Run SQL through psql as postgres; return its unaligned output."""
    r = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        raise RuntimeError(f"psql: {r.stderr.strip()}")
    return r.stdout.strip()


def setup_db(db: str, nkeys: int) -> None:
    """Create database ``db``, table t with ``nkeys`` rows and the roles, unless present."""
    if not psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'"):
        psql(f"CREATE DATABASE {db}")
    have = psql("SELECT count(*) FROM t", db) if psql("SELECT to_regclass('t')", db) else "0"
    if have != str(nkeys):
        t0 = time.monotonic()
        k, v = KEY_FMT.replace("{i}", "' || i || '"), VALUE_FMT.replace("{i}", "' || i || '")
        psql(
            "DROP TABLE IF EXISTS t; CREATE TABLE t (k text PRIMARY KEY, v text NOT NULL); "
            f"INSERT INTO t SELECT '{k}', '{v}' FROM generate_series(0, {nkeys - 1}) i; "
            "ANALYZE t",
            db,
        )
        print(f"# filled {db}.t ({nkeys} rows) in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    for role in ROLES.values():
        if not psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'"):
            psql(f"CREATE ROLE {role} LOGIN")
        psql(f"GRANT SELECT ON t TO {role}", db)


def write_cf(cfdir: Path, name: str, db: str, user: str, query: str) -> str:
    """A pgsql_table(5) file readable by Postfix's proxymap; returns ``pgsql:PATH``."""
    path = cfdir / f"{name}.cf"
    path.write_text(f"hosts = 127.0.0.1\ndbname = {db}\nuser = {user}\nquery = {query}\n")
    path.chmod(0o644)
    return f"pgsql:{path}"


@contextmanager
def peak_conns(db: str, interval: float = 0.05) -> Iterator[dict[str, int]]:
    """Poll pg_stat_activity every ``interval`` s; the dict holds each role's peak count."""
    peak: dict[str, int] = {}
    stop = threading.Event()
    sql = "SELECT usename, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY usename"

    def poll() -> None:
        with psycopg.connect(DSN.format(db="postgres"), autocommit=True) as conn:
            while not stop.is_set():
                for user, n in conn.execute(sql, (db,)).fetchall():
                    peak[user] = max(peak.get(user, 0), n)
                stop.wait(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield peak
    finally:
        stop.set()
        th.join(5)


def _hammer(
    path: str, table: str, nkeys: int, idx: int, delay: float, stop: Any, done: Any
) -> None:
    """Background client: after ``delay`` s, back-to-back lookups on ``table`` until ``stop``."""
    try:
        time.sleep(delay)
        sock = connect(path, table)
        n = 0
        while not stop.is_set():
            lookup(sock, table, KEY_FMT.format(i=(idx * 7919 + n) % nkeys))
            n += 1
        with done.get_lock():
            done.value += n
    except OSError as e:
        print(f"# background client {idx}: {e!r}", file=sys.stderr)


@contextmanager
def background(target: Target, table: str, nkeys: int, conns: int, delay: float) -> Iterator[Any]:
    """``conns`` processes looping lookups on ``table`` through ``target``, from ``delay`` s."""
    ctx = mp.get_context("fork")
    stop, done = ctx.Event(), ctx.Value("q", 0)
    procs = [
        ctx.Process(
            target=_hammer, args=(target.socket, table, nkeys, i, delay, stop, done), daemon=True
        )
        for i in range(conns)
    ]
    for p in procs:
        p.start()
    try:
        yield done
    finally:
        stop.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per row (%(default)s)")
    ap.add_argument("--conns", default="16,64", help="connection counts (%(default)s)")
    ap.add_argument("--keys", type=int, default=100_000, help="table rows (%(default)s)")
    ap.add_argument("--zipf", type=float, default=1.1, help="zipf exponent of keys (%(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the rows (%(default)s)")
    ap.add_argument("--db", default="pyproxymap_bench", help="database name (%(default)s)")
    ap.add_argument("--max-connections", type=int, default=4, help="ours, per table (4)")
    ap.add_argument("--cache-ttl", type=int, default=60, help="ours-cache: cache_ttl (60)")
    ap.add_argument("--cache-size", type=int, default=10000, help="ours-cache (%(default)s)")
    ap.add_argument("--sleep", type=float, default=0.05, help="slow query's pg_sleep (0.05)")
    ap.add_argument("--iso-conns", type=int, default=16, help="lmdb clients in isolation (16)")
    ap.add_argument("--iso-slow", type=int, default=16, help="slow pgsql clients (16)")
    ap.add_argument("--skip", default="", help="compare and/or isolation")
    ap.add_argument(
        "--ours-cmd", default="{bindir}/pyproxymap serve -c {conf}", help="see compare.py"
    )
    ap.add_argument("--warmup-time", type=float, default=2.0, help="untimed run per target")
    ap.add_argument("--json", type=Path, help="also write machine, config and rows here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = ap.parse_args(argv)
    args.conns = [int(c) for c in args.conns.split(",") if c]
    args.skip = set(args.skip.split(",")) - {""}
    return args


def compare_rows(args: argparse.Namespace, targets: list[Target]) -> list[dict[str, Any]]:
    """Alternating zipf rows on the pgsql table; each row with its target's peak DB conns."""
    for t in targets:
        problems = check_answers(t.socket, t.table, args.keys)
        if problems:
            raise RuntimeError(f"{t.name} gives wrong answers: {problems[:3]}")
        load = Load(t.socket, t.table, args.keys, 200, 1, args.zipf)
        warm = run_row(load, max(args.conns), args.warmup_time, t.meter())
        if warm["errors"]:
            raise RuntimeError(f"{t.name} warm-up failed: {warm['errors'][:3]}")
    print(f"# answers checked, warm-up done\n{'':<3}{HEAD}", flush=True)
    rows = []
    for rnd in range(args.rounds):
        for k, conns in enumerate(args.conns):
            order = targets if (k + rnd) % 2 == 0 else targets[::-1]
            for t in order:
                time.sleep(1.0)
                load = Load(t.socket, t.table, args.keys, 200, 2 + 1000 * rnd + k, args.zipf)
                with peak_conns(args.db) as peak:
                    db = CpuMeter(backends_of(ROLES[t.name]))
                    row = run_row(load, conns, args.duration, t.meter(), db)
                row |= {
                    "target": t.name,
                    "round": rnd + 1,
                    "peak_db_conns": peak.get(ROLES[t.name], 0),
                }
                rows.append(row)
                print(
                    f"{fmt_row(t.name, row)} {row['peak_db_conns']:>5} "
                    f"{row.get('db_cpu_us_per_lookup', float('nan')):>6.1f}",
                    flush=True,
                )
    print("\nratios to postfix (medians over rounds): lookups/s, p99")
    for conns in args.conns:
        med = {
            t.name: {
                m: statistics.median(
                    r[m] for r in rows if r["target"] == t.name and r["conns"] == conns
                )
                for m in ("lookups_per_s", "p99_us")
            }
            for t in targets
            if any(r["target"] == t.name and r["conns"] == conns and not r["errors"] for r in rows)
        }
        if "postfix" not in med:
            continue
        pf = med["postfix"]
        for name in ("ours", "ours-cache"):
            if name in med:
                tput = med[name]["lookups_per_s"] / pf["lookups_per_s"]
                p99 = med[name]["p99_us"] / pf["p99_us"]
                print(f"  c={conns:<3} {name:<10} {tput:6.2f}x {p99:6.2f}x")
    return rows


def isolation_rows(
    args: argparse.Namespace, targets: list[Target], lmdb: str, slow: str
) -> list[dict[str, Any]]:
    """lmdb p99 through each target, alone and while the slow pgsql table is hammered."""
    print(
        f"\n# isolation: {args.iso_conns} lmdb clients; with {args.iso_slow} clients on {slow} "
        f"(pg_sleep {args.sleep:g})\n{'':<3}{ROW_HEAD}  slow mode",
        flush=True,
    )
    rows = []
    for t in targets:
        if check_answers(t.socket, lmdb, args.keys):
            raise RuntimeError(f"{t.name}: wrong lmdb answers")
        # none: lmdb alone. first: the slow clients connect 1 s before the lmdb
        # clients. after: they connect 0.3 s after them (Postfix: into the same
        # proxymap processes, as one smtpd's connection serves all its tables).
        for mode, bg, delay in (
            ("none", 0, 0.0),
            ("first", args.iso_slow, 0.0),
            ("after", args.iso_slow, 0.3),
        ):
            time.sleep(1.0)
            load = Load(t.socket, lmdb, args.keys, 200, 7)
            with background(t, slow, args.keys, bg, delay) as done:
                time.sleep(1.0 if mode == "first" else 0)
                row = run_row(load, args.iso_conns, args.duration, t.meter())
            row |= {"target": t.name, "slow": mode, "slow_clients": bg, "slow_lookups": done.value}
            rows.append(row)
            print(f"{fmt_row(t.name, row)} {done.value:>5} {mode}", flush=True)
    return rows


ROW_HEAD = (
    f"{'target':<8} {'conns':>5} {'lookups/s':>10} {'p50 µs':>8} {'p99 µs':>8} "
    f"{'srv CPU':>7} {'µs/lkp':>6} {'procs':>5} {'cli CPU':>7} {'box%':>5} {'bad':>4}"
)
#: peak: most database connections of the target's role; db µs: CPU of its database
#: backends per lookup.
HEAD = f"{ROW_HEAD} {'peak':>5} {'db µs':>6}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("pgsql.py must run as root (it starts a Postfix master).", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup_db(args.db, args.keys)
    lmdb = build_table("lmdb", args.keys)
    cfdir = _readable_dir(_readable_dir(CACHE_DIR) / "pgsql")
    query = "SELECT v FROM t WHERE k='%s'"
    slow_q = f"SELECT v FROM t, pg_sleep({args.sleep}) WHERE k='%s'"
    cf = {n: write_cf(cfdir, n, args.db, r, query) for n, r in ROLES.items()}
    slow = write_cf(cfdir, "slow", args.db, "postgres", slow_q)
    pool = f"max_connections = {args.max_connections}\n"
    cache = (
        f"cache_ttl = {args.cache_ttl}\ncache_negative_ttl = {args.cache_ttl}\n"
        f"cache_size = {args.cache_size}\n"
    )
    toml = f'[table_defaults]\n{pool}\n[tables."{cf["ours-cache"]}"]\n{pool}{cache}'
    info = machine()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}  "
        + "  ".join(f"{k}={v}" for k, v in info.items())
    )
    print(
        f"# {args.keys} rows in {args.db}.t, zipf s={args.zipf}, {args.duration:g}s per row; "
        f"ours: max_connections={args.max_connections}; ours-cache: cache_ttl={args.cache_ttl} "
        f"cache_size={args.cache_size}; peak = most DB connections of that target's role "
        "(pg_stat_activity, every 50 ms); db µs = CPU of its role's backends per lookup"
    )
    report: dict[str, Any] = {"machine": info, "config": {k: str(v) for k, v in vars(args).items()}}
    try:
        with work_dir("pyproxymap-bench-pgsql-", args.keep) as top, ExitStack() as stack:
            ours = stack.enter_context(
                our_server(top / "ours", [cf["ours"], lmdb, slow], args.ours_cmd, toml=toml)
            )
            ours_c = stack.enter_context(
                our_server(top / "cache", [cf["ours-cache"]], args.ours_cmd, toml=toml)
            )
            pf = stack.enter_context(
                throwaway_postfix(top / "postfix", cf["postfix"], (lmdb, slow))
            )
            targets = [ours, dataclasses.replace(ours_c, name="ours-cache"), pf]
            for t in targets:
                print(f"# {t.name}: {t.note}")
            if "compare" not in args.skip:
                report["rows"] = compare_rows(args, targets)
            if "isolation" not in args.skip:
                iso = [dataclasses.replace(ours, table=lmdb), dataclasses.replace(pf, table=lmdb)]
                report["isolation"] = isolation_rows(args, iso, lmdb, slow)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
