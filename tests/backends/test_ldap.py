"""ldap: tables: real postmap vs our table against a throwaway slapd, then failures.

Parity: for each configuration file and key, ``postmap -q KEY ldap:FILE``
(Debian's Postfix, the oracle) and our table give the same value, the same
"not found", or both fail (RETRY: postmap's fatal "query error"); and
``postmap -q KEY proxy:ldap:FILE`` through our server prints what postmap
prints asking slapd itself. Failures: a stopped server is RETRY with a log
line naming table, host and cause, and lookups succeed within a second of its
return; a hung server ties up only its own table; the pool never holds more
connections than max_connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from pyproxymap.tables.base import TableOptions, TableRetry

pytest.importorskip("ldap", reason="python-ldap is not installed (the ldap extra)")
from pyproxymap.tables.ldap import (
    LdapTable,
    parse_url,
    rfc2253_quote,
    rfc2254_quote,
)
from tests.backends.ldap_memcache_fixtures import (
    BASE,
    ROOT_DN,
    ROOT_PW,
    Slapd,
    ask,
    backdate_all,
    established,
    free_port,
    open_spec,
    own_slapd,  # noqa: F401  (fixture)
    postmap_answer,
    run,
    slapd,  # noqa: F401  (fixture)
)
from tests.conftest import RunningServer, backdate, write_confdir
from tests.unit.test_texthash import Postfix

pytestmark = pytest.mark.backends

ALIASES = "query_filter = (mailLocalAddress=%s)\nresult_attribute = mailRoutingAddress\n"
GROUPS = ALIASES + "special_result_attribute = member, memberURL\n"

#: name -> the configuration file after server_host/search_base (see write_cfs).
CONFIGS = {
    "aliases": "bind = no\n" + ALIASES,
    "multi": "query_filter = (mail=%s)\nresult_attribute = mailLocalAddress, cn\n",
    "groups": f"bind = yes\nbind_dn = {ROOT_DN}\nbind_pw = {ROOT_PW}\n" + GROUPS,
    "leaf": (
        "query_filter = (mailLocalAddress=%s)\nresult_attribute =\n"
        "leaf_result_attribute = mail\nspecial_result_attribute = member memberURL\n"
    ),
    "terminal": (
        "query_filter = (mailLocalAddress=%s)\nresult_attribute = mail\n"
        "terminal_result_attribute = mailRoutingAddress\nspecial_result_attribute = member\n"
        "result_format = smtp:[%d] %u %S %D\n"
    ),
    "one": "search_base = ou=people,%(base)s\nscope = one\nquery_filter = (mail=%s)\n"
    "result_attribute = uid\nresult_filter = uid=%s\n",
    "dynbase": "search_base = uid=%u,ou=people,%(base)s\nscope = base\n"
    "query_filter = (objectClass=*)\nresult_attribute = mailRoutingAddress\n",
    "parts": "query_filter = (&(uid=%U)(mail=*@%2.%1))\nresult_attribute = mailRoutingAddress\n"
    "result_format = %s via %3\n",
    "domain": "domain = example.com, texthash:%(dir)s/domains.txt\n" + ALIASES,
    "expansion": "expansion_limit = 1\nquery_filter = (mail=%s)\n"
    "result_attribute = mailLocalAddress\n",
    "size": "size_limit = 1\nquery_filter = (mail=*%d)\nresult_attribute = uid\n",
    "recursion": "recursion_limit = 1\n" + GROUPS,
    "nobase": "search_base = ou=missing,%(base)s\n" + ALIASES,
    "failover": "server_host = ldap://127.0.0.1:%(dead)d/, %(url)s\n" + ALIASES,
    "hostport": "server_host = 127.0.0.1\nserver_port = %(port)d\nversion = 3\n" + ALIASES,
}

KEYS = [
    b"alice@example.com",
    b"ALICE@Example.COM",
    b"a.smith@example.com",
    b"bob@example.com",
    b"carol@sub.example.com",
    b"staff@example.com",
    b"dynamic@example.com",
    b"routed@example.com",
    b"nested@example.com",
    b"many@example.com",
    b"nobody@example.com",
    b"alice",
    b"@example.com",
    b"bob@",
    b"*@example.com",
    b"al(ice)@example.com",
    b"a\\lice@example.com",
]


def write_cfs(root: Path, server: Slapd) -> dict[str, Path]:
    (root / "domains.txt").write_text("sub.example.com ok\n")
    paths = {}
    for name, text in CONFIGS.items():
        body = text.replace("%(base)s", BASE).replace("%(dir)s", str(root))
        body = body.replace("%(dead)d", str(free_port())).replace("%(url)s", server.url)
        body = body.replace("%(port)d", str(server.port))
        head = "" if "server_host" in body else f"server_host = {server.url}\n"
        head += "" if "search_base" in body else f"search_base = {BASE}\n"
        paths[name] = root / f"{name}.cf"
        paths[name].write_text(head + body)
    backdate_all(root)
    return paths


@pytest.fixture(scope="module")
def setup(
    slapd: Slapd,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Postfix, dict[str, Path]]:
    root = tmp_path_factory.mktemp("ldap-cf")
    paths = write_cfs(root, slapd)
    listed = "\n\t".join(f"proxy:ldap:{path}" for path in paths.values())
    conf = write_confdir(root / "conf", f"proxy_read_maps =\n\t{listed}\n")
    backdate(conf / "main.cf")
    return Postfix(conf, fold=lambda key: key), paths


async def ours_all(paths: dict[str, Path]) -> dict[str, list[object]]:
    answers = {}
    for name, path in paths.items():
        table = open_spec(f"ldap:{path}")
        try:
            answers[name] = [await ask(table, key) for key in KEYS]
        finally:
            table.close()
    return answers


@pytest.mark.interop
def test_answers_as_postmap_does(setup: tuple[Postfix, dict[str, Path]]) -> None:
    postfix, paths = setup
    commands = [("-q", key, f"ldap:{path}") for path in paths.values() for key in KEYS]
    answers = iter(postfix.run_all(commands))
    ours = run(ours_all(paths))
    mismatches = []
    for name in paths:
        for key, got in zip(KEYS, ours[name], strict=True):
            want = postmap_answer(next(answers))
            if got != want:
                mismatches.append((name, key, want, got))
    assert not mismatches
    # The cases do cover what they are meant to cover.
    assert ours["multi"][0] == b"Alice,alice@example.com,a.smith@example.com"
    assert ours["groups"][5] == b"alice@mail1.example.com,bob@mail2.example.com"
    assert ours["expansion"][0] is TableRetry and ours["expansion"][3] == b"bob@example.com"
    assert ours["nobase"][0] is TableRetry and ours["dynbase"][10] is None
    assert ours["domain"][4] == b"carol@mail1.example.com" and ours["domain"][0] is not None


@pytest.mark.interop
def test_through_our_server(setup: tuple[Postfix, dict[str, Path]]) -> None:
    postfix, paths = setup
    chosen = [paths[name] for name in ("aliases", "groups", "terminal", "nobase")]
    server = RunningServer(postfix.confdir)
    try:
        keys = KEYS[:12]
        direct = postfix.run_all([("-q", k, f"ldap:{p}") for p in chosen for k in keys])
        proxied = postfix.run_all([("-q", k, f"proxy:ldap:{p}") for p in chosen for k in keys])
        for want, got in zip(direct, proxied, strict=True):
            assert (got.rc, got.stdout, got.fatal is None) == (
                want.rc,
                want.stdout,
                want.fatal is None,
            )
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_filter_and_dn_quoting() -> None:
    assert rfc2254_quote(b"a*(b)\\c@x") == b"a\\2A\\28b\\29\\5Cc@x"
    assert rfc2253_quote(b' a,b+c;"#<>\\') == b"\\20a\\2Cb\\2Bc\\3B\\22\\23\\3C\\3E\\5C"


def test_url_parsing_follows_libldap() -> None:
    url = parse_url("ldap:///ou=people,dc=x?mail,cn?one?(sn=J%20x)")
    assert (url.dn, url.attrs, url.scope, url.filter) == (
        "ou=people,dc=x",
        ["mail", "cn"],
        1,
        "(sn=J x)",
    )
    url = parse_url("<URL:LDAP://host:389/dc=x>")
    assert (url.scheme, url.dn, url.attrs, url.scope, url.filter) == ("ldap", "dc=x", None, 0, None)
    assert parse_url("ldap:///dc=%zz").dn == ""  # libldap empties text with a bad escape
    for bad in ("ldap://host:x/dc=x", "ldap:///dc=x??bogus", "ldap:///a?b?c?d?e?f", "<ldap:///x"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_configuration_errors(tmp_path: Path) -> None:
    cf = tmp_path / "bad.cf"
    for text, error in (
        ("bind = maybe\n", "unsupported parameter value: bind = maybe"),
        ("timeout = ten\n", "bad numerical configuration: timeout = ten"),
        ("version = 1\n", "invalid version parameter value 1 < 2"),
        ("query_filter = (a=%x)\n", "Invalid query template"),
        ("chase_referrals = maybe\n", "bad boolean configuration"),
        ("no equals sign\n", "missing '=' after attribute name"),
    ):
        cf.write_text(text)
        with pytest.raises(Exception, match=error):
            open_spec(f"ldap:{cf}")
    with pytest.raises(Exception, match="not supported"):
        open_spec("ldap:ldapsource")
    with pytest.raises(Exception, match="requires O_RDONLY"):
        open_spec(f"ldap:{cf}", writable=True)


def cf_for(server: Slapd, root: Path, extra: str = "") -> Path:
    path = root / "fault.cf"
    path.write_text(
        f"server_host = {server.url}\nsearch_base = {BASE}\nbind_dn = {ROOT_DN}\n"
        f"bind_pw = {ROOT_PW}\n{ALIASES}{extra}"
    )
    return path


def test_server_down_is_retry_and_back_within_a_second(
    own_slapd: Slapd,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    path = cf_for(own_slapd, tmp_path)
    table = open_spec(f"ldap:{path}")
    key = b"alice@example.com"

    async def scenario() -> float:
        assert await ask(table, key) == b"alice@mail1.example.com"
        own_slapd.stop()
        for _ in range(3):
            assert await ask(table, key) is TableRetry
        own_slapd.start()
        started = time.monotonic()
        while await ask(table, key) is TableRetry:
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    assert run(scenario(), table) < 1.0
    logged = caplog.text
    assert f"ldap:{path}" in logged and f"127.0.0.1:{own_slapd.port}" in logged
    assert "Can't contact LDAP server" in logged
    assert ROOT_PW not in logged


def test_hung_server_times_out_and_spares_other_tables(
    own_slapd: Slapd,  # noqa: F811
    slapd: Slapd,  # noqa: F811
    tmp_path: Path,
) -> None:
    hung_cf = cf_for(own_slapd, tmp_path, "timeout = 1\n")
    hung = open_spec(f"ldap:{hung_cf}")
    (tmp_path / "other").mkdir()
    healthy = open_spec(f"ldap:{cf_for(slapd, tmp_path / 'other')}")
    key = b"alice@example.com"

    async def scenario() -> None:
        assert await ask(hung, key) == b"alice@mail1.example.com"
        own_slapd.freeze()
        started = time.monotonic()
        stuck = asyncio.ensure_future(ask(hung, key))
        for _ in range(5):
            assert await ask(healthy, key) == b"alice@mail1.example.com"
        assert time.monotonic() - started < 0.5
        assert await stuck is TableRetry
        assert time.monotonic() - started < 2.5
        own_slapd.thaw()

    run(scenario(), hung, healthy)


def test_pool_never_exceeds_max_connections(
    slapd: Slapd,  # noqa: F811
    tmp_path: Path,
) -> None:
    deadline = time.monotonic() + 5  # earlier tests' connections close asynchronously
    while established(slapd.port) and time.monotonic() < deadline:
        time.sleep(0.02)
    options = TableOptions(max_connections=2)
    table = open_spec(f"ldap:{cf_for(slapd, tmp_path)}", options=options)
    assert isinstance(table, LdapTable)
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(established(slapd.port))
            time.sleep(0.002)

    async def many() -> list[object]:
        keys = [b"alice@example.com", b"bob@example.com", b"routed@example.com"] * 20
        return await asyncio.gather(*(ask(table, key) for key in keys))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = asyncio.run(many())
        seen.append(established(slapd.port))  # the pool keeps them open, idle
    finally:
        done.set()
        sampler.join()
        table.close()
    assert all(answer not in (None, TableRetry) for answer in answers)
    assert 1 <= max(seen) <= 2
    assert table.open_connections == 0
