"""Run as the proxymap or proxywrite service of Postfix's master(8).

master.cf names our command; master execs it as root with its usual arguments
(``-t unix -u``, ``-n proxywrite``, ``-l``, ``-o name=value`` …, getopt string
``cdDi:lm:n:o:s:St:uvVz``) and these file descriptors: 3 and 4, the flow-control
pipe (unused); 5, a stream socket to master shared by every process of the
service; 6, the service's listening socket, bound by master. We adopt fd 6,
chroot to ``queue_directory`` with ``-c``, drop to ``mail_owner`` (``-u``), and
tell master whether we are available with 12-byte records ``struct {int pid;
unsigned gen; int avail}`` on fd 5, GENERATION coming from the environment
(octal). We exit when fd 5 reads EOF (master died,
or ``postfix reload``: the next child gets the new configuration), on SIGTERM
(``postfix stop``), after ``max_idle`` seconds without clients, after ``max_use``
closed connections, and, fatally, when the event loop stops turning for
``daemon_timeout`` seconds.

Exiting. master starts the next child only once we are gone (on reload it
still counts us as available), so we stop accepting at once and are quick
about the rest: requests in flight are answered (up to ``shutdown_grace``);
connections less than ``request_timeout`` old, one-shot clients such as postmap
in mid-conversation, get until they hang up or fall silent (``QUIET_SECONDS``);
older, daemon-held connections are closed as soon as nothing is in flight, and
their clients reconnect to the next child. (multi_server exits at once,
cutting requests off; its clients sleep 1 s and retry.) The standard asyncio
loop is used, not uvloop: see ``ProxymapServer.stop_accepting``.

Availability. master forks another child only when a client is waiting on the
listening socket and no child of the service is AVAIL; a child counts as AVAIL
from its fork. multi_server(3) serves one request at a time, so it brackets each
request with TAKEN and AVAIL, and master adds processes as requests overlap. An
event loop accepts while it serves, so copying that would make master fork
processes we do not need (and cost two writes per request). We report TAKEN only
when we cannot accept promptly, so that master adds a process exactly then:

* while draining after ``max_use`` (we no longer accept; the new child serves
  newcomers while we finish with the clients we have);
* while the event loop is stalled for ``STALL_SECONDS`` or more (a blocking
  table, a long GC), as seen by the watchdog thread; AVAIL again when it turns.

Otherwise we stay AVAIL. One extra TAKEN→AVAIL pair is sent once, soon after
startup, at a moment when no client is waiting (so master has no reason to fork
during it): master counts a completed use, and so treats a later abnormal exit
as a crash to restart from, not as "bad command startup" to throttle the service
for ``service_throttle_time`` (60 s of hung clients). Startup errors happen
before it and exit 1, so a broken configuration is throttled rather than
re-forked in a loop.

Limits follow multi_server with one change: ``max_use`` counts closed
connections, but where multi_server keeps accepting until it happens to have no
clients (which a busy event loop never has) we stop accepting at ``max_use``,
wait for our clients to hang up (Postfix clients do after ``ipc_idle`` of quiet
or ``ipc_ttl``), then exit. ``max_use = 0`` means no limit, ``max_idle = 0`` no
idle exit.

``-c`` (master.cf's chroot column ``y``): chroot to ``queue_directory`` before the
drop to ``mail_owner``, as chroot_uid() does; every module a serving process may
need is imported first (``privileges.chroot_to``: Python imports lazily), and
table files are then named relative to the queue directory.

Not supported, refused at startup: ``-S`` (stand-alone), transports other than
``unix``, and running as root without ``-u`` (set master.cf's unpriv column to
``-`` or ``y``). proxywrite
starts a new session, as Postfix's proxymap does, so ``postfix stop`` cannot cut
an update short; it exits on the EOF that follows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getopt
import json
import logging
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import logs, privileges
from .. import settings as settings_mod
from ..config.maincf import ConfigError, MainCf, split_nameval
from ..logs import PostfixLogHandler, RedactingFormatter, install
from ..privileges import drop_privileges
from ..settings import Settings
from .admin import MAX_LINE, AdminServer, ServerControl
from .app import ProxymapServer, ServiceSlot
from .session import Session

log = logging.getLogger("pyproxymap")

GETOPT = "cdDi:lm:n:o:s:St:uvVz"
MASTER_FLOW_READ, MASTER_FLOW_WRITE = 3, 4
MASTER_STATUS_FD = 5
MASTER_LISTEN_FD = 6
STAT_TAKEN, STAT_AVAIL = 0, 1
SERVICES = ("proxymap", "proxywrite")
DEFAULT_CONFIG_DIR = "/etc/postfix"
#: A loop that has not turned for this long reports TAKEN, so master may add a process.
STALL_SECONDS = 1.0
#: When stopping, a connection whose client has been silent this long is closed.
QUIET_SECONDS = 0.1
#: How often the loop proves it turns, and the watchdog thread looks.
HEARTBEAT = 0.25
#: Without ipc_ttl in main.cf: Postfix's default, the longest a client keeps a connection.
DEFAULT_IPC_TTL = 1000


class Fatal(Exception):
    """A startup error: logged as ``fatal:``, exit status 1 (never 0: master would re-fork)."""


# -- arguments --------------------------------------------------------------------------
@dataclass
class MasterArgs:
    """What master's command line says, as multi_server_main reads it."""

    service: str | None = None  # -n
    transport: str | None = None  # -t
    overrides: dict[str, str] = field(default_factory=dict)  # -o, -i, -m (later wins)
    socket_count: int = 1  # -s
    unprivileged: bool = False  # -u
    chroot: bool = False  # -c
    verbose: int = 0  # -v
    daemon_mode: bool = True  # -d clears it
    debug_me: bool = False  # -D
    stand_alone: bool = False  # -S
    solitary: bool = False  # -l
    zerolimit: bool = False  # -z
    log_stderr: bool = False  # -V
    args: list[str] = field(default_factory=list)  # after the options: master.cf extras


def _atoi(text: str) -> int:
    """C atoi(): leading space, a sign, digits; 0 when there are none."""
    rest = text.lstrip(" \t\n\v\f\r")
    sign = -1 if rest[:1] == "-" else 1
    rest = rest[1:] if rest[:1] in "+-" else rest
    digits = ""
    for ch in rest:
        if not "0" <= ch <= "9":
            break
        digits += ch
    return sign * int(digits) if digits else 0


def parse_argv(argv: Sequence[str]) -> MasterArgs:
    """Options as getopt("+cdDi:lm:n:o:s:St:uvVz") gives them: clustered (``-lu``),
    arguments attached or separate, parsing stops at ``--`` or the first non-option.
    ``argv`` excludes the program name. Raises Fatal as multi_server would."""
    try:
        opts, rest = getopt.getopt(list(argv), GETOPT)
    except getopt.GetoptError as e:
        raise Fatal(f"invalid option: {e.opt}") from None
    out = MasterArgs(args=rest)
    for opt, value in opts:
        flag = opt[1]
        if flag == "c":
            out.chroot = True
        elif flag == "d":
            out.daemon_mode = False
        elif flag == "D":
            out.debug_me = True
        elif flag == "i":
            out.overrides["max_idle"] = value
        elif flag == "l":
            out.solitary = True
        elif flag == "m":
            out.overrides["max_use"] = value
        elif flag == "n":
            out.service = value
        elif flag == "o":
            try:
                name, val = split_nameval(value)
            except ValueError as e:
                raise Fatal(f'invalid "-o {value}" option value: {e}') from None
            out.overrides[name] = val
        elif flag == "s":
            out.socket_count = _atoi(value)
            if out.socket_count <= 0:
                raise Fatal(f"invalid socket_count: {value}")
        elif flag == "S":
            out.stand_alone = True
        elif flag == "t":
            out.transport = value
        elif flag == "u":
            out.unprivileged = True
        elif flag == "v":
            out.verbose += 1
        elif flag == "V":
            out.log_stderr = True
        elif flag == "z":
            out.zerolimit = True
    return out


def service_role(args: MasterArgs, argv0: str) -> str:
    """The service: ``-n NAME``, else the command's base name; proxymap or proxywrite only."""
    name = args.service if args.service is not None else os.path.basename(argv0)
    if name not in SERVICES:
        raise Fatal(
            f'invalid service name: "{name}" - service name must be "proxywrite" or "proxymap"'
        )
    return name


def check_supported(args: MasterArgs) -> None:
    """Refuse what we cannot do, with the master.cf change that fixes it."""
    if args.stand_alone:
        raise Fatal("stand-alone mode (-S) is not supported")
    if args.transport is None:
        raise Fatal("no transport type specified")
    if args.transport.lower() != "unix":
        raise Fatal(f"unsupported transport type: {args.transport} (unix only)")
    if args.socket_count != 1:
        raise Fatal(f"one listening socket expected, master passed {args.socket_count}")


# -- status records ---------------------------------------------------------------------
def parse_generation(text: str | None) -> int:
    """GENERATION from master: octal text (``%o``), read as strtoul(s, 0, 8) after alldig()."""
    if text is None:
        return 0
    if not all("0" <= ch <= "9" for ch in text):
        raise Fatal(f"bad generation: {text}")
    digits = ""
    for ch in text:
        if ch > "7":
            break
        digits += ch
    return (int(digits, 8) if digits else 0) & 0xFFFFFFFF


def status_record(pid: int, generation: int, avail: int) -> bytes:
    """One MASTER_STATUS record: ``struct {int pid; unsigned gen; int avail}``, native."""
    return struct.pack("iIi", pid, generation & 0xFFFFFFFF, avail)


class MasterStatus:
    """Our availability as master sees it, written to fd 5 when it changes.

    Thread-safe: the event loop and the watchdog thread both report. ``take(reason)``
    makes us TAKEN until every reason is released. A failed or short write means
    master is gone: ``on_gone`` is called once and nothing more is written.
    """

    def __init__(
        self,
        fd: int = MASTER_STATUS_FD,
        *,
        pid: int | None = None,
        generation: int = 0,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.pid = os.getpid() if pid is None else pid
        self.generation = generation
        self.on_gone = on_gone
        self.gone = False
        self.state = STAT_AVAIL  # master counts a new child as available from its fork
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def _write(self, avail: int) -> bool:
        record = status_record(self.pid, self.generation, avail)
        try:
            written = os.write(self.fd, record)  # one write: siblings share the stream
        except BlockingIOError:  # our own supervisor is not reading: try again later
            return False
        except OSError as e:
            log.debug("status update: %s", e)
            written = -1
        if written != len(record):
            self.gone = True
            if self.on_gone is not None:
                self.on_gone()
            return False
        self.state = avail
        return True

    def _sync(self) -> None:
        want = STAT_TAKEN if self._taken else STAT_AVAIL
        if want != self.state and not self.gone:
            self._write(want)

    def take(self, reason: str) -> None:
        with self._lock:
            self._taken.add(reason)
            self._sync()

    def release(self, reason: str) -> None:
        with self._lock:
            self._taken.discard(reason)
            self._sync()

    def beat(self) -> None:
        """Say again what we are: our own supervisor takes silence for a hung worker.
        Its socket is non-blocking: a supervisor that stops reading (stopped with ^Z,
        say) must not stop us serving."""
        with self._lock:
            if not self.gone:
                self._write(STAT_TAKEN if self._taken else STAT_AVAIL)

    def cycle(self) -> bool:
        """TAKEN then AVAIL, when AVAIL: master counts one completed use."""
        with self._lock:
            if self.gone or self._taken:
                return False
            return self._write(STAT_TAKEN) and self._write(STAT_AVAIL)


# -- file descriptors and privileges ----------------------------------------------------
def check_status_fd(fd: int = MASTER_STATUS_FD) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise Fatal(f"status fd {fd}: {e.strerror} (run me from master.cf only)") from None
    if not stat.S_ISSOCK(mode):
        raise Fatal(f"status fd {fd} is not a socket (run me from master.cf only)")


def adopt_listeners(count: int = 1, first: int = MASTER_LISTEN_FD) -> list[socket.socket]:
    """The listening sockets master bound for us, as socket objects (which own the fds)."""
    out = []
    for fd in range(first, first + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise Fatal(f"listening fd {fd}: {e.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise Fatal(f"listening fd {fd} is not a UNIX-domain stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise Fatal(f"fd {fd} is not a listening socket")
        out.append(sock)
    return out


def close_on_exec(last: int) -> None:
    """Keep master's fds (3 to ``last``) out of any helper process we start."""
    for fd in range(MASTER_FLOW_READ, last + 1):
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- logging ----------------------------------------------------------------------------
def setup_logging(tag: str, level: int, to_stderr: bool) -> None:
    """Log where master says (see PostfixLogHandler.for_master), and with ``-V`` or on a
    terminal also to stderr; passwords masked in both."""
    handlers: list[logging.Handler] = [PostfixLogHandler.for_master(tag)]
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(RedactingFormatter(f"{tag}: %(levelname)s: %(message)s"))
        handlers.append(stream)
    install(handlers, level)


def log_tag(procname: str, maincf: MainCf | None = None) -> str:
    """mail_task(): MAIL_LOGTAG from master, else syslog_name, then ``/`` program name."""
    tag = os.environ.get("MAIL_LOGTAG")
    if tag is None and maincf is not None:
        with contextlib.suppress(ConfigError):
            tag = maincf.get("syslog_name")
    return f"{tag or 'postfix'}/{procname}"


# -- the running child ------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """The main.cf limits a Postfix daemon enforces on itself (0 = none)."""

    max_use: int
    max_idle: int
    daemon_timeout: int
    ipc_ttl: int

    @classmethod
    def from_maincf(cls, maincf: MainCf) -> Limits:
        ipc_ttl = DEFAULT_IPC_TTL
        if maincf.get("ipc_ttl") is not None:
            ipc_ttl = maincf.get_time("ipc_ttl")
        return cls(
            max_use=maincf.get_int("max_use"),
            max_idle=maincf.get_time("max_idle"),
            daemon_timeout=maincf.get_time("daemon_timeout"),
            ipc_ttl=ipc_ttl,
        )


class _Tracked(asyncio.Protocol):
    """A Session as asyncio sees it, noting when its client last sent something."""

    __slots__ = ("born", "last", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.born = time.monotonic()
        self.last: float | None = None  # None: nothing received yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.session.data_received(data)

    def eof_received(self) -> bool:
        return self.session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class _MasterServer(ProxymapServer):
    """ProxymapServer that reports connections opened and closed, and stops without
    failing clients that are in the middle of their business."""

    def __init__(
        self,
        *args: object,
        on_connect: Callable[[], None],
        on_disconnect: Callable[[], None],
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._tracked: dict[Session, _Tracked] = {}

    def _session(self, slot: ServiceSlot) -> _Tracked:  # type: ignore[override]
        session = super()._session(slot)
        forget = session.on_lost
        tracked = self._tracked[session] = _Tracked(session)

        def lost(s: Session) -> None:
            if forget is not None:
                forget(s)
            self._tracked.pop(s, None)
            self._on_disconnect()

        session.on_lost = lost
        self._on_connect()
        return tracked

    async def stop(self) -> None:
        """ProxymapServer.stop, after closing each connection at a safe moment.

        A client that writes to a connection we have just closed fails (postmap
        dies of SIGPIPE; a daemon sleeps 1 s and retries), while one that finds it
        closed before its next request reconnects at once (clnt_stream checks).
        Young connections (under request_timeout old) are one-shot clients such as
        postmap in mid-conversation (open, then lookup): we wait until they hang up
        or fall silent for QUIET_SECONDS, or for their first request. Older ones are
        long-lived daemon connections, closed as soon as nothing is in flight.
        """
        await self.stop_accepting()
        loop = asyncio.get_running_loop()
        patience = self.settings.request_timeout
        deadline = loop.time() + patience
        while self.sessions and loop.time() < deadline:
            now, waiting = time.monotonic(), False
            for session in list(self.sessions):
                tracked = self._tracked.get(session)
                young = tracked is not None and now - tracked.born < patience
                if session.busy or (
                    young
                    and tracked is not None
                    and (tracked.last is None or now - tracked.last < QUIET_SECONDS)
                ):
                    waiting = True
                else:
                    session.close_when_idle()
            if not waiting:
                break
            await asyncio.sleep(0.01)
        await super().stop()


SUPERVISOR_ENV = "PYPROXYMAP_SUPERVISOR"


@dataclass(frozen=True)
class Supervised:
    """What pyproxymap's own supervisor (``serve`` with ``workers``) tells a worker it
    starts, in ``$PYPROXYMAP_SUPERVISOR``; absent under Postfix's master."""

    settings_file: str  # pyproxymap.toml as the supervisor read it
    settings: dict[str, Any]  # settings given on the supervisor's command line
    processes: int  # workers of every service: per-table bounds are shared by them
    control_fd: int  # a connected stream socket: the supervisor's admin commands

    @classmethod
    def from_env(cls) -> Supervised | None:
        text = os.environ.get(SUPERVISOR_ENV)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise Fatal(f"${SUPERVISOR_ENV}: {e}") from None

    def to_env(self) -> str:
        return json.dumps(asdict(self))


class MasterChild:
    """One child's life: serve, keep master informed, exit when a limit or master says so.

    Run by our own supervisor (``supervised``), it also reloads on SIGHUP without
    dropping a connection, answers the supervisor on an admin socket of its own, and
    repeats its status every HEARTBEAT so that a hung worker is noticed and killed.
    """

    def __init__(
        self,
        maincf: MainCf,
        settings: Settings,
        role: str,
        listener: socket.socket,
        status: MasterStatus,
        limits: Limits,
        *,
        supervised: Supervised | None = None,
        reread: Callable[[], tuple[MainCf, Settings]] | None = None,
    ) -> None:
        self.role = role
        self.supervised = supervised
        self.reread = reread
        self.listener = listener
        self.status = status
        self.limits = limits
        self.server = _MasterServer(
            maincf,
            settings,
            listeners={role: listener},
            on_connect=self._connected,
            on_disconnect=self._disconnected,
        )
        self.clients = 0
        self.use_count = 0
        self.accepting = True
        self.reason = ""
        self._done: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._started = False
        self._beat = time.monotonic()
        self._stopping = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()

        def gone() -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(self.finish, "master gone")

        self.status.on_gone = gone
        await self.server.start()
        loop.add_reader(self.status.fd, self._status_readable)
        loop.add_signal_handler(signal.SIGTERM, self.finish, "SIGTERM")
        self._arm_idle()
        self._heartbeat()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        if self.supervised is not None:
            await self._serve_supervisor()
        loop.call_soon(self._mark_started, 0)
        log.debug("%s: serving, pid %d", self.role, os.getpid())
        try:
            await self._done.wait()
            log.info("%s: %s -- exiting", self.role, self.reason)
            self.accepting = False
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.status.fd)
            await self.server.stop()
        finally:
            self._stopping.set()
        return 0

    async def _serve_supervisor(self) -> None:
        """SIGHUP reloads in place; the supervisor's admin commands (status, reload,
        flush) come over a socket pair, so no file name exposes them to anyone else."""
        assert self.supervised is not None and self.reread is not None
        reread = self.reread
        os.set_blocking(self.status.fd, False)  # see MasterStatus.beat

        async def reload() -> str | None:
            return await self.server.reload_from(reread)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(reload()))
        control = socket.socket(fileno=self.supervised.control_fd)
        reader, writer = await asyncio.open_unix_connection(sock=control, limit=MAX_LINE)
        admin_server = AdminServer(ServerControl(self.server, reload), Path())
        self._spawn(admin_server.serve_connection(reader, writer))

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def finish(self, reason: str) -> None:
        """Stop: no more accepting; requests received are answered, then we exit."""
        if self._done is not None and not self._done.is_set():
            self.reason = reason
            self._done.set()

    # -- master -----------------------------------------------------------------------
    def _status_readable(self) -> None:
        # master never writes to us: readable means EOF (reload, or master died).
        self.finish("master disconnect")

    def _mark_started(self, tries: int) -> None:
        """The one TAKEN→AVAIL pair, when no client waits (so master would not fork)."""
        if self._started or not self.accepting:
            return
        if self.supervised is not None:  # only Postfix's master counts uses
            self._started = True
            return
        try:
            waiting = bool(select.select([self.listener], [], [], 0)[0])
        except (OSError, ValueError):
            waiting = False
        if waiting and tries < 100:
            assert self._loop is not None
            self._loop.call_later(0.05, self._mark_started, tries + 1)
            return
        self._started = True
        self.status.cycle()

    # -- clients and limits -----------------------------------------------------------
    def _connected(self) -> None:
        self.clients += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _disconnected(self) -> None:
        self.clients -= 1
        self.use_count += 1
        if self.accepting and self.limits.max_use > 0 and self.use_count >= self.limits.max_use:
            self._drain()
        if self.clients == 0:
            if not self.accepting:
                self.finish(f"max_use {self.limits.max_use} reached")
            else:
                self._arm_idle()

    def _drain(self) -> None:
        """max_use reached: TAKEN, no new clients, exit when ours have hung up."""
        self.accepting = False
        self.status.take("draining")
        assert self._loop is not None
        self._tasks.add(self._loop.create_task(self.server.stop_accepting()))
        self._loop.call_later(self.limits.ipc_ttl, self.finish, "max_use drain timeout")

    def _arm_idle(self) -> None:
        if self.limits.max_idle > 0 and self.clients == 0 and self._loop is not None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = self._loop.call_later(
                self.limits.max_idle, self.finish, "idle timeout"
            )

    # -- watchdog ---------------------------------------------------------------------
    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        if self.supervised is not None:
            self.status.beat()
        assert self._loop is not None
        self._loop.call_later(HEARTBEAT, self._heartbeat)

    def _watchdog(self) -> None:
        """Thread: TAKEN while the loop is stalled; fatal after daemon_timeout."""
        stalled = False
        while not self._stopping.wait(HEARTBEAT):
            lag = time.monotonic() - self._beat
            if 0 < self.limits.daemon_timeout <= lag:
                log.critical("watchdog timeout")
                logging.shutdown()
                os._exit(1)
            if lag >= STALL_SECONDS and not stalled:
                stalled = True
                log.warning("event loop stalled for %.1f s: reporting busy to master", lag)
                self.status.take("stalled")
            elif lag < STALL_SECONDS and stalled:
                stalled = False
                self.status.release("stalled")


# -- entry point ------------------------------------------------------------------------
def _load_settings(
    maincf: MainCf, role: str, verbose: int, supervised: Supervised | None = None
) -> Settings:
    if supervised is None:
        conf = settings_mod.load(maincf.config_dir / "pyproxymap.toml")
    else:  # as the supervisor has them; our share of each table's bounds
        given = argparse.Namespace(**supervised.settings)
        conf = settings_mod.load(Path(supervised.settings_file), given)
        conf = replace(conf, tables=conf.tables.shared_by(supervised.processes))
    conf = replace(conf, services=role, log_level="debug" if verbose else conf.log_level)
    return conf.validate()


def _startup(argv: Sequence[str], procname: str) -> MasterChild:
    """Everything up to the event loop, as multi_server_main orders it. Raises Fatal."""
    args = parse_argv(argv[1:])
    level = logging.DEBUG if args.verbose else logging.INFO
    setup_logging(log_tag(procname), level, args.log_stderr or os.isatty(2))
    if args.daemon_mode and not args.stand_alone and os.isatty(0):
        raise Fatal("do not run this command by hand")
    role = service_role(args, argv[0])
    check_supported(args)
    if args.debug_me:
        log.warning("-D: debugger_command is not supported (ignored)")
    generation = parse_generation(os.environ.get("GENERATION"))
    config_dir = os.environ.get("MAIL_CONFIG") or DEFAULT_CONFIG_DIR
    supervised = Supervised.from_env()

    def reread() -> tuple[MainCf, Settings]:
        maincf = MainCf.load(config_dir, args.overrides)
        return maincf, _load_settings(maincf, role, args.verbose, supervised)

    try:
        maincf = MainCf.load(config_dir, args.overrides)
        setup_logging(log_tag(procname, maincf), level, args.log_stderr or os.isatty(2))
        _, settings = reread()
        if supervised is not None:  # log where and as the supervisor logs
            level_name = "debug" if args.verbose else settings.log_level
            logs.setup(level_name, settings.log_destination, maincf)
        limits = Limits.from_maincf(maincf)
        queue_dir = maincf.get("queue_directory") or "/var/spool/postfix"
        # Our own supervisor may name another account (the user setting).
        owner = (supervised and settings.user) or maincf.get("mail_owner") or "postfix"
    except (ConfigError, ValueError) as e:
        raise Fatal(str(e)) from None
    logging.getLogger("pyproxymap").setLevel(settings.log_level.upper())
    try:
        os.chdir(queue_dir)
    except OSError as e:
        raise Fatal(f'chdir("{queue_dir}"): {e.strerror}') from None
    check_status_fd()
    (listener,) = adopt_listeners(args.socket_count)
    close_on_exec(MASTER_LISTEN_FD + args.socket_count - (0 if supervised else 1))
    if role == "proxywrite":
        with contextlib.suppress(OSError):
            os.setsid()  # a process-group SIGTERM must not cut an update short
    _raise_open_file_limit()
    time.tzset()
    if os.geteuid() == 0 and not args.unprivileged:
        if supervised is None:
            raise Fatal(
                "refusing to run as root: set the unpriv column of this master.cf entry to - or y"
            )
        log.debug("unprivileged = false: running as root")  # the supervisor said so
    try:  # as chroot_uid(): the account is looked up before the chroot
        source = f"file {maincf.config_dir}/main.cf: parameter mail_owner"
        dropping = os.geteuid() == 0 and args.unprivileged
        account = privileges.account(owner, source) if dropping else None
        if args.chroot:  # master.cf chroot column y: chroot to queue_directory
            privileges.chroot_to(queue_dir)
        if account is not None:
            drop_privileges(account)
    except privileges.PrivilegeError as e:
        raise Fatal(str(e)) from None
    status = MasterStatus(generation=generation)
    log.debug("%s: generation %o, config %s, %s", role, generation, config_dir, limits)
    return MasterChild(
        maincf, settings, role, listener, status, limits, supervised=supervised, reread=reread
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for master(8): ``$daemon_directory/COMMAND [options]``."""
    argv = list(sys.argv if argv is None else argv)
    procname = os.path.basename(argv[0]) if argv else "pyproxymap"
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    with contextlib.suppress(AttributeError):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    setup_logging(log_tag(procname), logging.INFO, os.isatty(2))
    try:
        child = _startup(argv, procname)
    except Fatal as e:
        log.critical("%s", e)
        return 1
    except Exception:
        log.exception("fatal: startup failed")
        return 1
    try:
        return asyncio.run(child.run())
    except Exception:
        log.exception("%s: unexpected error", child.role)
        return 1
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
