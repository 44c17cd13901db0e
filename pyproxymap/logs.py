"""Postfix-style log lines: ``Mon DD HH:MM:SS host pyproxymap/SERVICE[PID]: warning: text``.

Operators grep Postfix logs for "warning:", "error:", "fatal:"; our lines read the
same way. Logger names ``pyproxymap.<service>`` give the service in the tag.
Passwords are masked in every line, whatever logged them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time

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


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PostfixFormatter())
    root = logging.getLogger("pyproxymap")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
