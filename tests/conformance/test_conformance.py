"""Conformance: every table type answers through our server as real Postfix answers.

For each table, real `postmap -q - TABLE` (the table opened directly: the
reference answer) and real `postmap -c CONF -q - proxy:TABLE` (Postfix's own proxy
client talking to our server) read the same keys and must print the same lines.
Indexed files are built by real `postmap`. Run alone with `make conformance`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningServer, backdate, write_confdir

pytestmark = [pytest.mark.interop, pytest.mark.conformance]

SOURCE = """\
alice@example.com\talice-value
bob@example.com  bob value with  spaces
MixedCase@Example.COM mixed-case-key
utf8-ключ@example.com значение-utf8
Straße@example.com strasse
example.com domain-entry
dollar@example.com $1 ${2} $$
long{long} long-key
""".replace("{long}", "x" * 400)  # LMDB keys are at most 511 bytes

REGEXP = r"""
/^alice@(.*)$/\tregexp-alice at $1
!/@example\.com$/\tnot-example ${0}
if /^n/
/^nested-(.*)/\tnested $1
if !/x/
/^nested/\tnested without x
endif
endif
/^(.+)\+(.+)@example\.org$/\text $1 $2 $$
/^UPPER/i\tcase-sensitive-upper
/^[[:digit:]]+$/\tdigits
"""

PCRE = r"""
/^alice@(.*)$/\tpcre-alice at $1
/^bob@/i\tpcre-bob
/^(\w+)\+(\w+)@example\.org$/\tpcre-ext $1 $2
if /^n/
/^nested-(.*)/\tnested $1
endif
!/@/\tno-at-sign
/^a.c$/s\tdotall
"""

CIDR = """
10.0.0.1\tcidr-host
192.168.0.0/16\tcidr-private
!192.168.1.0/24\tnot-192.168.1
2001:db8::/32\tcidr-v6
::ffff:10.1.2.3\tmapped
if 172.16.0.0/12
172.16.5.0/24\tinner
endif
"""

KEYS = [
    "alice@example.com",
    "ALICE@EXAMPLE.COM",
    "Alice@Example.Com",
    "bob@example.com",
    "mixedcase@example.com",
    "MIXEDCASE@EXAMPLE.COM",
    "utf8-ключ@example.com",
    "UTF8-КЛЮЧ@EXAMPLE.COM",
    "straße@example.com",
    "STRASSE@example.com",
    "example.com",
    "dollar@example.com",
    "long" + "x" * 400,
    "LONG" + "X" * 400,
    "long" + "x" * 5000,
    "nobody@example.com",
    "nested-one",
    "nested-x",
    "nx",
    "joe+ext@example.org",
    "UPPERCASE",
    "uppercase",
    "12345",
    "abc",
    "a\nc",
    "10.0.0.1",
    "10.0.0.2",
    "192.168.7.9",
    "192.168.1.1",
    "2001:db8::1",
    "2001:DB8:0:0:0:0:0:1",
    "2001:db9::1",
    "::ffff:10.1.2.3",
    "10.1.2.3",
    "172.16.5.1",
    "172.16.6.1",
    "8.8.8.8",
    "[10.0.0.1]",
    "root",
    "nosuchuser",
    "-",
    "# comment",
    "a b",
    "%",
    "$1",
]


def table_specs(root: Path) -> list[str]:
    """Every table type, written to root (indexed ones built by real postmap)."""
    (root / "src").write_text(SOURCE)
    specs = [f"texthash:{root}/src"]
    for kind in ("hash", "btree", "lmdb", "cdb"):
        (root / kind).write_text(SOURCE)
        subprocess.run(["postmap", f"{kind}:{root}/{kind}"], check=True, capture_output=True)
        specs.append(f"{kind}:{root}/{kind}")
    for kind, text in (("regexp", REGEXP), ("pcre", PCRE), ("cidr", CIDR)):
        (root / kind).write_text(text.replace("\\t", "\t"))
        specs.append(f"{kind}:{root}/{kind}")
    specs += [
        "inline:{alice@example.com=inline-alice, { bob@example.com = text, with comma }, "
        "MixedKey=mixed}",
        "static:static-result",
        "static:{ static with spaces }",
        "regexp:{{/^alice@/ inline-regexp}, {/^(.*)@example.org$/ rx-$1}}",
        "pcre:{{/^bob@/i inline-pcre}, {/^(\\w+)$/ word-$1}}",
        "cidr:{{10.0.0.0/8 inline-ten}, {2001:db8::/32 inline-v6}}",
        "unix:passwd.byname",
        "unix:group.byname",
        "randmap:{only-choice}",
        f"unionmap:{{texthash:{root}/src, static:union-static}}",
        f"pipemap:{{texthash:{root}/src, inline:{{alice-value=piped}}}}",
    ]
    return specs


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    specs = table_specs(root)
    backdate(*root.iterdir())
    listed = " ".join(f"proxy:{s}".replace("$", "$$") for s in specs)  # main.cf expands $
    conf = write_confdir(root, f"proxy_read_maps = {listed}\n")
    backdate(conf / "main.cf")
    server = RunningServer(conf)
    yield conf, specs, server
    server.stop()


def postmap_batch(args: list[str], keys: list[str]) -> tuple[int, str, str]:
    r = subprocess.run(
        ["postmap", *args], input="\n".join(keys) + "\n", capture_output=True, text=True, timeout=60
    )
    return r.returncode, r.stdout, r.stderr


def table_specs_names() -> list[str]:
    # the same list as table_specs(), without writing files: for test ids
    return [
        "texthash",
        "hash",
        "btree",
        "lmdb",
        "cdb",
        "regexp",
        "pcre",
        "cidr",
        "inline",
        "static",
        "static{}",
        "regexp{}",
        "pcre{}",
        "cidr{}",
        "unix:passwd",
        "unix:group",
        "randmap",
        "unionmap",
        "pipemap",
    ]


@pytest.mark.parametrize("index", range(len(table_specs_names())), ids=table_specs_names())
def test_proxied_answers_equal_direct_answers(conformance, index):
    conf, specs, _server = conformance
    spec = specs[index]
    direct = postmap_batch(["-c", str(conf), "-q", "-", spec], KEYS)
    proxied = postmap_batch(["-c", str(conf), "-q", "-", f"proxy:{spec}"], KEYS)
    assert direct[1], f"the reference answered nothing for {spec}: {direct}"
    assert proxied[:2] == direct[:2], (spec, proxied, direct)


def test_single_key_exit_statuses(conformance):
    conf, specs, _server = conformance
    for spec in specs[:8]:
        for key in ("alice@example.com", "nobody@example.com", "10.0.0.1"):
            direct = subprocess.run(
                ["postmap", "-c", str(conf), "-q", key, spec], capture_output=True, text=True
            )
            proxied = subprocess.run(
                ["postmap", "-c", str(conf), "-q", key, f"proxy:{spec}"],
                capture_output=True,
                text=True,
            )
            assert (proxied.returncode, proxied.stdout) == (direct.returncode, direct.stdout), (
                spec,
                key,
            )
