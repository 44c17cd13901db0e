"""Listening sockets: a burst of clients finds room to wait until they are accepted."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from pyproxymap.server.listener import BACKLOG, bind_unix, listen_unix, serve_socket

#: More than the event loop's default backlog (100), less than ours.
BURST = 300


def connect_burst(path: Path) -> list[socket.socket]:
    """BURST clients connecting with the event loop busy (nobody accepts meanwhile); a
    full backlog makes connect() fail with EAGAIN, as Postfix's clients would see."""
    clients = []
    for _ in range(BURST):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(1)
        client.connect(str(path))
        clients.append(client)
    return clients


@pytest.mark.parametrize("how", ["bound here", "passed down"])
def test_a_burst_of_clients_waits_in_the_backlog(tmp_path: Path, how: str) -> None:
    assert BURST < BACKLOG
    path = tmp_path / "private" / "proxymap"

    async def scenario() -> None:
        accepted = 0

        def factory() -> asyncio.Protocol:
            nonlocal accepted
            accepted += 1
            return asyncio.Protocol()

        if how == "bound here":
            server = await listen_unix(path, factory, owner=None)
        else:  # a socket a master (or our supervisor) listens on and hands to a worker
            server = await serve_socket(bind_unix(path, owner=None), factory)
        clients = connect_burst(path)
        try:
            for _ in range(100):
                if accepted == BURST:
                    break
                await asyncio.sleep(0.01)
            assert accepted == BURST
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
