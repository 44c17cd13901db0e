"""unix: the system's passwd and group databases by name, as Postfix's dict_unix.

``unix:passwd.byname`` answers ``name:passwd:uid:gid:gecos:dir:shell`` and
``unix:group.byname`` answers ``name:passwd:gid:member,member``. Lookups go
through NSS, which may block for as long as a remote directory (LDAP, NIS,
sssd) takes, so each one runs in a small thread pool of its own: a slow
directory neither stalls the event loop nor takes the threads that open
other tables.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .base import OpenContext, Table, TableConfigError, TableRetry
from .source import printable, refuse_writes
from .utf8layer import checked_value, key_rejected

_NSS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pyproxymap-nss")


def _passwd(name: str) -> bytes:
    pw = pwd.getpwnam(name)
    fields = (pw.pw_name, pw.pw_passwd, pw.pw_uid, pw.pw_gid, pw.pw_gecos, pw.pw_dir, pw.pw_shell)
    return b":".join(os.fsencode(str(field)) for field in fields)


def _group(name: str) -> bytes:
    gr = grp.getgrnam(name)
    fields = (gr.gr_name, gr.gr_passwd, str(gr.gr_gid), ",".join(gr.gr_mem))
    return b":".join(os.fsencode(field) for field in fields)


#: Map name -> (lookup by name, the sanity check Postfix makes after a miss, database).
_MAPS: dict[str, tuple[Callable[[str], bytes], Callable[[], object], str]] = {
    "passwd.byname": (_passwd, lambda: pwd.getpwuid(0), "password"),
    "group.byname": (_group, lambda: grp.getgrgid(0), "group"),
}


class UnixTable(Table):
    """No sequence, as in Postfix."""

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        spec = printable(ctx.spec)
        refuse_writes(ctx)
        if ctx.name not in _MAPS:
            raise TableConfigError(f"unknown table: {spec}")
        self._get, self._uid0, self._database = _MAPS[ctx.name]
        # Postfix checks once, at the first miss, that the database answers at all.
        self._sanity_checked = False

    def lookup(self, key: bytes, flags: int) -> Coroutine[Any, Any, bytes | None] | None:
        if key_rejected(self.ctx, key):
            return None
        return self._lookup(key)

    async def _lookup(self, key: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(_NSS, self._find, os.fsdecode(key))
        return checked_value(self.ctx, key, value)

    def _find(self, name: str) -> bytes | None:
        """Runs in the NSS pool. A miss is RETRY when not even uid/gid 0 can be found."""
        try:
            return self._get(name)
        except KeyError:
            if not self._sanity_checked:
                try:
                    self._uid0()
                except KeyError as e:
                    raise TableRetry(f"cannot access UNIX {self._database} database") from e
            return None
        finally:
            self._sanity_checked = True
