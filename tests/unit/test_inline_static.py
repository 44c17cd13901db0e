"""inline and static: unit tests, Postfix's regression data, and answers compared with postmap."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyproxymap.tables.base import (
    OpenContext,
    Table,
    TableConfigError,
    TableError,
    TableRetry,
    Unsupported,
    ascii_fold,
    utf8_fold,
)
from pyproxymap.tables.inline import InlineTable
from pyproxymap.tables.source import as_bytes, printable
from pyproxymap.tables.static import StaticTable
from pyproxymap.wire.proxymap import FIXED, SEQ_FIRST, SEQ_NEXT, SRC_RHS_IS_FILE
from tests.unit.test_texthash import (
    POSTFIX_TESTS,
    Answer,
    Fold,
    Postfix,
    as_postmap_prints,
    needs_postfix_tests,
    postfix,  # noqa: F401  (fixture)
)

DRIVERS: dict[str, type[Table]] = {"inline": InlineTable, "static": StaticTable}


def open_table(spec: str, fold: Fold = utf8_fold, flags: int = 0) -> Table:
    type_, _, name = spec.partition(":")
    return DRIVERS[type_](OpenContext(type_, name, instance_flags=flags, fold=fold))


def raised(spec: str, fold: Fold = utf8_fold, flags: int = 0) -> TableError:
    with pytest.raises(TableError) as info:
        open_table(spec, fold, flags)
    return info.value


# --- inline ------------------------------------------------------------------------------


def test_inline_entries_and_folding() -> None:
    table = open_table("inline:{ foo=XX, { bAr = lotsa stuff }, {Straße=s}}")
    assert table.lookup(b"foo", 0) == b"XX"
    assert table.lookup(b"bar", 0) == b"lotsa stuff"
    assert table.lookup(b"bAr", 0) is None  # the service folds request keys
    assert table.lookup(b"strasse", 0) == b"s"
    assert open_table("inline:{Straße=s}", ascii_fold).lookup("straße".encode(), 0) == b"s"
    assert table.flags == FIXED


@pytest.mark.parametrize(
    ("name", "entries"),
    [
        ("{a=1,a=2}", {b"a": b"2"}),  # no duplicate check: the last one wins
        ("{ {=x} }", {b"": b"x"}),
        ('{ {"a b" = 1} }', {b'"a b"': b"1"}),
        ("{ {A = x y ,z}, B=2 , {c=}}", {b"a": b"x y ,z", b"b": b"2", b"c": b""}),
        ("{ {a = 1} b=2}", {b"a": b"1", b"b": b"2"}),
        ("{{x={y}}}", {b"x": b"{y}"}),
        ("{a\\=b=c}", {b"a\\=b": b"c"}),
        ("{a=b\x0bc}", {b"a": b"b\x0bc"}),
    ],
)
def test_inline_syntax(name: str, entries: dict[bytes, bytes]) -> None:
    table = open_table(f"inline:{name}")
    assert isinstance(table, InlineTable)
    assert table.entries == entries


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("{}", "bad syntax"),
        (" {a=1}", "bad syntax"),
        ("{a=1}}", "bad syntax"),
        ("{ }", "empty table"),
        ("{ , }", "empty table"),
        ('{"a b"=1}', "unbalanced '\"'"),
        ("{ { } }", "no key found; expected format: key = value"),
        ("{a = b}", "missing '=' after attribute name"),
        ("{a= b}", "missing '=' after attribute name"),
    ],
)
def test_inline_syntax_errors(name: str, error: str) -> None:
    err = raised(f"inline:{name}")
    assert isinstance(err, TableConfigError)
    assert str(err) == f'{error}: "inline:{name}"; need "inline:{{name=value...}}"'


def test_inline_bad_utf8_depends_on_smtputf8() -> None:
    name = b"{a=\xff}".decode("utf-8", "surrogateescape")
    err = raised(f"inline:{name}")
    assert str(err) == 'bad UTF-8 syntax: "inline:{a=?}"; need "inline:{name=value...}"'
    assert open_table(f"inline:{name}", ascii_fold).lookup(b"a", 0) == b"\xff"


def test_inline_sequence_in_first_stored_order() -> None:
    table = open_table("inline:{b=1, a=2, B=3}")
    assert table.sequence(SEQ_FIRST, 0) == (b"b", b"3")
    assert table.sequence(SEQ_NEXT, 0) == (b"a", b"2")
    assert table.sequence(SEQ_NEXT, 0) is None


def test_inline_refuses_write_access() -> None:
    ctx = OpenContext("inline", "{a=1}", writable=True)
    with pytest.raises(
        TableConfigError, match=r"^inline:\{a=1\} map requires O_RDONLY access mode$"
    ):
        InlineTable(ctx)


def test_inline_rhs_is_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"this-is-file1\n")
    table = open_table(f"inline:{{a={tmp_path}/f}}", flags=SRC_RHS_IS_FILE)
    assert table.lookup(b"a", 0) == b"dGhpcy1pcy1maWxlMQo="
    err = raised("inline:{a=/nonexistent}", flags=SRC_RHS_IS_FILE)
    assert isinstance(err, TableRetry)
    syntax = raised("inline:{a}", flags=SRC_RHS_IS_FILE)
    assert str(syntax).endswith('need "inline:{name=filename...}"')


# --- static ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("fooxx", b"fooxx"),
        ("{ foo xx }", b"foo xx"),
        ("{}", b""),
        ("{ \t }", b""),
        ("a b ", b"a b "),
        (" {a}", b" {a}"),
        ("{{a} }", b"{a}"),
        ("Straße", "Straße".encode()),
    ],
)
def test_static_value(name: str, value: bytes) -> None:
    table = open_table(f"static:{name}")
    assert table.lookup(b"anything", 0) == value
    assert table.lookup(b"", 0) == value
    assert table.flags == FIXED


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("{ foo xx ", "missing '}' in \"{ foo xx \""),
        ("{ foo xx }x", "syntax error after '}' in \"{ foo xx }x\""),
        ("{a", "missing '}' in \"{a\""),
    ],
)
def test_static_syntax_errors(name: str, error: str) -> None:
    err = raised(f"static:{name}")
    assert isinstance(err, TableConfigError)
    assert str(err) == f"bad static:name syntax: {error}"


def test_static_has_no_sequence() -> None:
    with pytest.raises(Unsupported):
        open_table("static:x").sequence(SEQ_FIRST, 0)


def test_static_utf8_checks(caplog: pytest.LogCaptureFixture) -> None:
    """Postfix's UTF-8 layer: a non-UTF-8 key is not found, a non-UTF-8 value is an error."""
    assert open_table("static:v").lookup(b"\xff", 0) is None
    assert caplog.messages == ['static:v: non-UTF-8 key "?": malformed UTF-8 or invalid codepoint']
    bad = open_table("static:\udcff")  # the byte 0xff, as a surrogate-escaped name
    with pytest.raises(TableConfigError) as info:
        bad.lookup(b"k", 0)
    assert str(info.value) == (
        'static:?: key "k": non-UTF-8 value "?": malformed UTF-8 or invalid codepoint'
    )
    assert open_table("static:v", ascii_fold).lookup(b"\xff", 0) == b"v"


def test_static_rhs_is_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"this-is-file1\n")
    table = open_table(f"static:{{ {tmp_path}/f }}", flags=SRC_RHS_IS_FILE)
    assert table.lookup(b"k", 0) == b"dGhpcy1pcy1maWxlMQo="
    err = raised("static:/nonexistent", flags=SRC_RHS_IS_FILE)
    assert isinstance(err, TableRetry)
    assert str(err) == "open /nonexistent: No such file or directory"


# --- Postfix's own regression data -------------------------------------------------------


def dict_open_transcript(spec: str, gets: list[str], fold: Fold, flags: int = 0) -> list[str]:
    """What Postfix's dict_open test driver prints for a table and its ``get`` lines."""
    try:
        table: Table | None = open_table(spec, fold, flags)
        out = []
    except TableError as e:
        table, error = None, str(e)
        out = [f"./dict_open: error: {error}"]
    out.append("owner=trusted (uid=2147483647)")
    for key in gets:
        out.append(f"> get {key}")
        if table is None:
            out += [f"./dict_open: warning: {spec} is unavailable. {error}", f"{key}: error"]
            continue
        value = table.lookup(fold(key.encode()), 0)
        out.append(f"{key}: not found" if value is None else f"{key}={value.decode()}")
    return out


# The dict_open runs of Postfix's Makefile that produce each .ref file.
REF_RUNS: dict[str, list[tuple[str, list[str], Fold, int]]] = {
    "dict_inline.ref": [
        ("inline:{ }", [], ascii_fold, 0),
        ("inline:{ foo = xx }", [], ascii_fold, 0),
        ("inline:{ foo=xx }x", [], ascii_fold, 0),
        ("inline:{ foo=xx x", [], ascii_fold, 0),
        ("inline:{ foo=xx {x=y}x}", [], ascii_fold, 0),
        ("inline:{ foo=XX, { bAr = lotsa stuff }}", ["foo", "bar", "baz"], ascii_fold, 0),
        ("inline:{ foo=XX, { bAr = lotsa stuff }}", ["foo", "bar", "baz"], utf8_fold, 0),
    ],
    "dict_inline_file.ref": [
        ("inline:{ foo=xx, bar=yy }", ["foo"], ascii_fold, SRC_RHS_IS_FILE),
        (
            "inline:{ file1=dict_inline_file1, file2=dict_inline_file2}",
            ["file1", "file2", "file3"],
            ascii_fold,
            SRC_RHS_IS_FILE,
        ),
    ],
    "dict_static.ref": [
        ("static:fooxx", ["foo", "bar"], ascii_fold, 0),
        ("static:{ foo xx ", [], ascii_fold, 0),
        ("static:{ foo xx }x", [], ascii_fold, 0),
        ("static:{ foo xx }", ["foo", "bar"], ascii_fold, 0),
    ],
    "dict_static_file.ref": [
        ("static:fooxx", ["foo"], ascii_fold, SRC_RHS_IS_FILE),
        ("static:{ dict_static_file1 }", ["file1", "file2"], ascii_fold, SRC_RHS_IS_FILE),
    ],
}


@needs_postfix_tests
@pytest.mark.parametrize("ref", sorted(REF_RUNS))
def test_postfix_ref(ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):  # the files the Makefile writes before its runs
        (tmp_path / f"dict_inline_file{n}").write_text(f"this-is-file{n}\n")
    (tmp_path / "dict_static_file1").write_text("this-is-file1\n")
    got = [line for run in REF_RUNS[ref] for line in dict_open_transcript(*run)]
    assert got == (POSTFIX_TESTS / ref).read_text().splitlines()


# --- compared with real postmap ----------------------------------------------------------

SPECS = [
    "inline:{}",
    "inline:{ }",
    "inline:{a=1}",
    "inline:{ foo = xx }",
    "inline:{ foo=xx }x",
    "inline:{ foo=xx x",
    "inline:{ foo=xx {x=y}x}",
    "inline:{ foo=XX, { bAr = lotsa stuff }}",
    "inline:{a=1,a=2}",
    "inline:{ {=x} }",
    "inline:{ { } }",
    'inline:{ {"a b"=1} }',
    'inline:{"a b"=1}',
    "inline:{ {A = x y ,z}, B=2 , {c=}}",
    "inline:{ {a = 1} b=2}",
    "inline:{Straße=s, ǅ=t, ÄÖÜ=u}",
    "inline:{a=\udcff}",
    "inline:{\udcff=x, a=1}",
    "inline:{a\\=b=c}",
    "inline:{a=b\x0bc}",
    "inline:{a=}b}",
    "inline: {a=1}",
    "inline:{a = b}",
    "inline:{a= b}",
    "static:fooxx",
    "static:{ foo xx }",
    "static:{ foo xx ",
    "static:{ foo xx }x",
    "static:{}",
    "static:{ a  b }",
    "static:a b ",
    "static:\udcff",
    "static:{{a} }",
    "static:{a",
    "static: {a}",
    "static:Straße",
    "static:{ \t }",
]
KEYS = [
    b"x", b"a", b"A", b"b", b"B", b"c", b"foo", b"FOO", b"bar", b"BAR", b'"a b"', b"",
    b"\xff", "straße".encode(), b"STRASSE", "ǆ".encode(), "äöü".encode(), b"a\\=b", b"a b",
]  # fmt: skip
#: What postmap itself adds, not the table.
POSTMAP_ONLY = ("empty string result is not allowed", "should return NO RESULT")


def our_answers(spec: str, fold: Fold, caplog: pytest.LogCaptureFixture) -> list[Answer]:
    """Our answers in the shape of ``postmap -q KEY spec`` (one, when the open fails)."""
    try:
        table = open_table(spec, fold)
    except TableError as e:
        return [Answer(1, b"", [], str(e))]
    answers = []
    for key in KEYS:
        caplog.clear()
        try:
            rc, out = as_postmap_prints(table.lookup(fold(key), 0))
            answers.append(Answer(rc, out, list(caplog.messages), None))
        except TableConfigError as e:
            answers.append(Answer(1, b"", [str(e)], f"table {printable(spec)}: query error"))
    return answers


@pytest.mark.interop
def test_same_as_postmap(postfix: Postfix, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    cases = [
        (spec, key, answer)
        for spec in SPECS
        for key, answer in zip(KEYS, our_answers(spec, postfix.fold, caplog), strict=False)
    ]
    # postmap sleeps a second after a fatal error: run those all at once.
    for fatal in (True, False):
        group = [case for case in cases if (case[2].fatal is not None) == fatal]
        theirs = postfix.run_all([("-q", key, as_bytes(spec)) for spec, key, _ in group])
        for (spec, key, answer), got in zip(group, theirs, strict=True):
            got.warnings = [w for w in got.warnings if not any(p in w for p in POSTMAP_ONLY)]
            if spec.startswith("inline:"):  # Postfix's UTF-8 layer warns about bad keys
                got.warnings = [w for w in got.warnings if "non-UTF-8 key" not in w]
            # Postfix names the key as asked; a table sees it folded by the service.
            shown = f'key "{printable(key)}"'
            got.warnings = [
                w.replace(shown, f'key "{printable(postfix.fold(key))}"') for w in got.warnings
            ]
            assert answer == got, (spec, key)
