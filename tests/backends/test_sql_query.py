"""db_common expansion, each database's quoting, the domain list, result joining.

The parity tests (test_sql_parity.py) compare all of this with what real Postfix
sends and answers; these pin down the rules one by one.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from pyproxymap.tables.base import OpenContext, TableConfigError, TableRetry
from pyproxymap.tables.sql.query import DomainList, Templates, mysql_quote, sqlite_quote
from pyproxymap.tables.sql.sqlite import column_text, first_statement
from tests.backends.conftest import open_nested

LOG = logging.getLogger("test")


def templates(query: str, result: str = "%s", limit: int = 0) -> Templates:
    return Templates(query, result, limit, "sqlite:/t.cf", "/t.cf", LOG)


@pytest.mark.parametrize(
    ("query", "key", "expanded"),
    [
        ("%s", b"user@mail.example.com", b"user@mail.example.com"),
        ("%u|%d", b"user@mail.example.com", b"user|mail.example.com"),
        ("%U|%D|%S", b"user@mail.example.com", b"user|mail.example.com|user@mail.example.com"),
        ("%1.%2.%3", b"user@mail.example.com", b"com.example.mail"),
        ("%u", b"user", b"user"),  # %u of an unqualified key is the key
        ("%u", b"@example.com", None),  # ... of an empty local part: no query
        ("%d", b"user", None),  # %d needs a domain
        ("%d", b"user@", None),
        ("%3", b"user@example.com", None),  # too few labels
        ("%2", b"user@a..b", b"a"),  # empty labels do not count
        ("100%% %s", b"k", b"100% k"),
        ("%u@%d", b"a@b@c", b"a@b@c"),  # the last '@' splits
    ],
)
def test_query_expansion(query: str, key: bytes, expanded: bytes | None) -> None:
    assert templates(query).query(key) == expanded


def test_result_template_constrains_the_query() -> None:
    """As db_common: %D in result_format makes unqualified keys "not found" at once."""
    t = templates("SELECT '%s'", "%s@%D")
    assert t.query(b"user") is None
    assert t.query(b"user@example.com") == b"SELECT 'user@example.com'"


def test_quoting_applies_to_key_parts_only() -> None:
    t = templates("SELECT '%s' FROM t WHERE u='%u' AND d='%d' -- 100%%")
    assert t.query(b"o'x@a'b", sqlite_quote) == (
        b"SELECT 'o''x@a''b' FROM t WHERE u='o''x' AND d='a''b' -- 100%"
    )


@pytest.mark.parametrize("template", ["%x", "50%", "%0"])
def test_invalid_templates(template: str) -> None:
    with pytest.raises(TableConfigError, match="Invalid query template"):
        templates(template)
    with pytest.raises(TableConfigError, match="Invalid result template"):
        templates("%s", template)


def test_results_are_joined_and_filtered(caplog: pytest.LogCaptureFixture) -> None:
    t = templates("%s", "<%u at %d for %U>")
    rows = [(b"a@x", None, b"unqualified"), (b"@y", b"b@z\0ignored", b"")]
    assert t.results(rows, b"k@dom") == b"<a at x for k>,<b at z for k>"
    assert 'empty lookup result for: "k@dom" -- ignored' in caplog.text
    assert templates("%s").results([(None,)], b"k") is None


def test_result_with_key_parts_skips_unqualified_keys(caplog: pytest.LogCaptureFixture) -> None:
    t = templates("%s", "%s/%D")
    assert t.results([(b"v",)], b"unqualified") is None
    assert "lookup key 'v' skipped after query" in caplog.text


def test_expansion_limit() -> None:
    t = templates("%s", "%s", limit=2)
    assert t.results([(b"a", b"b")], b"k") == b"a,b"
    with pytest.raises(TableRetry, match="Expansion limit exceeded for key: 'k'"):
        t.results([(b"a", b"b"), (b"c",)], b"k")


def test_empty_key_is_not_looked_up(caplog: pytest.LogCaptureFixture) -> None:
    assert templates("%s").query(b"") is None
    assert 'table "sqlite:/t.cf": empty query string -- ignored' in caplog.text


@pytest.mark.parametrize(
    ("part", "width", "no_backslash", "quoted"),
    [
        (b"a'b\"c\\d\ne\rf\x1ag\0", 4, False, b"a\\'b\\\"c\\\\d\\ne\\rf\\Zg\\0"),
        ("josé€😀".encode(), 4, False, "josé€😀".encode()),
        (b"\xc3'", 4, False, b"\\\xc3\\'"),  # a lone lead byte cannot swallow the quote
        (b"\xbf'", 4, False, b"\xbf\\'"),  # not a lead byte in utf8
        ("😀".encode(), 3, False, "😀".encode()),  # utf8mb3: 0xF0 starts no character
        (b"\xe2\x82'", 3, False, b"\\\xe2\x82\\'"),  # a truncated 3-byte character
        (b"\xc3'", 1, False, b"\xc3\\'"),  # latin1: bytes are characters
        (b"a'b\\c", 4, True, b"a''b\\c"),  # NO_BACKSLASH_ESCAPES
    ],
)
def test_mysql_quote(part: bytes, width: int, no_backslash: bool, quoted: bytes) -> None:
    assert mysql_quote(part, width, no_backslash) == quoted


def test_sqlite_column_text() -> None:
    """Values as sqlite3_column_text() renders them (checked against the sqlite3 library)."""
    with sqlite3.connect(":memory:") as conn:
        for value in (1.0, 0.1, 1e20, 1.5e-7, -2.0, 123456789.125, 2**40, -7, "x", None):
            native = conn.execute("SELECT CAST(? AS TEXT)", (value,)).fetchone()[0]
            assert column_text(value) == (None if native is None else native.encode()), value
    assert column_text(b"blob") == b"blob"


def test_sqlite_first_statement() -> None:
    assert first_statement("SELECT 'a;b'; DROP TABLE x") == "SELECT 'a;b';"
    assert first_statement("SELECT 1") == "SELECT 1"


def domain_list(text: str, tmp_path: Path) -> DomainList:
    ctx = OpenContext(type="sqlite", name=str(tmp_path / "t.cf"), open_nested=open_nested)
    return DomainList(text, ctx, ctx.name)


def allows(domains: DomainList, key: bytes) -> bool:
    return asyncio.run(domains.allows(key))


def test_domain_list(tmp_path: Path) -> None:
    listed = tmp_path / "domains"
    listed.write_text("# comment\nfile.example\n!no.file.example, file2.example\n")
    domains = domain_list(
        f"!bad.Example.com, example.com, Bad.example.com {listed} inline:{{tab.example=1}}",
        tmp_path,
    )
    try:
        assert allows(domains, b"user@example.com")
        assert allows(domains, b"user@EXAMPLE.com")  # the domain is folded
        assert not allows(domains, b"user@bad.example.com")  # the first match decides
        assert allows(domains, b"u@file.example") and allows(domains, b"u@file2.example")
        assert not allows(domains, b"u@no.file.example")
        assert allows(domains, b"u@tab.example")
        assert not allows(domains, b"@example.com")  # empty local part
        assert not allows(domains, b"example.com")  # unqualified
        assert not allows(domains, b"user@other.example")
    finally:
        domains.close()
    assert allows(domain_list("", tmp_path), b"anything")


def test_domain_list_errors(tmp_path: Path) -> None:
    with pytest.raises(TableConfigError, match="no pattern after '!'"):
        domain_list("example.com, !", tmp_path)
    broken = domain_list(f"a.example {tmp_path}/missing b.example", tmp_path)
    assert allows(broken, b"u@a.example")
    with pytest.raises(TableRetry, match=r"open file .*/missing: No such file"):
        allows(broken, b"u@b.example")


def test_result_codes_and_the_plain_format(caplog: pytest.LogCaptureFixture) -> None:
    """%S and %U in result_format are the key's; "%s" alone passes each value through,
    cut at a NUL, with empty values skipped as db_common_expand() skips them."""
    assert templates("%s", "%S:%U=%s").results([(b"v",)], b"k") == b"k:k=v"
    assert templates("%s", "[%s] 100%%").results([(b"v",)], b"k") == b"[v] 100%"
    assert templates("%s").results([(b"a\0b", b"", b"c")], b"k") == b"a,c"
    assert 'empty lookup result for: "k" -- ignored' in caplog.text
