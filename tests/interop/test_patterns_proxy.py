"""regexp and pcre through our server, asked by real postmap.

For every table and key, `postmap -c CONF -q KEY proxy:TYPE:NAME` (Postfix's own proxy
client talking to `pyproxymap serve`) must print what `postmap -q KEY TYPE:NAME` prints.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, backdate, write_confdir
from tests.unit.pattern_checks import CASES
from tests.unit.test_texthash import POSTFIX_TESTS, Postfix

pytestmark = pytest.mark.interop

EDGES = b"".join(text for text, _ in CASES.values())
TABLES = [
    "regexp:{root}/edges.regexp",
    "pcre:{root}/edges.pcre",
    "regexp:{root}/dict_regexp.map",
    "pcre:{root}/dict_pcre.map",
    "regexp:{root}/reload.regexp",
    "regexp:{{/^a(.*)/ inline-$1}, {if /c/}, {/d/ cd}, {endif}, {/(/ bad}}",
    "pcre:{{/^(\\w+)@/i user-$1}, {!/x/ no-x}, {/^(x+)$/U ungreedy-$1}}",
]
#: A key whose answer is not UTF-8: the lookup fails and postmap stops there.
NON_UTF8_ANSWER = "uß".encode()
KEYS = sorted(
    {key for _, keys in CASES.values() for key in keys if key != NON_UTF8_ANSWER}
    | {line.split()[1].encode() for kind in ("regexp", "pcre")
       for line in (POSTFIX_TESTS / f"dict_{kind}.in").read_text().splitlines()}
    | {b"abc", b"cd", b"joe@x", b"JOE@x", b"xxx", b"key", b"a" * 5000,
       b"u" * 100_000 + b"@example.com"}
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str], str]]:
    root = tmp_path_factory.mktemp("patterns")
    (root / "edges.regexp").write_bytes(EDGES)
    (root / "edges.pcre").write_bytes(EDGES)
    for kind in ("regexp", "pcre"):
        shutil.copy(POSTFIX_TESTS / f"dict_{kind}.map", root)
    (root / "reload.regexp").write_text("/^key$/ before\n")
    (root / "limit.pcre").write_text("/^(a+)+$/ catastrophic\n")
    backdate(*root.iterdir())
    tables = [table.replace("{root}", str(root)) for table in TABLES]
    names = [*tables, f"pcre:{root}/limit.pcre"]
    listed = "\n\t".join(f"proxy:{name}".replace("$", "$$") for name in names)
    conf = write_confdir(root, f"proxy_read_maps =\n\t{listed}\n")
    backdate(conf / "main.cf")
    server = RunningServer(conf)
    yield conf, tables, root
    server.stop()
    log = server.log()
    assert "Traceback" not in log
    assert f"pcre map {root}/limit.pcre, line 1: match limit exceeded" in log


def postmap(conf: Path, *args: str | bytes, keys: list[bytes] | None = None) -> tuple[int, bytes]:
    stdin = None if keys is None else b"".join(key + b"\n" for key in keys)
    run = subprocess.run(
        ["postmap", "-c", str(conf), *args], input=stdin, capture_output=True, timeout=60
    )
    assert keys is None or b"query error" not in run.stderr  # postmap stops at an error
    return run.returncode, run.stdout


@pytest.mark.parametrize("index", range(len(TABLES)), ids=[t.split(":")[0] + str(i) for i, t in
                                                          enumerate(TABLES)])  # fmt: skip
def test_proxied_answers_equal_direct_answers(
    setup: tuple[Path, list[str], Path], index: int
) -> None:
    conf, tables, _ = setup
    table = tables[index]
    direct = postmap(conf, "-q", "-", table, keys=KEYS)
    assert direct[1], direct  # the table answers some keys
    assert postmap(conf, "-q", "-", f"proxy:{table}", keys=KEYS) == direct


def test_single_keys(setup: tuple[Path, list[str], Path]) -> None:
    """Keys a batch cannot carry (empty, newlines), and one whose lookup fails."""
    conf, tables, _ = setup
    keys = [b"", b"a\nc", b"line\nkey", b"\t", "Ключ".encode(), NON_UTF8_ANSWER]
    cases = [(table, key) for table in tables for key in keys]
    postfix = Postfix(conf, fold=lambda key: key)  # postmap's runs are started together
    direct = postfix.run_all([("-q", key, table) for table, key in cases], batch=len(cases))
    proxied = postfix.run_all([("-q", key, f"proxy:{table}") for table, key in cases], len(cases))
    assert [(case, a.rc, a.stdout) for case, a in zip(cases, proxied, strict=True)] == [
        (case, a.rc, a.stdout) for case, a in zip(cases, direct, strict=True)
    ]


def test_match_limit_is_a_temporary_error(setup: tuple[Path, list[str], Path]) -> None:
    """Postfix would skip the rule after 10 million steps; we answer RETRY, never a miss."""
    conf, _, root = setup
    table = f"proxy:pcre:{root}/limit.pcre"
    assert postmap(conf, "-q", "aaaa", table) == (0, b"catastrophic\n")
    run = subprocess.run(["postmap", "-c", str(conf), "-q", "a" * 40 + "b", table],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode != 0 and "query error" in run.stderr


def test_a_changed_file_is_reloaded(setup: tuple[Path, list[str], Path]) -> None:
    conf, _, root = setup
    table = f"proxy:regexp:{root}/reload.regexp"
    assert postmap(conf, "-q", "key", table) == (0, b"before\n")
    (root / "reload.regexp").write_text("/^key$/ after, and longer\n")
    deadline = time.monotonic() + 10
    while postmap(conf, "-q", "key", table) != (0, b"after, and longer\n"):
        assert time.monotonic() < deadline, "the changed table was not reloaded"
        time.sleep(0.2)
