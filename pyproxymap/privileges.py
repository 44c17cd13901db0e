"""Dropping root, and an optional chroot, as Postfix's daemons do (chroot_uid(3)).

Postfix's proxymap runs as ``mail_owner``, never as root. A server started as
root binds its sockets, then calls (in this order, as chroot_uid() does):

1. :func:`account`: the user's IDs and groups, looked up while /etc/passwd and
   /etc/group can still be read; a user with user or group ID 0 is refused with
   Postfix's words (mail_params.c);
2. :func:`chroot_to` (optional): imports now everything a serving process may
   import later (Python imports lazily, and nothing outside the new root can be
   imported afterwards), then ``chroot(dir)`` and ``chdir("/")``;
3. :func:`drop_privileges`: setgid, setgroups, setuid.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import importlib
import logging
import os
import pkgutil
import pwd
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PosixPath

from . import logs

log = logging.getLogger("pyproxymap")

#: Standard-library modules that are imported on first use, not at start-up.
LAZY_MODULES = (
    "concurrent.futures.thread",  # asyncio's default executor: table opens, NSS calls
    "encodings.idna",  # IDNA host names (main.cf, socketmap/tcp/LDAP hosts)
    "encodings.punycode",
    "stringprep",
    "unicodedata",
    "_strptime",
    "ssl",
    "traceback",
    "linecache",
)
#: Codecs looked up by name on first use.
CODECS = ("utf-8", "ascii", "latin-1", "idna", "punycode")
#: Shared libraries glibc loads on first use: libgcc_s unwinds a thread that exits
#: (without it, "libgcc_s.so.1 must be installed for pthread_exit to work" and abort).
LAZY_LIBRARIES = ("libgcc_s.so.1",)
_loaded: list[ctypes.CDLL] = []


class PrivilegeError(Exception):
    """The account is unusable, or chroot / setuid failed."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def account(user: str, source: str = "") -> Account:
    """The account ``user`` as a server may run as it: it exists and has neither user
    ID 0 nor group ID 0. ``source`` says where the name came from, as in Postfix's
    ``file /etc/postfix/main.cf: parameter mail_owner: user root has privileged user ID``."""
    prefix = f"{source}: " if source else ""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"{prefix}unknown user name value: {user}") from None
    if pw.pw_uid == 0:
        raise PrivilegeError(f"{prefix}user {user} has privileged user ID")
    if pw.pw_gid == 0:
        raise PrivilegeError(f"{prefix}user {user} has privileged group ID")
    try:
        groups = tuple(os.getgrouplist(user, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return Account(user, pw.pw_uid, pw.pw_gid, groups)


def drop_privileges(user: str | Account, source: str = "") -> None:
    """setgid, setgroups (the user's groups, as initgroups), setuid: for good. Every
    module a serving process may need is imported first: the account may not be able
    to read where Python and the packages are installed (a Python under /root), and
    Python imports lazily (psycopg when the first pgsql table opens)."""
    acct = user if isinstance(user, Account) else account(user, source)
    preload()
    try:
        os.setgid(acct.gid)
        os.setgroups(list(acct.groups))
        os.setuid(acct.uid)
    except OSError as e:
        raise PrivilegeError(f"dropping privileges to {acct.name}: {e.strerror}") from None
    if os.getuid() != acct.uid or os.geteuid() != acct.uid or os.getegid() != acct.gid:
        raise PrivilegeError(f"dropping privileges to {acct.name}: IDs did not change")
    log.debug("running as %s (uid %d, gid %d)", acct.name, acct.uid, acct.gid)


def preload() -> list[str]:
    """Import every module a serving process may need later: all of pyproxymap's
    modules and the table drivers (built-in and plugins) that import cleanly, the
    C libraries of regexp and pcre tables, lazily loaded standard modules and
    codecs, and what main.cf's computed defaults need. Returns what could not be
    loaded (those tables stay unavailable, as they would be anyway)."""
    failed: list[str] = []
    import pyproxymap

    def note(name: str) -> None:
        failed.append(name)

    for info in pkgutil.walk_packages(pyproxymap.__path__, "pyproxymap.", onerror=note):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception:
            failed.append(info.name)
    for name in LAZY_MODULES:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
    for name in CODECS:
        codecs.lookup(name)
    for library in LAZY_LIBRARIES:
        try:
            _loaded.append(ctypes.CDLL(library))  # stays loaded: dlopen finds it by name
        except OSError:
            failed.append(library)
    "pyproxymap.example".encode("idna").decode("idna")

    from .config import defaults
    from .tables import pcre, regexp, registry

    for type_name in registry.known_types():
        try:
            registry.driver_for(type_name)
        except Exception:
            failed.append(f"table type {type_name}")
    for library in (regexp._libc, pcre._pcre2):
        try:
            library()
        except Exception:
            failed.append(library.__module__)
    with contextlib.suppress(Exception):
        defaults._gethostname()
        defaults._interfaces()
    if failed:
        log.debug("not loaded before chroot: %s", ", ".join(failed))
    return failed


def chroot_to(directory: str) -> None:
    """Preload, then chroot to ``directory`` and chdir to its root. Logging keeps its
    connected sockets; a reconnect finds postlogd's socket inside the new root."""
    root = os.path.realpath(directory)
    preload()
    time.tzset()  # the time zone is read now: /etc/localtime is outside the chroot
    logs.chrooted(root)
    try:
        os.chroot(root)
        os.chdir("/")
    except OSError as e:
        raise PrivilegeError(f"chroot({directory}): {e.strerror}") from None
    log.debug("chrooted to %s", root)


def inside(root: str, path: str) -> str | None:
    """``path`` as it will be seen from within a chroot to ``root`` (ask before the
    chroot: symbolic links are resolved); None when it is outside."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    if rel == os.curdir:
        return "/"
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return "/" + rel


class KeptPath(PosixPath):
    """A socket path that the server, once unprivileged, cannot remove: left in place
    when it stops, as Postfix's master leaves its sockets (the next start replaces a
    stale socket)."""

    def unlink(self, missing_ok: bool = False) -> None:
        pass


@dataclass(frozen=True)
class Standalone:
    """How ``pyproxymap serve`` started as root gives up root once its sockets are
    bound: chroot to ``root`` (None: no chroot), then run as ``account`` (None: stay
    root, as a Postfix service with unpriv n)."""

    account: Account | None
    root: str | None = None

    def enter(self, paths: Sequence[Path]) -> list[Path]:
        """Chroot (optional) and drop privileges. ``paths`` (socket files the server
        removes when it stops) are returned as the process sees them afterwards: from
        within the chroot, or as KeptPath when it may no longer remove them."""
        seen = [path if self.root is None else inside(self.root, str(path)) for path in paths]
        if self.root is not None:
            chroot_to(self.root)
        if self.account is not None:
            drop_privileges(self.account)
        out: list[Path] = []
        for path, now in zip(paths, seen, strict=True):
            if now is None or not os.access(os.path.dirname(now), os.W_OK | os.X_OK):
                out.append(KeptPath(now or path))
            else:
                out.append(Path(now))
        return out


def standalone(
    user: str, source: str, chroot: str | None, unprivileged: bool = True
) -> Standalone | None:
    """The privilege drop of a standalone server: None when there is nothing to do.
    Not started as root, it keeps running as the user that started it (a chroot then
    cannot be done); ``unprivileged=False`` keeps root (``user`` is not looked up)."""
    if os.geteuid() != 0:
        me = _name_of(os.geteuid())
        if chroot is not None:
            raise PrivilegeError(
                f"chroot to {chroot} needs root: started as {me} (set chroot = false, "
                "or start pyproxymap serve as root)"
            )
        log.debug("not started as root: running as %s", me)
        return None
    if not unprivileged:
        log.info("unprivileged = false: running as root")
        return Standalone(None, chroot) if chroot is not None else None
    return Standalone(account(user, source), chroot)


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
