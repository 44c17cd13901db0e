"""hash, btree, lmdb and cdb through our server, asked by real, unmodified Postfix clients.

The oracle is the same file opened directly: ``postmap -q KEY TYPE:FILE``
must print and exit as ``postmap -c CONF -q KEY proxy:TYPE:FILE`` does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyproxymap.client import Client
from pyproxymap.wire.proxymap import LOOKUP, UPDATE, Status
from tests.conftest import RunningServer, backdate, write_confdir
from tests.interop.test_postfix_clients import libpostfix

pytestmark = pytest.mark.interop
pytest.importorskip("berkeleydb")
pytest.importorskip("lmdb")

TYPES = ["hash", "btree", "lmdb", "cdb"]
SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
SOURCE = """\
alice@example.com alice-value
bob@example.com  bob value with  spaces
MixedCase@Example.COM mixed-case-key
utf8-ключ@example.com значение-utf8
UTF8-ÄÖÜ@Example.com upper-utf8
empty@example.com -
""" + "".join(f"user{i}@example.com value-{i}\n" for i in range(50))
KEYS = [
    "alice@example.com",
    "ALICE@Example.COM",
    "bob@example.com",
    "MIXEDCASE@EXAMPLE.COM",
    "utf8-ключ@example.com",
    "UTF8-КЛЮЧ@example.com",
    "utf8-äöü@example.com",
    "UTF8-ÄÖÜ@EXAMPLE.COM",
    "empty@example.com",
    "user49@example.com",
    "user50@example.com",
    "nobody@example.com",
    "x" * 2000,
    "",
]


def postmap_all(commands: list[list[str]]) -> list[tuple[int, str]]:
    """Each ``postmap ARGS`` run at once (a fatal error makes postmap pause for a second)."""
    procs = [
        subprocess.Popen(["postmap", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for args in commands
    ]
    return [(p.wait(30), p.communicate()[0].decode()) for p in procs]


def build(conf: Path, spec: str, text: str = SOURCE, tool: str = "postmap") -> None:
    name = Path(spec.partition(":")[2])
    name.write_text(text)
    subprocess.run([tool, "-c", str(conf), spec], check=True, timeout=30)
    backdate(name, Path(f"{name}{SUFFIX[spec.partition(':')[0]]}"))


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("indexed")
    read = [f"proxy:{kind}:{root}/{kind}" for kind in TYPES]
    read += [f"proxy:{kind}:{root}/fresh-{kind}" for kind in TYPES]
    read += [f"proxy:hash:{root}/aliases", f"proxy:hash:{root}/missing", f"proxy:hash:{root}/re"]
    conf = write_confdir(
        root,
        f"""\
proxy_read_maps = {" ".join(read)}
proxy_write_maps = proxy:lmdb:{root}/lmdb
""",
    )
    backdate(root / "main.cf")
    for kind in TYPES:
        build(root, f"{kind}:{root}/{kind}")
        build(root, f"{kind}:{root}/fresh-{kind}")
    build(root, f"hash:{root}/aliases", "postmaster: root\nRoot: alice, bob\n", "postalias")
    return conf


@pytest.fixture(scope="module")
def server(conf: Path):
    srv = RunningServer(conf)
    yield srv
    srv.stop()


@pytest.mark.parametrize("kind", TYPES)
def test_postmap_through_us_answers_as_the_file_opened_directly(conf, server, kind):
    table = f"{kind}:{conf}/{kind}"
    runs = postmap_all(
        [["-c", str(conf), "-q", key, f"proxy:{table}"] for key in KEYS]
        + [["-c", str(conf), "-q", key, table] for key in KEYS]
    )
    proxied, direct = runs[: len(KEYS)], runs[len(KEYS) :]
    assert proxied == direct
    assert proxied[0] == (0, "alice-value\n") and proxied[-3] == (1, "")


def test_postalias_through_us(conf, server):
    r = subprocess.run(
        ["postalias", "-c", str(conf), "-q", "ROOT", f"proxy:hash:{conf}/aliases"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (r.returncode, r.stdout) == (0, "alice, bob\n")


@pytest.mark.parametrize("kind", ["hash", "btree", "lmdb"])
def test_sequence_through_us_lists_what_postmap_s_lists(conf, server, kind):
    table = f"{kind}:{conf}/{kind}"
    expected = subprocess.run(
        ["postmap", "-c", str(conf), "-s", table],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    seq = libpostfix(conf, table, "seq")
    assert seq[-1] == {"op": "seq-end", "status": "notfound"}
    assert "".join(f"{r['key']}\t{r['value']}\n" for r in seq[:-1]) == expected


def test_cdb_sequence_is_a_config_error_not_a_dead_server(conf, server):
    seq = libpostfix(conf, f"cdb:{conf}/cdb", "seq")
    assert seq == [{"op": "seq-end", "status": "config"}]
    assert libpostfix(conf, f"cdb:{conf}/cdb", "get", "alice@example.com")[0]["status"] == "found"


@pytest.mark.parametrize("kind", TYPES)
def test_open_reply_flags_as_postfix_and_learning(conf, server, kind):
    table = f"{kind}:{conf}/fresh-{kind}"
    multi_writer = 0x40000 if kind == "lmdb" else 0
    with Client(server.socket()) as c:
        assert c.open(table).flags == multi_writer | 28  # FIXED | TRY1NULL | TRY0NULL
        assert c.lookup(table, "alice@example.com") == b"alice-value"
        learned = 0x10 | (0x4 if kind == "cdb" else 0x8)  # cdb files have no null bytes
        assert c.open(table).flags == multi_writer | learned


def test_lmdb_on_proxywrite_opens_with_multi_writer_and_takes_writes(conf, server):
    table = f"lmdb:{conf}/lmdb"
    with Client(server.socket("proxywrite")) as c:
        assert c.open(table, 0x10000).flags & 0x40000  # OPEN_LOCK instance, as verify(8)
        assert c.request(LOOKUP, table, key=b"alice@example.com").value == b"alice-value"
        assert c.request(UPDATE, table, key=b"k", value=b"v").status == Status.OK


def test_missing_file_is_a_temporary_error_not_a_miss(conf, server):
    r = subprocess.run(
        ["postmap", "-c", str(conf), "-q", "a", f"proxy:hash:{conf}/missing"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and r.stdout == "" and "query error" in r.stderr
    assert (
        f"hash:{conf}/missing is unavailable. open database {conf}/missing.db: "
        "No such file or directory"
    ) in server.log()


def test_rebuilt_file_is_answered_at_once(conf, server):
    """postmap rewrites a .db in place: the next lookup sees the new contents."""
    table = f"hash:{conf}/re"
    build(conf, table, "k old\n")
    with Client(server.socket()) as c:
        assert c.lookup(table, "k") == b"old"
        build(conf, table, "k new\n" + "".join(f"u{i} {i}\n" for i in range(500)))
        assert c.lookup(table, "k") == b"new"
        assert c.lookup(table, "u499") == b"499"
