"""pgsql:, mysql:, sqlite: tables against real Postfix, on the same .cf files and data.

For each database and each configuration below (plain and multi-column queries,
result_format with every expansion, %u/%d/%1/%2 in the query, the domain list,
the legacy query parameters, expansion_limit) and each key (quotes,
backslashes, %, several '@', no local part, no domain, non-ASCII, ...):

- ``postmap -q KEY type:/x.cf`` (Postfix's own driver) answers what our table
  answers when opened directly;
- ``postmap -c CONF -q KEY proxy:type:/x.cf`` through ``pyproxymap serve``
  answers the same again.

The "echo" configurations return the query text as the server received it
(PostgreSQL's current_query(), MariaDB's PROCESSLIST.INFO; for SQLite the
literal parsed back), so the expansion and quoting are compared byte for byte.
One difference is expected and asserted instead: Debian's Postfix 3.7 talks to
PostgreSQL in LATIN1, newer Postfix (and we) in UTF8, so 3.7 cannot find a
non-ASCII key stored in a UTF8 database; ``encoding = LATIN1`` restores 3.7's
behaviour.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import pytest

from pyproxymap.tables.base import TableRetry
from tests.backends.conftest import Database, has_map_type, lookup, open_table, run
from tests.conftest import RunningServer, backdate, write_confdir

pytestmark = [pytest.mark.interop, pytest.mark.backends]

ROWS = [
    ("bob@example.com", "bob@mail2.example.com", None),
    ("bob@example.com", "bob2@mail3.example.com", "bob@extra.example.com"),
    ("o'hara@example.com", "o'hara@m.example.com", "it's"),
    ("back\\slash@example.com", "back\\slash@m.example.com", ""),
    ('dq"x@example.com', 'dq"x@m.example.com', None),
    ("alice@sub.example.com", "unqualified", None),
    ("josé@example.com", "josé@m.example.com", None),
    ("pct%_@example.com", "pct@m.example.com", None),
    ("user@a.b.c.example.com", "deep@m.example.com", None),
    ("x@inl.example", "inline@m.example.com", None),
    ("y@file.example", "file@m.example.com", None),
]
KEYS = [
    b"bob@example.com",
    b"BOB@Example.COM",
    b"o'hara@example.com",
    b"back\\slash@example.com",
    b'dq"x@example.com',
    b"alice@sub.example.com",
    "josé@example.com".encode(),
    "JOSÉ@EXAMPLE.COM".encode(),
    b"pct%_@example.com",
    b"user@a.b.c.example.com",
    b"x@inl.example",
    b"y@file.example",
    b"nobody@example.com",
    b"a@b@example.com",
    b"@example.com",
    b"bob@",
    b"bob",
    b"",
    b"x@.example.com",
    b"semi;colon@example.com",
    b"it's--'@x.example",
]
ECHO_PARTS = "%s|%u|%d|%U|%D|%S|%1|%2|%%"
#: A query that answers with its own text as the server received it.
ECHO = {
    "pgsql": "SELECT current_query() WHERE '{}' IS NOT NULL",
    "mysql": "SELECT INFO FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID() "
    "AND '{}' IS NOT NULL",
    "sqlite": "SELECT '{}'",
}


def configurations(kind: str, table: str, domains_file: Path) -> dict[str, dict[str, str]]:
    plain = f"SELECT dest FROM {table} WHERE addr='%s'"
    return {
        "plain": {"query": plain},
        "columns": {"query": f"SELECT dest, extra FROM {table} WHERE addr='%s' ORDER BY dest"},
        "format": {"query": plain, "result_format": "smtp:[%s]"},
        "parts": {"query": plain, "result_format": "%u at %d for %U at %D (%S) %1.%2"},
        "user_domain": {"query": f"SELECT dest FROM {table} WHERE addr='%u@%d'"},
        "like": {
            # (not the non-ASCII row: Debian's 3.7 would get it in LATIN1, see below)
            "query": f"SELECT dest FROM {table} WHERE addr LIKE '%%%2.%1' "
            "AND addr NOT LIKE 'jos%%' ORDER BY dest",
            "result_format": "%s",
        },
        "domain": {
            "query": plain,
            "domain": f"example.com, !sub.example.com {domains_file} inline:{{inl.example=1}}",
        },
        "legacy": {
            "table": table,
            "select_field": "dest",
            "where_field": "addr",
            "additional_conditions": "AND dest <> 'bob@mail2.example.com'",
        },
        "echo_key": {"query": ECHO[kind].format("%s")},
        "echo_parts": {"query": ECHO[kind].format(ECHO_PARTS)},
    }


@dataclass
class Setup:
    db: Database
    conf: Path
    cfs: dict[str, Path]
    limit_cf: Path
    server: RunningServer


@pytest.fixture(scope="module", params=["pgsql", "mysql", "sqlite"])
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    kind = request.param
    if not has_map_type(kind):
        pytest.skip(f"Postfix has no {kind} support (postfix-{kind})")
    db: Database = request.getfixturevalue(
        {"pgsql": "postgres", "mysql": "mariadb", "sqlite": "sqlite_db"}[kind]
    )
    root = tmp_path_factory.mktemp(f"parity-{kind}")
    table = f"aliases_{secrets.token_hex(3)}"
    db.execute(f"CREATE TABLE {table} (addr text, dest text, extra text)")
    db.insert(table, ROWS)
    domains_file = root / "domains"
    domains_file.write_text("file.example\n")
    cfs = {
        name: db.cf(root / f"{name}.cf", **params)
        for name, params in configurations(kind, table, domains_file).items()
    }
    limit_cf = db.cf(
        root / "limit.cf",
        query=f"SELECT dest FROM {table} WHERE addr='%s'",
        expansion_limit="1",
    )
    listed = "\n\t".join(f"proxy:{kind}:{cf}" for cf in [*cfs.values(), limit_cf])
    conf = write_confdir(root / "conf", f"proxy_read_maps =\n\t{listed}\n")
    backdate(conf / "main.cf")
    server = RunningServer(conf)
    yield Setup(db, conf, cfs, limit_cf, server)
    server.stop()
    assert "Traceback" not in server.log()
    db.execute(f"DROP TABLE {table}")


def postmap_bulk(conf: Path, spec: str, keys: list[bytes]) -> dict[bytes, bytes]:
    """``postmap -q - SPEC``: every found key with its value; fails on a lookup error."""
    proc = subprocess.run(
        ["postmap", "-c", str(conf), "-q", "-", spec],
        input=b"".join(key + b"\n" for key in keys),
        capture_output=True,
        timeout=60,
    )
    assert b"fatal" not in proc.stderr, proc.stderr
    return dict(line.split(b"\t", 1) for line in proc.stdout.splitlines())


def postmap_each(conf: Path, spec: str, keys: list[bytes]) -> list[bytes | type | None]:
    """``postmap -q KEY SPEC`` for each key, side by side (a fatal error costs postmap a
    second): the value, None (not found) or TableRetry (query error)."""
    procs = [
        subprocess.Popen(["postmap", "-c", str(conf), "-q", key, spec], stdout=PIPE, stderr=PIPE)
        for key in keys
    ]
    answers: list[bytes | type | None] = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        if b"fatal:" in stderr:
            answers.append(TableRetry)
        else:
            answers.append(stdout.removesuffix(b"\n") if proc.returncode == 0 else None)
    return answers


def ours(kind: str, cf: Path, keys: list[bytes]) -> dict[bytes, bytes | None]:
    async def all_keys() -> dict[bytes, bytes | None]:
        table = open_table(kind, cf)
        try:
            return {key: await lookup(table, key) for key in keys}
        finally:
            table.close()

    return run(all_keys())


def latin1_difference(kind: str, name: str, key: bytes) -> bool:
    """Where Debian's 3.7 (client encoding LATIN1) may answer otherwise than newer Postfix."""
    return kind == "pgsql" and not key.isascii() and not name.startswith("echo")


@pytest.mark.parametrize(
    "name",
    [
        "plain",
        "columns",
        "format",
        "parts",
        "user_domain",
        "like",
        "domain",
        "legacy",
        "echo_key",
        "echo_parts",
    ],
)
def test_answers_as_postfix(setup: Setup, name: str) -> None:
    kind = setup.db.kind
    spec = f"{kind}:{setup.cfs[name]}"
    postfix = postmap_bulk(setup.conf, spec, KEYS)
    answers = ours(kind, setup.cfs[name], KEYS)
    assert any(answers.values())
    for key in KEYS:
        if latin1_difference(kind, name, key):
            continue  # see test_pgsql_encoding_utf8_unlike_debian_37
        assert answers[key] == postfix.get(key), key
    proxied = postmap_bulk(setup.conf, f"proxy:{spec}", KEYS)
    assert proxied == {key: value for key, value in answers.items() if value is not None}


def test_expansion_limit_fails_as_postfix(setup: Setup) -> None:
    kind, cf = setup.db.kind, setup.limit_cf
    keys = [b"bob@example.com", b"o'hara@example.com", b"nobody@example.com"]
    want = [TableRetry, b"o'hara@m.example.com", None]
    assert postmap_each(setup.conf, f"{kind}:{cf}", keys) == want
    assert postmap_each(setup.conf, f"proxy:{kind}:{cf}", keys) == want
    with pytest.raises(TableRetry, match=r"Expansion limit exceeded for key: 'bob@example\.com'"):
        ours(kind, cf, keys[:1])


def test_pgsql_encoding_utf8_unlike_debian_37(setup: Setup, tmp_path: Path) -> None:
    """Postfix 3.8 made the client encoding configurable, UTF8 by default (3.7: LATIN1)."""
    if setup.db.kind != "pgsql":
        pytest.skip("pgsql only")
    key = "josé@example.com".encode()
    spec = f"pgsql:{setup.cfs['plain']}"
    assert postmap_bulk(setup.conf, spec, [key]) == {}  # 3.7 sends it as LATIN1
    assert ours("pgsql", setup.cfs["plain"], [key]) == {key: "josé@m.example.com".encode()}
    latin1 = tmp_path / "latin1.cf"
    latin1.write_bytes(setup.cfs["plain"].read_bytes() + b"encoding = LATIN1\n")
    assert ours("pgsql", latin1, [key]) == {key: None}
