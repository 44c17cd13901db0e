"""Real, unmodified Postfix clients against `pyproxymap serve`.

The oracle is real Postfix: `postmap -q KEY TYPE:NAME` without the proxy gives
the expected answer; `postmap -c CONF -q KEY proxy:TYPE:NAME` asks our server
through Postfix's own client code, as would smtpd or cleanup.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import backdate, write_confdir

pytestmark = pytest.mark.interop

INLINE = "inline:{a=1, { b = text, with comma }, MixedKey=mixed}"
SOURCE = """\
alice@example.com alice-value
bob@example.com  bob value with  spaces
# comment

carol@example.com first
  continued
MixedCase@Example.COM mixed-case-key
utf8-ключ@example.com значение-utf8
empty@example.com
"""
KEYS = [
    "alice@example.com",
    "ALICE@Example.COM",
    "bob@example.com",
    "carol@example.com",
    "mixedcase@example.com",
    "MIXEDCASE@EXAMPLE.COM",
    "utf8-ключ@example.com",
    "UTF8-КЛЮЧ@example.com",
    "empty@example.com",
    "nobody@example.com",
    "# comment",
    "",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    (root / "t").write_text(SOURCE)
    backdate(root / "t")
    conf = write_confdir(
        root,
        f"""\
my_tables = proxy:texthash:{root}/t
\tproxy:{INLINE}
proxy_read_maps = $my_tables proxy:static:hello proxy:texthash:{root}/missing
proxy_write_maps = proxy:texthash:{root}/t
""",
    )
    return conf


@pytest.fixture(scope="module")
def server(setup):
    from tests.conftest import RunningServer

    srv = RunningServer(setup)
    yield srv
    srv.stop()


def postmap(*args: str) -> tuple[int, str, str]:
    r = subprocess.run(["postmap", *args], capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout, r.stderr


def libpostfix(conf: Path, table: str, op: str, *args: str) -> list[dict] | str:
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("postfix_lib.py")),
            str(conf),
            table,
            op,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        return "fatal: " + r.stderr.strip()
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.mark.parametrize("table", ["texthash:{root}/t", INLINE, "static:hello"])
@pytest.mark.parametrize("key", [k for k in KEYS if k])
def test_postmap_through_us_answers_as_the_table_opened_directly(setup, server, table, key):
    table = table.replace("{root}", str(setup))
    direct = postmap("-c", str(setup), "-q", key, table)
    proxied = postmap("-c", str(setup), "-q", key, f"proxy:{table}")
    assert proxied[:2] == direct[:2], (proxied, direct)


def test_expected_answers(setup, server):
    t = f"proxy:texthash:{setup}/t"
    assert postmap("-c", str(setup), "-q", "ALICE@Example.COM", t)[:2] == (0, "alice-value\n")
    assert postmap("-c", str(setup), "-q", "carol@example.com", t)[:2] == (0, "first  continued\n")
    assert postmap("-c", str(setup), "-q", "b", f"proxy:{INLINE}")[:2] == (0, "text, with comma\n")
    assert postmap("-c", str(setup), "-q", "mixedkey", f"proxy:{INLINE}")[:2] == (0, "mixed\n")


def test_unapproved_table_is_fatal_for_the_client_with_postfix_hint(setup, server):
    rc, _out, err = postmap("-c", str(setup), "-q", "a", f"proxy:texthash:{setup}/other")
    assert rc == 1 and f'is not configured for table "texthash:{setup}/other"' in err
    rc, _out, err = postmap(
        "-c", str(setup), "-q", "a", "proxy:inline:{a=1,{ b = text, with comma }}"
    )
    assert rc == 1 and "not configured" in err  # approval is byte-exact, spacing included
    log = server.log()
    assert f'request for unapproved table: "texthash:{setup}/other"' in log
    assert (
        f"to approve this table for read-only access, list proxy:texthash:{setup}/other "
        "in main.cf:proxy_read_maps"
    ) in log


def test_missing_file_is_a_temporary_error_not_a_miss(setup, server):
    rc, out, err = postmap("-c", str(setup), "-q", "a", f"proxy:texthash:{setup}/missing")
    assert rc != 0 and out == "" and "query error" in err  # never "not found"
    assert f"texthash:{setup}/missing is unavailable" in server.log()


def test_postfix_client_library_get_and_sequence(setup, server):
    table = f"texthash:{setup}/t"
    got = libpostfix(setup, table, "get", "bob@example.com", "nobody", "UTF8-КЛЮЧ@example.com")
    assert [(r["status"], r.get("value")) for r in got] == [
        ("found", "bob value with  spaces"),
        ("notfound", None),
        ("found", "значение-utf8"),
    ]
    seq = libpostfix(setup, table, "seq")
    assert seq[-1] == {"op": "seq-end", "status": "notfound"}
    assert {r["key"]: r["value"] for r in seq[:-1]}["carol@example.com"] == "first  continued"
    assert len(seq) == 6  # five entries (a key without a value is skipped), then the end


def test_postfix_client_library_writes_go_to_proxywrite(setup, server):
    table = f"texthash:{setup}/t"
    # texthash cannot be opened for writing: unavailable (RETRY) as with Postfix, no crash
    assert libpostfix(setup, table, "put", "k", "v") == [
        {"op": "put", "key": "k", "status": "retry"}
    ]
    assert libpostfix(setup, table, "del", "k") == [{"op": "del", "key": "k", "status": "retry"}]
    # a table not in proxy_write_maps is refused: fatal for the client, as with Postfix
    res = libpostfix(setup, "static:hello", "put", "k", "v")
    assert (
        isinstance(res, str)
        and 'proxywrite service is not configured for table "static:hello"' in res
    )
    assert libpostfix(setup, table, "get", "alice@example.com")[0]["value"] == "alice-value"


def test_query_and_check_commands(setup, server):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pyproxymap.cli", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    t = f"texthash:{setup}/t"
    r = cli("query", "-c", str(setup), t, "ALICE@example.com")
    assert (r.returncode, r.stdout) == (0, "alice-value\n")
    r = cli("query", "-c", str(setup), f"proxy:{t}", "nobody")
    assert (r.returncode, r.stdout) == (1, "")
    r = cli("query", "-c", str(setup), t, "alice@example.com", "nobody", "bob@example.com")
    assert (r.returncode, r.stdout) == (
        0,
        "alice@example.com\talice-value\nbob@example.com\tbob value with  spaces\n",
    )
    r = cli("query", "-c", str(setup), f"texthash:{setup}/missing", "a")
    assert r.returncode == 2 and "RETRY" in r.stderr
    r = cli("query", "-c", str(setup), f"texthash:{setup}/other", "a")
    assert r.returncode == 2 and "DENY" in r.stderr
    r = cli("check", "-c", str(setup), t)
    assert r.returncode == 0, r.stdout
    r = cli("check", "-c", str(setup), "static:hello")
    assert r.returncode == 0 and "proxy_write_maps" in r.stdout  # read ok, write explained
    r = cli("check", "-w", "-c", str(setup), "static:hello")
    assert r.returncode == 1
    r = cli("check", "-c", str(setup), f"texthash:{setup}/other")
    assert r.returncode == 1
    assert (f"list proxy:texthash:{setup}/other in main.cf:proxy_read_maps") in r.stdout
