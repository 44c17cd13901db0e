"""cidr: unit tests, Postfix's regression data, and answers compared with real postmap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyproxymap.tables.base import OpenContext, TableConfigError, TableRetry, ascii_fold
from pyproxymap.tables.cidr import CidrTable, parse_pattern
from pyproxymap.tables.source import SourceError
from pyproxymap.wire.proxymap import PATTERN, SRC_RHS_IS_FILE
from tests.unit.test_texthash import (
    POSTFIX_TESTS,
    Fold,
    Postfix,
    as_postmap_prints,
    needs_postfix_tests,
    postfix,  # noqa: F401  (fixture)
    write,
)


def open_cidr(name: str | Path, flags: int = 0, fold: Fold = ascii_fold) -> CidrTable:
    return CidrTable(OpenContext("cidr", str(name), instance_flags=flags, fold=fold))


def answers(table: CidrTable, keys: list[str]) -> list[bytes | None]:
    return [table.lookup(key.encode(), 0) for key in keys]


# --- patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("172.16.1.3/21", 'non-null host address bits in "172.16.1.3/21", perhaps you should '
                          'use "172.16.0.0/21" instead'),
        ("172.16.1.3/33", 'bad mask length in "172.16.1.3/33"'),
        ("::/129", 'bad mask length in "::/129"'),
        ("172.999.0.0/21", 'bad network value in "172.999.0.0/21"'),
        ("172.16.1.999", 'bad address pattern: "172.16.1.999"'),
        ("01.2.3.4", 'bad address pattern: "01.2.3.4"'),  # inet_pton: no leading zeros
        ("1.2.3", 'bad address pattern: "1.2.3"'),
        ("fe80::1%eth0", 'bad address pattern: "fe80::1%eth0"'),  # no zone ids
        ("0.0.0.0/", 'bad mask value in "0.0.0.0/"'),
        ("1.2.3.0/+24", 'bad mask value in "1.2.3.0/+24"'),
        ("1.2.3.0/24/5", 'bad mask value in "1.2.3.0/24/5"'),
        ("[1.2.3.0]/24/5", 'bad mask value in "1.2.3.0/24/5"'),
        ("1.2.3.0/2:4", 'bad mask value in "1.2.3.0/2:4"'),  # the family is the address's
        ("[1234", "missing ']' character after \"[1234\""),
        ("[1234]junk", 'garbage after "[1234]"'),
        ("10.2.0.0/256", 'non-null host address bits in "10.2.0.0/256", perhaps you should '
                         'use "0.0.0.0/0" instead'),  # atoi() into an unsigned char: /0
        ("10.3.0.0/99999999999999999999", 'bad mask length in "10.3.0.0/99999999999999999999"'),
        ("::ffff:9.9.9.1/120", 'non-null host address bits in "::ffff:9.9.9.1/120", perhaps '
                               'you should use "::ffff:9.9.9.0/120" instead'),
    ],
)  # fmt: skip
def test_bad_patterns(pattern: str, why: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_pattern(pattern)
    assert str(info.value) == why


@pytest.mark.parametrize(
    ("pattern", "same_as"),
    [
        ("[1.2.3.0]/24", "1.2.3.0/24"),
        ("[1.2.3.0/24]", "1.2.3.0/24"),
        ("[::1]", "::1/128"),
        ("10.0.0.0/288", "10.0.0.0/32"),  # 288 & 0xff
        ("10.4.0.0/4294967312", "10.4.0.0/16"),  # (int) of the long, then & 0xff
        ("10.1.0.0/016", "10.1.0.0/16"),
        ("2001:DB8::/32", "2001:db8::/32"),
    ],
)
def test_equivalent_patterns(pattern: str, same_as: str) -> None:
    assert parse_pattern(pattern) == parse_pattern(same_as)


# --- tables --------------------------------------------------------------------------------

EDGE_TABLE = b"""\
1.2.3.4 v4exact
[5.6.7.0]/24 bracket-outside
[5.6.8.0/24] bracket-inside
[::1] bracket6
::ffff:1.2.3.4 mapped
::ffff:9.9.9.0/120 mapped-net
10.0.0.0/288 mask288
fe80::1%eth0 zone
fe80::/10 linklocal
2001:DB8::/32 upper
01.2.3.4 leadingzero
if 9.0.0.0/8
IF !9.9.9.0/24
9.1.1.1 in-nine-not-nine-nine
EndIF
9.9.9.9 nine\t \r
ifx 9.0.0.0/8 x
if 9.9.0.0/16 value
endif garbage
endif
endif
IF
endifx
\xff\xfe non-utf8-pattern
! ::1 not-v6-loopback
if!11.0.0.0/8
if 12.0.0.0/8
12.1.1.1 twelve
endif
endif
if 11.0.0.0/8
11.1.1.1 eleven
if 11.1.0.0/16
11.1.2.3 no-endif
! 11.1.7.7 not-11.1.7.7
"""
EDGE_KEYS = [
    b"1.2.3.4", b"5.6.7.9", b"5.6.8.1", b"::1", b"[::1]", b"::ffff:1.2.3.4", b"::FFFF:1.2.3.4",
    b"::ffff:9.9.9.5", b"10.0.0.0", b"10.0.0.1", b"fe80::1", b"fe80::1%eth0", b"FE80::2",
    b"2001:0db8:0::1", b"01.2.3.4", b"1.2.3.04", b" 1.2.3.4", b"1.2.3.4 ", b"7.7.7.7", b"9.1.1.1",
    b"9.9.9.9", b"9.9.9.1", b"11.1.1.1", b"11.1.2.3", b"11.1.9.9", b"11.1.7.7", b"11.2.0.0",
    b"12.1.1.1", b"12.1.2.3", b"", b"abc", b"1.2.3.4/32",
    b"1:2:3:4:5:6:1.2.3.4", b"::1.2.3.4", b"1.2.3.4:", b"\xff", "::ä".encode(),
]  # fmt: skip


def test_edge_table(tmp_path: Path) -> None:
    table = open_cidr(write(tmp_path / "t", EDGE_TABLE))
    assert table.flags == PATTERN
    got = {key: table.lookup(key, 0) for key in EDGE_KEYS}
    assert {key.decode(): value.decode() for key, value in got.items() if value} == {
        "1.2.3.4": "v4exact",
        "5.6.7.9": "bracket-outside",
        "5.6.8.1": "bracket-inside",
        "::1": "bracket6",
        "::ffff:1.2.3.4": "mapped",  # IPv4-mapped keys are IPv6: not v4exact
        "::FFFF:1.2.3.4": "mapped",
        "::ffff:9.9.9.5": "mapped-net",
        "10.0.0.0": "mask288",
        "fe80::1": "linklocal",
        "FE80::2": "linklocal",
        "2001:0db8:0::1": "upper",
        "9.1.1.1": "in-nine-not-nine-nine",
        "9.9.9.9": "nine",
        "::1.2.3.4": "not-v6-loopback",
        "1:2:3:4:5:6:1.2.3.4": "not-v6-loopback",
        "12.1.1.1": "twelve",
        "11.1.1.1": "eleven",
        "11.1.2.3": "no-endif",
        "11.1.9.9": "not-11.1.7.7",  # an IF without ENDIF hides the rest from other keys
    }


def test_if_endif_negation_and_unterminated_if(caplog: pytest.LogCaptureFixture) -> None:
    table = open_cidr(
        "{{if !1.2.3.4/30}, {1.2.3.3 outside}, {1.2.3.5 never}, {endif},"
        " {if ::f4/126}, {! ::f4 v6-not-f4}, {endif}, {if 1.0.0.0/8}, {1.2.3.5 unterminated}}"
    )
    keys = ["1.2.3.3", "1.2.3.5", "::f5", "::f4", "::f8", "2.0.0.0"]
    assert answers(table, keys) == [b"outside", b"unterminated", b"v6-not-f4", None, None, None]
    assert caplog.messages == [
        "cidr map {{if !1.2.3.4/30}, {1.2.3.3 outside}, {1.2.3.5 never}, {endif}, {if ::f4/126},"
        " {! ::f4 v6-not-f4}, {endif}, {if 1.0.0.0/8}, {1.2.3.5 unterminated}}, line 8:"
        " IF has no matching ENDIF"
    ]


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("{1.2.3.4 x}", "cidr map: no '{' at start of text in \"1.2.3.4\""),
        ("{{1.2.3.4 x}}x", "cidr map: syntax error after '}' in \"{{1.2.3.4 x}}x\""),
        ("{{1.2.3.4 x}x}", "cidr map: syntax error after '}' in \"{1.2.3.4 x}x\""),
        ("{{1.2.3.4 x}", "cidr map: missing '}' in \"{{1.2.3.4 x}\""),
    ],
)
def test_inline_syntax_errors(name: str, error: str) -> None:
    with pytest.raises(TableConfigError) as info:
        open_cidr(name)
    assert str(info.value) == error


def test_inline_forms() -> None:
    assert open_cidr("{, }").rules == []
    table = open_cidr("{ , { 1.2.3.4   spaced  value  },{#c},{5.6.7.8 y} , }")
    assert answers(table, ["1.2.3.4", "5.6.7.8"]) == [b"spaced  value", b"y"]
    assert not table.changed()


def test_file_errors_and_changes(tmp_path: Path) -> None:
    with pytest.raises(TableRetry, match=f"^open {tmp_path}/nope: No such file or directory$"):
        open_cidr(tmp_path / "nope")
    with pytest.raises(TableRetry, match=f"^cidr map {tmp_path}: read error: Is a directory$"):
        open_cidr(tmp_path)
    with pytest.raises(TableConfigError, match="map requires O_RDONLY access mode"):
        CidrTable(OpenContext("cidr", str(tmp_path / "t"), writable=True))
    path = write(tmp_path / "t", b"1.2.3.4 a\n")
    table = open_cidr(path)
    assert not table.changed()
    path.write_bytes(b"1.2.3.4 b\n")
    assert table.changed()
    os.unlink(path)
    assert table.changed()


def test_utf8_layer(caplog: pytest.LogCaptureFixture) -> None:
    """With smtputf8_enable, a non-UTF-8 value fails the lookup, as Postfix's UTF-8 layer."""
    name = b"{{1.2.3.4 \xff}}".decode("utf-8", "surrogateescape")
    with pytest.raises(TableConfigError, match=r'key "1.2.3.4": non-UTF-8 value "\?"'):
        CidrTable(OpenContext("cidr", name)).lookup(b"1.2.3.4", 0)
    assert open_cidr(name).lookup(b"1.2.3.4", 0) == b"\xff"  # ascii_fold: smtputf8 off
    assert CidrTable(OpenContext("cidr", name)).lookup(b"\xff", 0) is None
    assert caplog.messages[-1].endswith('non-UTF-8 key "?": malformed UTF-8 or invalid codepoint')


# --- Postfix's own regression data ---------------------------------------------------------


def transcript(spec_name: str, gets: list[str], messages: list[str], table: CidrTable) -> list[str]:
    """What Postfix's dict_open driver prints, less its ``owner=`` line."""
    out = [f"./dict_open: warning: {message}" for message in messages]
    for key in gets:
        value = table.lookup(key.encode(), 0)
        out += [f"> get {key}", f"{key}: not found" if value is None else f"{key}={value.decode()}"]
    return out


def ref_lines(name: str) -> list[str]:
    return [
        line for line in (POSTFIX_TESTS / name).read_text().splitlines() if "owner=" not in line
    ]


@needs_postfix_tests
@pytest.mark.parametrize(("test", "flags"), [("dict_cidr", 0), ("dict_cidr_file", SRC_RHS_IS_FILE)])
def test_postfix_ref(
    test: str,
    flags: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):  # the files Postfix's Makefile writes first
        (tmp_path / f"dict_cidr_file{n}").write_text(f"this-is-file{n}\n")
    (tmp_path / f"{test}.map").write_bytes((POSTFIX_TESTS / f"{test}.map").read_bytes())
    table = open_cidr(f"{test}.map", flags)
    gets = [line.split()[1] for line in (POSTFIX_TESTS / f"{test}.in").read_text().splitlines()]
    assert transcript(test, gets, caplog.messages, table) == ref_lines(f"{test}.ref")


@needs_postfix_tests
def test_postfix_inline_ref(caplog: pytest.LogCaptureFixture) -> None:
    table = open_cidr("{{1.2.3.4 got 1.2.3.4}}")
    got = transcript("inline", ["1.2.3.4", "4.3.2.1"], caplog.messages, table)
    assert got == ref_lines("dict_inline_cidr.ref")


def test_postfix_miss_endif(caplog: pytest.LogCaptureFixture) -> None:
    """Postfix's miss_endif_cidr test: an IF without ENDIF hides what follows."""
    table = open_cidr("{{if 1.2.3.4}}")
    assert table.lookup(b"1.2.3.5", 0) is None
    assert caplog.messages == ["cidr map {{if 1.2.3.4}}, line 1: IF has no matching ENDIF"]


# --- compared with real postmap ------------------------------------------------------------


@pytest.mark.interop
def test_file_same_as_postmap(
    postfix: Postfix,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = write(tmp_path / "t", EDGE_TABLE)
    table = open_cidr(path, fold=postfix.fold)
    assert caplog.messages == postfix.run("-q", "x", f"cidr:{path}").warnings
    ours = [as_postmap_prints(table.lookup(postfix.fold(key), 0)) for key in EDGE_KEYS]
    assert ours == postfix.query_all(EDGE_KEYS, f"cidr:{path}")


INLINE_SPECS = [
    "cidr:{{1.2.3.4 got 1.2.3.4}}",
    "cidr:{ {1.2.3.0/24 net}, {!::/0 not-v6} }",
    "cidr:{{if 1.2.3.0/24}, {!1.2.3.4 not-four}, {endif}, {::/0 v6}}",
    "cidr:{, }",
    "cidr:{{1.2.3.4 x}x}",
    "cidr:{1.2.3.4 x}",
    "cidr:{{1.2.3.9/24 x}, {1.2.3.4}, {bad y}}",
]
INLINE_KEYS = ["1.2.3.4", "1.2.3.5", "::1", "9.9.9.9"]


@pytest.mark.interop
def test_inline_same_as_postmap(postfix: Postfix, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    commands = [("-q", key, spec) for spec in INLINE_SPECS for key in INLINE_KEYS]
    answers = iter(postfix.run_all(commands, batch=len(commands)))  # all at once: some are fatal
    for spec in INLINE_SPECS:
        theirs = [next(answers) for _ in INLINE_KEYS]
        caplog.clear()
        try:
            table = open_cidr(spec.removeprefix("cidr:"), fold=postfix.fold)
        except TableConfigError as e:
            assert {(a.rc, a.fatal) for a in theirs} == {(1, str(e))}, spec
            continue
        assert caplog.messages == theirs[0].warnings, spec
        ours = [as_postmap_prints(table.lookup(key.encode(), 0)) for key in INLINE_KEYS]
        assert ours == [(a.rc, a.stdout) for a in theirs], spec
