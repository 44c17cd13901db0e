"""Writes through hash, btree and lmdb instances opened for proxywrite.

The raw files are checked with the libraries themselves (and, in the interop
tests, with real postmap): keys and values as Postfix's writers store them.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from inspect import isawaitable
from pathlib import Path
from typing import Any

import pytest

from pyproxymap.tables import indexed
from pyproxymap.tables import lmdb as lmdb_table
from pyproxymap.tables.base import (
    OpenContext,
    Table,
    TableConfigError,
    TableRetry,
    Unsupported,
)
from pyproxymap.tables.registry import driver_for
from pyproxymap.wire.proxymap import FIXED, MULTI_WRITER, SEQ_FIRST, SEQ_NEXT, TRY0NULL, TRY1NULL
from tests.unit.test_indexed import SUFFIX, WRITERS

db = pytest.importorskip("berkeleydb.db")
lmdb = pytest.importorskip("lmdb")

KINDS = ["hash", "btree", "lmdb"]


def open_table(kind: str, name: Path, flags: int = 0, writable: bool = True) -> Table:
    driver = driver_for(kind)
    assert driver is not None
    return driver.open(OpenContext(kind, str(name), instance_flags=flags, writable=writable))


async def done(result: Any) -> Any:
    return await result if isawaitable(result) else result


def run(result: Any) -> Any:
    """A table's answer, awaited in a loop of its own when it came as an awaitable."""
    return asyncio.run(done(result)) if isawaitable(result) else result


def raw(kind: str, name: Path) -> dict[bytes, bytes]:
    """Every raw key and value in the file, read in another process."""
    script = (
        "import sys\n"
        "kind, path = sys.argv[1:]\n"
        "if kind == 'lmdb':\n"
        "    import lmdb\n"
        "    env = lmdb.open(path, subdir=False, lock=False, readonly=True)\n"
        "    items = list(env.begin().cursor())\n"
        "else:\n"
        "    from berkeleydb import db\n"
        "    d = db.DB()\n"
        "    d.open(path, None, db.DB_HASH if kind == 'hash' else db.DB_BTREE, db.DB_RDONLY)\n"
        "    items = d.items()\n"
        "print(repr(sorted(items)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, kind, f"{name}{SUFFIX[kind]}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(ast.literal_eval(out))


def walk(table: Table, delete_behind: bool = False) -> list[bytes]:
    """The keys of a whole sequence; ``delete_behind`` deletes each key once the
    sequence has moved past it, as Postfix's cache cleanup (dict_cache.c) does."""

    async def go() -> list[bytes]:
        keys: list[bytes] = []
        item = await done(table.sequence(SEQ_FIRST, 0))
        while item is not None:
            if delete_behind and keys:
                assert await done(table.delete(keys[-1], 0)) is True
            keys.append(item[0])
            item = await done(table.sequence(SEQ_NEXT, 0))
        if delete_behind and keys:
            assert await done(table.delete(keys[-1], 0)) is True
        return keys

    return asyncio.run(go())


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs of our own: a real full or read-only file system (needs root)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system with one file; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


# --- writing, as Postfix's writers write ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_missing_file_is_created_as_postfix_creates_it(tmp_path: Path, kind: str) -> None:
    old = os.umask(0o022)
    try:
        table = open_table(kind, tmp_path / "cache")
    finally:
        os.umask(old)
    st = os.stat(f"{tmp_path}/cache{SUFFIX[kind]}")
    assert (st.st_mode & 0o777, st.st_uid) == (0o644, os.geteuid())
    assert table.flags == FIXED | (MULTI_WRITER if kind == "lmdb" else 0) | TRY0NULL | TRY1NULL
    assert run(table.lookup(b"k", 0)) is None
    assert walk(table) == []
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_update_stores_key_and_value_with_a_null_byte(tmp_path: Path, kind: str) -> None:
    table = open_table(kind, tmp_path / "t")
    assert run(table.update(b"a@example.com", b"0:0:1:ok", 0)) is None
    assert table.flags & (TRY0NULL | TRY1NULL) == TRY1NULL  # decided, as Postfix on Linux
    run(table.update(b"a@example.com", b"replaced", 0))  # DUP_REPLACE, always
    run(table.update(b"empty", b"", 0))
    assert raw(kind, tmp_path / "t") == {b"a@example.com\0": b"replaced\0", b"empty\0": b"\0"}
    assert run(table.lookup(b"a@example.com", 0)) == b"replaced"
    assert run(table.lookup(b"empty", 0)) == b""
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_file_without_null_bytes_is_written_without(tmp_path: Path, kind: str) -> None:
    name = WRITERS[kind](tmp_path / "t", {b"old": b"1"})
    table = open_table(kind, name)
    assert run(table.lookup(b"old", 0)) == b"1"  # learned: TRY0NULL
    run(table.update(b"new", b"2", 0))
    assert raw(kind, name) == {b"old": b"1", b"new": b"2"}
    fresh = open_table(kind, name)  # undecided: deleting finds the key without one
    assert run(fresh.delete(b"new", 0)) is True
    assert fresh.flags & (TRY0NULL | TRY1NULL) == TRY0NULL
    table.close()
    fresh.close()


@pytest.mark.parametrize("kind", KINDS)
def test_delete_says_whether_the_key_was_there(tmp_path: Path, kind: str) -> None:
    table = open_table(kind, tmp_path / "t")
    run(table.update(b"k", b"v", 0))
    assert run(table.delete(b"k", 0)) is True
    assert run(table.delete(b"k", 0)) is False  # the service answers NOKEY (status 1)
    assert run(table.delete(b"never", 0)) is False
    assert run(table.lookup(b"k", 0)) is None
    assert raw(kind, tmp_path / "t") == {}
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_writes_from_instances_of_one_file_all_land(tmp_path: Path, kind: str) -> None:
    first = open_table(kind, tmp_path / "t")
    second = open_table(kind, tmp_path / "t", flags=0x10000)  # OPEN_LOCK, as verify(8)

    async def go() -> None:
        await asyncio.gather(
            *(
                done((first if i % 2 else second).update(b"k%d" % i, b"v%d" % i, 0))
                for i in range(200)
            )
        )
        assert [await done(first.lookup(b"k%d" % i, 0)) for i in range(200)] == [
            b"v%d" % i for i in range(200)
        ]
        assert await done(second.lookup(b"k7", 0)) == b"v7"

    asyncio.run(go())
    assert len(raw(kind, tmp_path / "t")) == 200
    first.close()
    second.close()


@pytest.mark.parametrize("kind", ["texthash", "cdb"])
def test_types_that_cannot_be_written_refuse_cleanly(tmp_path: Path, kind: str) -> None:
    """In Postfix's words: the table is unavailable (RETRY) through proxywrite; an
    operation a type does not have is CONFIG."""
    (tmp_path / "t").write_text("k v\n")
    with pytest.raises(TableConfigError, match="requires O_RDONLY access mode"):
        open_table(kind, tmp_path / "t")
    with pytest.raises(Unsupported, match="update operation is not supported"):
        open_table("static", Path("x")).update(b"k", b"v", 0)


# --- sequence, while entries are deleted ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cache_cleanup_walk_deleting_behind_sees_every_entry_once(
    tmp_path: Path, kind: str
) -> None:
    table = open_table(kind, tmp_path / "t")
    keys = [b"user%d@example.com" % i for i in range(300)]

    async def fill_() -> None:
        await asyncio.gather(*(done(table.update(key, b"v", 0)) for key in keys))

    asyncio.run(fill_())
    seen = walk(table, delete_behind=True)
    assert sorted(seen) == sorted(keys)
    assert raw(kind, tmp_path / "t") == {}
    assert walk(table) == []
    table.close()


@pytest.mark.parametrize("kind", ["btree", "lmdb"])
def test_sequence_goes_on_after_its_current_key_is_deleted(tmp_path: Path, kind: str) -> None:
    """Ordered types find the place of a deleted key; later keys deleted are skipped."""
    table = open_table(kind, tmp_path / "t")
    for i in range(10):
        run(table.update(b"k%d" % i, b"v", 0))
    assert run(table.sequence(SEQ_FIRST, 0)) == (b"k0", b"v")
    assert run(table.sequence(SEQ_NEXT, 0)) == (b"k1", b"v")
    run(table.delete(b"k1", 0))
    run(table.delete(b"k3", 0))
    assert run(table.sequence(SEQ_NEXT, 0)) == (b"k2", b"v")
    assert run(table.sequence(SEQ_NEXT, 0)) == (b"k4", b"v")
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_one_cursor_per_instance_and_writes_between_steps_keep_its_place(
    tmp_path: Path, kind: str
) -> None:
    table = open_table(kind, tmp_path / "t")
    for i in range(20):
        run(table.update(b"k%d" % i, b"v", 0))
    seen = [run(table.sequence(SEQ_FIRST, 0))[0]]
    while (item := run(table.sequence(SEQ_NEXT, 0))) is not None:  # any client's NEXT
        seen.append(item[0])
        run(table.update(seen[0], b"rewritten", 0))  # the file changes under the cursor
    assert sorted(seen) == sorted(b"k%d" % i for i in range(20))
    table.close()


# --- locking and the event loop -------------------------------------------------------------

HOLD = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
(fcntl.flock if sys.argv[2] == "flock" else fcntl.lockf)(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold_lock(kind: str, path: str, seconds: float) -> subprocess.Popen[str]:
    """Another process (postmap, another server) holding the file's exclusive lock."""
    style = "fcntl" if kind == "lmdb" else "flock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, path, style, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.parametrize("kind", KINDS)
def test_a_write_waiting_for_the_lock_blocks_neither_the_loop_nor_other_tables(
    tmp_path: Path, kind: str
) -> None:
    table = open_table(kind, tmp_path / "t")
    other = open_table(kind, tmp_path / "other")
    run(other.update(b"k", b"other", 0))
    holder = hold_lock(kind, table.path, 0.4)

    async def go() -> tuple[float, float]:
        started = time.monotonic()
        write = asyncio.ensure_future(done(table.update(b"k", b"v", 0)))
        gaps = []
        while not write.done():
            tick = time.monotonic()
            assert await done(other.lookup(b"k", 0)) == b"other"
            run_other = asyncio.ensure_future(done(other.update(b"n", b"1", 0)))
            await asyncio.sleep(0.01)
            await run_other
            gaps.append(time.monotonic() - tick)
        await write
        return time.monotonic() - started, max(gaps)

    waited, worst = asyncio.run(go())
    assert waited > 0.3  # the write waited for the other process
    assert worst < 0.2  # meanwhile the loop and the other table went on
    assert run(table.lookup(b"k", 0)) == b"v"
    holder.wait(10)
    table.close()
    other.close()


@pytest.mark.parametrize("kind", KINDS)
def test_lock_held_too_long_is_retry_naming_the_table(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexed, "LOCK_WAIT", 0.1)
    table = open_table(kind, tmp_path / "t")
    holder = hold_lock(kind, table.path, 0.5)
    expected = f"{re.escape(table.path)}: still locked by .* after 0.1 s"
    with pytest.raises(TableRetry, match=expected):
        run(table.update(b"k", b"v", 0))
    holder.wait(10)
    run(table.update(b"k", b"v", 0))  # and the next write, once it is free, works
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_our_readers_and_writers_exclude_each_other(tmp_path: Path, kind: str) -> None:
    """As two processes would: flock() and open-file-description fcntl() locks."""
    table = open_table(kind, tmp_path / "t")
    run(table.update(b"k", b"old", 0))
    lock = indexed.write_lock(table.path, "fcntl" if kind == "lmdb" else "flock")
    pending = table.lookup(b"k", 0)
    assert isawaitable(pending)  # not read while our writer holds the lock
    lock.close()
    assert run(pending) == b"old"
    run(table.update(b"k", b"new", 0))
    assert run(table.lookup(b"k", 0)) == b"new"
    table.close()


def test_a_write_queued_before_close_still_lands(tmp_path: Path) -> None:
    table = open_table("lmdb", tmp_path / "t")

    async def go() -> None:
        writes = [asyncio.ensure_future(done(table.update(b"k%d" % i, b"v", 0))) for i in range(20)]
        await asyncio.sleep(0)
        table.close()  # the environment closes after the queued writes
        await asyncio.gather(*writes)

    asyncio.run(go())
    assert len(raw("lmdb", tmp_path / "t")) == 20


# --- instances, and lmdb specifics -------------------------------------------------------


def test_lmdb_map_grows_when_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lmdb_table, "MAP_SIZE", 64 << 10)
    table = open_table("lmdb", tmp_path / "t")
    run(table.update(b"big", b"x" * (300 << 10), 0))
    assert run(table.lookup(b"big", 0)) == b"x" * (300 << 10)
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_reader_instance_sees_our_writes_at_once(tmp_path: Path, kind: str) -> None:
    """The proxymap service's instance of a file proxywrite writes (lmdb: opened first,
    so the environment both share is opened read-write)."""
    name = WRITERS[kind](tmp_path / "t", {b"k\0": b"v\0"})
    reader = open_table(kind, name, writable=False)
    writer = open_table(kind, name)
    assert run(reader.lookup(b"k", 0)) == b"v"
    for value in (b"new1", b"new2"):  # twice within a clock tick, the same size
        run(writer.update(b"k", value, 0))
        assert run(reader.lookup(b"k", 0)) == value
    reader.close()
    writer.close()


def test_lmdb_key_too_long_is_a_config_error_not_a_retry(tmp_path: Path) -> None:
    table = open_table("lmdb", tmp_path / "t")
    with pytest.raises(TableConfigError, match="MDB_BAD_VALSIZE"):
        run(table.update(b"k" * 600, b"v", 0))
    assert run(table.delete(b"k" * 600, 0)) is False
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_writable_instance_changes_only_when_another_file_takes_the_path(
    tmp_path: Path, kind: str
) -> None:
    table = open_table(kind, tmp_path / "t")
    run(table.update(b"k", b"v", 0))
    assert not table.changed()  # its own writes keep it current
    path = Path(table.path)
    path.rename(tmp_path / "moved")
    assert table.changed()
    if kind == "lmdb":  # writing into the moved file would lose the write
        with pytest.raises(TableRetry, match="No such file"):
            run(table.update(b"k", b"w", 0))
    else:  # Berkeley DB writes go to the path: the file is created again
        run(table.update(b"k", b"w", 0))
        assert raw(kind, tmp_path / "t") == {b"k\0": b"w\0"}
    table.close()


# --- broken files and file systems ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_file_is_retry(tmp_path: Path, kind: str) -> None:
    Path(f"{tmp_path}/t{SUFFIX[kind]}").write_bytes(b"\x17" * 20000)
    with pytest.raises(TableRetry, match="open database"):
        open_table(kind, tmp_path / "t")


@pytest.mark.parametrize("kind", KINDS)
def test_full_file_system_is_retry_and_the_file_stays_good(tmpfs: Path, kind: str) -> None:
    table = open_table(kind, tmpfs / "t")
    for i in range(50):
        run(table.update(b"k%d" % i, b"v%d" % i, 0))
    filler = fill(tmpfs)
    with pytest.raises(TableRetry, match=f"{re.escape(str(tmpfs))}/t.*: .*No space left on device"):
        run(table.update(b"big", b"x" * (256 << 10), 0))
    assert run(table.lookup(b"k7", 0)) == b"v7"  # reads go on
    filler.unlink()
    run(table.update(b"big", b"x" * (256 << 10), 0))
    assert len(raw(kind, tmpfs / "t")) == 51
    table.close()


@pytest.mark.parametrize("kind", ["hash", "btree"])
def test_file_system_gone_read_only_is_retry_and_reads_go_on(tmpfs: Path, kind: str) -> None:
    table = open_table(kind, tmpfs / "t")
    run(table.update(b"k", b"v", 0))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        expected = f"{re.escape(str(tmpfs))}/t.db: Read-only file system"
        with pytest.raises(TableRetry, match=expected):
            run(table.update(b"k", b"w", 0))
        assert run(table.lookup(b"k", 0)) == b"v"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    run(table.update(b"k", b"w", 0))
    assert run(table.lookup(b"k", 0)) == b"w"
    table.close()


@pytest.mark.parametrize("kind", KINDS)
def test_missing_file_on_read_only_file_system_is_retry(tmpfs: Path, kind: str) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(TableRetry, match="Read-only file system"):
        open_table(kind, tmpfs / "t")


def test_a_lock_fd_of_another_process_does_not_unlock_ours(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops a process's classic fcntl() locks;
    ours are taken on the open file description and survive it."""
    table = open_table("lmdb", tmp_path / "t")
    lock = indexed.write_lock(table.path, "fcntl")
    os.close(os.open(table.path, os.O_RDONLY))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
            "except OSError: print('held')\n",
            table.path,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout == "held\n"
    lock.close()
    table.close()
