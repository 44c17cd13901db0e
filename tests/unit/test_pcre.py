"""pcre: Postfix's regression data, PCRE2 flags and limits, answers compared with real postmap."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pyproxymap.tables import pcre
from pyproxymap.tables.base import TableRetry, ascii_fold
from pyproxymap.tables.pcre import PcreTable
from pyproxymap.wire.proxymap import PATTERN, SRC_RHS_IS_FILE
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


def pcre_table(tmp_path: Path, text: bytes) -> PcreTable:
    table = open_table("pcre", write(tmp_path / "t", text), ascii_fold)
    assert isinstance(table, PcreTable)
    return table


# --- Postfix's own regression data ---------------------------------------------------------


@needs_postfix_tests
@pytest.mark.parametrize(("suffix", "flags"), [("", 0), ("_file", SRC_RHS_IS_FILE)])
def test_postfix_regression_data(
    suffix: str, flags: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ours, ref = regression_data("pcre", suffix, flags, tmp_path, monkeypatch, caplog)
    assert ours == ref


@needs_postfix_tests
def test_postfix_inline_regression_data() -> None:
    ours, ref = inline_regression_data("pcre")
    assert ours == ref


# --- unit tests ----------------------------------------------------------------------------


def test_flags_toggle_from_caseless_dotall(tmp_path: Path) -> None:
    table = pcre_table(
        tmp_path,
        b"/^a.c$/ dotall\n/^b.d$/s not-dotall\n/^l2$/m multiline\n/ x y /x extended\n"
        b"/z/A anchored\n/^e$/E dollar-endonly\n/(f+)/U ungreedy-$1\n/^CaSe$/i sensitive\n"
        b"/^g$/X obsolete\n",
    )
    assert table.flags == PATTERN
    assert answer(table, b"A\nC") == b"dotall"
    assert answer(table, b"b\nd") is None
    assert answer(table, b"l1\nl2") == b"multiline"
    assert answer(table, b"XY") == b"extended"
    assert answer(table, b"yz") is None
    assert answer(table, b"zy") == b"anchored"
    assert answer(table, b"e\n") is None
    assert answer(table, b"e") == b"dollar-endonly"
    assert answer(table, b"ffff") == b"ungreedy-f"
    assert answer(table, b"case") is None
    assert answer(table, b"G") == b"obsolete"


def test_bytes_unless_utf_is_asked_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = pcre_table(tmp_path, "/^.$/ one\n/^ä$/ umlaut\n/(*UTF)^(.)$/ utf-$1\n".encode())
    assert answer(table, "é".encode()) == "utf-é".encode()
    assert answer(table, "Ä".encode()) == "utf-Ä".encode()  # no Unicode case folding
    assert answer(table, b"\xff\xfe") is None  # (*UTF): a match error, the rule is skipped
    assert caplog.messages == [
        f"pcre map {tmp_path}/t, line 3: UTF-8 error: illegal byte (0xfe or 0xff)"
    ]


def test_match_limit_answers_retry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Postfix would warn and skip the rule, after up to 10 million steps; we stop at
    MATCH_LIMIT and answer RETRY (the service logs the message)."""
    table = pcre_table(tmp_path, b"/^(a+)+$/ catastrophic\n/./ any\n")
    started = time.monotonic()
    with pytest.raises(TableRetry) as info:
        answer(table, b"a" * 40 + b"b")
    assert time.monotonic() - started < 0.5
    assert str(info.value) == f"pcre map {tmp_path}/t, line 1: match limit exceeded"
    assert answer(table, b"a" * 40) == b"catastrophic"
    assert caplog.messages == []


def test_heap_limit_answers_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pcre, "HEAP_LIMIT_KIB", 1024)
    pcre._pcre2.cache_clear()
    try:
        table = pcre_table(tmp_path, b"/^(a|b)*$/ ok\n")
        assert answer(table, b"ab" * 100) == b"ok"
        with pytest.raises(TableRetry, match="line 1: heap limit exceeded"):
            answer(table, b"ab" * 20000)
    finally:
        monkeypatch.undo()
        pcre._pcre2.cache_clear()


def test_long_keys_use_the_background_thread(tmp_path: Path) -> None:
    table = pcre_table(tmp_path, b"/^(.*)@(.*)$/ $2\n")
    pending = table.lookup(b"u" * 100_000 + b"@example.com", 0)
    assert asyncio.iscoroutine(pending)
    assert asyncio.run(pending) == b"example.com"


def test_named_groups_count_as_numbered(tmp_path: Path) -> None:
    table = pcre_table(tmp_path, b"/^(?<user>[^@]+)@(?:x|(y))$/ $1-$2\n")
    assert answer(table, b"joe@x") == b"joe-"
    assert answer(table, b"joe@y") == b"joe-y"


# --- compared with real postmap ------------------------------------------------------------

PCRE_FLAGS = (
    b"/^a.c$/\tdotall-default\n"
    b"/ x y z /x\textended\n"
    b"/b/A\tanchored\n"
    b"/(f+)/U\tungreedy-$1\n"
    b"/(f+)/UU\tgreedy-$1\n"
    b"/^CaSe$/i\tsensitive\n"
    b"/^g$/X\tobsolete-X\n"
    b"/(?<name>h+)/\tnamed-$1\n"
    b"/^(*UTF)u/\tmisplaced-utf\n"
    b"/(*UTF)^(.)$/\tutf-one-char-$1\n"
    b"/(*UTF)^u/\tutf-u\n"
    b"/^\\d+$/\tdigits\n"
    b"/^(?=.*j)k/\tlookahead\n"
    b"/^(?i:m)M$/\tinline-option\n"
    b"/a{2,1}/\tbad-quantifier\n"
    b"/(?<n/\tbad-name\n"
    b"/[z-a]/\tbad-range\n"
    b"/\\/\tlone-backslash\n"
    b"/a/!/b/\tno-second-pattern\n"
    b"/q/s!\tbad-option\n"
    b"/^(a|b)(c)?$/\t[$1][$2]\n"
)  # fmt: skip
PCRE_FLAG_KEYS = [b"abc", b"AxC", b"xyz", b"ab", b"ba", b"fff", b"CaSe", b"case", b"G",
                  b"hhh", "é".encode(), b"\xc3", b"u\xff", b"123", b"kj", b"mM", b"MM",
                  b"a", b"bc", b"q"]  # fmt: skip


@pytest.mark.interop
@pytest.mark.parametrize("case", [*CASES, "flags"])
def test_same_as_postmap(
    postfix: Postfix,  # noqa: F811  (the fixture)
    tmp_path: Path,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    text, keys = (PCRE_FLAGS, PCRE_FLAG_KEYS) if case == "flags" else CASES[case]
    ours, postmap = postmap_and_ours_file(postfix, "pcre", tmp_path, text, keys, caplog)
    assert ours == postmap


@pytest.mark.interop
@pytest.mark.parametrize("name", INLINE_FORMS)
def test_inline_same_as_postmap(
    postfix: Postfix,  # noqa: F811  (the fixture)
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours, postmap = postmap_and_ours(postfix, "pcre", name, INLINE_KEYS, caplog)
    assert ours == postmap


@pytest.mark.interop
@pytest.mark.parametrize(
    "key",
    [b"", b"a\nc", b"b\nd", b"l1\nl2", b"e\n", b"e", b"A" * 5000, b"x" * 600 + b"@y"],
    ids=["empty", "dotall", "no-dotall", "multiline", "endonly-nl", "endonly", "long", "long@"],
)
def test_single_keys_same_as_postmap(
    postfix: Postfix,  # noqa: F811  (the fixture)
    tmp_path: Path,
    key: bytes,
) -> None:
    path = write(
        tmp_path / "t",
        b"/^$/ empty\n/^a.c$/ dotall\n/^b.d$/s not-dotall\n/^l2$/m multiline\n"
        b"/^e$/E endonly\n/^(.*)@(.*)$/ [$2]\n/^(.)(.*)(.)$/ [$3$1]\n",
    )
    table = open_table("pcre", path, postfix.fold)
    expected = postfix.run("-q", key, f"pcre:{path}")
    assert as_postmap_prints(answer(table, key)) == (expected.rc, expected.stdout)
