"""Shared fixtures: throwaway Postfix config dirs and a real `pyproxymap serve` on them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "pyproxymap.cli", "serve"]


def write_confdir(root: Path, main_cf: str) -> Path:
    """A config dir whose queue_directory is private to it (so Postfix clients given
    ``-c root`` talk to the server started on it, not to a system Postfix)."""
    (root / "q" / "private").mkdir(parents=True, exist_ok=True)
    (root / "main.cf").write_text(
        f"queue_directory = {root}/q\ncompatibility_level = 3.6\n" + main_cf
    )
    return root


def throwaway_postfix_main_cf(root: Path, extra: str) -> str:
    """main.cf of a throwaway Postfix instance under root (own queue, data and log), local
    only, with no local delivery tables; ``extra`` adds the test's own parameters."""
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
myhostname = pfxtest.localdomain
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
syslog_name = postfix-pyproxymap-test
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
{extra}"""


def backdate(*paths: Path, seconds: int = 10) -> None:
    """Postfix waits for a table file modified in the last seconds to "cool down"
    (up to 1.8 s per open); make files the test just wrote older."""
    when = time.time() - seconds
    for path in paths:
        os.utime(path, (when, when))


def connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class RunningServer:
    def __init__(self, confdir: Path, *args: str) -> None:
        self.confdir = confdir
        self.log_path = confdir / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            # Stays root (tables live in root's private temp dirs); the privilege drop
            # of a root-started server is tested in tests/server/test_privileges.py.
            [*SERVE, "-c", str(confdir), "--no-unprivileged", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        deadline = time.time() + 20
        while not all(connectable(self.socket(s)) for s in ("proxymap", "proxywrite")):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.log()}")
            time.sleep(0.05)

    def socket(self, service: str = "proxymap") -> Path:
        return self.confdir / "q" / "private" / service

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve() -> Iterator:
    """serve(confdir, *args) starts `pyproxymap serve -c confdir`; stopped after the test."""
    started: list[RunningServer] = []

    def start(confdir: Path, *args: str) -> RunningServer:
        started.append(RunningServer(confdir, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def pytest_configure(config):
    """Postfix commands run without ``-c`` (postmap building a test's table files) read
    $MAIL_CONFIG/main.cf: give them a throwaway one, so the tests neither need nor read
    the machine's /etc/postfix (Debian installs Postfix "No configuration" without one)."""
    if "MAIL_CONFIG" in os.environ:
        return
    confdir = Path(tempfile.mkdtemp(prefix="pyproxymap-mail-config-"))
    (confdir / "main.cf").write_text("compatibility_level = 3.6\n")
    os.environ["MAIL_CONFIG"] = str(confdir)
    config.add_cleanup(lambda: shutil.rmtree(confdir, ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    if shutil.which("postmap"):
        return
    skip = pytest.mark.skip(reason="Postfix is not installed (make test installs it)")
    for item in items:
        if "interop" in item.keywords:
            item.add_marker(skip)
