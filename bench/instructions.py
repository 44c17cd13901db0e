"""Instructions our server executes per lookup, counted by valgrind's callgrind.

Usage (as root, from the repository):
    .venv/bin/python bench/instructions.py [--table pgsql|lmdb|texthash] [--lookups 2000]

Time measured on a shared 2-vCPU machine moves by 10 % from run to run; the number of
instructions a process executes for the same work does not (valgrind counts them, in
user space only, whatever else the machine is doing). So a change on the lookup path is
compared here, before and after, and the throughput benchmarks tell what it is worth.

Our server runs under ``valgrind --tool=callgrind --instr-atstart=no`` (as root with
``--no-unprivileged``, so it can write callgrind's file). One client (loadgen.py's)
opens the table and does ``--warmup`` lookups; instrumentation is switched on with
``callgrind_control -i on``, the client does ``--lookups`` lookups one after the other
(keys ``user<i>@example.com`` in turn over the first ``--keys``), instrumentation goes
off, the server stops, and the total from callgrind's file is divided by the lookups.
pgsql uses the database, table and .cf files of pgsql.py (PostgreSQL on 127.0.0.1);
lmdb and texthash the tables of compare.py. Needs Debian's ``valgrind``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import CACHE_DIR, _readable_dir, build_table, our_server, work_dir
from loadgen import KEY_FMT, VALUE_FMT, connect, lookup
from pgsql import ROLES, setup_db, write_cf


def table_spec(kind: str, nkeys: int) -> str:
    if kind != "pgsql":
        return build_table(kind, nkeys)
    db = "pyproxymap_bench"
    setup_db(db, nkeys)
    cfdir = _readable_dir(_readable_dir(CACHE_DIR) / "pgsql")
    return write_cf(cfdir, "ours", db, ROLES["ours"], "SELECT v FROM t WHERE k='%s'")


def callgrind(pid: int, switch: str) -> None:
    subprocess.run(["callgrind_control", "-i", switch, str(pid)], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", choices=["pgsql", "lmdb", "texthash"], default="pgsql")
    ap.add_argument("--lookups", type=int, default=2000, help="counted lookups (2000)")
    ap.add_argument("--warmup", type=int, default=300, help="lookups before counting (300)")
    ap.add_argument("--keys", type=int, default=1000, help="distinct keys looked up (1000)")
    ap.add_argument("--rows", type=int, default=100000, help="table size (100000)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (callgrind file)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("instructions.py must run as root (like the other benchmarks).", file=sys.stderr)
        return 2
    table = table_spec(args.table, args.rows)
    with work_dir("pyproxymap-bench-instr-", args.keep) as top:
        out = top / "callgrind.out"
        cmd = (
            f"valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={out} "
            "{bindir}/pyproxymap serve -c {conf} --no-unprivileged"
        )
        with our_server(top / "ours", [table], cmd) as ours:
            sock = connect(ours.socket, table)
            for i in range(args.warmup):
                lookup(sock, table, KEY_FMT.format(i=i % args.keys))
            callgrind(ours.pid, "on")
            for i in range(args.lookups):
                status, value = lookup(sock, table, KEY_FMT.format(i=i % args.keys))
                if status != 0 or value != VALUE_FMT.format(i=i % args.keys).encode():
                    raise RuntimeError(f"wrong answer for key {i % args.keys}: {status} {value!r}")
            callgrind(ours.pid, "off")
            sock.close()
        found = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no totals in {out}")
        total = int(found.group(1))
    print(
        f"{table}: {total / args.lookups / 1000:.1f}k instructions per lookup "
        f"({total} for {args.lookups} lookups, one client, after {args.warmup})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
