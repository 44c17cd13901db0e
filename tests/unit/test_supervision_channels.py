"""The two channels between the supervisor and a worker: admin requests matched to
their replies by id, and status heartbeats that never block the worker's loop."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pyproxymap.server.admin import AdminError, AdminServer, ask_over
from pyproxymap.server.postfix_master import STAT_AVAIL, MasterStatus


class SlowOnce:
    """A Control whose first status takes longer than the asker waits."""

    def __init__(self) -> None:
        self.slow = True

    async def status(self) -> dict[str, Any]:
        if self.slow:
            self.slow = False
            await asyncio.sleep(0.3)
        return {"services": {}}

    async def reload(self) -> str | None:
        return None

    async def flush(self, table: str) -> int:
        return 7


def test_a_late_reply_is_not_taken_for_the_next_requests() -> None:
    async def scenario() -> int:
        ours, theirs = socket.socketpair()
        server = AdminServer(SlowOnce(), Path())
        r, w = await asyncio.open_unix_connection(sock=theirs)
        serving = asyncio.ensure_future(server.serve_connection(r, w))
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        with pytest.raises(AdminError, match="timed out"):
            await ask_over(reader, writer, {"command": "status"}, "worker", timeout=0.1)
        reply = await ask_over(reader, writer, {"command": "flush", "table": "t"}, "worker")
        writer.close()
        await serving
        return reply["flushed"]

    assert asyncio.run(scenario()) == 7


def test_heartbeats_to_a_supervisor_that_stopped_reading_never_block() -> None:
    ours, theirs = socket.socketpair()
    os.set_blocking(theirs.fileno(), False)
    status = MasterStatus(theirs.fileno(), pid=1)
    started = time.monotonic()
    for _ in range(100_000):  # far more than the socket buffer holds
        status.beat()
    assert time.monotonic() - started < 5
    assert not status.gone and status.state == STAT_AVAIL
    ours.close()
    theirs.close()
