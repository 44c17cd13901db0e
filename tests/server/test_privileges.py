"""`pyproxymap serve` started as root: binds, then runs as mail_owner (or `user`),
optionally chrooted to the queue directory, as Postfix's proxymap runs."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyproxymap import privileges, settings
from pyproxymap.client import Client
from tests.conftest import ROOT, SERVE, backdate, connectable

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def _postfix() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postfix")
    except KeyError:
        pytest.skip("no postfix account")


def _ids(pid: int, field: str) -> list[int]:
    """Real, effective, saved and filesystem IDs from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(n) for n in status.split(f"\n{field}:")[1].split("\n")[0].split()]


class Serve:
    """`pyproxymap serve -c CONF` as root, the unprivileged default kept."""

    def __init__(self, conf: Path, queue: Path, *args: str) -> None:
        self.conf, self.queue = conf, queue
        self.log_path = queue.parent / f"serve-{time.monotonic_ns()}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*SERVE, "-c", str(conf), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def started(self) -> Serve:
        deadline = time.monotonic() + 20
        while not connectable(self.socket()) or "pyproxymap started" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"did not start: {self.log()}")
            time.sleep(0.05)
        return self

    def socket(self, service: str = "proxymap") -> Path:
        return self.queue / "private" / service

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def exit_status(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.exit_status()


@pytest.fixture
def site() -> Iterator[Path]:
    """A directory the postfix account can traverse (pytest's tmp_path is 0700 root)."""
    root = Path(tempfile.mkdtemp(prefix="pyproxymap-priv-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _queue(queue: Path) -> Path:
    """A queue directory as `postfix set-permissions` leaves it: private/ and public/
    owned by mail_owner."""
    owner = _postfix()
    for sub in ("private", "public"):
        (queue / sub).mkdir(parents=True, exist_ok=True)
        os.chown(queue / sub, owner.pw_uid, owner.pw_gid)
    (queue / "private").chmod(0o700)
    (queue / "public").chmod(0o710)
    return queue


def _main_cf(conf: Path, queue: Path, text: str) -> None:
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "main.cf").write_text(
        f"queue_directory = {queue}\ncompatibility_level = 3.6\nmail_owner = postfix\n" + text
    )


@needs_root
def test_root_binds_then_serves_as_mail_owner_logging_to_postlog(site):
    owner = _postfix()
    queue = _queue(site / "q")
    (site / "t").write_text("alice@example.com alice-value\n")
    (site / "u").write_text("k u-value\n")
    backdate(site / "t", site / "u")
    _main_cf(site, queue, f"proxy_read_maps = proxy:texthash:{site}/t\n")
    postlog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    postlog.bind(str(queue / "public" / "postlog"))
    postlog.settimeout(10)
    srv = Serve(site, queue, "--log-destination", "postlog")
    try:
        deadline = time.monotonic() + 20
        lines: list[str] = []
        while not any("pyproxymap started" in line for line in lines):
            assert time.monotonic() < deadline and srv.proc.poll() is None, (lines, srv.log())
            lines.append(postlog.recv(65536).decode())
        assert any(f"postfix/pyproxymap[{srv.proc.pid}]: running as postfix" in x for x in lines)
        assert _ids(srv.proc.pid, "Uid") == [owner.pw_uid] * 4
        assert _ids(srv.proc.pid, "Gid") == [owner.pw_gid] * 4
        with Client(srv.socket()) as c:
            assert c.lookup(f"texthash:{site}/t", "alice@example.com") == b"alice-value"
        # the admin socket, bound as root, still answers root's commands
        r = subprocess.run(
            [*SERVE[:-1], "status", "-c", str(site)], capture_output=True, text=True, timeout=20
        )
        assert r.returncode == 0, r.stderr
        # SIGHUP re-reads main.cf and the settings as mail_owner
        _main_cf(
            site, queue, f"proxy_read_maps = proxy:texthash:{site}/t proxy:texthash:{site}/u\n"
        )
        srv.proc.send_signal(signal.SIGHUP)
        while not any("reloaded configuration" in line for line in lines):
            assert time.monotonic() < deadline, lines
            lines.append(postlog.recv(65536).decode())
        with Client(srv.socket()) as c:
            assert c.lookup(f"texthash:{site}/u", "k") == b"u-value"
        assert srv.stop() == 0
        assert not srv.socket().exists()  # private/ belongs to mail_owner: removed
        assert srv.log() == ""  # everything went to postlogd
    finally:
        srv.stop()
        postlog.close()


@needs_root
@pytest.mark.parametrize(
    ("main_cf", "args", "message"),
    [
        (
            "mail_owner = root\n",
            [],
            "fatal: file {conf}/main.cf: parameter mail_owner: user root has privileged user ID",
        ),
        ("", ["--user", "root"], "fatal: setting user: user root has privileged user ID"),
        ("", ["--user", "no-such-user-x"], "unknown user name value: no-such-user-x"),
    ],
)
def test_a_privileged_or_unknown_user_is_refused(site, main_cf, args, message):
    queue = _queue(site / "q")
    _main_cf(site, queue, main_cf)
    srv = Serve(site, queue, *args)
    assert srv.exit_status() != 0
    assert message.format(conf=site) in srv.log(), srv.log()
    assert not (queue / "private" / "proxymap").exists()  # refused before binding


@needs_root
def test_chroot_to_the_queue_directory(site):
    owner = _postfix()
    queue = _queue(site / "q")
    conf = queue / "etc"  # inside the chroot: a reload can read it
    (queue / "t").write_text("k1 in-chroot\n")
    (queue / "t2").write_text("k2 also\n")
    (queue / "r").write_text("/^(.+)@example\\.com$/ user-$1\n")
    backdate(queue / "t", queue / "t2", queue / "r")
    _main_cf(conf, queue, "proxy_read_maps = proxy:texthash:/t proxy:regexp:/r\n")
    (conf / "pyproxymap.toml").write_text("chroot = true\n")
    srv = Serve(conf, queue).started()
    try:
        assert os.readlink(f"/proc/{srv.proc.pid}/root") == str(queue.resolve())
        assert _ids(srv.proc.pid, "Uid") == [owner.pw_uid] * 4
        with Client(srv.socket()) as c:
            assert c.lookup("texthash:/t", "k1") == b"in-chroot"  # relative to the chroot
            assert c.lookup("regexp:/r", "bob@example.com") == b"user-bob"
        _main_cf(conf, queue, "proxy_read_maps = proxy:texthash:/t proxy:texthash:/t2\n")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_log("reloaded configuration from /etc")
        with Client(srv.socket()) as c:
            assert c.lookup("texthash:/t2", "k2") == b"also"
        assert srv.stop() == 0, srv.log()
        assert not srv.socket().exists()
    finally:
        srv.stop()


@needs_root
def test_chroot_with_the_configuration_outside_says_a_reload_cannot_read_it(site):
    queue = _queue(site / "q")
    (queue / "t").write_text("k1 v1\n")
    backdate(queue / "t")
    _main_cf(site, queue, "proxy_read_maps = proxy:texthash:/t\n")
    srv = Serve(site, queue, "--chroot").started()
    try:
        assert f"{site} is outside the chroot {queue}: a reload cannot read it" in srv.log()
        with Client(srv.socket()) as c:
            assert c.lookup("texthash:/t", "k1") == b"v1"
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_log("reload refused, still serving the previous configuration")
        with Client(srv.socket()) as c:
            assert c.lookup("texthash:/t", "k1") == b"v1"
    finally:
        assert srv.stop() == 0, srv.log()


def test_not_root_keeps_its_user_and_refuses_chroot(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    assert privileges.standalone("postfix", "", None) is None
    with pytest.raises(privileges.PrivilegeError, match="chroot to /var/spool/postfix needs root"):
        privileges.standalone("postfix", "", "/var/spool/postfix")


def test_account_refuses_uid_or_gid_0_in_postfix_words():
    with pytest.raises(privileges.PrivilegeError, match=r"^src: user root has privileged user ID$"):
        privileges.account("root", "src")
    with pytest.raises(privileges.PrivilegeError, match="unknown user name value: no-such-x"):
        privileges.account("no-such-x")
    gid0 = next((p for p in pwd.getpwall() if p.pw_uid != 0 and p.pw_gid == 0), None)
    if gid0 is not None:
        with pytest.raises(privileges.PrivilegeError, match="has privileged group ID"):
            privileges.account(gid0.pw_name)


def test_inside_maps_paths_into_the_chroot(tmp_path):
    (tmp_path / "q" / "etc").mkdir(parents=True)
    assert privileges.inside(str(tmp_path / "q"), str(tmp_path / "q" / "etc")) == "/etc"
    assert privileges.inside(str(tmp_path / "q"), str(tmp_path / "q")) == "/"
    assert privileges.inside(str(tmp_path / "q"), str(tmp_path / "qq")) is None
    assert privileges.inside(str(tmp_path / "q"), str(tmp_path)) is None


def test_preload_imports_every_table_driver():
    privileges.preload()
    from pyproxymap.tables import registry

    for name in ("texthash", "regexp", "pcre", "cidr", "unionmap", "socketmap", "tcp"):
        assert registry.driver_for.cache_info().currsize and registry.driver_for(name)


def test_boolean_settings_on_the_command_line_and_in_toml(tmp_path):
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    assert settings.load(None, parser.parse_args([])).chroot is False  # False is not "<= 0"
    assert settings.load(None, parser.parse_args(["--chroot"])).chroot is True
    conf = settings.load(None, parser.parse_args(["--no-unprivileged", "--user", "nobody"]))
    assert (conf.unprivileged, conf.user, conf.log_destination) == (False, "nobody", "stderr")
    toml = tmp_path / "pyproxymap.toml"
    toml.write_text('chroot = true\nlog_destination = "syslog"\n')
    conf = settings.load(toml, parser.parse_args(["--no-chroot"]))
    assert (conf.chroot, conf.log_destination) == (False, "syslog")  # command line wins
    toml.write_text('chroot = "yes"\n')
    with pytest.raises(ValueError, match="chroot must be true or false"):
        settings.load(toml)
    toml.write_text('log_destination = "journal"\n')
    with pytest.raises(ValueError, match="unknown log_destination 'journal'"):
        settings.load(toml)
