"""Throwaway slapd and memcached servers for the ldap and memcache table tests.

Each server runs as our foreground child on a free loopback port, in its own
directory, and is stopped (or killed) when the test is done; nothing of a
system instance is used. A test that needs a server skips when its binary is
missing (CI installs it with scripts/install-test-deps.sh).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Coroutine, Iterator
from inspect import isawaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyproxymap.tables.base import OpenContext, Table, TableOptions, TableRetry, utf8_fold
from pyproxymap.tables.registry import driver_for
from pyproxymap.wire.proxymap import FOLD_FIX
from tests.conftest import backdate
from tests.unit.test_texthash import Answer

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if os.path.exists("/usr/sbin/slapd") else None)
SLAPADD = shutil.which("slapadd") or (
    "/usr/sbin/slapadd" if os.path.exists("/usr/sbin/slapadd") else None
)
MEMCACHED = shutil.which("memcached")

_T = TypeVar("_T")

BASE = "dc=example,dc=com"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PW = "secret"

#: The directory the LDAP tests ask: users with multi-valued attributes, a group
#: of DNs, a group given by an LDAP URL, a terminal group, and an alias.
LDIF = f"""\
dn: {BASE}
objectClass: domain
dc: example

dn: ou=people,{BASE}
objectClass: organizationalUnit
ou: people

dn: uid=alice,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: alice
cn: Alice
sn: Smith
mail: alice@example.com
mailLocalAddress: alice@example.com
mailLocalAddress: a.smith@example.com
mailRoutingAddress: alice@mail1.example.com

dn: uid=bob,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: bob
cn: Bob
sn: Jones
mail: bob@example.com
mailLocalAddress: bob@example.com
mailRoutingAddress: bob@mail2.example.com

dn: uid=carol,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: carol
cn: Carol
sn: White
mail: carol@sub.example.com
mailLocalAddress: carol@sub.example.com
mailRoutingAddress: carol@mail1.example.com

dn: uid=dan,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: dan
cn: Dan
sn: Brown
mail: dan@example.com
mailLocalAddress: dan@example.com

dn: cn=staff,{BASE}
objectClass: groupOfNames
objectClass: inetLocalMailRecipient
objectClass: extensibleObject
cn: staff
mail: staff-owner@example.com
mailLocalAddress: staff@example.com
member: uid=alice,ou=people,{BASE}
member: uid=bob,ou=people,{BASE}
member: uid=ghost,ou=people,{BASE}

dn: cn=dynamic,{BASE}
objectClass: groupOfURLs
objectClass: inetLocalMailRecipient
cn: dynamic
mailLocalAddress: dynamic@example.com
memberURL: ldap:///ou=people,{BASE}?mail,mailRoutingAddress?one?(sn=Jones)

dn: cn=routed,{BASE}
objectClass: groupOfNames
objectClass: inetLocalMailRecipient
cn: routed
mailLocalAddress: routed@example.com
mailRoutingAddress: routed-list@lists.example.com
member: uid=alice,ou=people,{BASE}

dn: cn=nested,{BASE}
objectClass: groupOfNames
objectClass: inetLocalMailRecipient
cn: nested
mailLocalAddress: nested@example.com
member: cn=staff,{BASE}
member: uid=dan,ou=people,{BASE}

dn: cn=many,{BASE}
objectClass: groupOfNames
objectClass: inetLocalMailRecipient
cn: many
mailLocalAddress: many@example.com
member: uid=alice,ou=people,{BASE}
member: uid=bob,ou=people,{BASE}
member: uid=carol,ou=people,{BASE}
member: uid=dan,ou=people,{BASE}
"""

SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/misc.schema
include /etc/ldap/schema/dyngroup.schema
pidfile {dir}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit 500
database mdb
maxsize 10485760
suffix "{base}"
rootdn "{root_dn}"
rootpw {root_pw}
directory {dir}/db
access to attrs=userPassword by * auth
access to * by * read
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{what} did not start (rc={proc.returncode})")


class Daemon:
    """A server we started: stop, start again on the same port, freeze and thaw."""

    def __init__(self, argv: list[str], port: int, what: str) -> None:
        self.argv, self.port, self.what = argv, port, what
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_port(self.proc, self.port, self.what)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # memcached takes ~1 s to exit on SIGTERM
            self.proc.wait()
        self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class Slapd(Daemon):
    def __init__(self, root: Path, ldif: str = LDIF) -> None:
        if not (SLAPD and SLAPADD):
            pytest.skip("slapd is not installed (scripts/install-test-deps.sh installs it)")
        self.dir = root
        (root / "db").mkdir(parents=True, exist_ok=True)
        conf = root / "slapd.conf"
        conf.write_text(SLAPD_CONF.format(dir=root, base=BASE, root_dn=ROOT_DN, root_pw=ROOT_PW))
        (root / "data.ldif").write_text(ldif)
        subprocess.run(
            [SLAPADD, "-q", "-f", str(conf), "-l", str(root / "data.ldif")],
            check=True,
            capture_output=True,
        )
        port = free_port()
        self.url = f"ldap://127.0.0.1:{port}/"
        argv = [SLAPD, "-d", "0", "-f", str(conf), "-h", self.url]
        super().__init__(argv, port, "slapd")


class Memcached(Daemon):
    def __init__(self) -> None:
        if not MEMCACHED:
            pytest.skip("memcached is not installed (scripts/install-test-deps.sh installs it)")
        port = free_port()
        argv = [MEMCACHED, "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "16"]
        if os.getuid() != 0:
            argv[1:3] = []
        super().__init__(argv, port, "memcached")

    def command(self, text: bytes) -> bytes:
        """Send raw protocol text and read until the reply ends (END, STORED, ...)."""
        with socket.create_connection(("127.0.0.1", self.port), 5) as s:
            s.sendall(text)
            data = b""
            while not data.endswith((b"END\r\n", b"STORED\r\n", b"DELETED\r\n", b"NOT_FOUND\r\n")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def get(self, key: bytes) -> bytes | None:
        reply = self.command(b"get " + key + b"\r\n")
        if reply == b"END\r\n":
            return None
        header, _, rest = reply.partition(b"\r\n")
        size = int(header.split()[3])
        return rest[:size]

    def set(self, key: bytes, value: bytes) -> None:
        assert self.command(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)) == b"STORED\r\n"

    def stats(self) -> dict[str, str]:
        reply = self.command(b"stats\r\nget x\r\n")
        return {
            parts[1]: parts[2]
            for line in reply.decode().splitlines()
            if (parts := line.split()) and parts[0] == "STAT"
        }


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A slapd with LDIF loaded, shared by a module's tests (which must not stop it)."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A slapd for one test, which may stop, restart or freeze it."""
    server = Slapd(tmp_path / "slapd")
    yield server
    if server.proc is not None:
        server.thaw()
    server.stop()


@pytest.fixture
def memcached() -> Iterator[Memcached]:
    """A fresh memcached for one test, which may stop, restart or freeze it."""
    server = Memcached()
    yield server
    if server.proc is not None:
        server.thaw()
    server.stop()


# --- opening and asking our tables ---------------------------------------------------------


def open_spec(spec: str, *, writable: bool = False, options: TableOptions | None = None) -> Table:
    """Open one of our tables as the table cache does, nested tables included."""
    type_, _, name = spec.partition(":")
    driver = driver_for(type_)
    assert driver is not None, type_

    def nested(component: str, flags: int) -> Table:
        return open_spec(component, writable=writable)

    options = options or TableOptions()
    ctx = OpenContext(type_, name, 0, writable, utf8_fold, open_nested=nested, options=options)
    return driver.open(ctx)


async def ask(table: Table, key: bytes) -> bytes | type[TableRetry] | None:
    """Our answer to a lookup of ``key`` as the service asks (folded): TableRetry for RETRY."""
    try:
        result = table.lookup(table.folded(key, FOLD_FIX), FOLD_FIX)
        return await result if isawaitable(result) else result
    except TableRetry:
        return TableRetry


def postmap_answer(answer: Answer) -> bytes | type[TableRetry] | None:
    """What ``postmap -q`` printed, in the shape of :func:`ask`."""
    if answer.rc == 0:
        return answer.stdout.rstrip(b"\n")
    return TableRetry if answer.fatal else None


def backdate_all(root: Path) -> None:
    """Make every .cf file old enough that postmap does not wait for it to cool down."""
    backdate(*root.glob("*.cf"), *root.glob("*.txt"))


def established(port: int) -> int:
    """TCP connections from this machine to 127.0.0.1:``port`` (client ends, ESTABLISHED)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def run(work: Coroutine[Any, Any, _T], *tables: Table) -> _T:
    """Run ``work`` in a new event loop and close ``tables`` in it (their connections
    belong to that loop)."""

    async def main() -> _T:
        try:
            return await work
        finally:
            for table in tables:
                table.close()

    return asyncio.run(main())
