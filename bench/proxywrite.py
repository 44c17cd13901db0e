"""Updates/s and lookups/s through proxywrite: pyproxymap beside Postfix's proxywrite.

Usage (as root, from the repository):
    .venv/bin/python bench/proxywrite.py --types lmdb,btree --conns 1,16 --duration 4

For each table type, each target gets its own copy of a ``--keys``-key table
(``postmap TYPE:FILE`` from the cached texthash source, owned by ``postfix`` in a
directory it can write), listed in its ``proxy_write_maps``. Postfix's
proxywrite (process limit 1) holds an exclusive lock on a hash/btree file for
its lifetime (OPEN_LOCK), so the two servers cannot share one file. The client
is compare.py's (one process per connection, closed loop); every request,
carries verify(8)'s flags (WRITE_FLAGS; ``open`` the same less LOCK). An update writes
``value-<i>`` under key ``i`` again and must answer status 0; a lookup must return
``value-<i>``. Rows alternate between targets as in compare.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from compare import (
    CACHE_DIR,
    HEADER,
    Target,
    build_table,
    fmt_row,
    machine,
    our_server,
    postmap,
    ratios,
    throwaway_postfix,
    work_dir,
)
from loadgen import WRITE_FLAGS, Load, check_answers, run_row

#: verify(8)'s open flags: its request flags less LOCK (64); Postfix's dict_open
#: refuses OPEN_LOCK together with LOCK.
OPEN_FLAGS = WRITE_FLAGS & ~64
FLAGS = {"open_flags": OPEN_FLAGS, "flags": WRITE_FLAGS}
WRITABLE = {"lmdb": ".lmdb", "btree": ".db", "hash": ".db"}


def writable_copy(kind: str, src: Path, where: Path) -> str:
    """``TYPE:PATH`` of a fresh ``postmap``-built copy of ``src``, owned by postfix."""
    pw = pwd.getpwnam("postfix")
    where.mkdir(parents=True)
    shutil.copyfile(src, where / "w")
    postmap(f"{kind}:{where / 'w'}")
    for p in (where, where / "w", where / f"w{WRITABLE[kind]}"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    where.chmod(0o755)
    return f"{kind}:{where / 'w'}"


def start(args: argparse.Namespace, kind: str, top: Path, stack: ExitStack) -> list[Target]:
    """Both servers, each on its own copy; Targets point at their proxywrite sockets."""
    read = build_table("texthash", args.keys, args.cache_dir)  # readiness check only
    src = Path(read.partition(":")[2])
    targets = []
    for name in args.targets:
        wt = writable_copy(kind, src, top / name / "tables")
        if name == "ours":
            t = stack.enter_context(
                our_server(top / name / "srv", [read], args.ours_cmd, write_maps=(wt,))
            )
        else:
            t = stack.enter_context(throwaway_postfix(top / name / "srv", read, write_maps=(wt,)))
        sock = str(Path(t.socket).with_name("proxywrite"))
        targets.append(dataclasses.replace(t, socket=sock, table=wt, note=f"{t.note}, {wt}"))
    return targets


def bench(
    args: argparse.Namespace, kind: str, targets: list[Target], rnd_base: int
) -> list[dict[str, Any]]:
    """Guard, warm-up, then for each op the alternating rows."""
    for t in targets:
        print(f"# {t.name}: {t.note}")
        deadline = time.monotonic() + 30
        while problems := check_answers(t.socket, t.table, args.keys, OPEN_FLAGS, WRITE_FLAGS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{t.name} gives wrong answers: {problems[:3]}")
            time.sleep(0.2)
        load = Load(t.socket, t.table, args.keys, args.warmup, **FLAGS)
        warm = run_row(load, max(args.conns), args.warmup_time, t.meter())
        if warm["errors"]:
            raise RuntimeError(f"{t.name} warm-up failed: {warm['errors'][:3]}")
    print("# answers checked, warm-up done (requests/s in the lookups/s column)")
    print(HEADER, flush=True)
    rows = []
    k = rnd_base
    for op in args.ops:
        for conns in args.conns:
            for t in targets if k % 2 == 0 else targets[::-1]:
                time.sleep(args.pause)
                seed = args.seed + k
                load = Load(t.socket, t.table, args.keys, args.warmup, seed, op=op, **FLAGS)
                row = {"target": t.name, "type": kind, "op": op}
                row |= run_row(load, conns, args.duration, t.meter())
                rows.append(row)
                print(fmt_row(f"{t.name[:4]}-{op[:3]}", row), flush=True)
            k += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--types", default="lmdb,btree", help="writable types (%(default)s)")
    ap.add_argument("--ops", default="update,lookup", help="request kinds (%(default)s)")
    ap.add_argument("--conns", default="1,16", help="connection counts (%(default)s)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per row (%(default)s)")
    ap.add_argument("--keys", type=int, default=100_000, help="table size (%(default)s)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ap.add_argument("--targets", default="ours,postfix", help="(%(default)s)")
    ap.add_argument("--ours-cmd", default="{bindir}/pyproxymap serve -c {conf}")
    ap.add_argument("--warmup", type=int, default=200, help="untimed lookups per connection")
    ap.add_argument("--warmup-time", type=float, default=1.0, help="untimed lookups per target")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between rows")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write machine, config and rows here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = ap.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    args.ops = [o for o in args.ops.split(",") if o]
    args.conns = [int(c) for c in args.conns.split(",") if c]
    args.targets = [t for t in args.targets.split(",") if t]
    if set(args.types) - WRITABLE.keys() or set(args.ops) - {"update", "lookup"}:
        ap.error(f"--types takes {','.join(WRITABLE)}; --ops takes update,lookup")
    if os.geteuid() != 0:
        print("proxywrite.py must run as root (it starts a Postfix master).", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}  "
        + "  ".join(f"{k}={v}" for k, v in info.items())
    )
    print(
        f"# proxywrite, {args.keys} keys, flags {WRITE_FLAGS}, {args.duration:g}s per row, "
        "client: 1 process per connection"
    )
    rows: list[dict[str, Any]] = []
    for n, kind in enumerate(args.types):
        try:
            with work_dir(f"pyproxymap-pw-{kind}-", args.keep) as top, ExitStack() as stack:
                targets = start(args, kind, top, stack)
                print(f"# --- {kind}")
                rows += bench(args, kind, targets, n)
        except RuntimeError as e:
            print(f"error: {kind}: {e}", file=sys.stderr)
            return 2
    summary = []
    print("\nours / postfix (requests/s; p50, p99 < 1 favour ours)")
    print(f"{'type':<6} {'op':<7} {'conns':>5} {'req/s':>7} {'p50':>6} {'p99':>6} {'CPU/req':>8}")
    for kind in args.types:
        for op in args.ops:
            sub = [r for r in rows if r["type"] == kind and r["op"] == op]
            for r in ratios(sub):
                summary.append({"type": kind, "op": op} | r)
                print(
                    f"{kind:<6} {op:<7} {r['conns']:>5} {r['throughput']:>6.2f}x "
                    f"{r['p50']:>5.2f}x {r['p99']:>5.2f}x {r['cpu_per_lookup']:>7.2f}x"
                )
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"machine": info, "config": config, "rows": rows, "ratios": summary}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
