"""hash, btree, lmdb and cdb: files written by real postmap/postalias, answers compared with it.

The oracle is ``postmap -q KEY TYPE:FILE`` (and ``postmap -s``) on the same
file. Tests that need no Postfix write the files with the libraries themselves.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import time
from inspect import isawaitable
from pathlib import Path
from typing import Any

import pytest

from pyproxymap.tables import indexed
from pyproxymap.tables.base import OpenContext, Table, TableConfigError, TableRetry, Unsupported
from pyproxymap.tables.base import utf8_fold as fold
from pyproxymap.tables.cdb import HEADER, cdb_hash
from pyproxymap.tables.registry import driver_for
from pyproxymap.wire.proxymap import FIXED, MULTI_WRITER, SEQ_FIRST, SEQ_NEXT, TRY0NULL, TRY1NULL
from tests.conftest import backdate, write_confdir
from tests.unit.test_texthash import Postfix, as_postmap_prints

db = pytest.importorskip("berkeleydb.db")
lmdb = pytest.importorskip("lmdb")

TYPES = ["hash", "btree", "lmdb", "cdb"]
SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
LONG_KEY = "long-" + "k" * 400  # LMDB keys stop at 511 bytes
SOURCE = f"""\
alice@example.com alice-value
bob@example.com  bob value with  spaces
MixedCase@Example.COM mixed-case-key
utf8-ключ@example.com значение-utf8
UTF8-ÄÖÜ@Example.com upper-utf8
Straße@example.com strasse
"quoted key" quoted value
empty@example.com -
{LONG_KEY} long-key-value
long-value {"v" * 3000}
""" + "".join(f"user{i}@example.com value-{i}\n" for i in range(300))
KEYS = [
    "alice@example.com",
    "ALICE@Example.COM",
    "bob@example.com",
    "mixedcase@example.com",
    "MIXEDCASE@EXAMPLE.COM",
    "utf8-ключ@example.com",
    "UTF8-КЛЮЧ@EXAMPLE.COM",
    "utf8-äöü@example.com",
    "UTF8-ÄÖÜ@EXAMPLE.COM",
    "strasse@example.com",
    "STRASSE@example.com",
    '"quoted key"',
    "quoted key",
    "empty@example.com",
    LONG_KEY,
    LONG_KEY.upper(),
    "long-value",
    "user0@example.com",
    "user299@example.com",
    "user300@example.com",
    "nobody@example.com",
    "alice@example.com ",
    "x" * 5000,
    "",
]


def open_table(kind: str, name: Path | str, flags: int = 0, **ctx: Any) -> Table:
    driver = driver_for(kind)
    assert driver is not None
    return driver.open(OpenContext(kind, str(name), instance_flags=flags, **ctx))


def answer(result: Any) -> Any:
    """A table's answer, awaited when it came as an awaitable."""
    return asyncio.run(_await(result)) if isawaitable(result) else result


async def _await(result: Any) -> Any:
    return await result


def entries(table: Table) -> list[bytes]:
    """Every entry through the sequence interface, as ``postmap -s`` prints them."""
    out = []
    item = answer(table.sequence(SEQ_FIRST, 0))
    while item is not None:
        out.append(b"%s\t%s\n" % item)
        item = answer(table.sequence(SEQ_NEXT, 0))
    return out


# --- files written without Postfix ---------------------------------------------------------


def write_bdb(path: Path, records: dict[bytes, bytes], kind: str = "hash") -> Path:
    """A ``.db`` file holding exactly these raw keys and values."""
    d = db.DB()
    d.open(str(path) + ".db", None, db.DB_HASH if kind == "hash" else db.DB_BTREE, db.DB_CREATE)
    for key, value in records.items():
        d.put(key, value)
    d.close()
    backdate(Path(str(path) + ".db"))
    return path


def write_lmdb(path: Path, records: dict[bytes, bytes]) -> Path:
    env = lmdb.open(str(path) + ".lmdb", subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key, value)
    env.close()
    return path


def write_cdb(path: Path, records: dict[bytes, bytes]) -> Path:
    """djb's cdbmake: records, then 256 hash tables twice as long as their entries."""
    body, slots = bytearray(), [[] for _ in range(256)]
    for key, value in records.items():
        h = cdb_hash(key)
        slots[h & 0xFF].append((h, HEADER + len(body)))
        body += struct.pack("<II", len(key), len(value)) + key + value
    header, tables = bytearray(), bytearray()
    for entries_ in slots:
        size = 2 * len(entries_)
        header += struct.pack("<II", HEADER + len(body) + len(tables), size)
        table = [(0, 0)] * size
        for h, pos in entries_:
            i = (h >> 8) % size
            while table[i][1]:
                i = (i + 1) % size
            table[i] = (h, pos)
        tables += b"".join(struct.pack("<II", *slot) for slot in table)
    Path(str(path) + ".cdb").write_bytes(header + body + tables)
    return path


WRITERS = {
    "hash": write_bdb,
    "btree": lambda path, records: write_bdb(path, records, "btree"),
    "lmdb": write_lmdb,
    "cdb": write_cdb,
}


@pytest.mark.parametrize("kind", TYPES)
def test_flags_learn_the_null_byte_convention(tmp_path: Path, kind: str) -> None:
    name = WRITERS[kind](tmp_path / "t", {b"with\0": b"1\0", b"without": b"2", b"empty\0": b"\0"})
    base = FIXED | (MULTI_WRITER if kind == "lmdb" else 0)
    table = open_table(kind, name)
    assert table.flags == base | TRY0NULL | TRY1NULL  # 28, lmdb 262172: as Postfix opens
    assert answer(table.lookup(b"nothing", 0)) is None
    assert table.flags == base | TRY0NULL | TRY1NULL
    assert answer(table.lookup(b"with", 0)) == b"1"  # the value's null byte is dropped
    assert table.flags == base | TRY1NULL  # learned: only keys with a null byte from now on
    assert answer(table.lookup(b"without", 0)) is None
    assert answer(table.lookup(b"empty", 0)) == b""

    table = open_table(kind, name)
    assert answer(table.lookup(b"without", 0)) == b"2"
    assert table.flags == base | TRY0NULL
    assert answer(table.lookup(b"with", 0)) is None

    table = open_table(kind, name, flags=TRY0NULL)  # the client decided: no guessing
    assert table.flags == base | TRY0NULL
    assert answer(table.lookup(b"with", 0)) is None
    assert answer(table.lookup(b"without", 0)) == b"2"


@pytest.mark.parametrize("kind", TYPES)
def test_a_value_ends_at_its_first_null_byte(tmp_path: Path, kind: str) -> None:
    name = WRITERS[kind](tmp_path / "t", {b"k\0": b"before\0after\0"})
    assert answer(open_table(kind, name).lookup(b"k", 0)) == b"before"


@pytest.mark.parametrize("kind", TYPES)
def test_missing_file_is_a_retry_in_postfix_words(tmp_path: Path, kind: str) -> None:
    with pytest.raises(TableRetry) as info:
        open_table(kind, tmp_path / "nope")
    path = f"{tmp_path}/nope{SUFFIX[kind]}"
    assert str(info.value) == f"open database {path}: No such file or directory"


@pytest.mark.parametrize("kind", TYPES)
def test_garbage_file_is_a_retry(tmp_path: Path, kind: str) -> None:
    (tmp_path / f"t{SUFFIX[kind]}").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(TableRetry) as info:
        answer(open_table(kind, tmp_path / "t").lookup(b"k", 0))
    assert f"{tmp_path}/t{SUFFIX[kind]}" in str(info.value)


def test_cdb_with_offsets_outside_the_file_is_a_retry(tmp_path: Path) -> None:
    name = write_cdb(tmp_path / "t", {b"k": b"v"})
    path = tmp_path / "t.cdb"
    data = bytearray(path.read_bytes())
    assert open_table("cdb", name).lookup(b"k", 0) == b"v"
    data[HEADER + 4 : HEADER + 8] = struct.pack("<I", 10**6)  # the value runs past the data
    path.write_bytes(bytes(data))
    with pytest.raises(TableRetry, match="corrupt cdb file: value outside the data"):
        open_table("cdb", name).lookup(b"k", 0)
    h = cdb_hash(b"k")
    data[(h & 0xFF) * 8 : (h & 0xFF) * 8 + 4] = struct.pack("<I", 10**6)  # table past the end
    path.write_bytes(bytes(data))
    with pytest.raises(TableRetry, match="corrupt cdb file: hash table outside the file"):
        open_table("cdb", name).lookup(b"k", 0)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(TableRetry, match="not a cdb file"):
        open_table("cdb", name)


def test_cdb_full_hash_table_ends_the_probe(tmp_path: Path) -> None:
    """A corrupt table without an empty slot must not make a miss loop forever."""
    name = write_cdb(tmp_path / "t", {b"k": b"v"})
    path = tmp_path / "t.cdb"
    data = bytearray(path.read_bytes())
    h = cdb_hash(b"k")
    table, size = struct.unpack_from("<II", data, (h & 0xFF) * 8)
    for i in range(size):  # every slot taken, by a record of another hash
        data[table + 8 * i : table + 8 * i + 8] = struct.pack("<II", h ^ 1, HEADER)
    path.write_bytes(bytes(data))
    assert open_table("cdb", name).lookup(b"k", 0) is None


def test_truncated_berkeley_db_file_is_refused(tmp_path: Path) -> None:
    """Berkeley DB would read the missing pages as empty: "not found" for keys on them."""
    records = {b"user%d\0" % i: b"value-%d\0" % i for i in range(3000)}
    write_bdb(tmp_path / "t", records)
    path = tmp_path / "t.db"
    size = path.stat().st_size
    os.truncate(path, size // 2 // 4096 * 4096)
    with pytest.raises(TableRetry, match=f"the file is truncated: .* bytes of {size}"):
        open_table("hash", tmp_path / "t")


def test_truncated_lmdb_file_is_refused_before_it_can_crash_the_server(tmp_path: Path) -> None:
    """Reading a memory-mapped page past the end of the file would be SIGBUS."""
    write_lmdb(tmp_path / "t", {b"user%d\0" % i: b"value-%d\0" % i for i in range(3000)})
    path = tmp_path / "t.lmdb"
    shutil.copy(path, tmp_path / "copy.lmdb")
    table = open_table("lmdb", tmp_path / "copy")
    assert answer(table.lookup(b"user5", 0)) == b"value-5"
    os.truncate(tmp_path / "copy.lmdb", 8192 * 2)
    with pytest.raises(TableRetry, match="shorter than its data"):
        table.lookup(b"user2999", 0)
    with pytest.raises(TableRetry, match="shorter than its data"):
        open_table("lmdb", tmp_path / "copy")


@pytest.mark.parametrize("kind", TYPES)
def test_changed_when_the_file_is_rewritten_or_removed(tmp_path: Path, kind: str) -> None:
    name = WRITERS[kind](tmp_path / "t", {b"k\0": b"1\0"})
    path = Path(str(name) + SUFFIX[kind])
    table = open_table(kind, name)
    assert not table.changed()
    os.utime(path, (time.time() - 5, time.time() - 5))
    assert table.changed()
    table = open_table(kind, name)
    path.rename(tmp_path / "moved")
    assert table.changed()
    table.close()


def test_cdb_is_read_only_and_has_no_sequence(tmp_path: Path) -> None:
    name = write_cdb(tmp_path / "t", {b"k": b"v"})
    with pytest.raises(TableConfigError, match="requires O_RDONLY"):
        open_table("cdb", name, writable=True)
    with pytest.raises(Unsupported):
        open_table("cdb", name).sequence(SEQ_FIRST, 0)


@pytest.mark.parametrize("kind", ["hash", "btree", "lmdb"])
def test_sequence(tmp_path: Path, kind: str) -> None:
    records = {b"a\0": b"1\0", b"b": b"2", b"c\0": b"3\0"}
    table = open_table(kind, WRITERS[kind](tmp_path / "t", records))
    assert answer(table.sequence(SEQ_NEXT, 0)) is None  # no sequence started
    assert sorted(entries(table)) == [b"a\t1\n", b"b\t2\n", b"c\t3\n"]
    assert entries(table) == entries(table)  # FIRST starts over


def test_lmdb_instances_of_one_file_share_its_environment(tmp_path: Path) -> None:
    """py-lmdb (and LMDB) refuse a second open of a file in one process."""
    name = write_lmdb(tmp_path / "t", {b"k\0": b"v\0"})
    first, second = open_table("lmdb", name), open_table("lmdb", name, flags=TRY1NULL)
    assert answer(second.lookup(b"k", 0)) == b"v"
    first.close()
    assert answer(second.lookup(b"k", 0)) == b"v"
    second.close()
    third = open_table("lmdb", name)
    assert answer(third.lookup(b"k", 0)) == b"v"
    third.close()


def test_lmdb_reads_what_a_writer_commits_after_growing_the_map(tmp_path: Path) -> None:
    name = write_lmdb(tmp_path / "t", {b"k\0": b"v\0"})
    table = open_table("lmdb", name)
    assert answer(table.lookup(b"k", 0)) == b"v"
    grow = (
        "import lmdb, sys\n"
        "env = lmdb.open(sys.argv[1], subdir=False, lock=False, map_size=64 << 20)\n"
        "with env.begin(write=True) as txn:\n"
        "    for i in range(3000): txn.put(b'big%d\\0' % i, b'x' * 4000 + b'\\0')\n"
    )
    subprocess.run([sys.executable, "-c", grow, f"{name}.lmdb"], check=True, timeout=30)
    assert (tmp_path / "t.lmdb").stat().st_size > 10 << 20  # past the map we opened
    assert answer(table.lookup(b"big2999", 0)) == b"x" * 4000
    assert answer(table.lookup(b"k", 0)) == b"v"
    table.close()


def test_berkeley_db_read_waits_for_a_writer_lock(tmp_path: Path) -> None:
    name = write_bdb(tmp_path / "t", {b"k\0": b"v\0"})
    table = open_table("hash", name)
    writer = os.open(f"{name}.db", os.O_RDWR)
    fcntl.flock(writer, fcntl.LOCK_EX)  # as postmap holds it while it rebuilds

    async def scenario() -> tuple[Any, Any]:
        pending = table.lookup(b"k", 0)
        assert isawaitable(pending)  # not answered while the writer holds the lock
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0.05)
        assert not task.done()
        fcntl.flock(writer, fcntl.LOCK_UN)
        return await task, table.lookup(b"k", 0)

    assert asyncio.run(scenario()) == (b"v", b"v")  # the lock is released after each read
    os.close(writer)


def test_lmdb_read_waits_for_a_writer_lock(tmp_path: Path) -> None:
    name = write_lmdb(tmp_path / "t", {b"k\0": b"v\0"})
    table = open_table("lmdb", name)
    hold = (  # fcntl locks of one process never conflict: the writer is another process
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(0.3)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", hold, f"{name}.lmdb"], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline() == "locked\n"
    started = time.monotonic()
    pending = table.lookup(b"k", 0)
    assert isawaitable(pending)
    assert answer(pending) == b"v"
    assert time.monotonic() - started > 0.1
    writer.wait(10)
    table.close()


def test_lock_wait_has_a_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexed, "LOCK_WAIT", 0.05)
    name = write_bdb(tmp_path / "t", {b"k\0": b"v\0"})
    table = open_table("hash", name)
    writer = os.open(f"{name}.db", os.O_RDWR)
    fcntl.flock(writer, fcntl.LOCK_EX)
    with pytest.raises(TableRetry, match="still locked by a writer"):
        answer(table.lookup(b"k", 0))
    with pytest.raises(TableRetry, match="still locked by a writer"):
        open_table("hash", name)
    os.close(writer)


# --- against real postmap and postalias ----------------------------------------------------


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Postfix:
    confdir = write_confdir(tmp_path_factory.mktemp("indexed"), "smtputf8_enable = yes\n")
    backdate(confdir / "main.cf")
    return Postfix(confdir, fold)


@pytest.fixture(scope="module")
def built(postfix: Postfix) -> dict[str, Path]:
    """The same source, made into each type by postmap."""
    names = {}
    for kind in TYPES:
        name = postfix.confdir / f"src-{kind}"
        name.write_text(SOURCE)
        answer_ = postfix.run(f"{kind}:{name}")
        assert answer_.rc == 0, answer_
        backdate(name, Path(f"{name}{SUFFIX[kind]}"))
        names[kind] = name
    return names


@pytest.mark.interop
def test_lookups_answer_as_postmap_does(postfix: Postfix, built: dict[str, Path]) -> None:
    keys = [key.encode() for key in KEYS]
    queries = [("-q", key, f"{kind}:{built[kind]}") for kind in TYPES for key in keys]
    expected = [(a.rc, a.stdout) for a in postfix.run_all(queries, batch=len(queries))]
    got = [
        as_postmap_prints(answer(open_table(kind, built[kind]).lookup(fold(key), 0)))
        for kind in TYPES
        for key in keys
    ]
    assert got == expected
    assert expected[0] == (0, b"alice-value\n") and expected[-2] == (1, b"")


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["hash", "btree", "lmdb"])
def test_sequence_lists_what_postmap_s_lists(
    postfix: Postfix, built: dict[str, Path], kind: str
) -> None:
    expected = postfix.run("-s", f"{kind}:{built[kind]}")
    assert expected.rc == 0 and expected.stdout.count(b"\n") == 310
    assert b"".join(entries(open_table(kind, built[kind]))) == expected.stdout  # same order


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["hash", "lmdb", "cdb"])
def test_postalias_files_and_null_byte_learning_as_postmap(postfix: Postfix, kind: str) -> None:
    """postalias stores YP_* keys without a null byte, the rest with one: the first hit
    decides which a shared instance tries from then on (postmap -q - shares one)."""
    name = postfix.confdir / f"aliases-{kind}"
    name.write_text("postmaster: root\nRoot: alice, bob\nlong:\n  a,\n  b\n")
    subprocess.run(["postalias", "-c", str(postfix.confdir), f"{kind}:{name}"], check=True)
    backdate(name, Path(f"{name}{SUFFIX[kind]}"))
    for order in (["root", "YP_MASTER_NAME", "long"], ["YP_MASTER_NAME", "root", "long"]):
        postmap = subprocess.run(
            ["postmap", "-c", str(postfix.confdir), "-f", "-q", "-", f"{kind}:{name}"],
            input="".join(f"{key}\n" for key in order).encode(),
            capture_output=True,
            check=False,
        )
        table = open_table(kind, name)
        ours = b""
        for key in order:
            value = answer(table.lookup(key.encode(), 0))
            if value is not None:
                ours += b"%s\t%s\n" % (key.encode(), value)
        assert ours == postmap.stdout
        learned = 3 if kind == "cdb" else 2 if order[0] == "root" else 1  # cdb: no null bytes
        assert ours.count(b"\n") == learned


@pytest.mark.interop
def test_errors_in_postmap_words(postfix: Postfix, built: dict[str, Path], tmp_path: Path) -> None:
    """Run together: postmap pauses a second before it exits on a fatal error."""
    names = [tmp_path / "missing", tmp_path / "bad"]
    cases = [(kind, name) for kind in TYPES for name in names]
    for kind in TYPES:
        (tmp_path / f"bad{SUFFIX[kind]}").write_bytes(b"\x01" * 8192)
    commands = [("-q", "k", f"{kind}:{name}") for kind, name in cases]
    *fatals, sequence = postfix.run_all([*commands, ("-s", f"cdb:{built['cdb']}")])
    for (kind, name), expected in zip(cases, fatals, strict=True):
        with pytest.raises(TableRetry) as info:
            answer(open_table(kind, name).lookup(b"k", 0))
        if kind != "cdb" or name.name == "missing":  # tinycdb says "Protocol error"
            assert str(info.value).partition(" (")[0] == expected.fatal
    assert sequence.fatal == f"table cdb:{built['cdb']}.cdb: sequence operation is not supported"
    with pytest.raises(Unsupported, match="sequence operation is not supported"):
        open_table("cdb", built["cdb"]).sequence(SEQ_FIRST, 0)


@pytest.mark.interop
def test_python_written_files_read_as_postmap_reads_them(postfix: Postfix, tmp_path: Path) -> None:
    """Keys with and without null bytes and an empty value, seen by Postfix's own reader."""
    records = {b"with\0": b"1\0", b"without": b"2", b"empty\0": b"\0", b"cut\0": b"a\0b\0"}
    for kind in TYPES:
        name = WRITERS[kind](tmp_path / kind, records)
        keys = [b"with", b"without", b"empty", b"cut", b"none"]
        expected = postfix.query_all(keys, f"{kind}:{name}")
        got = [as_postmap_prints(answer(open_table(kind, name).lookup(key, 0))) for key in keys]
        assert got == expected, kind


@pytest.mark.interop
def test_rebuild_in_place_is_read_after_reopening(postfix: Postfix, tmp_path: Path) -> None:
    """postmap rewrites a .db file in place; a handle opened before must not be trusted."""
    name = tmp_path / "t"
    name.write_text("k old\n" + "".join(f"u{i} {i}\n" for i in range(100)))
    assert postfix.run(f"hash:{name}").rc == 0
    inode = Path(f"{name}.db").stat().st_ino
    table = open_table("hash", name)
    assert answer(table.lookup(b"k", 0)) == b"old"
    name.write_text("k new\nfresh v\n" + "".join(f"u{i} {i}\n" for i in range(2000)))
    assert postfix.run(f"hash:{name}").rc == 0
    assert Path(f"{name}.db").stat().st_ino == inode  # the same file, rewritten
    pending = table.lookup(b"fresh", 0)
    assert isawaitable(pending)  # reopened in a worker thread first
    assert answer(pending) == b"v"
    assert answer(table.lookup(b"k", 0)) == b"new"
    assert answer(table.lookup(b"u1999", 0)) == b"1999"
    assert not table.changed()  # the instance is current again
    table.close()
