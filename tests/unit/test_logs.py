"""Log destinations: stderr, syslog and postlogd datagrams as Postfix formats them."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyproxymap import logs
from pyproxymap.config.maincf import MainCf

SECRET = "password = hunter2, and postgresql://bob:s3cret@db/mail"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("pyproxymap")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level, root.propagate = saved


def _receiver(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def _received(sock: socket.socket, count: int) -> list[str]:
    return [sock.recv(65536).decode() for _ in range(count)]


def _maincf(tmp_path: Path, text: str) -> MainCf:
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}/q\ncompatibility_level = 3.6\n" + text
    )
    return MainCf.load(tmp_path)


def _log_three_lines() -> None:
    log = logging.getLogger("pyproxymap.proxymap")
    log.info("opened %s", "pgsql:/etc/postfix/users.cf")
    log.warning("connect failed: %s", SECRET)
    log.critical("two\nlines")


def test_postlog_lines_reach_postlogds_socket_as_msg_logger_formats_them(tmp_path, restore_logging):
    maincf = _maincf(tmp_path, "postlog_service_name = plog\nmyhostname = mx1.example.com\n")
    receiver = _receiver(tmp_path / "q" / "public" / "plog")
    try:
        logs.setup("info", "postlog", maincf)
        _log_three_lines()
        got = _received(receiver, 4)
    finally:
        receiver.close()
    pid = os.getpid()
    # "%b %d %H:%M:%S " then the host's first label, then name[pid]: (msg_logger.c)
    stamp = r"[A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d"
    head = rf"{stamp} mx1 postfix/pyproxymap\[{pid}\]: "
    assert re.fullmatch(head + r"opened pgsql:/etc/postfix/users\.cf", got[0]), got
    assert re.fullmatch(
        head + r"warning: connect failed: password = \*\*\*, and postgresql://bob:\*\*\*@db/mail",
        got[1],
    ), got
    assert re.fullmatch(head + "fatal: two", got[2]) and re.fullmatch(head + "fatal: lines", got[3])
    assert "hunter2" not in "".join(got) and "s3cret" not in "".join(got)
    # postlogd strips month, day, time and host, then takes name[pid] (postlogd.c)
    _month, _day, _time, host, progname, rest = got[1].split(None, 5)
    assert (host, progname) == ("mx1", f"postfix/pyproxymap[{pid}]:")
    assert rest.startswith("warning: ")


def test_postlog_default_service_name_and_syslog_name(tmp_path, restore_logging):
    maincf = _maincf(tmp_path, "syslog_name = postfix-out\n")
    receiver = _receiver(tmp_path / "q" / "public" / "postlog")
    try:
        logs.setup("debug", "postlog", maincf)
        logging.getLogger("pyproxymap").debug("debug line")
        (got,) = _received(receiver, 1)
    finally:
        receiver.close()
    assert f" postfix-out/pyproxymap[{os.getpid()}]: debug line" in got


def test_syslog_datagrams_as_syslog3_sends_them(tmp_path, restore_logging):
    maincf = _maincf(tmp_path, "syslog_facility = local3\n")
    path = tmp_path / "devlog"
    receiver = _receiver(path)
    try:
        logs.setup("info", "syslog", maincf, syslog_path=str(path))
        _log_three_lines()
        got = _received(receiver, 4)
    finally:
        receiver.close()
    # <facility * 8 + level>"%h %e %T " then tag[pid]: (glibc syslog(3), no host name)
    stamp = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
    head = rf"{stamp} postfix/pyproxymap\[{os.getpid()}\]: "
    local3 = 19 * 8
    assert re.fullmatch(rf"<{local3 + 6}>" + head + r"opened pgsql:\S+", got[0]), got
    assert re.fullmatch(rf"<{local3 + 4}>" + head + r"warning: connect failed: .*", got[1]), got
    assert "hunter2" not in got[1] and "password = ***" in got[1]
    assert got[2].startswith(f"<{local3 + 2}>") and got[2].endswith("fatal: two")


def test_syslog_default_facility_is_mail_and_a_bad_one_is_refused(tmp_path, restore_logging):
    path = tmp_path / "devlog"
    receiver = _receiver(path)
    try:
        logs.setup("info", "syslog", _maincf(tmp_path, ""), syslog_path=str(path))
        logging.getLogger("pyproxymap").error("boom")
        (got,) = _received(receiver, 1)
    finally:
        receiver.close()
    assert got.startswith(f"<{2 * 8 + 3}>") and got.endswith("error: boom")
    with pytest.raises(ValueError, match="unknown facility name: mailz"):
        logs.handler_for("syslog", _maincf(tmp_path, "syslog_facility = mailz\n"))
    with pytest.raises(ValueError, match="log_destination"):
        logs.handler_for("journal", _maincf(tmp_path, ""))


def test_unreachable_log_socket_falls_back_to_stderr(tmp_path, restore_logging, capsys):
    logs.setup("info", "postlog", _maincf(tmp_path, "myhostname = h.example\n"))
    logging.getLogger("pyproxymap").warning("bind_pw = topsecret")
    err = capsys.readouterr().err
    assert f" h postfix/pyproxymap[{os.getpid()}]: warning: bind_pw = ***" in err
    assert "topsecret" not in err


def test_stderr_lines_are_redacted(restore_logging, capsys):
    logs.setup("info")
    logging.getLogger("pyproxymap.proxywrite").warning("x %s", SECRET)
    err = capsys.readouterr().err
    assert " pyproxymap/proxywrite[" in err and "password = ***" in err
    assert "hunter2" not in err and "s3cret" not in err


def test_handler_paths_after_chroot(tmp_path):
    handler = logs.PostfixLogHandler("t", str(tmp_path / "q" / "public" / "postlog"), postlog=True)
    handler.chrooted(str(tmp_path / "q"))
    assert handler.path == "/public/postlog"
    handler.close()
    handler = logs.PostfixLogHandler("t", "/dev/log")
    handler.chrooted(str(tmp_path / "q"))
    assert handler.path == "/dev/log"  # as Postfix: the chroot's own dev/log
    handler.close()


def test_master_handler_follows_postlog_service(tmp_path, monkeypatch):
    path = tmp_path / "postlog"
    receiver = _receiver(path)
    monkeypatch.setenv("POSTLOG_SERVICE", str(path))
    monkeypatch.setenv("POSTLOG_HOSTNAME", "relay.example.net")
    handler = logs.PostfixLogHandler.for_master("postfix/pyproxymap")
    try:
        logger = logging.getLogger("pyproxymap.test_master_handler")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("password=abc")
        (got,) = _received(receiver, 1)
    finally:
        handler.close()
        receiver.close()
    assert re.search(r"\d relay postfix/pyproxymap\[\d+\]: warning: password=\*\*\*$", got), got
