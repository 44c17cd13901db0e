"""Postfix-style log lines, to stderr, to syslog, or to postlogd (``maillog_file``).

Operators grep Postfix logs for "warning:", "error:", "fatal:"; our lines read the
same way, wherever they go (the ``log_destination`` setting):

* ``stderr``: ``Mon DD HH:MM:SS host pyproxymap/SERVICE[PID]: warning: text``; logger
  names ``pyproxymap.<service>`` give the service in the tag.
* ``syslog``: one datagram per line to ``/dev/log``, as syslog(3) sends what a Postfix
  daemon logs: ``<PRI>Mon dD HH:MM:SS $syslog_name/pyproxymap[PID]: warning: text``,
  facility ``$syslog_facility`` (mail).
* ``postlog``: one datagram per line to postlogd's socket
  ``$queue_directory/public/$postlog_service_name``, as Postfix programs log when
  ``maillog_file`` is set (msg_logger(3)):
  ``Mon DD HH:MM:SS host $syslog_name/pyproxymap[PID]: warning: text``.

Under master(8) the same handler logs where master says (``POSTLOG_SERVICE``).
Passwords are masked in every line, whatever logged them and wherever it goes.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .config.maincf import MainCf

_SEVERITY = {
    logging.DEBUG: "",
    logging.INFO: "",
    logging.WARNING: "warning: ",
    logging.ERROR: "error: ",
    logging.CRITICAL: "fatal: ",
}

#: "password = x", "bind_pw: x" (as in Postfix's *_table files), "scheme://user:x@host".
_SECRET = re.compile(
    r"(?i)(\b(?:bind_?pw|password|passwd)\s*[=:]\s*['\"]?)[^\s,;'\"]+|(://[^/\s:@]*:)[^/\s@]+(?=@)"
)


def redact(text: str) -> str:
    """``text`` with the passwords in it replaced by ``***``."""
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


class PostfixFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._host = socket.gethostname().split(".")[0]

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(record.created))
        _, _, service = record.name.partition(".")
        tag = f"pyproxymap/{service}" if service else "pyproxymap"
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = f"{stamp} {self._host} {tag}[{os.getpid()}]: {_SEVERITY.get(record.levelno, '')}"
        return prefix + redact(text).replace("\n", "\n" + prefix)


class RedactingFormatter(logging.Formatter):
    """A plain ``logging.Formatter`` whose output has its passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# -- syslog and postlogd ----------------------------------------------------------------
DESTINATIONS = ("stderr", "syslog", "postlog")
#: syslog(3) facility codes, by the names Postfix accepts in syslog_facility.
FACILITIES = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}
LOG_MAIL = FACILITIES["mail"]
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
#: Postfix's MSG_LOGGER_RECLEN and MSG_SYSLOG_RECLEN: the longest text of one record.
RECLEN = 2000
SYSLOG_PATH = "/dev/log"
#: main.cf's default syslog_name (DEF_SYSLOG_NAME).
DEFAULT_SYSLOG_NAME = "${multi_instance_name?{$multi_instance_name}:{postfix}}"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class PostfixLogHandler(logging.Handler):
    """Lines as a Postfix program logs them, one datagram per line, passwords masked.

    ``postlog=True``: to postlogd, as msg_logger(3) formats them
    (``Mon DD HH:MM:SS host tag[pid]: warning: text``; postlogd strips the
    prefix only when it has no ``maillog_file`` to write to). Otherwise to a
    syslog socket, as syslog(3) sends what msg_syslog(3) logs
    (``<PRI>Mon dD HH:MM:SS tag[pid]: warning: text``, no host name).

    The socket is connected at once (before a privilege drop or chroot, as
    Postfix does) and reconnected once when a send fails (postlogd or syslogd
    restarted). A line that cannot be sent is written to ``fallback`` when there
    is one (Postfix commands fall back to stderr), else dropped.
    """

    def __init__(
        self,
        tag: str,
        path: str = SYSLOG_PATH,
        *,
        postlog: bool = False,
        hostname: str | None = None,
        facility: int = LOG_MAIL,
        fallback: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.tag = tag
        self.path = path
        self.postlog = postlog
        host = hostname or socket.gethostname()
        self.host = host.split(".", 1)[0]  # msg_logger logs the first label
        self.facility = facility
        self.fallback = fallback
        self.sock: socket.socket | None = None
        self._connect()

    @classmethod
    def for_master(cls, tag: str) -> PostfixLogHandler:
        """Where master(8) tells its children to log: postlogd when it exports
        POSTLOG_SERVICE (``maillog_file`` is set), else syslog, facility mail."""
        postlog = os.environ.get("POSTLOG_SERVICE")
        if postlog:
            return cls(tag, postlog, postlog=True, hostname=os.environ.get("POSTLOG_HOSTNAME"))
        return cls(tag)

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            self.sock = None

    def chrooted(self, root: str) -> None:
        """Called just before chroot(root): a path under ``root`` is reached from the
        new ``/`` when reconnecting (one outside it, such as /dev/log, is looked up
        inside the new root, as Postfix's chrooted daemons do)."""
        inside = os.path.relpath(os.path.realpath(self.path), os.path.realpath(root))
        if inside != os.curdir and not inside.startswith(os.pardir):
            self.path = "/" + inside

    def format_lines(self, record: logging.LogRecord) -> list[str]:
        """The datagrams of one record, one per line of its text."""
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        t = time.localtime(record.created)
        month, clock = _MONTHS[t.tm_mon - 1], f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        head = f"{self.tag}[{os.getpid()}]: {_SEVERITY.get(record.levelno, '')}"
        if self.postlog:
            head = f"{month} {t.tm_mday:02d} {clock} {self.host} {head}"  # "%b %d %H:%M:%S "
        else:
            priority = self.facility * 8 + _SYSLOG_PRIORITY.get(record.levelno, 2)
            head = f"<{priority}>{month} {t.tm_mday:2d} {clock} {head}"  # glibc: "%h %e %T "
        return [head + line[:RECLEN] for line in redact(text).split("\n")]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format_lines(record):
                self._send(line)
        except Exception:
            self.handleError(record)

    def _send(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        for _ in range(2):  # postlogd or syslogd may have been restarted: reconnect once
            if self.sock is not None:
                try:
                    self.sock.send(data)
                    return
                except OSError:
                    pass
            self._connect()
        if self.fallback is not None:
            self.fallback.write(line + "\n")
            self.fallback.flush()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        super().close()


def syslog_name(maincf: MainCf) -> str:
    return maincf.get("syslog_name") or maincf.expand(DEFAULT_SYSLOG_NAME, "syslog_name")


def facility_code(name: str) -> int:
    """syslog_facility's value as a syslog(3) facility; ValueError as Postfix's fatal."""
    try:
        return FACILITIES[name.lower()]
    except KeyError:
        raise ValueError(f"syslog_facility: unknown facility name: {name}") from None


def postlog_path(maincf: MainCf) -> str:
    """postlogd's socket: ``$queue_directory/public/$postlog_service_name``."""
    queue = maincf.get("queue_directory") or "/var/spool/postfix"
    return os.path.join(queue, "public", maincf.get("postlog_service_name") or "postlog")


def handler_for(
    destination: str, maincf: MainCf | None = None, *, syslog_path: str = SYSLOG_PATH
) -> logging.Handler:
    """The handler of a ``log_destination``: stderr, syslog or postlog (those two
    read syslog_name, syslog_facility, queue_directory, postlog_service_name and
    myhostname from ``maincf``). Lines that cannot reach syslogd or postlogd go to
    stderr."""
    if destination == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PostfixFormatter())
        return handler
    if destination not in DESTINATIONS:
        raise ValueError(f"unknown log_destination {destination!r} ({', '.join(DESTINATIONS)})")
    if maincf is None:
        raise ValueError(f"log_destination {destination} needs the Postfix configuration")
    tag = f"{syslog_name(maincf)}/pyproxymap"
    if destination == "syslog":
        facility = facility_code(maincf.get("syslog_facility") or "mail")
        return PostfixLogHandler(tag, syslog_path, facility=facility, fallback=sys.stderr)
    return PostfixLogHandler(
        tag,
        postlog_path(maincf),
        postlog=True,
        hostname=maincf.get("myhostname"),
        fallback=sys.stderr,
    )


def install(handlers: list[logging.Handler], level: str | int) -> None:
    """Make ``handlers`` the only ones of the ``pyproxymap`` loggers (old ones closed)."""
    root = logging.getLogger("pyproxymap")
    for old in root.handlers:
        if old not in handlers:
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level.upper() if isinstance(level, str) else level)
    root.propagate = False


def setup(
    level: str = "info",
    destination: str = "stderr",
    maincf: MainCf | None = None,
    *,
    syslog_path: str = SYSLOG_PATH,
) -> None:
    """Log to ``destination`` (see :data:`DESTINATIONS`) from now on."""
    install([handler_for(destination, maincf, syslog_path=syslog_path)], level)


def chrooted(root: str) -> None:
    """Tell the syslog and postlog handlers that the process is about to chroot to ``root``."""
    for handler in logging.getLogger("pyproxymap").handlers:
        if isinstance(handler, PostfixLogHandler):
            handler.chrooted(root)
