"""texthash: unit tests, Postfix's regression data, and answers compared with real postmap."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import pytest

from pyproxymap.tables import texthash
from pyproxymap.tables.base import (
    OpenContext,
    TableConfigError,
    TableRetry,
    ascii_fold,
    utf8_fold,
)
from pyproxymap.tables.texthash import TexthashTable
from pyproxymap.wire.proxymap import FIXED, SEQ_FIRST, SEQ_NEXT, SRC_RHS_IS_FILE
from tests.conftest import backdate, write_confdir

POSTFIX_TESTS = Path(__file__).resolve().parents[1] / "data" / "postfix"
needs_postfix_tests = pytest.mark.skipif(
    not POSTFIX_TESTS.is_dir(), reason="Postfix regression data not present"
)
Fold = Callable[[bytes], bytes]


def no_fold(key: bytes) -> bytes:
    """What ``postmap -f`` asks for: keys as written."""
    return key


def open_thash(path: Path | str, fold: Fold = utf8_fold, flags: int = 0) -> TexthashTable:
    return TexthashTable(OpenContext("texthash", str(path), instance_flags=flags, fold=fold))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    backdate(path)
    return path


def entries(table: TexthashTable) -> list[bytes]:
    """Every entry through the sequence interface, as ``postmap -s`` prints them."""
    out = []
    item = table.sequence(SEQ_FIRST, 0)
    while item is not None:
        out.append(b"%s\t%s" % item)
        item = table.sequence(SEQ_NEXT, 0)
    return out


# --- real postmap, shared with test_inline_static ------------------------------------------


@dataclass
class Answer:
    """What one postmap run printed: exit code, stdout, warnings and fatal error."""

    rc: int
    stdout: bytes
    warnings: list[str]
    fatal: str | None


@dataclass
class Postfix:
    """A postmap configured with smtputf8_enable on or off, and our matching fold.

    Runs are started together: postmap sleeps a second before it exits on a
    fatal error, and many of the cases compared are fatal errors.
    """

    confdir: Path
    fold: Fold

    def run_all(self, commands: list[tuple[str | bytes, ...]], batch: int = 64) -> list[Answer]:
        base = ["postmap", "-c", str(self.confdir)]
        answers = []
        for i in range(0, len(commands), batch):
            procs = [
                subprocess.Popen([*base, *args], stdout=PIPE, stderr=PIPE)
                for args in commands[i : i + batch]
            ]
            answers += [_answer(*proc.communicate(timeout=30), proc.returncode) for proc in procs]
        return answers

    def run(self, *args: str | bytes) -> Answer:
        return self.run_all([args])[0]

    def query_all(self, keys: list[bytes], spec: str | bytes) -> list[tuple[int, bytes]]:
        """``postmap -q KEY SPEC`` for each key: exit code and stdout."""
        answers = self.run_all([("-q", key, spec) for key in keys])
        return [(answer.rc, answer.stdout) for answer in answers]


def _answer(stdout: bytes, stderr: bytes, rc: int | None) -> Answer:
    warnings, fatal = [], None
    for line in stderr.decode("utf-8", "replace").splitlines():
        if line.startswith("postmap: warning: "):
            warnings.append(line.removeprefix("postmap: warning: "))
        elif line.startswith("postmap: fatal: "):
            fatal = line.removeprefix("postmap: fatal: ")
    assert rc is not None
    return Answer(rc, stdout, warnings, fatal)


def as_postmap_prints(value: bytes | None) -> tuple[int, bytes]:
    """Our answer in the shape of ``postmap -q``: the value and a newline, or exit 1."""
    return (1, b"") if value is None else (0, value + b"\n")


@pytest.fixture(scope="module", params=["utf8", "ascii"])
def postfix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Postfix:
    utf8 = request.param == "utf8"
    main_cf = f"smtputf8_enable = {'yes' if utf8 else 'no'}\n"
    confdir = write_confdir(tmp_path_factory.mktemp(request.param), main_cf)
    backdate(confdir / "main.cf")  # postmap waits for a fresh main.cf to cool down too
    return Postfix(confdir, utf8_fold if utf8 else ascii_fold)


# --- unit tests ----------------------------------------------------------------------------


def test_key_whitespace_value(tmp_path: Path) -> None:
    table = open_thash(write(tmp_path / "t", b'Key   some  value \t\r\n"a b"\tq\n'))
    assert table.lookup(b"key", 0) == b"some  value"
    assert table.lookup(b"Key", 0) is None  # stored folded; the service folds requests
    assert table.lookup(b'"a b"', 0) == b"q"
    assert table.flags == FIXED


def test_first_duplicate_wins_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "t", "k 1\nK 2\nStraße 3\nSTRASSE 4\n".encode())
    assert entries(open_thash(path)) == [b"k\t1", b"strasse\t3"]
    assert caplog.messages == [
        f'{path}, line 2: duplicate entry: "K"',
        f'{path}, line 4: duplicate entry: "STRASSE"',
    ]


def test_ascii_fold_leaves_non_ascii_alone(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "ÄBC 1\nStraße 2\nSTRASSE 3\n".encode() + b"\xff 4\n")
    assert open_thash(path, ascii_fold).entries == {
        "Äbc".encode(): b"1",
        "straße".encode(): b"2",
        b"strasse": b"3",
        b"\xff": b"4",  # no UTF-8 check either
    }


def test_skipped_lines_and_their_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = b'"open\tquote v\nnovalue\nalias: v\nbad\xff v\nnul\0 v\nok v\n'
    path = write(tmp_path / "t", data)
    assert entries(open_thash(path)) == [b"alias:\tv", b"ok\tv"]
    assert caplog.messages == [
        f"{path}, line 1: unbalanced '\"' in '\"open?quote v' -- ignoring this line",
        f"{path}, line 2: expected format: key whitespace value -- ignoring this line",
        f'{path}, line 3: record is in "key: value" format; is this an alias file?',
        f'{path}, line 4: non-UTF-8 input "bad? v" -- ignoring this line',
        f"{path}, line 5: expected format: key whitespace value -- ignoring this line",
    ]


def test_missing_file_is_a_retry(tmp_path: Path) -> None:
    with pytest.raises(TableRetry) as info:
        open_thash(tmp_path / "nope")
    assert str(info.value) == f"open database {tmp_path}/nope: No such file or directory"


def test_directory_fails_on_read(tmp_path: Path) -> None:
    with pytest.raises(TableRetry) as info:
        open_thash(tmp_path)
    assert str(info.value) == f"read {tmp_path}: Is a directory"


def test_write_access_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "t", b"k v\n")
    with pytest.raises(TableConfigError) as info:
        TexthashTable(OpenContext("texthash", str(path), writable=True))
    assert str(info.value) == f"texthash:{path} map requires O_RDONLY access mode"


def test_sequence_cursor(tmp_path: Path) -> None:
    table = open_thash(write(tmp_path / "t", b"a 1\nb 2\n"))
    assert table.sequence(SEQ_NEXT, 0) is None  # no sequence started
    assert table.sequence(SEQ_FIRST, 0) == (b"a", b"1")
    assert table.sequence(SEQ_FIRST, 0) == (b"a", b"1")  # FIRST restarts
    assert table.sequence(SEQ_NEXT, 0) == (b"b", b"2")
    assert table.sequence(SEQ_NEXT, 0) is None
    assert table.sequence(SEQ_NEXT, 0) is None
    table.sequence(SEQ_FIRST, 0)
    assert table.sequence(7, 0) is None  # any other function stops the sequence
    assert table.sequence(SEQ_NEXT, 0) is None


def test_changed(tmp_path: Path) -> None:
    path = write(tmp_path / "t", b"k v\n")
    table = open_thash(path)
    assert not table.changed()
    os.utime(path, (1, 1))
    assert table.changed()

    table = open_thash(path)
    copy = write(tmp_path / "copy", path.read_bytes())
    os.utime(copy, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    copy.replace(path)  # same size and mtime, another inode
    assert table.changed()

    table = open_thash(path)
    path.unlink()
    assert table.changed()


def test_changed_by_size_alone(tmp_path: Path) -> None:
    """A rewrite that keeps the mtime (same second, or restored) still shows in the size."""
    path = write(tmp_path / "t", b"k v\n")
    table = open_thash(path)
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(b"k vv\n")
    os.utime(path, ns=(mtime_ns, mtime_ns))
    assert table.changed()


@pytest.mark.parametrize(("age", "pauses"), [(10, 0), (-100, 0), (0, 6)])
def test_hot_file_is_read_again_once_cool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, age: int, pauses: int
) -> None:
    """A file modified within the last second is re-read, as Postfix does, until it is
    about two seconds old; older files and files dated in the future are read once."""
    now = 1_000_000_000.5
    clock = [now]
    monkeypatch.setattr(texthash, "_clock", lambda: clock[0])
    monkeypatch.setattr(texthash, "_doze", lambda s: clock.__setitem__(0, clock[0] + s))
    path = tmp_path / "t"
    path.write_bytes(b"k v\n")
    os.utime(path, (now - age, now - age))
    assert open_thash(path).lookup(b"k", 0) == b"v"
    assert round((clock[0] - now) / texthash.COOL_DOWN_PAUSE) == pauses


def test_rhs_is_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "f1").write_bytes(b"this-is-file1\n")
    path = write(tmp_path / "t", f"a {tmp_path}/f1\nb {tmp_path}/nope\n".encode())
    table = open_thash(path, flags=SRC_RHS_IS_FILE)
    assert table.entries == {b"a": b"dGhpcy1pcy1maWxlMQo="}
    assert table.flags == FIXED | SRC_RHS_IS_FILE
    assert caplog.messages == [
        f"{path}, line 2: open {tmp_path}/nope: No such file or directory: skipping this entry"
    ]


# --- Postfix's own regression data ---------------------------------------------------------


@needs_postfix_tests
def test_postfix_dict_thash_map(caplog: pytest.LogCaptureFixture) -> None:
    """``postmap -fs texthash:dict_thash.map | sort`` reproduces the file."""
    table = open_thash(POSTFIX_TESTS / "dict_thash.map", no_fold)
    assert sorted(entries(table)) == (POSTFIX_TESTS / "dict_thash.map").read_bytes().splitlines()
    assert caplog.messages == []


@needs_postfix_tests
def test_postfix_dict_thash_in(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``postmap -fs texthash:dict_thash.in`` prints dict_thash.ref (entries in hash order)."""
    monkeypatch.chdir(POSTFIX_TESTS)
    table = open_thash("dict_thash.in", no_fold)
    ref = (POSTFIX_TESTS / "dict_thash.ref").read_bytes().splitlines()
    warnings = [line for line in ref if line.startswith(b"postmap: warning: ")]
    assert caplog.messages == [line[18:].decode() for line in warnings]
    assert sorted(entries(table)) == sorted(set(ref) - set(warnings))


# --- compared with real postmap ------------------------------------------------------------

EDGE_TABLE = (
    b"# comment at the top\n"
    b"KEY1 value one\n"
    b"key1 duplicate, differs only in case\n"
    b"MiXeD   spaced   value   \n"
    b"   \n"
    b"Stra\xc3\x9fe street\n"
    b"STRASSE folds like strasse\n"
    b"\xc3\x84\xc3\x96\xc3\x9c umlauts\n"
    b"\xc7\x85 titlecase\n"
    b'"quoted key" q value\n'
    b'"unbalanced x\n'
    b"a\\ b escaped space\n"
    b"alias: alias-like\n"
    b"novalue\n"
    b"novalue2   \t\n"
    b"cont first\n"
    b"  second\n"
    b"#interleaved comment\n"
    b"\n"
    b"\tthird \n"
    b"\xff\xfe invalid utf8 key\n"
    b"ok\xc3\xa4 \xff invalid utf8 value\n"
    b"nul\0after v\n"
    b"knul v\0after\n"
    b"tab\tsep\ttabs\tin\tvalue\n"
    b"crlf value\r\n"
    b"vt\x0bsep\x0bvalue\x0c\n"
    b"   # indented comment\n"
    b"last no newline"
)
EDGE_KEYS = [
    b"KEY1", b"key1", b"Key1", b"mixed", b"MIXED", "straße".encode(), b"STRASSE", b"strasse",
    "äöü".encode(), "ÄÖÜ".encode(), "ǆ".encode(), "ǅ".encode(), b'"quoted key"', b"quoted key",
    b'"unbalanced', b"a\\ b", b"a b", b"alias:", b"alias", b"novalue", b"novalue2", b"cont",
    b"second", b"third", b"\xff\xfe", "okä".encode(), b"nul", b"knul", b"tab", b"crlf", b"vt",
    b"last", b"missing", b"#", b"# comment",
]  # fmt: skip


@pytest.mark.interop
@pytest.mark.parametrize(
    "data",
    [
        EDGE_TABLE,
        b"  leading whitespace v\n#c\n continued\nk v\n",
        b"\n\n# only comments\n \n",
        b"k v\n" * 3 + b"K w\r\n",
        b'"the answer is"\t42\nthe\tanswer is 42\n"a\\" b" c\n',
        b"x\\\nx\\ y z\n\\ lead v\n",
    ],
    ids=["edge", "leading-ws", "empty", "dups", "quotes", "backslashes"],
)
def test_same_as_postmap(
    postfix: Postfix, tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "table", data)
    table = open_thash(path, postfix.fold)
    dump = postfix.run("-s", f"texthash:{path}")
    assert caplog.messages == dump.warnings
    assert sorted(entries(table)) == sorted(dump.stdout.splitlines())
    ours = [as_postmap_prints(table.lookup(postfix.fold(key), 0)) for key in EDGE_KEYS]
    assert ours == postfix.query_all(EDGE_KEYS, f"texthash:{path}")


@pytest.mark.interop
def test_missing_file_same_as_postmap(postfix: Postfix, tmp_path: Path) -> None:
    answer = postfix.run("-q", "k", f"texthash:{tmp_path}/nope")
    with pytest.raises(TableRetry) as info:
        open_thash(tmp_path / "nope", postfix.fold)
    assert (answer.rc, answer.fatal) == (1, str(info.value))
