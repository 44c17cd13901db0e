"""One client connection: greeting, framing, deadlines, pipelining, backpressure.

An ``asyncio.Protocol`` rather than streams: ``data_received`` feeds the
incremental decoder and a lookup in an in-memory table is answered right there,
with no task and no per-request timer. A request whose backend really waits is
answered from a callback on its future (a database answer), or from a task (a
table being opened, a backend that awaits); replies still leave in request order,
because later requests queue behind it.

Where Postfix's proxymap is fragile, this is not: a client that stalls in the
middle of a request is closed at the deadline (proxymap spins), every pipelined
request is answered in order (proxymap drops all but the first), and garbage
gets status 3 or a closed connection without affecting anyone else.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ..wire.attr import AttrError, Decoder, Limits, Record
from ..wire.proxymap import GREETING, ProtocolError, parse_request
from .service import Pending

if TYPE_CHECKING:
    from .app import ServiceSlot


class Session(asyncio.Protocol):
    __slots__ = (
        "_deadline",
        "_decoder",
        "_log",
        "_max_pipelined",
        "_paused_reading",
        "_pending",
        "_queue",
        "_slot",
        "_timeout",
        "_transport",
        "_writing_paused",
        "closing",
        "on_lost",
    )

    def __init__(
        self,
        slot: ServiceSlot,
        *,
        limits: Limits,
        timeout: float,
        max_pipelined: int,
        log: logging.Logger,
    ) -> None:
        self._slot = slot
        self._decoder = Decoder(limits)
        self._timeout = timeout
        self._max_pipelined = max_pipelined
        self._log = log
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Record] = deque()
        self._pending: Pending | None = None  # the reply being waited for
        self._deadline: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._writing_paused = False
        self.closing = False  # close once the requests already received are answered
        self.on_lost: Callable[[Session], None] | None = None

    @property
    def busy(self) -> bool:
        """A request is being served or waits to be."""
        return self._pending is not None or bool(self._queue)

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        try:
            records = self._decoder.feed(data)
        except AttrError as e:
            self._log.warning("closing connection: %s", e)
            self.abort()
            return
        if records:
            if self._pending is None and not self._queue:
                self._serve_now(records)
            else:
                self._queue.extend(records)
                self._limit_read_ahead()
        self._watch_partial_request()
        if self.closing:
            self._close_if_idle()

    def eof_received(self) -> bool:
        # Answer what was asked, then close: keep the transport half-open until then.
        self.closing = True
        return self.busy

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._pending is not None:
            self._pending.future.cancel()
            self._pending = None
        self._queue.clear()
        self._transport = None
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests, and give
        # it the request deadline to take what we have written.
        self._writing_paused = True
        self._pause_reading()
        self._arm_deadline()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._cancel_deadline()
        if not self._queue:
            self._resume_reading()
        self._watch_partial_request()

    # -- serving ------------------------------------------------------------------
    def _serve_now(self, records: list[Record]) -> None:
        """Answer records in order; stop at the first one that must wait."""
        replies: list[bytes] = []
        for i, record in enumerate(records):
            reply = self._answer(record)
            if reply is None:  # not our protocol: close after what we owe
                self._flush(replies)
                self._close()
                return
            if isinstance(reply, bytes):
                replies.append(reply)
                continue
            self._flush(replies)
            self._queue.extend(records[i + 1 :])
            self._limit_read_ahead()
            self._wait_for(reply)
            return
        self._flush(replies)

    def _answer(self, record: Record) -> bytes | Pending | None:
        try:
            request = parse_request(record)
        except ProtocolError as e:
            self._log.warning("%s", e)
            return e.reply
        for name in request.extra:
            self._log.warning(
                "unexpected attribute %s in %s request (ignored)",
                name.decode(errors="replace"),
                request.op,
            )
        return self._slot.service.handle(request)

    def _wait_for(self, reply: Pending) -> None:
        self._pending = reply
        reply.future.add_done_callback(self._deliver)

    def _deliver(self, future: asyncio.Future[object]) -> None:
        reply, self._pending = self._pending, None
        if self._transport is None or reply is None or reply.future is not future:
            return  # the connection is gone (and the request given up)
        try:
            data = reply.finish(future)
        except asyncio.CancelledError:  # a task of the service, cancelled: we are stopping
            self.abort()
            return
        except Exception:  # the service answers failures itself; this is a bug
            self._log.exception("request failed; closing the connection")
            self.abort()
            return
        self._flush([data])
        self._drain_queue()

    def _drain_queue(self) -> None:
        """Serve queued requests after a waiting one finished."""
        if self._queue:
            records = list(self._queue)
            self._queue.clear()
            self._serve_now(records)
        if self._transport is None:
            return
        if not self._queue and not self._writing_paused:
            self._resume_reading()
        if self.closing:
            self._close_if_idle()

    def _flush(self, replies: list[bytes]) -> None:
        if replies and self._transport is not None:
            self._transport.write(replies[0] if len(replies) == 1 else b"".join(replies))

    # -- flow control and deadlines -----------------------------------------------
    def _limit_read_ahead(self) -> None:
        if len(self._queue) >= self._max_pipelined:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._paused_reading and self._transport is not None:
            self._paused_reading = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self._transport is not None:
            self._paused_reading = False
            self._transport.resume_reading()

    def _watch_partial_request(self) -> None:
        """A request has begun but not ended: it must end within the deadline."""
        if self._writing_paused:
            return
        if self._decoder.pending:
            self._arm_deadline()
        else:
            self._cancel_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._timeout, self._deadline_expired)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_expired(self) -> None:
        self._deadline = None
        what = "taking replies" if self._writing_paused else "sending a request"
        self._log.warning("closing connection: client stalled %s for %.3g s", what, self._timeout)
        self.abort()

    # -- closing ------------------------------------------------------------------
    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close_when_idle(self) -> None:
        """For a stopping server: close as soon as no request is in flight."""
        self.closing = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self.busy and not self._decoder.pending:
            self._close()
