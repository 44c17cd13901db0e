"""socketmap and tcp tables through our server, asked by postmap.

For every key, `postmap -c CONF -q KEY proxy:socketmap:...` (Postfix's own proxy
client talking to `pyproxymap serve`) must print what `postmap -q KEY
socketmap:...` prints when it asks the same socketmap server itself; likewise
for tcp. The servers are the Python test servers of the unit tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, backdate, write_confdir
from tests.unit.test_socketmap_tcp import (
    KEYS,
    SOCKETMAP_ERRORS,
    TCP_KEYS,
    Backends,
    backends,  # noqa: F401  (fixture)
    spec_of,
)
from tests.unit.test_texthash import Postfix

pytestmark = pytest.mark.interop

KINDS = {
    "socketmap": KEYS + SOCKETMAP_ERRORS,
    "unix": KEYS + SOCKETMAP_ERRORS,
    "tcp": KEYS + TCP_KEYS,
}


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    backends: Backends,  # noqa: F811
) -> Iterator[tuple[Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("socketmap-proxy")
    specs = {kind: spec_of(backends, kind) for kind in KINDS}
    listed = "\n\t".join(f"proxy:{spec}" for spec in specs.values())
    conf = write_confdir(root, f"proxy_read_maps =\n\t{listed}\n")
    backdate(conf / "main.cf")
    server = RunningServer(conf)
    yield conf, specs
    server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("kind", list(KINDS))
def test_proxy_answers_as_the_table_asked_directly(
    setup: tuple[Path, dict[str, str]], kind: str
) -> None:
    conf, specs = setup
    postmap = Postfix(conf, fold=lambda key: key)
    keys = KINDS[kind]
    direct = postmap.run_all([("-q", key, specs[kind]) for key in keys])
    proxied = postmap.run_all([("-q", key, f"proxy:{specs[kind]}") for key in keys])
    for key, want, got in zip(keys, direct, proxied, strict=True):
        assert (got.rc, got.stdout) == (want.rc, want.stdout), key
