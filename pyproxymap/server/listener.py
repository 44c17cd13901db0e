"""Listening UNIX-domain sockets, bound the way Postfix's private sockets are."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from pathlib import Path

#: Connections that may wait to be accepted: a burst of Postfix processes starting
#: at once must not find the socket full (a client then gets EAGAIN).
BACKLOG = 511


class SocketInUse(Exception):
    """Another server already answers on the socket path."""


def _answering(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def prepare_socket_path(path: Path, owner: str | None = None) -> None:
    """Make the directory (0700, owned by ``owner`` when we are root, like Postfix's
    private/) and remove a stale socket; refuse to steal a live server's socket."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        if owner and os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam(owner)
                os.chown(directory, user.pw_uid, grp.getgrgid(user.pw_gid).gr_gid)
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        if _answering(path):
            raise SocketInUse(f"another server is already listening on {path}")
        path.unlink()


def bind_unix(path: Path, *, owner: str | None) -> socket.socket:
    """A listening socket at ``path``, for this process or for worker processes."""
    prepare_socket_path(path, owner)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)  # access is controlled by the directory, as Postfix does
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen_unix(
    path: Path,
    factory: Callable[[], asyncio.Protocol],
    *,
    owner: str | None,
    accepting: bool = True,
) -> asyncio.Server:
    return await serve_socket(bind_unix(path, owner=owner), factory, accepting=accepting)


async def serve_socket(
    sock: socket.socket, factory: Callable[[], asyncio.Protocol], *, accepting: bool = True
) -> asyncio.Server:
    """Serve connections on a listening socket (ours, or one a master passed down).

    The event loop calls listen() again, with a backlog of 100 unless told otherwise:
    200 clients connecting at once would then find the socket full."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(
        factory, sock=sock, backlog=BACKLOG, start_serving=accepting
    )
