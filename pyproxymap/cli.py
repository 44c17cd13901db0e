"""The ``pyproxymap`` command: serve | query | check | status | reload | flush."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import resource
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import demo, logs, privileges, settings
from .client import Client, ProxymapError
from .config.allowlist import build_allowlist
from .config.maincf import ConfigError, MainCf
from .server import admin
from .server.app import ProxymapServer, socket_path
from .server.listener import SocketInUse
from .server.supervisor import Supervisor

log = logging.getLogger("pyproxymap")

EXIT_FOUND, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq:
            raise SystemExit(f"pyproxymap: -o {pair}: expected name=value")
        out[name.strip()] = value.strip()
    return out


def _config(args: argparse.Namespace) -> tuple[MainCf, settings.Settings]:
    maincf = MainCf.load(args.config_dir, _overrides(args.override))
    return maincf, settings.load(_settings_file(args, maincf), args)


def _settings_file(args: argparse.Namespace, maincf: MainCf) -> Path:
    return Path(args.config) if args.config else maincf.config_dir / "pyproxymap.toml"


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        dest="config_dir",
        default="/etc/postfix",
        help="Postfix configuration directory (default: /etc/postfix)",
    )
    parser.add_argument(
        "-o",
        dest="override",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a main.cf parameter",
    )
    parser.add_argument(
        "--config",
        help="pyproxymap TOML settings file "
        "(default: pyproxymap.toml in the configuration directory)",
    )
    settings.add_arguments(parser)


# -- serve ----------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    demo_dir = None
    if args.demo:
        demo_dir = demo.create()
        args.config_dir = str(demo_dir)
    maincf, conf = _config(args)
    logs.setup(conf.log_level, conf.log_destination, maincf)
    try:
        drop = None if args.demo else _privilege_drop(args, maincf, conf)
    except privileges.PrivilegeError as e:
        log.critical("%s", e)
        return 1
    if demo_dir is not None:
        print(demo.instructions(demo_dir), flush=True)
    try:
        with contextlib.suppress(ImportError):
            import uvloop  # optional speed-up

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(_serve(maincf, conf, args, drop))
    except (SocketInUse, OSError, ImportError, privileges.PrivilegeError) as e:
        log.critical("%s", e)
        return 1
    finally:
        if demo_dir is not None:
            shutil.rmtree(demo_dir, ignore_errors=True)
    return 0


Drop = Callable[[list[Path]], list[Path]]


def _privilege_drop(
    args: argparse.Namespace, maincf: MainCf, conf: settings.Settings
) -> Drop | None:
    """Started as root: what ``_serve`` calls once the sockets are bound, to chroot
    (``chroot``) and run as ``user`` (default mail_owner), as Postfix's proxymap runs
    (``unprivileged = false``: stay root). None when there is nothing to do: not root
    (it keeps running as the user that started it), or worker processes serve (they
    drop privileges themselves)."""
    queue = maincf.get("queue_directory") or "/var/spool/postfix"
    if conf.user:
        user, source = conf.user, "setting user"
    else:
        user = maincf.get("mail_owner") or "postfix"
        source = f"file {maincf.config_dir}/main.cf: parameter mail_owner"
    chroot = queue if conf.chroot else None
    plan = privileges.standalone(user, source, chroot, conf.unprivileged)
    if plan is None or conf.workers:  # workers chroot and drop privileges themselves
        return None
    root = plan.root

    def drop(paths: list[Path]) -> list[Path]:
        if root is not None:
            # SIGHUP and ``pyproxymap reload`` read the configuration from inside the
            # chroot from now on, where it can be read only if it lies under the root.
            config_dir = privileges.inside(root, args.config_dir)
            toml = privileges.inside(root, args.config) if args.config else ""
            if config_dir is None or toml is None:
                log.warning(
                    "%s is outside the chroot %s: a reload cannot read it, restart "
                    "pyproxymap serve to apply configuration changes",
                    args.config if toml is None else args.config_dir,
                    root,
                )
            else:
                args.config_dir, args.config = config_dir, toml or None
        after = plan.enter(paths)
        log.info(
            "running as %s%s",
            plan.account.name if plan.account is not None else "root",
            f", chrooted to {root}" if root is not None else "",
        )
        return after

    return drop


def _raise_open_file_limit() -> None:
    """Every client is a file descriptor: allow as many as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serving(
    maincf: MainCf, conf: settings.Settings, args: argparse.Namespace
) -> tuple[ProxymapServer | Supervisor, admin.Control]:
    """One process serving both services, or (``workers``) a supervisor of workers."""
    reread = functools.partial(_config, args)
    if not conf.workers:
        server = ProxymapServer(maincf, conf)
        return server, admin.ServerControl(server, functools.partial(server.reload_from, reread))
    given = {
        name: getattr(args, name)
        for name, *_ in settings.definitions()
        if getattr(args, name, None) is not None
    }
    supervisor = Supervisor(
        maincf,
        conf,
        settings_file=_settings_file(args, maincf),
        given=given,
        overrides=_overrides(args.override),
        reread=reread,
    )
    return supervisor, supervisor


async def _serve(
    maincf: MainCf,
    conf: settings.Settings,
    args: argparse.Namespace,
    drop: Drop | None = None,
) -> None:
    _raise_open_file_limit()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server, server_control = _serving(maincf, conf, args)
    # From the start: a SIGHUP's default action would kill us.
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server_control.reload()))
    async with contextlib.AsyncExitStack() as stack:
        # Where they listen is read at start only, as for the service sockets.
        control = admin.AdminServer(server_control, admin.admin_path(maincf, conf))
        await control.start()
        stack.push_async_callback(control.stop)
        if conf.metrics_address:
            from .server.metrics import MetricsServer  # needs the metrics extra

            metrics = MetricsServer(server_control.status, conf.metrics_address)
            await metrics.start()
            stack.push_async_callback(metrics.stop)
        if drop is None:
            await server.start()
            stack.push_async_callback(server.stop)
        else:  # started as root: bind, become the user (maybe chrooted), then serve
            assert isinstance(server, ProxymapServer)  # workers drop privileges themselves
            await server.start(accepting=False)
            stack.push_async_callback(server.stop)
            names = list(server.socket_paths)
            *kept, control.path = drop([*server.socket_paths.values(), control.path])
            server.socket_paths.update(zip(names, kept, strict=True))
            await server.accept()
        log.info("pyproxymap started, config %s", maincf.config_dir)
        await stop.wait()
        log.info("stopping: letting in-flight requests finish")
    log.info("stopped")


# -- query ----------------------------------------------------------------------------
def _table_name(table: str) -> str:
    while table.startswith("proxy:"):
        table = table[len("proxy:") :]
    return table


def cmd_query(args: argparse.Namespace) -> int:
    maincf, conf = _config(args)
    table = _table_name(args.table)
    path = socket_path(maincf, conf, "proxywrite" if args.write else "proxymap")
    found = False
    try:
        with Client(path) as client:
            for key in args.keys:
                value = client.lookup(table, key)
                if value is None:
                    continue
                found = True
                text = value.decode("utf-8", "replace")
                print(f"{key}\t{text}" if len(args.keys) > 1 else text)
    except ProxymapError as e:
        print(f"pyproxymap: table proxy:{table}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"pyproxymap: cannot query {path}: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_FOUND if found else EXIT_NOT_FOUND


# -- status, reload, flush --------------------------------------------------------------
def _ask(args: argparse.Namespace, request: dict[str, str]) -> dict[str, Any] | None:
    """Send a command to the running server's admin socket; None (said why) on failure."""
    maincf = MainCf.load(args.config_dir, _overrides(args.override))
    try:
        conf = settings.load(_settings_file(args, maincf), args)
    except ValueError as e:  # the server will say so too; its admin socket is still there
        print(f"pyproxymap: warning: {e}", file=sys.stderr)
        conf = settings.Settings(admin_socket=args.admin_socket or "")
    try:
        return admin.ask(admin.admin_path(maincf, conf), request)
    except admin.AdminError as e:
        print(f"pyproxymap: {args.command}: {e}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "status"})
    if reply is None:
        return EXIT_ERROR
    if args.json:
        print(json.dumps(reply["status"], indent=2))
    else:
        print(admin.format_status(reply["status"]))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    if _ask(args, {"command": "reload"}) is None:
        return EXIT_ERROR
    print("pyproxymap: configuration reloaded")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    table = _table_name(args.table)
    reply = _ask(args, {"command": "flush", "table": table})
    if reply is None:
        return EXIT_ERROR
    if reply["flushed"]:
        print(f"pyproxymap: {table}: flushed; the next request opens it afresh")
    else:
        print(f"pyproxymap: {table} is not open; nothing to flush")
    return 0


# -- check ----------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    maincf, _ = _config(args)
    quiet = logging.getLogger("pyproxymap.check")
    lists = {writer: build_allowlist(maincf, writer, quiet) for writer in (False, True)}
    ok = True
    for given in args.tables:
        table = _table_name(given)
        print(f"proxy:{table}")
        for writer, allowlist in lists.items():
            service = "proxywrite (read-write)" if writer else "proxymap (read-only)"
            if allowlist.approves(table):
                print(f"  {service}: approved, listed in {allowlist.tables[table]}")
            else:
                print(f"  {service}: NOT approved; {allowlist.hint(table)}")
                if writer == args.write:
                    ok = False
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyproxymap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxymap and proxywrite services (foreground)")
    _add_config_options(serve)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve a built-in demo config with its own sockets in a temp dir",
    )
    serve.set_defaults(func=cmd_serve)

    query = sub.add_parser(
        "query",
        help="look keys up through the running server, "
        "like postmap -q (exit 0 found, 1 not found, 2 error)",
    )
    _add_config_options(query)
    query.add_argument("-w", "--write", action="store_true", help="ask the proxywrite service")
    query.add_argument("table", metavar="TABLE", help="[proxy:]type:name")
    query.add_argument("keys", metavar="KEY", nargs="+")
    query.set_defaults(func=cmd_query)

    check = sub.add_parser(
        "check",
        help="say whether tables are approved for the proxymap "
        "(read) and proxywrite (write) services, and how to approve them",
    )
    _add_config_options(check)
    check.add_argument(
        "-w",
        "--write",
        action="store_true",
        help="exit non-zero unless approved for write (default: for read)",
    )
    check.add_argument("tables", metavar="TABLE", nargs="+", help="[proxy:]type:name")
    check.set_defaults(func=cmd_check)

    status = sub.add_parser(
        "status",
        help="show the running server's tables, request counts and latency, cache and pool use",
    )
    _add_config_options(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    reload = sub.add_parser(
        "reload", help="make the running server re-read its configuration (as SIGHUP does)"
    )
    _add_config_options(reload)
    reload.set_defaults(func=cmd_reload)

    flush = sub.add_parser(
        "flush",
        help="drop a table's open instances and cached answers, so the next request reopens it",
    )
    _add_config_options(flush)
    flush.add_argument("table", metavar="TABLE", help="[proxy:]type:name")
    flush.set_defaults(func=cmd_flush)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"pyproxymap: fatal: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
