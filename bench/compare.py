"""Benchmark pyproxymap against real Postfix proxymap(8) in one run.

Usage (as root, from the repository):  .venv/bin/python bench/compare.py [--type hash]

Builds (once, cached) a 100k-key table of the chosen type (texthash, or hash,
lmdb, cdb made by the real postmap), starts a throwaway Postfix instance and our
server on the same file, checks that both answer correctly, warms both up, then
runs the same closed-loop client (one process per connection, no pipelining)
against each at every concurrency level, alternating the order so drift hits
both. See bench/README.md for what is measured and the caveats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import (
    IO_TIMEOUT,
    KEY_FMT,
    LOOKUP_FLAGS,
    VALUE_FMT,
    CpuMeter,
    Load,
    check_answers,
    connect,
    descendants,
    master_and,
    read_record,
    run_row,
)

POSTFIX_SBIN = "/usr/sbin"
#: Table types and the suffix postmap gives their file ("" = read from the source itself).
TYPES = {"texthash": "", "hash": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
#: Built tables are kept here between runs, one directory per table size.
CACHE_DIR = Path("/var/tmp/pyproxymap-bench-cache")
#: How long a server may take to start and open a table (1M-line texthash).
READY_TIMEOUT = 180.0


@dataclass
class Target:
    """A server under test: where it listens and how to find its processes."""

    name: str
    socket: str
    table: str
    meter: Callable[[], CpuMeter]
    note: str
    pid: int = 0  # ours: the server process; Postfix: its master


def sh(*cmd: str, check: bool = True) -> str:
    """Run a command, return stdout+stderr; raise with the output on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = (r.stdout + r.stderr).strip()
    if check and r.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {r.returncode}: {out}")
    return out


def tail(path: Path, lines: int = 15) -> str:
    """Last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def wait_ready(
    path: str,
    table: str | None,
    timeout: float,
    alive: Callable[[], bool],
    poll: float = 0.1,
) -> None:
    """Wait until ``path`` accepts a connection and opens ``table``.

    With ``table=None`` only the connection and the server's announcement are
    awaited, so no table is opened.
    """
    t_end, last = time.monotonic() + timeout, "no attempt"
    while time.monotonic() < t_end:
        if not alive():
            raise RuntimeError(f"server exited before {path} was ready ({last})")
        try:
            if table is None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(IO_TIMEOUT)
                    sock.connect(path)
                    read_record(sock)
            else:
                connect(path, table).close()
            return
        except OSError as e:  # ConnectionError, FileNotFoundError, timeouts
            last = repr(e)
        time.sleep(poll)
    raise RuntimeError(f"{path} not ready after {timeout:.0f}s: {last}")


def write_table(path: Path, nkeys: int) -> None:
    """The texthash source: ``user<i>@example.com<TAB>value-<i>``."""
    with path.open("w") as f:
        f.writelines(f"{KEY_FMT.format(i=i)}\t{VALUE_FMT.format(i=i)}\n" for i in range(nkeys))
    path.chmod(0o644)


def _readable_dir(path: Path) -> Path:
    """Create ``path`` mode 0755: proxymap runs as mail_owner and must reach the tables."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def postmap(spec: str) -> None:
    """The real postmap, building ``TYPE:PATH``. It reads $MAIL_CONFIG/main.cf even so,
    and Debian installs Postfix "No configuration", without one: give it a minimal one."""
    if "MAIL_CONFIG" not in os.environ and not Path("/etc/postfix/main.cf").exists():
        confdir = _readable_dir(_readable_dir(CACHE_DIR) / "mail-config")
        (confdir / "main.cf").write_text("compatibility_level = 3.6\n")
        (confdir / "master.cf").touch()
        os.environ["MAIL_CONFIG"] = str(confdir)
    sh(f"{POSTFIX_SBIN}/postmap", spec)


@contextmanager
def work_dir(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh 0755 directory for configs and logs (Postfix makes its own directories
    under it and reads them as mail_owner), removed at the end unless ``keep``."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    top.chmod(0o755)
    try:
        yield top
    finally:
        if keep:
            print(f"# kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


def build_table(kind: str, nkeys: int, cache: Path = CACHE_DIR) -> str:
    """``TYPE:PATH`` of an ``nkeys``-key table, built once and then reused from ``cache``.

    The source is ``cache/k<nkeys>/big``; indexed types are made from it by the
    real ``postmap TYPE:FILE`` beside it (``big.db``, ``big.lmdb``, ``big.cdb``).
    Every file is built under a temporary name and renamed into place when
    complete, so an interrupted build is never reused. Delete the directory to
    rebuild.
    """
    _readable_dir(cache)
    top = _readable_dir(cache / f"k{nkeys}")
    src = top / "big"
    if not src.exists():
        t0 = time.monotonic()
        tmp = top / f".big.{os.getpid()}"
        write_table(tmp, nkeys)
        # Older than a second, so no reader waits for the file to "cool down".
        old = time.time() - 60
        os.utime(tmp, (old, old))
        os.replace(tmp, src)
        print(f"# wrote {src} ({nkeys} lines) in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    suffix = TYPES[kind]
    if suffix and not (top / f"big{suffix}").exists():
        t0 = time.monotonic()
        build = _readable_dir(top / f".build-{kind}-{os.getpid()}")
        try:
            (build / "big").symlink_to(src)
            postmap(f"{kind}:{build / 'big'}")
            out = build / f"big{suffix}"
            out.chmod(0o644)
            os.replace(out, top / f"big{suffix}")
        finally:
            shutil.rmtree(build, ignore_errors=True)
        print(
            f"# postmap {kind}:{src} ({nkeys} keys) took {time.monotonic() - t0:.1f}s",
            file=sys.stderr,
        )
    return f"{kind}:{src}"


# ---------------------------------------------------------------- Postfix
@contextmanager
def throwaway_postfix(
    top: Path, table: str, extra_maps: tuple[str, ...] = (), write_maps: tuple[str, ...] = ()
) -> Iterator[Target]:
    """A private Postfix instance (own config, queue, data dirs and master).

    ``extra_maps`` (``TYPE:NAME``) are added to its proxy_read_maps; ``write_maps``,
    if any, are its proxy_write_maps, served by a proxywrite service (process limit 1).
    """
    etc, spool, data = top / "etc", top / "spool", top / "data"
    etc.mkdir(parents=True)
    spool.mkdir(mode=0o755)  # must exist; data/ must not (postfix check creates it)
    (etc / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
myhostname = pfxbench.localdomain
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
syslog_name = postfix-pyproxymap-bench
maillog_file = {top}/maillog
maillog_file_prefixes = {top}
proxy_read_maps = {" ".join(f"proxy:{t}" for t in (table, *extra_maps))}
"""
        + (f"proxy_write_maps = {' '.join(f'proxy:{t}' for t in write_maps)}\n" * bool(write_maps))
    )
    (etc / "master.cf").write_text(
        "postlog    unix-dgram n - n - 1 postlogd\nproxymap   unix - - n - - proxymap\n"
        + ("proxywrite unix - - n - 1 proxymap\n" if write_maps else "")
    )
    postfix = f"{POSTFIX_SBIN}/postfix"
    try:
        sh(postfix, "-c", str(etc), "check")
        sh(postfix, "-c", str(etc), "start")
        sock = str(spool / "private" / "proxymap")
        wait_ready(sock, table, READY_TIMEOUT, lambda: True)
        master = int((spool / "pid" / "master.pid").read_text().split()[0])
    except Exception as e:
        sh(postfix, "-c", str(etc), "stop", check=False)
        raise RuntimeError(f"{e}\nmaillog:\n{tail(top / 'maillog')}") from e
    try:
        yield Target(
            "postfix",
            sock,
            table,
            lambda: CpuMeter(master_and(master)),
            f"Postfix {sh('postconf', '-dh', 'mail_version')} throwaway instance "
            f"(config {etc}, master pid {master})",
            master,
        )
    finally:
        sh(postfix, "-c", str(etc), "stop", check=False)


@contextmanager
def system_postfix(table: str, why: str) -> Iterator[Target]:
    """Fallback: the running system instance, if it proxies the same table.

    The same file for indexed types; for texthash, any file with identical content.
    """
    queue = Path(sh("postconf", "-h", "queue_directory"))
    kind, _, path = table.partition(":")
    want = Path(path).read_bytes() if kind == "texthash" else None
    for tok in sh("postconf", "-xh", "proxy_read_maps").replace(",", " ").split():
        if tok == f"proxy:{table}":
            cand = table
            break
        if want is not None and tok.startswith("proxy:texthash:"):
            cand = tok.removeprefix("proxy:")
            try:
                file = Path(cand.removeprefix("texthash:"))
                if file.stat().st_size == len(want) and file.read_bytes() == want:
                    break
            except OSError:
                continue
    else:
        raise RuntimeError(
            f"throwaway Postfix failed ({why}) and the system instance does not proxy "
            f"{table}" + (" or a texthash table identical to it" if want is not None else "")
        )
    master = int((queue / "pid" / "master.pid").read_text().split()[0])
    sock = str(queue / "private" / "proxymap")
    wait_ready(sock, cand, READY_TIMEOUT, lambda: True)
    yield Target(
        "postfix",
        sock,
        cand,
        lambda: CpuMeter(master_and(master)),
        f"FALLBACK: system Postfix {sh('postconf', '-h', 'mail_version')} instance "
        f"(master pid {master}, table {cand}) because the throwaway instance failed: {why}",
        master,
    )


# ---------------------------------------------------------------- ours
@contextmanager
def our_server(
    top: Path,
    tables: list[str],
    cmd_fmt: str,
    ready: str | None = "",
    poll: float = 0.1,
    toml: str = "",
    write_maps: tuple[str, ...] = (),
    name: str = "ours",
) -> Iterator[Target]:
    """Our server in the foreground, on its own queue directory; SIGTERM at the end.

    ``tables`` (``TYPE:PATH``) are its proxy_read_maps, ``write_maps`` its
    proxy_write_maps. It is ready when the first
    of them opens, or ``ready`` if given (``None``: when the socket answers, with
    no table opened). ``toml``, if given, is written as ``pyproxymap.toml``.
    """
    etc, spool = top / "etc", top / "spool"
    etc.mkdir(parents=True)
    (spool / "private").mkdir(parents=True, mode=0o700)
    maps = " ".join(f"proxy:{t}" for t in tables)
    wmaps = " ".join(f"proxy:{t}" for t in write_maps)
    (etc / "main.cf").write_text(
        f"queue_directory = {spool}\nproxy_read_maps = {maps}\n"
        + (f"proxy_write_maps = {wmaps}\n" if write_maps else "")
    )
    if toml:
        (etc / "pyproxymap.toml").write_text(toml)
    cmd = shlex.split(cmd_fmt.format(bindir=Path(sys.executable).parent, conf=etc))
    log = top / "server.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
    except OSError as e:
        raise RuntimeError(
            f"cannot start our server ({e}); not installed yet? --targets postfix skips it"
        ) from e
    table, sock = tables[0], str(spool / "private" / "proxymap")
    try:
        try:
            wait_ready(
                sock,
                table if ready == "" else ready,
                READY_TIMEOUT,
                lambda: proc.poll() is None,
                poll,
            )
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{shlex.join(cmd)} log:\n{tail(log)}") from e
        yield Target(
            name,
            sock,
            table,
            lambda: CpuMeter(descendants(proc.pid)),
            f"pyproxymap: {shlex.join(cmd)} (pid {proc.pid})",
            proc.pid,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    """Where the figures come from."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln]
        info["cpu_model"] = models[0] if models else "?"
        info["virtualised"] = " hypervisor" in cpuinfo
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
        for ln in Path("/etc/os-release").read_text().splitlines():
            if ln.startswith("PRETTY_NAME="):
                info["os"] = ln.split("=", 1)[1].strip('"')
    except (OSError, IndexError):
        pass
    return info


HEADER = (
    f"{'target':<8} {'conns':>5} {'lookups/s':>10} {'p50 µs':>8} {'p99 µs':>8} "
    f"{'srv CPU':>7} {'µs/lkp':>6} {'procs':>5} {'cli CPU':>7} {'box%':>5} {'bad':>4}"
)


def fmt_row(name: str, r: dict[str, Any]) -> str:
    """One result line (CPU in cores; µs/lkp = server CPU per lookup)."""
    if r["errors"]:
        return f"{name:<8} {r['conns']:>5}  FAILED: {'; '.join(r['errors'][:3])}"
    return (
        f"{name:<8} {r['conns']:>5} {r['lookups_per_s']:>10.0f} {r['p50_us']:>8.1f} "
        f"{r['p99_us']:>8.1f} {r['server_cpu_cores']:>7.2f} "
        f"{r['server_cpu_us_per_lookup']:>6.1f} {r['server_procs']:>5} "
        f"{r['client_cpu_cores']:>7.2f} {r['box_busy_pct']:>5.0f} {r['bad_replies']:>4}"
    )


RATIO_METRICS = {
    "throughput": "lookups_per_s",
    "p50": "p50_us",
    "p99": "p99_us",
    "cpu_per_lookup": "server_cpu_us_per_lookup",
}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of ours (one process, or ``ours-wN`` with N workers) / postfix per
    concurrency, on the median over rounds of each metric."""
    out = []
    names = list(dict.fromkeys(r["target"] for r in rows if r["target"] != "postfix"))
    for name in names:
        for conns in sorted({r["conns"] for r in rows}):
            med = {}
            for who in (name, "postfix"):
                ok = [r for r in rows if r["target"] == who and r["conns"] == conns]
                ok = [r for r in ok if not r["errors"]]
                if ok:
                    med[who] = {
                        m: statistics.median(r[m] for r in ok) for m in RATIO_METRICS.values()
                    }
            if len(med) == 2:
                a, b = med[name], med["postfix"]
                out.append(
                    {"target": name, "conns": conns}
                    | {k: a[m] / b[m] if b[m] else float("nan") for k, m in RATIO_METRICS.items()}
                )
    return out


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per row (%(default)s)")
    ap.add_argument("--conns", default="1,16,64", help="connection counts (%(default)s)")
    ap.add_argument("--keys", type=int, default=100_000, help="table size (%(default)s)")
    ap.add_argument(
        "--type",
        choices=list(TYPES),
        default="texthash",
        help="table type; indexed types are built with the real postmap (%(default)s)",
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE_DIR,
        help="where built tables are kept between runs (%(default)s)",
    )
    ap.add_argument("--json", type=Path, help="also write machine, config and rows here")
    ap.add_argument("--targets", default="ours,postfix", help="which servers to run (%(default)s)")
    ap.add_argument(
        "--postfix",
        choices=["throwaway", "system"],
        default="throwaway",
        help="Postfix instance: throwaway (default; falls back to system) or system",
    )
    ap.add_argument(
        "--ours-cmd",
        default="{bindir}/pyproxymap serve -c {conf}",
        help="our server's command; {bindir}=this python's bin dir, {conf}=config dir",
    )
    ap.add_argument(
        "--workers",
        default="",
        help="also run ours with these worker counts, e.g. 2,3 (targets ours-w2, ours-w3)",
    )
    ap.add_argument("--warmup", type=int, default=200, help="untimed lookups per connection")
    ap.add_argument(
        "--warmup-time", type=float, default=2.0, help="untimed run per target before rows"
    )
    ap.add_argument("--rounds", type=int, default=1, help="repeat all rows; ratios use medians (1)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between rows")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = ap.parse_args(argv)
    args.conns = [int(c) for c in args.conns.split(",") if c]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.targets = [t for t in args.targets.split(",") if t]
    if not args.targets or set(args.targets) - {"ours", "postfix"}:
        ap.error("--targets takes ours and/or postfix")
    return args


def start_targets(
    args: argparse.Namespace, top: Path, table: str, stack: ExitStack
) -> list[Target]:
    """Start the requested servers (ours first) on ``table``; each stops when ``stack`` closes."""
    targets: list[Target] = []
    if "ours" in args.targets:
        targets.append(stack.enter_context(our_server(top / "ours", [table], args.ours_cmd)))
        for n in args.workers:
            # Workers open the table when first asked: ready once the socket answers.
            cmd = f"{args.ours_cmd} --workers {n}"
            name = f"ours-w{n}"
            server = our_server(top / name, [table], cmd, ready=None, name=name)
            targets.append(stack.enter_context(server))
    if "postfix" in args.targets:
        if args.postfix == "system":
            targets.append(stack.enter_context(system_postfix(table, "--postfix system")))
        else:
            try:
                pf = stack.enter_context(throwaway_postfix(top / "postfix", table))
            except RuntimeError as e:
                print(f"# throwaway Postfix failed, trying the system one: {e}", file=sys.stderr)
                pf = stack.enter_context(system_postfix(table, str(e).splitlines()[0]))
            targets.append(pf)
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("compare.py must run as root (it starts a Postfix master).", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        table = build_table(args.type, args.keys, args.cache_dir)
    except RuntimeError as e:
        print(f"error: building the table: {e}", file=sys.stderr)
        return 2
    info = machine()
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    try:
        with work_dir("pyproxymap-bench-", args.keep) as top, ExitStack() as stack:
            targets = start_targets(args, top, table, stack)
            notes = {t.name: t.note for t in targets}
            rows = bench(args, info, targets)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {
            "machine": info,
            "config": config,
            "targets": notes,
            "rows": rows,
            "ratios": ratios(rows),
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(r["errors"] for r in rows) else 0


def bench(
    args: argparse.Namespace, info: dict[str, Any], targets: list[Target]
) -> list[dict[str, Any]]:
    """Guard, warm up, then the alternating timed rows; prints as it goes."""
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}  "
        + "  ".join(f"{k}={v}" for k, v in info.items())
    )
    print(
        f"# {targets[0].table if targets else args.type} ({args.keys} keys), "
        f"lookup flags {LOOKUP_FLAGS}, {args.duration:g}s per row, "
        f"{args.warmup} warm-up lookups per connection, client: 1 process per connection"
    )
    for t in targets:
        print(f"# {t.name}: {t.note}")
        problems = check_answers(t.socket, t.table, args.keys)
        if problems:
            raise RuntimeError(f"{t.name} gives wrong answers, not benchmarking: {problems[:3]}")
        load = Load(t.socket, t.table, args.keys, args.warmup, args.seed)
        warm = run_row(load, max(args.conns), args.warmup_time, t.meter())
        if warm["errors"]:
            raise RuntimeError(f"{t.name} warm-up failed: {warm['errors'][:3]}")
    print("# answers checked, warm-up done\n" + HEADER, flush=True)
    rows = []
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"# round {rnd + 1} of {args.rounds}")
        for k, conns in enumerate(args.conns):
            # Alternate who goes first, so drift (thermal, neighbours) hits both.
            for t in targets if (k + rnd) % 2 == 0 else targets[::-1]:
                time.sleep(args.pause)
                seed = args.seed + 1000 * rnd + k
                load = Load(t.socket, t.table, args.keys, args.warmup, seed)
                row = {"target": t.name, "round": rnd + 1}
                row |= run_row(load, conns, args.duration, t.meter())
                rows.append(row)
                print(fmt_row(t.name, row), flush=True)
    rat = ratios(rows)
    if rat:
        over = f", medians of {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"\nours / postfix{over}   (throughput > 1 and latency < 1 favour ours)")
        print(
            f"{'target':>8} {'conns':>5} {'lookups/s':>10} {'p50':>6} {'p99':>6} {'CPU/lookup':>10}"
        )
        for r in rat:
            print(
                f"{r['target']:>8} {r['conns']:>5} {r['throughput']:>9.2f}x {r['p50']:>5.2f}x "
                f"{r['p99']:>5.2f}x {r['cpu_per_lookup']:>9.2f}x"
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())
