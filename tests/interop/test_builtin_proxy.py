"""cidr, unix, environ, fail, randmap, unionmap, pipemap through our server, asked by postmap.

For every table and key, `postmap -c CONF -q KEY proxy:TYPE:NAME` (Postfix's own proxy
client talking to `pyproxymap serve`) must print what `postmap -q KEY TYPE:NAME` prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, backdate, write_confdir
from tests.unit.test_texthash import Postfix

pytestmark = pytest.mark.interop

CIDR = """\
1.2.3.4 four
! 10.0.0.0/8 not-ten
if ::/0
::ffff:1.2.3.4 mapped
fe80::/10 link-local
endif
"""
TABLES = [
    "cidr:{root}/t.cidr",
    "cidr:{{1.2.3.0/24 net}, {if !1.2.3.4}, {::1 loopback}, {endif}}",
    "unix:passwd.byname",
    "unix:group.byname",
    "environ:x",
    "fail:x",
    "randmap:{only}",
    "unionmap:{static:one, inline:{a=1, root=r}, cidr:{{1.2.3.4 ip}}}",
    "unionmap:{static:one, fail:x}",
    "pipemap:{inline:{k1=v1,k2=v2}, inline:{v2=v3}}",
    "pipemap:{static:root, unix:passwd.byname}",
    "pipemap:{inline:{k1=v1}, fail:x}",
]
KEYS = ["1.2.3.4", "::ffff:1.2.3.4", "::1", "FE80::1", "10.1.1.1", "a", "A", "k1", "k2",
        "root", "ROOT", "nobody", "no-such-user", "pyproxymap_test_var"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("builtin")
    (root / "t.cidr").write_text(CIDR)
    backdate(root / "t.cidr")
    tables = [table.replace("{root}", str(root)) for table in TABLES]
    listed = "\n\t".join(f"proxy:{table}" for table in tables)
    conf = write_confdir(root, f"proxy_read_maps =\n\t{listed}\n")
    backdate(conf / "main.cf")
    with pytest.MonkeyPatch.context() as env:  # for the server and postmap alike
        env.setenv("pyproxymap_test_var", "env value")
        server = RunningServer(conf)
        yield conf, tables
        server.stop()
        assert "Traceback" not in server.log()


def test_proxied_answers_equal_direct_answers(setup: tuple[Path, list[str]]) -> None:
    conf, tables = setup
    postfix = Postfix(conf, fold=lambda key: key)
    cases = [(table, key) for table in tables for key in KEYS]
    direct = postfix.run_all([("-q", key, table) for table, key in cases], batch=len(cases))
    proxied = postfix.run_all([("-q", key, f"proxy:{table}") for table, key in cases], len(cases))
    assert [(case, a.rc, a.stdout) for case, a in zip(cases, proxied, strict=True)] == [
        (case, a.rc, a.stdout) for case, a in zip(cases, direct, strict=True)
    ]
    # A comparison of misses alone would prove little: every table answers some key.
    answering = {table for (table, _), a in zip(cases, direct, strict=True) if a.rc == 0}
    assert answering == {table for table in tables if "fail:" not in table}
