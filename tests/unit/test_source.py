"""The Postfix source-text helpers: readllines, extpar, mystrtokq, split_qnameval, dict_file."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyproxymap.tables.base import OpenContext, ascii_fold, utf8_fold
from pyproxymap.tables.source import (
    SourceError,
    balpar,
    brace_tokens,
    extpar,
    logical_lines,
    printable,
    read_fd,
    rhs_files_to_b64,
    split_key_value,
    split_qnameval,
    utf8_enabled,
    valid_utf8,
)

LOG = logging.getLogger("test-source")


def lines(data: bytes) -> list[tuple[int, bytes]]:
    return list(logical_lines(data, "memory buffer", LOG))


# The cases of Postfix's readlline.c self-test: input, first logical line, its line number.
@pytest.mark.parametrize(
    ("data", "text", "lineno"),
    [
        (b" #abcde\nfghij\n", b"fghij", 2),
        (b"#abc\ndef", b"def", 2),
        (b"\nabc\n", b"abc", 2),
        (b" \nabc\n", b"abc", 2),
        (b"abc def", b"abc def", 1),
        (b"abc\0def", b"abc\0def", 1),
        (b"abc\0\n def", b"abc\0 def", 1),
        (b"#abc\0\ndef", b"def", 2),
        (b"abc\n def\n", b"abc def", 1),
        (b"abc\n #def\n ghi", b"abc ghi", 1),
        (b"abc\n#def\n ghi", b"abc ghi", 1),
        (b"abc\n \n ghi", b"abc ghi", 1),
        (b"abc\n\n ghi", b"abc ghi", 1),
        (b"abc\n #def\n", b"abc", 1),
        (b"abc\n#def\n", b"abc", 1),
        (b"abc\n ", b"abc", 1),
        (b"k v\r\n\tmore\r\n", b"k v\r\tmore\r", 1),
    ],
)
def test_readllines_cases(data: bytes, text: bytes, lineno: int) -> None:
    assert lines(data)[0] == (lineno, text)


@pytest.mark.parametrize("data", [b"", b"#abc def", b"\n", b"\n \n", b"  \n\t\n# x\n"])
def test_nothing_but_comments_and_blanks(data: bytes) -> None:
    assert lines(data) == []


def test_line_numbers_count_every_physical_line() -> None:
    data = b"# head\n\na 1\n  2\n#x\n\nb 3\nc 4\n\n\n  5\n  #c\nd"
    assert lines(data) == [(3, b"a 1  2"), (7, b"b 3"), (8, b"c 4  5"), (13, b"d")]


def test_leading_whitespace_drops_the_whole_logical_line(caplog: pytest.LogCaptureFixture) -> None:
    data = b"  lead v\n#c\n k2 v2\nk3 v3\n"
    assert lines(data) == [(4, b"k3 v3")]
    assert caplog.messages == [
        'memory buffer: logical line must not start with whitespace: "  lead v k2 v2"'
    ]


def test_leading_whitespace_warning_is_cut_at_30_bytes(caplog: pytest.LogCaptureFixture) -> None:
    assert lines(b" " + b"x" * 40 + b"\nk v") == [(2, b"k v")]
    assert caplog.messages == [
        f'memory buffer: logical line must not start with whitespace: " {"x" * 29}..."'
    ]


@given(st.lists(st.sampled_from([b"", b" ", b"#c", b" #c", b"k v", b"\tw", b"x\0y", b"\r"])))
def test_readllines_model(physical: list[bytes]) -> None:
    """Every yielded line starts with a non-blank, numbers rise, no text is lost or invented."""
    got = list(logical_lines(b"\n".join(physical), "m", logging.getLogger("quiet")))
    numbers = [n for n, _ in got]
    assert numbers == sorted(set(numbers))
    for n, text in got:
        assert text[:1] not in b" \t\r#"
        assert text.startswith(physical[n - 1])


def test_balpar() -> None:
    assert balpar("{a{b}c}d") == 7
    assert balpar("{a{b}c") == 0
    assert balpar("a{b}") == 0
    assert balpar("{}") == 2


@pytest.mark.parametrize(
    ("text", "inner"),
    [
        ("{ foo xx }", "foo xx"),
        ("{\t{a}\n}", "{a}"),
        ("{}", ""),
        ("{  }", ""),
        ("{ a\x0b}", "a"),
    ],
)
def test_extpar(text: str, inner: str) -> None:
    assert extpar(text) == inner


def test_extpar_without_strip_keeps_whitespace() -> None:
    assert extpar("{ a }", strip=False) == " a "


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{ foo xx ", "missing '}' in \"{ foo xx \""),
        ("{ foo xx }x", "syntax error after '}' in \"{ foo xx }x\""),
        ("foo", "no '{' at start of text in \"foo\""),
        ("{a}}", "syntax error after '}' in \"{a}}\""),
    ],
)
def test_extpar_errors(text: str, error: str) -> None:
    with pytest.raises(SourceError) as info:
        extpar(text)
    assert str(info.value) == error


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (" foo=XX, { bAr = lotsa stuff }", ["foo=XX", "{ bAr = lotsa stuff }"]),
        ("a,,b \t\r\nc", ["a", "b", "c"]),
        (" foo=xx {x=y}x", ["foo=xx", "{x=y}x"]),
        ("{a, {b c}} d", ["{a, {b c}}", "d"]),
        ("a}b, c", ["a}b", "c"]),
        ("{a b", ["{a b"]),
        ("  ,  ", []),
        ("a\x0bb", ["a\x0bb"]),  # vertical tab is not a separator
    ],
)
def test_brace_tokens(text: str, tokens: list[str]) -> None:
    assert list(brace_tokens(text)) == tokens


def test_brace_tokens_other_separators() -> None:
    assert list(brace_tokens("a:b (c:d):e", ":", "()")) == ["a", "b (c:d)", "e"]


# split_qnameval.c's self-test cases, plus the no-key case.
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("xx = yy", "xx", "yy"),
        ("xx=yy", "xx", "yy"),
        ("xx =", "xx", ""),
        ("xx=", "xx", ""),
        ('"xx " = yy', '"xx "', "yy"),
        ('"xx "= yy', '"xx "', "yy"),
        ('"xx " =', '"xx "', ""),
        ('"xx "=', '"xx "', ""),
        ('"\\"xx " = yy', '"\\"xx "', "yy"),
        ("  a\\=b = c d  ", "a\\=b", "c d"),
        ("=x", "", "x"),
    ],
)
def test_split_qnameval(text: str, key: str, value: str) -> None:
    assert split_qnameval(text) == (key, value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("xx", "missing '=' after attribute name"),
        ('"xx "', "missing '=' after attribute name"),
        ('"xx ', "unbalanced '\"'"),
        (" \t", "no key found; expected format: key = value"),
        ("a b=c", "missing '=' after attribute name"),
    ],
)
def test_split_qnameval_errors(text: str, error: str) -> None:
    with pytest.raises(SourceError) as info:
        split_qnameval(text)
    assert str(info.value) == error


@pytest.mark.parametrize(
    ("line", "key", "value", "unbalanced"),
    [
        (b"k \t v  w \r", b"k", b"v  w", False),
        (b'"the answer is"\t42', b'"the answer is"', b"42", False),
        (b"a\\ b c", b"a\\ b", b"c", False),
        (b'"a b', b'"a b', b"", True),
        (b"k", b"k", b"", False),
        (b"x\\", b"x\\", b"", False),
        (b"k\xc3\xa4 \xff v", b"k\xc3\xa4", b"\xff v", False),
    ],
)
def test_split_key_value(line: bytes, key: bytes, value: bytes, unbalanced: bool) -> None:
    assert split_key_value(line) == (key, value, unbalanced)


@pytest.mark.parametrize(
    ("data", "utf8", "shown"),
    [
        (b"a\tb", True, "a?b"),
        (b"\xff\xfe v3", True, "?? v3"),
        (b"ka\xc3\x84 \xff", True, "kaÄ ?"),
        (b"ka\xc3\x84", False, "ka??"),
        (b"abc\0def", True, "abc"),
        ("tab\there", True, "tab?here"),
        ("bad\udcff", True, "bad?"),
    ],
)
def test_printable(data: bytes | str, utf8: bool, shown: str) -> None:
    assert printable(data, utf8) == shown


def test_valid_utf8_is_strict() -> None:
    assert valid_utf8(b"") and valid_utf8("straße".encode())
    for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc3"):
        assert not valid_utf8(bad)


def test_utf8_enabled_follows_the_fold_function() -> None:
    assert utf8_enabled(OpenContext("t", "n", fold=utf8_fold))
    assert not utf8_enabled(OpenContext("t", "n", fold=ascii_fold))


def test_rhs_files(tmp_path: Path) -> None:
    (tmp_path / "f1").write_bytes(b"one\n")
    (tmp_path / "f2").write_bytes(b"two")
    names = f"{tmp_path}/f1, {tmp_path}/f2".encode()
    assert base64.b64decode(rhs_files_to_b64(names)) == b"one\n\ntwo"
    assert rhs_files_to_b64(f"{tmp_path}/f1".encode()) == b"b25lCg=="


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (b"{d}/nope", "open {d}/nope: No such file or directory"),
        (b"{d}", "read {d}: Is a directory"),
        (b" , ", "empty pathname list: >> , <<'"),
    ],
)
def test_rhs_file_errors(tmp_path: Path, names: bytes, error: str) -> None:
    with pytest.raises(SourceError) as info:
        rhs_files_to_b64(names.replace(b"{d}", bytes(tmp_path)))
    assert str(info.value) == error.format(d=tmp_path)


def test_read_fd_closes(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    data, st = read_fd(fd)
    assert (data, st.st_size) == (b"data", 4)
    with pytest.raises(OSError):
        os.fstat(fd)
