"""pgsql/mysql/sqlite .cf files: Postfix's cfg_parser rules and each driver's parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pyproxymap.tables.base import OpenContext, TableConfigError
from pyproxymap.tables.registry import driver_for
from pyproxymap.tables.sql import mysql, pgsql
from pyproxymap.tables.sql.config import CfgFile, host_list, lookup_config
from pyproxymap.tables.sql.pool import INET, UNIX, URI

pytest.importorskip("psycopg")  # the drivers: opening a table needs them
pytest.importorskip("aiomysql")

LOG = logging.getLogger("test")


def cfg(tmp_path: Path, text: str) -> CfgFile:
    path = tmp_path / "t.cf"
    path.write_text(text)
    return CfgFile(str(path), LOG)


def test_main_cf_syntax(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = cfg(
        tmp_path,
        "# comment\nquery = SELECT a\n  FROM b\n\n   # indented comment\n"
        "user=u1\nuser = u2\nhosts =\npassword = old-secret\npassword = new\n",
    )
    assert c.get_str("query") == "SELECT a  FROM b"
    assert c.get_str("user") == "u2"
    assert "overriding earlier entry: user=u1" in caplog.text
    assert "overriding earlier entry: password=***" in caplog.text
    assert "old-secret" not in caplog.text
    assert c.get_str("hosts") == "" and c.get_optional("hosts") is None
    assert c.get_str("absent", "dflt") == "dflt" and c.get_optional("absent") is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("query\n", "line 1: missing '=' after attribute name"),
        ("= x\n", "missing attribute name"),
    ],
)
def test_syntax_errors(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(TableConfigError, match=error):
        cfg(tmp_path, text)


def test_numbers_and_booleans(tmp_path: Path) -> None:
    c = cfg(tmp_path, "a = 7\nb = -3\nc = 7x\nd = 99999999999\ne = YES\nf = no\ng = maybe\n")
    assert c.get_int("a", 1) == 7 and c.get_int("zz", 60, min=1) == 60
    with pytest.raises(TableConfigError, match="invalid b parameter value -3 < 1"):
        c.get_int("b", 0, min=1)
    for name in "cd":
        with pytest.raises(TableConfigError, match=f"bad numerical configuration: {name} = "):
            c.get_int(name, 0)
    assert c.get_bool("e", False) is True and c.get_bool("f", True) is False
    assert c.get_bool("zz", None) is None
    with pytest.raises(TableConfigError, match="bad boolean configuration: g = maybe"):
        c.get_bool("g", True)


def test_legacy_query_and_its_required_parts(tmp_path: Path) -> None:
    c = cfg(
        tmp_path,
        "table = mxaliases\nselect_field = forw_addr\nwhere_field = alias\n"
        "additional_conditions = AND status = 'paid'\n",
    )
    assert lookup_config(c).query == (
        "SELECT forw_addr FROM mxaliases WHERE alias='%s' AND status = 'paid'"
    )
    with pytest.raises(TableConfigError, match="bad string length 0 < 1: where_field = "):
        lookup_config(cfg(tmp_path, "table = t\nselect_field = f\n"))
    assert lookup_config(cfg(tmp_path, "query = Q %s\ntable = t\n")).query == "Q %s"


def test_result_format_must_not_be_empty(tmp_path: Path) -> None:
    with pytest.raises(TableConfigError, match="bad string length 0 < 1: result_format = "):
        lookup_config(cfg(tmp_path, "query = Q\nresult_format =\n"))


def test_hosts_list(tmp_path: Path) -> None:
    assert host_list(cfg(tmp_path, "")) == ["localhost", "localhost"]
    assert host_list(cfg(tmp_path, "hosts = db1\n")) == ["db1", "db1"]  # a load balancer
    assert host_list(cfg(tmp_path, "hosts = a, b\tc\n")) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("postgresql://u@h/db?sslmode=require", (URI, "postgresql://u@h/db?sslmode=require", "")),
        ("postgres://user:secret@localhost", (URI, "postgres://user:secret@localhost", "")),
        ("inet:host1.some.domain", (INET, "host1.some.domain", "")),
        ("host2.some.domain:5433", (INET, "host2.some.domain", "5433")),
        ("unix:/var/run/postgresql", (UNIX, "/var/run/postgresql", "")),
        ("/tmp", (UNIX, "/tmp", "")),
    ],
)
def test_pgsql_hosts(entry: str, parsed: tuple[int, str, str]) -> None:
    assert pgsql.parse_host(entry) == parsed


def test_passwords_never_in_host_labels() -> None:
    redact = pgsql.redact
    assert redact("postgresql://user:s3cret@h:5432/db") == "postgresql://user:***@h:5432/db"
    assert redact("postgres://h/db?sslmode=require&password=s3cret") == (
        "postgres://h/db?sslmode=require&password=***"
    )
    assert redact("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("inet:db1:3307", (INET, "db1", 3307)),
        ("db1", (INET, "db1", 0)),
        ("db1:mysql", (INET, "db1", 3306)),  # a service name
        ("unix:/run/x.sock", (UNIX, "/run/x.sock", 0)),
        ("localhost", (UNIX, "/run/mysqld/mysqld.sock", 0)),  # "the MySQL way"
        ("inet:LocalHost:3306", (UNIX, "/run/mysqld/mysqld.sock", 3306)),
    ],
)
def test_mysql_hosts(entry: str, parsed: tuple[int, str, int]) -> None:
    assert mysql.parse_host(entry) == parsed


def test_mysql_unknown_service() -> None:
    with pytest.raises(TableConfigError, match="unknown service: nosuch/tcp"):
        mysql.parse_host("db1:nosuch")


def open_cf(tmp_path: Path, kind: str, text: str, writable: bool = False) -> None:
    path = tmp_path / f"{kind}.cf"
    path.write_text(text)
    driver = driver_for(kind)
    assert driver is not None
    driver.open(OpenContext(type=kind, name=str(path), writable=writable)).close()


def test_pgsql_dbname_is_required_only_for_non_uri_hosts(tmp_path: Path) -> None:
    """Postfix 3.10: URIs carry their database; any other target needs dbname."""
    open_cf(tmp_path, "pgsql", "hosts = postgresql://h/db\nquery = Q\n")
    with pytest.raises(TableConfigError, match="host target 'h2' requires dbname setting"):
        open_cf(tmp_path, "pgsql", "hosts = postgresql://h/db inet:h2:5432\nquery = Q\n")
    with pytest.raises(TableConfigError, match="host target 'localhost' requires dbname"):
        open_cf(tmp_path, "pgsql", "query = Q\n")  # hosts defaults to localhost


def test_pgsql_select_function(tmp_path: Path) -> None:
    path = tmp_path / "f.cf"
    path.write_text("dbname = d\nselect_function = lookup_alias\n")
    table = pgsql.PgsqlTable(OpenContext(type="pgsql", name=str(path)))
    try:
        assert table._templates.query(b"a'b") == b"SELECT lookup_alias('a'b')"
    finally:
        table.close()


def test_mysql_needs_dbname_and_a_known_charset(tmp_path: Path) -> None:
    with pytest.raises(TableConfigError, match="bad string length 0 < 1: dbname = "):
        open_cf(tmp_path, "mysql", "query = Q\n")
    with pytest.raises(TableConfigError, match="charset gbk is not supported"):
        open_cf(tmp_path, "mysql", "dbname = d\ncharset = gbk\nquery = Q\n")
    open_cf(tmp_path, "mysql", "dbname = d\ncharset = latin1\nquery = Q\n")


@pytest.mark.parametrize("kind", ["pgsql", "mysql", "sqlite"])
def test_read_only_and_main_cf_forms_are_refused(tmp_path: Path, kind: str) -> None:
    with pytest.raises(TableConfigError, match="map requires O_RDONLY access mode"):
        open_cf(tmp_path, kind, "dbname = d\nquery = Q\n", writable=True)
    driver = driver_for(kind)
    assert driver is not None
    with pytest.raises(TableConfigError, match=r"parameters in main\.cf"):
        driver.open(OpenContext(type=kind, name="mysource"))
    with pytest.raises(TableConfigError, match=r"open /nonexistent\.cf: No such file"):
        driver.open(OpenContext(type=kind, name="/nonexistent.cf"))


def test_sqlite_database_must_exist(tmp_path: Path) -> None:
    """Postfix 3.8 opens the database read-only (3.7 created an empty one)."""
    missing = tmp_path / "missing.db"
    with pytest.raises(TableConfigError, match=f"open database {missing}: unable to open"):
        open_cf(tmp_path, "sqlite", f"dbpath = {missing}\nquery = Q\n")
    assert not missing.exists()


def test_sqlite_warns_about_unquoted_expansions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "d.db"
    db.write_bytes(b"")
    open_cf(tmp_path, "sqlite", f"dbpath = {db}\nquery = SELECT a FROM t WHERE k='%s' OR k=%u\n")
    assert "contains >%u< without the recommended '' quotes" in caplog.text
    assert ">%s<" not in caplog.text


def test_changed_follows_the_cf_file(tmp_path: Path) -> None:
    c = cfg(tmp_path, "query = Q\n")
    assert not c.changed()
    (tmp_path / "t.cf").write_text("query = Q2\n")
    assert c.changed()
