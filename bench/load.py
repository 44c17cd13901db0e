"""Our server with big tables: load time and memory, and lookup latency at 1M vs 10k keys.

Usage (as root, from the repository):  .venv/bin/python bench/load.py

1. Load: starts ``pyproxymap serve`` on a 1M-line texthash and times from the
   start of the process until the answer to the first lookup in that table
   arrives; then the same with a 1-line texthash (the startup without the
   table). Load time = the difference (medians over ``--repeat`` starts each,
   alternating). Memory = growth of the server's peak RSS (VmHWM) and of its RSS
   after the load (VmRSS), from /proc/PID/status, over the 1-line run.
2. Size: one server with a 10k-key and a 1M-key table of each type, and the
   closed-loop client of bench/loadgen.py at one connection, alternating
   between the two sizes for ``--rounds`` rows each; prints p50 at 1M / p50 at
   10k per type (target: within 1.2x). Server and client are pinned to one CPU
   (``--pin``): on a VM, a client and server on different CPUs add tens of µs of
   wake-up latency to each round trip, and which placement a row gets is luck.

Tables come from the cache of bench/compare.py (indexed ones made by the real
postmap). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare import CACHE_DIR, TYPES, Target, build_table, machine, our_server
from loadgen import (
    KEY_FMT,
    VALUE_FMT,
    CpuMeter,
    Load,
    check_answers,
    connect,
    descendants,
    run_row,
    scan_procs,
)
from loadgen import lookup as lookup_once

TARGET_RATIO = 1.2


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of ``pid`` in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            out[name] = int(rest.split()[0])
    return out


def first_lookup(top: Path, tables: list[str], table: str, cmd: str, nkeys: int) -> dict[str, Any]:
    """Start a server, look up one key of ``table`` and time it; stop the server."""
    shutil.rmtree(top, ignore_errors=True)
    i = nkeys // 2
    t0 = time.monotonic()
    with our_server(top, tables, cmd, ready=None, poll=0.005) as srv:
        t_up = time.monotonic()
        sock = connect(srv.socket, table)  # the open request loads the table
        t_open = time.monotonic()
        got = lookup_once(sock, table, KEY_FMT.format(i=i))
        t_end = time.monotonic()
        sock.close()
        mem = proc_status(srv.pid)
        nprocs = len(descendants(srv.pid)(scan_procs())[1])
    if got != (0, VALUE_FMT.format(i=i).encode()):
        raise RuntimeError(f"{table}: wrong answer for key {i}: {got!r}")
    return {
        "total_s": t_end - t0,
        "up_s": t_up - t0,
        "open_s": t_open - t_up,
        "hwm_kib": mem["VmHWM"],
        "rss_kib": mem["VmRSS"],
        "procs": nprocs,
    }


def measure_load(args: argparse.Namespace, top: Path) -> dict[str, Any]:
    """Load time and memory of a ``--big``-line texthash, over a 1-line one."""
    big = build_table("texthash", args.big, args.cache_dir)
    tiny = build_table("texthash", 1, args.cache_dir)
    runs: dict[str, list[dict[str, Any]]] = {"big": [], "tiny": []}
    for r in range(args.repeat):
        order = [("big", big, args.big), ("tiny", tiny, 1)]
        for name, table, n in order if r % 2 == 0 else order[::-1]:
            runs[name].append(first_lookup(top / "load", [big, tiny], table, args.ours_cmd, n))
            x = runs[name][-1]
            print(
                f"  {name:<4} start→answer {x['total_s']:6.3f}s  (socket up {x['up_s']:.3f}s, "
                f"open {x['open_s']:.3f}s)  VmHWM {x['hwm_kib'] / 1024:6.1f} MiB  "
                f"VmRSS {x['rss_kib'] / 1024:6.1f} MiB",
                flush=True,
            )

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    res = {
        "table": big,
        "runs": runs,
        "load_s": med("big", "total_s") - med("tiny", "total_s"),
        "open_s": med("big", "open_s"),
        "peak_growth_mib": (med("big", "hwm_kib") - med("tiny", "hwm_kib")) / 1024,
        "rss_growth_mib": (med("big", "rss_kib") - med("tiny", "rss_kib")) / 1024,
        "base_rss_mib": med("tiny", "rss_kib") / 1024,
    }
    print(
        f"load {big} ({args.big} lines): {res['load_s']:.2f}s over the 1-line start "
        f"(open request alone {res['open_s']:.2f}s); peak RSS +{res['peak_growth_mib']:.0f} MiB, "
        f"RSS after load +{res['rss_growth_mib']:.0f} MiB (1-line server: "
        f"{res['base_rss_mib']:.0f} MiB); medians of {args.repeat}",
        flush=True,
    )
    return res


def pin(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of ``pid`` (later threads inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def measure_sizes(args: argparse.Namespace, top: Path) -> list[dict[str, Any]]:
    """p50 at one connection, ``--big`` keys against ``--small`` keys, per type."""
    tables = {
        (kind, n): build_table(kind, n, args.cache_dir)
        for kind in args.types
        for n in (args.small, args.big)
    }
    out: list[dict[str, Any]] = []
    mine = os.sched_getaffinity(0)
    with our_server(top / "sizes", list(tables.values()), args.ours_cmd, ready=None) as srv:
        if args.pin is not None:
            pin(srv.pid, {args.pin})
            os.sched_setaffinity(0, {args.pin})  # the forked client processes inherit it
            print(f"# server and client pinned to CPU {args.pin}", flush=True)
        try:
            for kind in args.types:
                out.append(size_rows(args, srv, kind, tables))
        finally:
            os.sched_setaffinity(0, mine)
    return out


def size_rows(
    args: argparse.Namespace, srv: Target, kind: str, tables: dict[tuple[str, int], str]
) -> dict[str, Any]:
    """Alternating 1-connection rows on the two sizes of one type; prints the ratio."""
    sizes = (args.small, args.big)
    try:
        for n in sizes:
            problems = check_answers(srv.socket, tables[kind, n], n)
            if problems:
                raise RuntimeError(f"wrong answers: {problems[:3]}")
    except (OSError, RuntimeError) as e:
        print(f"{kind:<8} NOT AVAILABLE: {e}", flush=True)
        return {"type": kind, "error": str(e)}
    p50: dict[int, list[float]] = {n: [] for n in sizes}
    rate: dict[int, list[float]] = {n: [] for n in sizes}
    for rnd in range(-1, args.rounds):  # round -1: untimed warm-up of both
        for n in sizes if rnd % 2 == 0 else sizes[::-1]:
            load = Load(srv.socket, tables[kind, n], n, args.warmup, args.seed + rnd)
            meter = CpuMeter(descendants(srv.pid))
            row = run_row(load, 1, args.duration if rnd >= 0 else 1.0, meter)
            if row["errors"] or row["bad_replies"]:
                raise RuntimeError(f"{tables[kind, n]}: {row['errors'][:3] or 'bad replies'}")
            if rnd >= 0:
                p50[n].append(row["p50_us"])
                rate[n].append(row["lookups_per_s"])
    med = {n: statistics.median(p50[n]) for n in sizes}
    ratio = med[args.big] / med[args.small]
    print(
        f"{kind:<8} p50 {args.small} keys {med[args.small]:6.1f} µs  "
        f"{args.big} keys {med[args.big]:6.1f} µs  ratio {ratio:5.2f}x  "
        f"({'within' if ratio <= TARGET_RATIO else 'OVER'} {TARGET_RATIO}x)   "
        f"rows {' '.join(f'{x:.1f}' for x in p50[args.small])} | "
        f"{' '.join(f'{x:.1f}' for x in p50[args.big])} µs",
        flush=True,
    )
    return {
        "type": kind,
        "p50_us": {str(n): p50[n] for n in sizes},
        "lookups_per_s": {str(n): rate[n] for n in sizes},
        "ratio": ratio,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--big", type=int, default=1_000_000, help="large table (%(default)s)")
    ap.add_argument("--small", type=int, default=10_000, help="small table (%(default)s)")
    ap.add_argument(
        "--types", default=",".join(TYPES), help="types for the p50 ratio (%(default)s)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="server starts per load case (3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per p50 row (5)")
    ap.add_argument("--rounds", type=int, default=3, help="p50 rows per size and type (3)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed lookups per row (200)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--pin",
        default="0",
        help="CPU to pin server and client to for the p50 rows, or 'none' (%(default)s)",
    )
    ap.add_argument("--skip", choices=["load", "sizes"], help="leave out one part")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="table cache (%(default)s)")
    ap.add_argument(
        "--ours-cmd",
        default="{bindir}/pyproxymap serve -c {conf}",
        help="our server's command; {bindir}=this python's bin dir, {conf}=config dir",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    args.pin = None if args.pin == "none" else int(args.pin)
    if not args.types or set(args.types) - set(TYPES):
        ap.error(f"--types takes {', '.join(TYPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("load.py must run as root (postmap, table cache).", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}  "
        + "  ".join(f"{k}={v}" for k, v in info.items()),
        flush=True,
    )
    report: dict[str, Any] = {"machine": info, "config": {}}
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    top = Path(tempfile.mkdtemp(prefix="pyproxymap-load-"))
    try:
        if args.skip != "load":
            report["load"] = measure_load(args, top)
        if args.skip != "sizes":
            report["sizes"] = measure_sizes(args, top)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(top, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any("error" in s for s in report.get("sizes", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
