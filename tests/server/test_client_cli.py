"""Our client library, the in-process server harness, settings, and the demo."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyproxymap import settings
from pyproxymap.client import AsyncClient, Client, ProxymapError
from pyproxymap.config.maincf import MainCf
from pyproxymap.server.app import ProxymapServer
from pyproxymap.tables.base import TableOptions
from pyproxymap.wire.proxymap import NEW_DIALECT, Status
from tests.conftest import write_confdir

ROOT = Path(__file__).resolve().parents[2]


def test_in_process_server_with_sync_and_async_clients(tmp_path):
    (tmp_path / "t").write_text("alice@example.com alice-value\nbob@example.com bob-value\n")
    conf = write_confdir(
        tmp_path,
        f"proxy_read_maps = proxy:texthash:{tmp_path}/t\nproxy_write_maps = proxy:static:w\n",
    )
    table = f"texthash:{tmp_path}/t"

    async def go():
        async with ProxymapServer(MainCf.load(conf), settings.Settings()) as server:
            path = server.socket_paths["proxymap"]
            async with AsyncClient(path) as c:
                assert (await c.open(table)).flags & 0x10  # FIXED
                assert await c.lookup(table, "ALICE@example.com") == b"alice-value"
                assert await c.lookup(table, "nobody") is None
                with pytest.raises(ProxymapError) as e:
                    await c.lookup("texthash:/not/approved", "x")
                assert e.value.status == Status.DENY
                with pytest.raises(ProxymapError) as e:
                    await c.update(table, "k", "v")
                assert e.value.status == Status.DENY  # writes on the read-only service

            def sync_side():
                with Client(path) as c:
                    assert c.lookup(table, "bob@example.com") == b"bob-value"
                    assert sorted(c.items(table)) == [
                        (b"alice@example.com", b"alice-value"),
                        (b"bob@example.com", b"bob-value"),
                    ]
                with Client(path, dialect=NEW_DIALECT) as c:
                    reply = c.request("lookup", table, key=b"bob@example.com")
                    assert (reply.status, reply.value) == (0, b"bob-value")
                with Client(server.socket_paths["proxywrite"]) as c:
                    with pytest.raises(ProxymapError) as e:
                        c.delete("static:w", "k")
                    assert e.value.status == Status.CONFIG  # static has no delete

            await asyncio.to_thread(sync_side)

    asyncio.run(go())


def test_settings_come_from_toml_and_the_command_line(tmp_path):
    toml = tmp_path / "pyproxymap.toml"
    toml.write_text("request_timeout = 2.5\nmax_pipelined = 7\n")
    parser = __import__("argparse").ArgumentParser()
    settings.add_arguments(parser)
    conf = settings.load(toml, parser.parse_args(["--max-pipelined", "9"]))
    assert (conf.request_timeout, conf.max_pipelined) == (2.5, 9)
    toml.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        settings.load(toml)
    with pytest.raises(ValueError, match="positive"):
        settings.load(None, parser.parse_args(["--request-timeout", "0"]))


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name, *_ in settings.definitions():
        assert f"| `{name}` |" in readme, name
    for name in TableOptions.__dataclass_fields__:
        assert f"| `{name}` |" in readme, name


def test_demo_serves_its_tables_with_no_postfix_config(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyproxymap.cli", "serve", "--demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        first = proc.stdout.readline()
        root = Path(re.search(r"config dir (\S+)", first).group(1))
        sock = root / "q" / "private" / "proxymap"
        deadline = time.time() + 15
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.05)
        query = [sys.executable, "-m", "pyproxymap.cli", "query", "-c", str(root)]
        r = subprocess.run(
            [*query, f"texthash:{root}/virtual", "Sales@Example.com"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert (r.returncode, r.stdout) == (0, "carol@mail.example.net\n"), r.stderr
        r = subprocess.run(
            [*query, "inline:{postmaster=root, abuse=security-team}", "abuse"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert (r.returncode, r.stdout) == (0, "security-team\n"), r.stderr
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyproxymap.cli",
                "check",
                "-c",
                str(root),
                f"texthash:{root}/access",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert r.returncode == 1 and "proxy_read_maps" in r.stdout
    finally:
        proc.terminate()
        proc.wait(15)
    assert not root.exists()  # the demo cleans up after itself
