"""regexp: Postfix's regression data, glibc semantics, and answers compared with real postmap."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pyproxymap.tables import patterns
from pyproxymap.tables.base import (
    OpenContext,
    TableConfigError,
    TableRetry,
    Unsupported,
    ascii_fold,
)
from pyproxymap.tables.regexp import RegexpTable
from pyproxymap.wire.proxymap import NO_REGSUB, PATTERN, SEQ_FIRST, SRC_RHS_IS_FILE
from tests.unit.pattern_checks import (
    CASES,
    INLINE_FORMS,
    INLINE_KEYS,
    answer,
    inline_regression_data,
    open_table,
    postmap_and_ours,
    postmap_and_ours_file,
    regression_data,
)
from tests.unit.test_texthash import (
    Postfix,
    as_postmap_prints,
    needs_postfix_tests,
    postfix,  # noqa: F401  (fixture)
    write,
)


def regexp(tmp_path: Path, text: bytes, flags: int = 0) -> RegexpTable:
    table = open_table("regexp", write(tmp_path / "t", text), flags=flags)
    assert isinstance(table, RegexpTable)
    return table


# --- Postfix's own regression data ---------------------------------------------------------


@needs_postfix_tests
@pytest.mark.parametrize(("suffix", "flags"), [("", 0), ("_file", SRC_RHS_IS_FILE)])
def test_postfix_regression_data(
    suffix: str, flags: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ours, ref = regression_data("regexp", suffix, flags, tmp_path, monkeypatch, caplog)
    assert ours == ref


@needs_postfix_tests
def test_postfix_inline_regression_data() -> None:
    ours, ref = inline_regression_data("regexp")
    assert ours == ref


# --- unit tests ----------------------------------------------------------------------------


def test_flags_and_no_sequence(tmp_path: Path) -> None:
    table = regexp(tmp_path, b"/a/ b\n")
    assert table.flags == PATTERN
    with pytest.raises(Unsupported):
        table.sequence(SEQ_FIRST, 0)
    with pytest.raises(Unsupported):
        table.update(b"a", b"b", 0)


def test_case_insensitive_by_default_and_i_toggles(tmp_path: Path) -> None:
    table = regexp(tmp_path, b"/^abc$/ insensitive\n/^Xyz$/i sensitive\n/^q$/ii twice\n")
    assert answer(table, b"ABC") == b"insensitive"
    assert answer(table, b"Xyz") == b"sensitive"
    assert answer(table, b"xyz") is None
    assert answer(table, b"Q") == b"twice"


def test_c_locale_bytes_and_ascii_case(tmp_path: Path) -> None:
    """As Postfix, which never calls setlocale(): '.' is one byte, case folds ASCII only."""
    path = write(
        tmp_path / "t", "/^.$/ one\n/^..$/ two\n/^ä$/ umlaut\n/^[[:alpha:]]+$/ alpha\n".encode()
    )
    table = open_table("regexp", path, ascii_fold)
    assert answer(table, "é".encode()) == b"two"  # two bytes
    assert answer(table, b"\xff") == b"one"  # not UTF-8: still one byte (ascii_fold server)
    assert answer(table, "Ä".encode()) == b"two"  # no Unicode case folding
    assert answer(table, b"abcXYZ") == b"alpha"
    assert answer(table, "abcé".encode()) is None


def test_glibc_group_spans(tmp_path: Path) -> None:
    """glibc's choice of subexpression spans, which Postfix gets too (not POSIX's)."""
    table = regexp(tmp_path, b"/^(a*)*(b)$/ [$1][$2]\n/^(.?)*$/ [$1]\n")
    assert answer(table, b"ab") == b"[a][b]"
    assert answer(table, b"xy") == b"[y]"


def test_second_pattern_and_options(tmp_path: Path) -> None:
    table = regexp(
        tmp_path,
        b"/^a\\{2\\}$/x bre\n/a/!/b/ a-not-b\n/^x(.)/ !/z/ x-$1\n/^m1$/m multiline\n/abc\\\n",
    )
    assert answer(table, b"ac") == b"a-not-b"
    assert answer(table, b"ab") is None
    assert answer(table, b"xy") == b"!/z/ x-y"  # after a space, "!/z/" is result text
    assert answer(table, b"AA") == b"bre"
    assert answer(table, b"m0\nm1") == b"multiline"
    assert answer(table, b"ABC") == b""  # dict_regexp ends "/abc\" at the backslash


def test_no_regsub_instance_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = regexp(tmp_path, b"/(a)/ $1\n/b/ $$plain\n", flags=NO_REGSUB)
    assert answer(table, b"a") is None
    assert answer(table, b"b") == b"$plain"
    assert caplog.messages == [
        f"regexp map {tmp_path}/t, line 1: regular expression substitution is not allowed: "
        "skipping this rule"
    ]


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(TableRetry, match=f"^open {tmp_path}/nope: No such file or directory$"):
        open_table("regexp", tmp_path / "nope")
    with pytest.raises(TableRetry, match=f"^read {tmp_path}: Is a directory$"):
        open_table("regexp", tmp_path)
    with pytest.raises(TableConfigError, match="map requires O_RDONLY access mode"):
        RegexpTable(OpenContext("regexp", "{{/a/ b}}", writable=True))
    with pytest.raises(TableRetry) as info:
        open_table("regexp", "{{/x/ y}x}")
    assert str(info.value) == "regexp map: syntax error after '}' in \"{/x/ y}x\""
    with pytest.raises(TableRetry) as info:
        open_table("regexp", "{{/x/ y}, z}")
    assert str(info.value) == "regexp map: no '{' at start of text in \"z\""


def test_changed(tmp_path: Path) -> None:
    table = regexp(tmp_path, b"/a/ b\n")
    assert not table.changed()
    os.utime(tmp_path / "t", (1, 1))
    assert table.changed()
    (tmp_path / "t").unlink()
    assert table.changed()
    assert not open_table("regexp", "{{/a/ b}}").changed()


def test_long_keys_are_matched_in_the_background(tmp_path: Path) -> None:
    table = regexp(tmp_path, b"/^(a+)b$/ [$1]\n")
    inline = b"a" * (patterns.INLINE_KEY_MAX - 1)
    assert table.lookup(inline + b"b", 0) == b"[" + inline + b"]"
    pending = table.lookup(inline + b"ab", 0)  # one byte over
    assert asyncio.iscoroutine(pending)
    assert asyncio.run(pending) == b"[" + inline + b"a]"


def test_back_references_are_always_matched_in_the_background(tmp_path: Path) -> None:
    table = regexp(tmp_path, b"/^(a+)\\1$/ double\n")
    pending = table.lookup(b"aaaa", 0)
    assert asyncio.iscoroutine(pending)
    assert asyncio.run(pending) == b"double"


def test_a_runaway_match_answers_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's regexec takes quadratic time on a key it cannot match; nothing can stop it,
    but the lookup answers RETRY after MATCH_TIMEOUT, and the loop is never blocked."""
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT", 0.05)
    table = regexp(tmp_path, b"/(.*)x/ $1\n")
    started = time.monotonic()
    with pytest.raises(TableRetry, match=r"no answer within 0\.05s for a key of 20000 bytes"):
        answer(table, b"a" * 20000)  # about a second of regexec
    assert time.monotonic() - started < 0.5
    assert answer(table, b"ax") == b"a"  # short keys are answered meanwhile


# --- compared with real postmap ------------------------------------------------------------

GLIBC = (
    b"/^(a*)*(b)$/\t[$1][$2]\n"
    b"/a/!/b/\ta-not-b\n"
    b"/^a\\{2\\}$/x\tbre\n"
    b"/^(x+)\\1$/\tbackref-$1\n"
    b"/^[[:digit:]]+$/\tdigits\n"
    b"/^[[:upper:]]+$/i\tupper\n"
    b"/^[[:foo:]]$/\tbad-class\n"
    b"/(/\tbad\n"
    b"/a{1/\tbad-brace\n"
    b"/^.$/\tone-byte\n"
    b"/^..$/\ttwo-bytes\n"
    b"/abc\\\n"
    b"/q/!\tdangling\n"
    b"/^k/!/(/\tbad-second\n"
    b"/^(.?)*$/\t[$1]\n"
)  # fmt: skip
GLIBC_KEYS = [b"ab", b"xy", b"ac", b"aa", b"AA", b"xxxx", b"xxx", b"123", b"ABC", b"Abc",
              "é".encode(), b"\xff", b"ABCD", b"q", b"k1", b"zzz"]  # fmt: skip


@pytest.mark.interop
@pytest.mark.parametrize("case", [*CASES, "glibc"])
def test_same_as_postmap(
    postfix: Postfix,  # noqa: F811  (the fixture)
    tmp_path: Path,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    text, keys = (GLIBC, GLIBC_KEYS) if case == "glibc" else CASES[case]
    ours, postmap = postmap_and_ours_file(postfix, "regexp", tmp_path, text, keys, caplog)
    assert ours == postmap


@pytest.mark.interop
@pytest.mark.parametrize("name", INLINE_FORMS)
def test_inline_same_as_postmap(
    postfix: Postfix,  # noqa: F811  (the fixture)
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours, postmap = postmap_and_ours(postfix, "regexp", name, INLINE_KEYS, caplog)
    assert ours == postmap


@pytest.mark.interop
@pytest.mark.parametrize(
    "key", [b"", b"a\nb", b"A" * 5000, b"\t", b"k\xc3\xa9y"], ids=["empty", "newline", "long",
                                                                    "tab", "utf8"]
)  # fmt: skip
def test_single_keys_same_as_postmap(
    postfix: Postfix,  # noqa: F811  (the fixture)
    tmp_path: Path,
    key: bytes,
) -> None:
    path = write(tmp_path / "t", b"/^$/ empty\n/^a$/m multi\n/^(.)(.*)(.)$/ [$3$2$1]\n/./ one\n")
    table = open_table("regexp", path, postfix.fold)
    expected = postfix.run("-q", key, f"regexp:{path}")
    assert as_postmap_prints(answer(table, key)) == (expected.rc, expected.stdout)
