"""Standalone process model: a supervisor and worker processes sharing the listening sockets.

``pyproxymap serve`` with ``workers = N`` runs this. The supervisor binds the service
sockets (as root when it must, in directories that belong to mail_owner), then
starts each worker exactly as Postfix's master(8) starts ``pyproxymap-master``: the
listening socket on fd 6, a stream socket on fd 5 on which the worker reports AVAIL
or TAKEN in master's 12-byte records, the configuration directory in MAIL_CONFIG,
``-u`` so that a worker started as root drops to its user before it serves. One
worker implementation serves under both masters, and the supervisor knows
processes, not the proxymap protocol:

- N workers share the proxymap socket; one serves proxywrite (a single writer).
- A worker that dies is replaced at once and counted in ``worker_restarts``. One
  that dies before it ever reported failed to start: retried after 1 s, doubling
  to 60 s (master throttles a failing service likewise), so a broken setup does
  not spin. Workers run ``python -P`` from ``/``: nothing is imported from where
  the supervisor was started.
- A worker that reports TAKEN (draining after ``max_use``, or its event loop
  stalled) does not count as serving: a replacement starts beside it, and the
  draining one exits once its clients are gone. One that exits after
  ``max_idle`` is replaced too (its tables reopen fresh), so N keep serving.
- Watchdog: workers repeat their status every HEARTBEAT seconds; one silent for
  SILENT_SECONDS gets a replacement beside it, one silent for ``daemon_timeout``
  (its event loop or the whole process stuck) gets SIGKILL.
- Reload (SIGHUP, ``pyproxymap reload``): the new configuration is checked here and
  refused whole when broken; then every worker reloads in place, connections open.
- Stop (SIGTERM, SIGINT): workers see EOF on fd 5 (as on master's reload), answer
  what is in flight and exit; any left after ``shutdown_grace`` are killed.

Status and admin commands reach each worker over a socket pair (fd 7), so no file
name exposes them. Per-table ``max_connections`` and ``cache_size`` bound the whole
service: each worker gets its share (TableSettings.shared_by).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyproxymap

from ..config.maincf import MainCf
from ..settings import Settings
from .admin import AdminError, ask_over, merge_services, status_head
from .app import build_services, socket_path
from .listener import bind_unix
from .postfix_master import (
    HEARTBEAT,
    MASTER_LISTEN_FD,
    MASTER_STATUS_FD,
    STAT_AVAIL,
    SUPERVISOR_ENV,
    Limits,
    Supervised,
)

log = logging.getLogger("pyproxymap")

CONTROL_FD = MASTER_LISTEN_FD + 1
RECORD = struct.Struct("iIi")
MAX_BACKOFF = 60.0
#: How long a worker may take to answer an admin command (a hung one is the watchdog's);
#: status is asked at every metrics scrape, so it must not wait long for one worker.
ASK_TIMEOUT = 10.0
STATUS_TIMEOUT = 2.0
#: A worker silent this long counts as busy: a replacement starts beside it (it is
#: killed only after daemon_timeout).
SILENT_SECONDS = 2.0
#: A worker that has not reported this long after it was started is killed.
STARTUP_TIMEOUT = 60.0
#: Settings a running supervisor keeps from its start (a reload warns and keeps them).
START_ONLY = ("user", "unprivileged", "chroot", "services")
#: How a worker is started: the master(8) child entry point, named "pyproxymap" in logs.
WORKER_CODE = (
    "import sys; from pyproxymap.server.postfix_master import main; "
    "sys.exit(main(['pyproxymap', *sys.argv[1:]]))"
)


@dataclass(eq=False)
class Worker:
    service: str
    proc: subprocess.Popen[bytes]
    status: socket.socket  # our end of its fd 5
    control: socket.socket  # our end of its fd 7
    started: float = field(default_factory=time.monotonic)
    heard: float = field(default_factory=time.monotonic)
    config: int = 0  # the configuration generation it started with
    state: str = "starting"  # starting, available, busy (TAKEN), silent, stopping
    ready: bool = False  # has reported at least once
    killed: str = ""  # why we killed it, if we did
    buffer: bytes = b""
    channel: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serving(self) -> bool:
        return self.state in ("starting", "available")


class Supervisor:
    """Keeps ``workers`` proxymap workers and one proxywrite worker running."""

    def __init__(
        self,
        maincf: MainCf,
        settings: Settings,
        *,
        settings_file: Path,
        given: dict[str, Any],
        overrides: dict[str, str],
        reread: Callable[[], tuple[MainCf, Settings]],
    ) -> None:
        self.maincf = maincf
        self.settings = settings
        self.limits = Limits.from_maincf(maincf)  # checked now: workers would die of it
        self.config_generation = 0
        self.settings_file = settings_file
        self.given = given
        self.overrides = overrides
        self.reread = reread
        self.workers: list[Worker] = []
        self.listeners: dict[str, socket.socket] = {}
        self.socket_paths: dict[str, Path] = {}
        self.started = time.time()
        self.reloads = 0
        self.worker_restarts = 0
        self.generation = 0
        self._backoff: dict[str, float] = {}
        #: Counts of workers gone, so that totals never go back; each live worker's last.
        self._gone: dict[str, Any] = {"pid": 0, "services": {}}
        self._last: dict[int, dict[str, Any]] = {}
        self._throttled: dict[str, asyncio.TimerHandle] = {}
        self._stopping = False
        self._tasks: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    # -- configuration ------------------------------------------------------------------
    @property
    def targets(self) -> dict[str, int]:
        """How many workers each service should have serving."""
        counts = {"proxymap": self.settings.workers, "proxywrite": 1}
        return {name: counts[name] for name in self.settings.service_names}

    @property
    def processes(self) -> int:
        return sum(self.targets.values())

    # -- start and stop -------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _keep_inherited_fds_to_ourselves()
        owner = self.maincf.get("mail_owner")
        try:
            for name in self.targets:
                path = socket_path(self.maincf, self.settings, name)
                self.listeners[name] = bind_unix(path, owner=owner)
                self.socket_paths[name] = path
                log.info("%s: listening on %s", name, path)
        except BaseException:
            self._close_listeners()
            raise
        self._reconcile()
        self._watch()

    async def stop(self) -> None:
        """Workers finish what is in flight and exit; stragglers are killed."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for timer in self._throttled.values():
            timer.cancel()
        for worker in self.workers:
            self._retire(worker)
        assert self._loop is not None
        patience = self.settings.shutdown_grace + self.settings.request_timeout + 1
        deadline = self._loop.time() + patience
        while self.workers and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for worker in list(self.workers):
            log.warning("worker pid %d did not stop in time: killing it", worker.pid)
            self._kill(worker, "stop timeout")
        while self.workers and self._loop.time() < deadline + 5:
            await asyncio.sleep(0.05)
        self._close_listeners()

    def _close_listeners(self) -> None:
        for sock in self.listeners.values():
            sock.close()
        for path in self.socket_paths.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.listeners.clear()

    # -- keeping the right number of workers ----------------------------------------------
    def _reconcile(self) -> None:
        if self._stopping:
            return
        for service, target in self.targets.items():
            mine = [w for w in self.workers if w.service == service and w.state != "stopping"]
            serving = [w for w in mine if w.serving]
            missing = target - len(serving)
            if missing > 0 and service not in self._throttled:
                # Busy (draining, stalled) workers beside the serving ones: a few more
                # than the target at most; past that the oldest are told to finish now
                # (in-flight requests are answered, idle connections closed).
                excess = len(mine) + missing - max(2 * target, target + 4)
                for worker in sorted(mine, key=lambda w: w.started):
                    if excess <= 0:
                        break
                    if not worker.serving:
                        self._retire(worker)
                        excess -= 1
                for _ in range(missing):
                    self._spawn(service)
            for worker in sorted(serving, key=lambda w: w.started)[target:]:
                if worker.ready:  # one more than needed, after a stall or a reload
                    self._retire(worker)

    def _spawn(self, service: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_fd = self.listeners[service].fileno()
        handed = (theirs.fileno(), listen_fd, control_theirs.fileno())

        def arrange_fds() -> None:  # in the child, between fork and exec
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in handed]
            for target, fd in zip(
                (MASTER_STATUS_FD, MASTER_LISTEN_FD, CONTROL_FD), high, strict=True
            ):
                os.dup2(fd, target)  # inheritable: these three survive exec

        self.generation += 1
        env = dict(os.environ)
        package_root = str(Path(pyproxymap.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        env["MAIL_CONFIG"] = str(self.maincf.config_dir)
        env["GENERATION"] = f"{self.generation:o}"
        env[SUPERVISOR_ENV] = Supervised(
            settings_file=str(self.settings_file),
            settings=self.given,
            processes=self.processes,
            control_fd=CONTROL_FD,
        ).to_env()
        # -P and cwd /: nothing is imported from the directory we were started in.
        argv = [sys.executable, "-P", "-c", WORKER_CODE, "-t", "unix", "-n", service]
        if self.settings.unprivileged:
            argv.append("-u")  # as master.cf's unpriv column: drop to the user
        if self.settings.chroot:
            argv.append("-c")  # as master.cf's chroot column
        for name, value in self.overrides.items():
            argv += ["-o", f"{name}={value}"]
        if self.settings.log_level.lower() == "debug":
            argv.append("-v")
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=False,  # only the three made inheritable above pass
                preexec_fn=arrange_fds,
                cwd="/",
                process_group=0,  # a terminal's ^C is for the supervisor, which stops them
            )
        except OSError as e:
            log.error("%s: cannot start a worker: %s", service, e)
            for sock in (ours, theirs, control, control_theirs):
                sock.close()
            self._throttle(service)
            return
        finally:
            theirs.close()
            control_theirs.close()
        worker = Worker(service, proc, ours, control, config=self.config_generation)
        self.workers.append(worker)
        assert self._loop is not None
        ours.setblocking(False)
        self._loop.add_reader(ours.fileno(), self._status_readable, worker)
        pidfd = os.pidfd_open(proc.pid)
        self._loop.add_reader(pidfd, self._exited, worker, pidfd)
        log.debug("%s: started worker pid %d", service, proc.pid)

    def _status_readable(self, worker: Worker) -> None:
        try:
            data = worker.status.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # it closed fd 5, or died: its exit is handled by _exited
            assert self._loop is not None
            self._loop.remove_reader(worker.status.fileno())
            return
        worker.buffer += data
        while len(worker.buffer) >= RECORD.size:
            _, _, avail = RECORD.unpack_from(worker.buffer)
            worker.buffer = worker.buffer[RECORD.size :]
            worker.heard = time.monotonic()
            if not worker.ready:
                if avail != STAT_AVAIL:
                    continue  # the TAKEN of the TAKEN-AVAIL pair a worker sends at start
                worker.ready = True
                self._backoff.pop(worker.service, None)
                if worker.config < self.config_generation:  # a reload came while it started
                    task = asyncio.ensure_future(self._reload_worker(worker))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            if worker.state != "stopping":
                worker.state = "available" if avail == STAT_AVAIL else "busy"
        self._reconcile()

    def _exited(self, worker: Worker, pidfd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.status.fileno())
        code = worker.proc.wait()
        worker.status.close()
        if worker.channel is not None:
            worker.channel[1].close()
        worker.control.close()
        self.workers.remove(worker)
        if last := self._last.pop(worker.pid, None):  # its counts stay in the totals
            for info in (t for s in last["services"].values() for t in s["tables"].values()):
                info["instances"] = []
            self._gone["services"] = merge_services([self._gone, last])
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        if worker.state == "stopping" or self._stopping:
            log.debug("%s: worker pid %d stopped (%s)", worker.service, worker.pid, how)
        elif code == 0:
            log.info(
                "%s: worker pid %d exited (max_use, max_idle, SIGTERM)", worker.service, worker.pid
            )
        elif worker.ready:
            reason = f" ({worker.killed})" if worker.killed else ""
            log.warning("%s: worker pid %d %s%s", worker.service, worker.pid, how, reason)
            self.worker_restarts += 1
        else:
            log.warning(
                "%s: worker pid %d %s before it started serving", worker.service, worker.pid, how
            )
            self._throttle(worker.service)
        self._reconcile()

    def _throttle(self, service: str) -> None:
        """No new worker for this service for a while: its workers fail to start.
        Several failing at once count once."""
        if service in self._throttled:
            return
        delay = min(MAX_BACKOFF, max(1.0, 2 * self._backoff.get(service, 0.5)))
        self._backoff[service] = delay
        log.warning("%s: starting workers again in %.0f s", service, delay)
        assert self._loop is not None

        def retry() -> None:
            self._throttled.pop(service, None)
            self._reconcile()

        self._throttled[service] = self._loop.call_later(delay, retry)

    def _retire(self, worker: Worker) -> None:
        """As master on reload: EOF on its fd 5; it answers what is in flight and exits."""
        if worker.state == "stopping":
            return
        worker.state = "stopping"
        worker.heard = time.monotonic()
        with contextlib.suppress(OSError):
            worker.status.shutdown(socket.SHUT_WR)

    def _kill(self, worker: Worker, why: str) -> None:
        worker.killed = why
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def _watch(self) -> None:
        """The watchdog: a worker silent for SILENT_SECONDS gets a replacement beside it,
        one silent for daemon_timeout is killed, as is one that never reports after
        its start, or one that does not finish stopping."""
        try:
            now = time.monotonic()
            timeout = self.limits.daemon_timeout
            grace = self.settings.shutdown_grace + self.settings.request_timeout + 5
            for worker in self.workers:
                if worker.killed:
                    continue
                silent = now - worker.heard
                if worker.state == "stopping":
                    # It beats while it drains (up to ipc_ttl); silent, it is stuck.
                    if silent > grace:
                        log.warning("worker pid %d is still stopping: killing it", worker.pid)
                        self._kill(worker, "did not stop")
                elif not worker.ready:
                    if silent > STARTUP_TIMEOUT:
                        log.warning("%s: worker pid %d did not start", worker.service, worker.pid)
                        self._kill(worker, "startup timeout")
                elif 0 < timeout < silent:
                    log.warning(
                        "%s: worker pid %d silent for %.1f s (daemon_timeout %d s): killing it",
                        worker.service,
                        worker.pid,
                        silent,
                        timeout,
                    )
                    self._kill(worker, "watchdog timeout")
                elif silent > SILENT_SECONDS and worker.state != "silent":
                    log.warning(
                        "%s: worker pid %d silent for %.1f s: starting another beside it",
                        worker.service,
                        worker.pid,
                        silent,
                    )
                    worker.state = "silent"
            self._reconcile()
        finally:
            assert self._loop is not None
            self._watchdog = self._loop.call_later(HEARTBEAT, self._watch)

    # -- admin: status, reload, flush ---------------------------------------------------
    async def _ask(
        self, worker: Worker, request: dict[str, Any], timeout: float = ASK_TIMEOUT
    ) -> dict[str, Any]:
        async with worker.lock:
            if worker.channel is None:
                worker.channel = await asyncio.open_unix_connection(
                    sock=worker.control, limit=1 << 24
                )
            reader, writer = worker.channel
            return await ask_over(reader, writer, request, f"worker pid {worker.pid}", timeout)

    async def _ask_all(
        self, request: dict[str, Any], timeout: float = ASK_TIMEOUT
    ) -> list[tuple[Worker, Any]]:
        """Each ready worker's answer, or the exception it gave."""
        ready = [w for w in self.workers if w.ready and w.state != "stopping"]
        answers = await asyncio.gather(
            *(self._ask(w, request, timeout) for w in ready), return_exceptions=True
        )
        return list(zip(ready, answers, strict=True))

    async def _reload_worker(self, worker: Worker) -> None:
        try:
            await self._ask(worker, {"command": "reload"})
            worker.config = self.config_generation
        except (AdminError, OSError) as e:
            log.error("reload of worker pid %d: %s", worker.pid, e)

    async def status(self) -> dict[str, Any]:
        parts = [self._gone]
        for worker, answer in await self._ask_all({"command": "status"}, STATUS_TIMEOUT):
            if isinstance(answer, BaseException):
                log.warning("status of worker pid %d: %s", worker.pid, answer)
            else:
                parts.append(answer["status"])
                self._last[worker.pid] = answer["status"]
        now = time.monotonic()
        return status_head(self) | {
            "workers": [
                {
                    "pid": w.pid,
                    "service": w.service,
                    "state": w.state,
                    "uptime": round(now - w.started, 3),
                }
                for w in self.workers
            ],
            "services": merge_services(parts),
        }

    async def reload(self) -> str | None:
        """Check the new configuration here, then have every worker swap it in."""
        try:
            maincf, settings = self.reread()
            limits = Limits.from_maincf(maincf)  # what workers and watchdog will use
            build_services(maincf, settings)  # allow-lists and table settings; raises
        except Exception as e:
            log.error("reload refused, still serving the previous configuration: %s", e)
            return f"reload refused, still serving the previous configuration: {e}"
        kept = {name: getattr(self.settings, name) for name in START_ONLY}
        if changed := [name for name, value in kept.items() if getattr(settings, name) != value]:
            log.warning("%s: read at start only; restart to change", ", ".join(changed))
        if not settings.workers:
            log.warning(
                "workers = 0 (one process, no supervisor) takes a restart: keeping %d",
                self.settings.workers,
            )
            kept["workers"] = self.settings.workers
        settings = replace(settings, **kept)
        resized = settings.workers != self.settings.workers
        self.maincf, self.settings, self.limits = maincf, settings, limits
        self.config_generation += 1
        if settings.chroot or resized:
            # Chrooted workers cannot read the configuration, and a new number of
            # workers means new shares of the bounds: new workers take over.
            for worker in self.workers:
                self._retire(worker)
        errors = []
        for worker, answer in await self._ask_all({"command": "reload"}):
            if isinstance(answer, BaseException):
                errors.append(f"worker pid {worker.pid}: {answer}")
            else:
                worker.config = self.config_generation
        self._reconcile()
        if errors:
            log.error("reload: %s", "; ".join(errors))
            return "; ".join(errors)
        self.reloads += 1
        log.info("reloaded configuration from %s", maincf.config_dir)
        return None

    async def flush(self, table: str) -> int:
        flushed = 0
        for worker, answer in await self._ask_all({"command": "flush", "table": table}):
            if isinstance(answer, BaseException):
                log.warning("flush in worker pid %d: %s", worker.pid, answer)
            else:
                flushed += answer["flushed"]
        return flushed


def _keep_inherited_fds_to_ourselves() -> None:
    """Descriptors we inherited (a pipe of the shell that started us, say) stay out of
    the workers and of what they start: only fds 5, 6 and 7 are handed on."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(int(name), False)
