"""Connections to SQL servers: bounded, shared, recycled, with Postfix's host failover.

Postfix keeps one connection per table in each process and fails over between
the ``hosts`` of the .cf file: hosts with an open connection first, UNIX
sockets before TCP before URIs, random among equals; a host that fails (to
connect or to answer) is skipped for ``retry_interval`` seconds and the same
lookup goes on to the next host; a connection idle for ``idle_interval``
seconds is closed. A single host is listed twice, so one failure is followed
by an immediate reconnect (a restarted server goes unnoticed); here, once
that reconnect succeeds, both entries count as up again.

One pyproxymap answers for every Postfix process at once, so a table's
connections form a pool instead, shared by every open table with the same
connection settings:

- at most ``max_connections`` connections, counted from the start of a connect
  to the end of a close, so the server never sees more; a lookup that finds
  them all busy waits in line at most ``pool_wait`` seconds;
- a backend that pipelines (pgsql: ``Backend.depth`` > 1) lets a lookup that may
  share (``query(shared=True)``) take a seat on the least busy connection in use,
  unless the backend says its oldest query has stalled; a connection that fails or
  is given up on takes no new lookups and closes when its last user leaves;
- every lookup has a deadline (``timeout``): past it the lookup is RETRY at
  once, and the query, cancelled, ends and closes its connection on its own
  while still holding its place in the count;
- a connection idle for ``idle_interval`` seconds or older than
  ``MAX_LIFETIME`` is closed; one that sat idle for ``CHECK_AFTER`` seconds is
  pinged before it is used, and dropped if the server went away;
- when every host is in its ``retry_interval``, Postfix answers RETRY without
  trying until an interval ends (60 s by default); we let one lookup try the
  host that failed first once the shared :class:`~..backoff.Backoff` allows
  (0.05 s after a failure, doubling to 0.5 s), so a server that comes back is
  used again within a second while a dead one sees a few attempts per second.

Any failure is RETRY to the client (never "not found"), with a log line that
names the table, the host and the cause; host labels never show a password.
"""

from __future__ import annotations

import asyncio
import random
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Hashable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from logging import Logger
from typing import Any, ClassVar, Generic, TypeVar

from ..backoff import Backoff
from ..base import TableError, TableRetry
from .query import Quote, Rows

C = TypeVar("C")
T = TypeVar("T")

#: Seconds a connection lives at most (PgBouncer's server_lifetime default).
MAX_LIFETIME = 3600.0
#: Seconds idle after which a connection is pinged before it is used.
CHECK_AFTER = 1.0

#: Kinds of host, in the order Postfix prefers them.
UNIX, INET, URI = 0, 1, 2

#: Builds the query once the connection's quoting is known; None: nothing to ask.
SqlFor = Callable[[Quote], bytes | None]


class ConnectFailed(Exception):
    """No connection could be made to a host; ``str()`` is the cause."""


class QueryFailed(Exception):
    """The query failed on a connection; ``str()`` is the cause. As in Postfix, the
    host is then skipped for ``retry_interval`` and the lookup tries the next one."""


@dataclass(eq=False)
class Host(Generic[T]):
    """One entry of ``hosts`` and its failover state."""

    label: str  # as logged: as written, without any password
    kind: int  # UNIX, INET or URI
    target: T  # what the backend connects to
    failed_until: float | None = None  # loop time until which it is skipped
    cause: str = ""  # why it failed last
    conns: int = 0  # connections open to it (Postfix's "active" host)


class Backend(ABC, Generic[C]):
    """What a database driver supplies to the pool."""

    name: ClassVar[str]  # "pgsql", as in Postfix's log lines
    what: ClassVar[str] = "server"  # what a host is, in log lines
    #: Lookups one connection may carry at once (pipelined); 1: one at a time.
    depth: ClassVar[int] = 1

    @abstractmethod
    async def connect(self, host: Host[Any]) -> C:
        """A new connection; ConnectFailed when the host cannot be used."""

    @abstractmethod
    def query(self, conn: C, sql_for: SqlFor) -> Awaitable[Rows]:
        """Quote and run the query; QueryFailed, or a TableError for this lookup only.

        A coroutine, run as a task, or a future, whose cancel() may let it end later:
        the connection keeps its place in the count until it has."""

    def stalled(self, conn: C) -> bool:
        """Whether a connection in use should take no more lookups: its oldest query
        has run for a while, and lookups sent after it would wait behind it."""
        return False

    @abstractmethod
    def ping(self, conn: C) -> Awaitable[object]:
        """Raise QueryFailed when the connection no longer works (as query())."""

    @abstractmethod
    def close(self, conn: C) -> None:
        """Close now, without waiting for the server."""

    def shutdown(self) -> None:
        """Release what the backend holds besides connections (threads)."""


@dataclass(eq=False, slots=True)
class _Conn(Generic[C]):
    raw: C
    host: Host[Any]
    born: float
    used: float
    users: int = 0  # seats taken: one per shared lookup, the backend's depth for one alone
    broken: bool = False  # to be closed when its last user leaves


#: What a waiter in line gets when its wait is over (``pool_wait`` or the deadline).
_TIMED_OUT: Any = object()


def _wake(waiter: asyncio.Future[Any], *_: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class _Lookup(asyncio.Future[T]):
    """One lookup's query, from the wait for a connection to the answer, with failover
    to the next host, the deadline, and cancel() to give it up. The pool's bookkeeping
    (seats, releases, failed hosts) stays in the pool."""

    __slots__ = (
        "_conn",
        "_finish",
        "_pool",
        "_seats",
        "_sql_for",
        "_table",
        "_timeout",
        "_tried",
        "_waiting",
        "_work",
        "deadline",
    )

    def __init__(
        self,
        pool: Pool[Any],
        table: str,
        sql_for: SqlFor,
        deadline: float,
        timeout: float,
        seats: int,
        finish: Callable[[Rows], T],
    ) -> None:
        assert pool._loop is not None
        super().__init__(loop=pool._loop)
        self._pool = pool
        self._table = table
        self._sql_for = sql_for
        self.deadline = deadline  # loop time
        self._timeout = timeout
        self._seats = seats
        self._finish = finish
        self._tried: set[Host[Any]] = set()
        self._conn: _Conn[Any] | None = None
        self._work: asyncio.Future[Rows] | None = None  # the query on self._conn
        self._waiting: asyncio.Task[None] | None = None  # for a connection

    def wait_for_connection(self) -> None:
        self._waiting = self.get_loop().create_task(self._acquire())

    async def _acquire(self) -> None:
        try:
            conn = await self._pool._acquire(self._table, self.deadline, self._tried, self._seats)
        except asyncio.CancelledError:
            return  # given up: cancel() ended the lookup
        except BaseException as e:
            self._waiting = None
            if not self.done():
                self.set_exception(e)
            return
        self._waiting = None
        try:
            self.send(conn)
        except Exception as e:  # a bug, but the client gets RETRY rather than no answer
            if not self.done():
                self.set_exception(e)

    def send(self, conn: _Conn[Any]) -> None:
        """Run the query on ``conn``, whose seats are taken for us."""
        try:
            work = self._pool.backend.query(conn.raw, self._sql_for)
        except Exception as e:  # a driver's bug: RETRY for this lookup, not no answer ever
            conn.broken = True
            self._pool._release(conn, self._seats)
            self.set_exception(e)
            return
        if not isinstance(work, asyncio.Future):
            work = asyncio.ensure_future(work)
        self._conn, self._work = conn, work
        if work.done():
            self._answered(work)
            return
        self._pool._watch(self)
        work.add_done_callback(self._answered)

    def _answered(self, work: asyncio.Future[Rows]) -> None:
        if work is not self._work:  # given up on after it ended: _give_up() released it
            return
        conn, pool, seats = self._conn, self._pool, self._seats
        assert conn is not None
        pool._unwatch(self)
        self._conn = self._work = None
        if work.cancelled():  # not by us (cancel() stops listening first)
            conn.broken = True
            pool._release(conn, seats)
            self.set_exception(TableRetry(f"{self._table}: {pool._where(conn.host)}: cancelled"))
            return
        error = work.exception()
        if error is None:
            pool._release(conn, seats)
            try:
                value = self._finish(work.result())
            except BaseException as e:
                self.set_exception(e)
            else:
                self.set_result(value)
        elif isinstance(error, QueryFailed):
            conn.broken = True
            pool._release(conn, seats)
            pool._warn_host_failed(self._table, "query failed on", conn.host, str(error))
            self._tried.add(conn.host)
            self.wait_for_connection()  # on the next host
        elif isinstance(error, TableError):
            pool._release(conn, seats)
            where = pool._where(conn.host)
            failed = type(error)(f"{self._table}: {where}: {error}")
            failed.__cause__ = error
            self.set_exception(failed)
        else:
            conn.broken = True
            pool._release(conn, seats)
            self.set_exception(error)

    def expired(self) -> None:
        """The deadline passed with the query in flight."""
        conn, work = self._conn, self._work
        assert conn is not None and work is not None
        if work.done():  # the answer came in this same pass: _answered() delivers it
            return
        self._give_up()
        cause = f"query timed out after {self._timeout:g} s"
        self._pool._host_failed(conn.host, cause)
        self.set_exception(TableRetry(f"{self._table}: {self._pool._where(conn.host)}: {cause}"))

    def _give_up(self) -> None:
        """Stop listening to the query in flight and cancel it: its connection, broken,
        keeps its seats until the query has ended. (If it has just ended, the
        _answered() already on its way finds it given up and does nothing.)"""
        conn, work, seats = self._conn, self._work, self._seats
        assert conn is not None and work is not None
        self._pool._unwatch(self)
        self._conn = self._work = None
        work.remove_done_callback(self._answered)
        work.cancel()
        conn.broken = True
        self._pool._later(work, lambda _: self._pool._release(conn, seats))

    def cancel(self, msg: Any = None) -> bool:
        if not self.done():
            if self._waiting is not None:
                self._waiting.cancel()
                self._waiting = None
            if self._work is not None:
                self._give_up()
        # Done already: False, and, as for any future, a failure nobody will ask for
        # is not logged as never retrieved (the client went away as it came).
        return super().cancel(msg)


class Pool(Generic[C]):
    """Connections to one set of hosts, shared by every table with the same settings."""

    def __init__(
        self,
        backend: Backend[C],
        hosts: list[Host[Any]],
        log: Logger,
        *,
        size: int,
        wait: float,
        idle: float,
        retry_interval: float,
    ) -> None:
        self.backend = backend
        self.hosts = hosts
        self.size = max(1, size)
        self._log = log
        self._wait = wait
        self._max_idle = idle
        self._retry_interval = retry_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._depth = max(1, backend.depth)
        self._idle: list[_Conn[C]] = []
        self._busy: set[_Conn[C]] = set()  # connections with a user
        self._waiters: deque[tuple[asyncio.Future[_Conn[C] | None], int]] = deque()
        self._live = 0  # slots in use: connections open, being opened or being closed
        self._pending: set[asyncio.Future[Any]] = set()  # abandoned work, ending on its own
        self._closed = False
        self._backoff = Backoff()  # paces attempts while every host is down
        # One timer for every idle connection: it fires at the earliest idle or age limit.
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        # One timer for the deadlines of every query in flight, at the earliest (a timer
        # per query cost about 3 % of a lookup's CPU).
        self._in_flight: dict[_Lookup[Any], None] = {}  # an ordered set
        self._deadlines: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0

    def query(
        self,
        table: str,
        sql_for: SqlFor,
        timeout: float,
        shared: bool,
        finish: Callable[[Rows], T],
    ) -> asyncio.Future[T]:
        """``finish`` of the rows the query returns, from the first host that answers;
        TableRetry when none does by the deadline. ``table`` names the table in log
        lines. ``shared``: the query may run on a connection that carries other lookups'
        queries (when the backend pipelines them); otherwise it has its connection to
        itself. Cancelling the future gives the lookup up.

        A connection ready for the query (idle and recently used, or a seat on one in
        use) gets it at once, and callbacks carry the answer back: no task, no
        coroutine. Otherwise a task waits for a connection, then sends it the same way."""
        loop = self._bind()
        seats = 1 if shared else self._depth
        lookup = _Lookup(self, table, sql_for, loop.time() + timeout, timeout, seats, finish)
        conn = self._ready(seats)
        if conn is None:
            lookup.wait_for_connection()
        else:
            lookup.send(conn)
        return lookup

    def _watch(self, lookup: _Lookup[Any]) -> None:
        """Mind the deadline of a query sent (until _unwatch())."""
        self._in_flight[lookup] = None
        if self._deadlines is None or lookup.deadline < self._deadline_at:
            self._deadlines_at(lookup.deadline)

    def _unwatch(self, lookup: _Lookup[Any]) -> None:
        # The timer stays: when it fires it finds what is still in flight.
        self._in_flight.pop(lookup, None)  # None: answered before it was watched

    def _deadlines_at(self, when: float) -> None:
        assert self._loop is not None
        if self._deadlines is not None:
            self._deadlines.cancel()
        self._deadline_at = when
        self._deadlines = self._loop.call_at(when, self._deadlines_passed)

    def _deadlines_passed(self) -> None:
        """Time out the queries past their deadline; wait for the next deadline."""
        assert self._loop is not None
        now = max(self._loop.time(), self._deadline_at)  # a timer may fire a little early
        self._deadlines = None
        for lookup in [q for q in self._in_flight if q.deadline <= now]:
            lookup.expired()
        if self._in_flight:
            self._deadlines_at(min(q.deadline for q in self._in_flight))

    def _where(self, host: Host[Any]) -> str:
        return f"{self.backend.name} {self.backend.what} {host.label}"

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests): old connections are unusable
            for conn in self._idle:
                self._close(conn)
            self._loop, self._idle, self._waiters, self._live = loop, [], deque(), 0
            self._busy, self._sweeper = set(), None
            self._in_flight, self._deadlines = {}, None
            self._pending.clear()
            for host in self.hosts:
                host.conns = 0
        return loop

    async def _settle(self, task: asyncio.Future[T], until: float) -> T:
        """The task's result by ``until``. Otherwise cancel it and raise TimeoutError
        (CancelledError when we are cancelled): the caller leaves it to end on its own.

        One future and one timer, woken by whichever comes first: asyncio.wait()
        would cost twice as much, and the task must outlive the wait."""
        if not task.done():
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            wake = partial(_wake, waiter)
            task.add_done_callback(wake)
            timer = self._loop.call_at(until, _wake, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                timer.cancel()
                task.remove_done_callback(wake)
                task.cancel()
                raise
            timer.cancel()
            if not task.done():
                task.remove_done_callback(wake)
                task.cancel()
                raise TimeoutError
        return task.result()

    def _later(self, task: asyncio.Future[T], cleanup: Callable[[asyncio.Future[T]], None]) -> None:
        """Run ``cleanup`` when an abandoned task ends; keep it referenced until then."""

        def done(finished: asyncio.Future[T]) -> None:
            self._pending.discard(finished)
            if not finished.cancelled():
                finished.exception()  # retrieved: nobody else will
            cleanup(finished)

        self._pending.add(task)
        task.add_done_callback(done)

    # --- getting a connection ---------------------------------------------------------

    async def _acquire(
        self, table: str, deadline: float, tried: set[Host[Any]], seats: int
    ) -> _Conn[C]:
        """A connection with ``seats`` taken: an idle one, a new one while the bound
        allows, a seat on one in use (``seats`` 1, a pipelining backend), or the first
        that comes free."""
        assert self._loop is not None
        while self._idle:
            conn = self._idle.pop()
            if not self._reusable(conn) or conn.host in tried:
                self._dispose(conn)
            elif self._loop.time() - conn.used < CHECK_AFTER or await self._alive(
                table, conn, deadline
            ):
                return self._take(conn, seats)
        if self._live < self.size:
            self._live += 1
            return self._take(await self._open(table, deadline, tried), seats)
        if seats < self._depth and not self._waiters:  # else: behind those in line
            conn = self._sharable(tried)
            if conn is not None:
                conn.users += seats
                return conn
        return await self._wait_for_slot(table, deadline, tried, seats)

    def _ready(self, seats: int) -> _Conn[C] | None:
        """A connection that takes the lookup now, without waiting or a health check: the
        connection idle the shortest while (if recently used), else, when no connection
        may be opened and nobody waits in line, a seat on one in use. None: _acquire()."""
        assert self._loop is not None
        if self._idle:
            conn = self._idle[-1]
            if self._loop.time() - conn.used >= CHECK_AFTER or not self._reusable(conn):
                return None
            return self._take(self._idle.pop(), seats)
        if self._live < self.size or seats == self._depth or self._waiters:
            return None
        conn = self._sharable(())
        if conn is not None:
            conn.users += seats
        return conn

    def _take(self, conn: _Conn[C], seats: int) -> _Conn[C]:
        conn.users = seats
        self._busy.add(conn)
        return conn

    def _sharable(self, tried: Collection[Host[Any]]) -> _Conn[C] | None:
        """The least used connection that can take one more lookup, if any."""
        best = None
        for conn in self._busy:
            if (
                conn.users < self._depth
                and (best is None or conn.users < best.users)
                and not conn.broken
                and conn.host not in tried
                and self._reusable(conn)
                and not self.backend.stalled(conn.raw)
            ):
                best = conn
        return best

    async def _alive(self, table: str, conn: _Conn[C], deadline: float) -> bool:
        """Ping a connection that sat idle; False (and it is gone) when that fails."""
        task = asyncio.ensure_future(self.backend.ping(conn.raw))
        try:
            await self._settle(task, deadline)
        except (TimeoutError, asyncio.CancelledError) as e:
            self._later(task, lambda _: self._dispose(conn))
            if isinstance(e, asyncio.CancelledError):
                raise
            cause = "no answer to a health check"
            self._host_failed(conn.host, cause)
            raise TableRetry(f"{table}: {self._where(conn.host)}: {cause}") from None
        except QueryFailed:
            self._dispose(conn)
            return False
        except BaseException:
            self._dispose(conn)
            raise
        return True

    async def _wait_for_slot(
        self, table: str, deadline: float, tried: set[Host[Any]], seats: int
    ) -> _Conn[C]:
        """Wait in line for a connection someone releases (its seats already taken for
        us), or for a free slot."""
        assert self._loop is not None
        waiter: asyncio.Future[_Conn[C] | None] = self._loop.create_future()
        entry = (waiter, seats)
        self._waiters.append(entry)
        started = self._loop.time()
        timer = self._loop.call_at(min(deadline, started + self._wait), _time_out, waiter)
        try:
            given = await waiter
        except BaseException:
            timer.cancel()
            late = waiter.result() if waiter.done() and not waiter.cancelled() else _TIMED_OUT
            if late is _TIMED_OUT:
                with suppress(ValueError):
                    self._waiters.remove(entry)
            elif late is None:  # handed over just too late
                self._free_slot()
            else:
                self._release(late, seats)
            raise
        timer.cancel()
        if given is _TIMED_OUT:
            with suppress(ValueError):
                self._waiters.remove(entry)
            waited = self._loop.time() - started
            raise TableRetry(
                f"{table}: no free {self.backend.name} connection after {waited:.3g} s "
                f"({self.size} in use)"
            )
        if given is not None:
            if given.host not in tried:
                return given
            if given.users > seats:  # others use it: give our seat back, wait again
                self._release(given, seats)
                return await self._wait_for_slot(table, deadline, tried, seats)
            given.users = 0
            self._busy.discard(given)
            self._close(given)  # keep its slot for a new connection
        return self._take(await self._open(table, deadline, tried), seats)

    async def _open(self, table: str, deadline: float, tried: set[Host[Any]]) -> _Conn[C]:
        """Connect in a slot already counted; the slot is freed when this fails, or
        stays with a connect attempt that is left to end on its own."""
        assert self._loop is not None
        while True:
            try:
                host = self._pick(table, tried)
            except BaseException:
                self._free_slot()
                raise
            task = asyncio.ensure_future(self.backend.connect(host))
            try:
                raw = await self._settle(task, deadline)
            except (TimeoutError, asyncio.CancelledError) as e:
                self._later(task, self._connect_abandoned)
                if isinstance(e, asyncio.CancelledError):
                    raise
                self._host_failed(host, "connection timed out")
                raise TableRetry(f"{table}: connect to {self._where(host)}: timed out") from None
            except ConnectFailed as e:
                self._warn_host_failed(table, "connect to", host, str(e))
                tried.add(host)
                continue
            except BaseException:
                self._free_slot()
                raise
            now = self._loop.time()
            for same in self.hosts:  # a server listed twice answers for both entries
                if same.target == host.target:
                    same.failed_until, same.cause = None, ""
            host.conns += 1
            self._backoff.succeeded()
            return _Conn(raw, host, now, now)

    def _connect_abandoned(self, task: asyncio.Future[C]) -> None:
        """A connect we stopped waiting for ended: close what it made, free its slot."""
        if not task.cancelled() and task.exception() is None:
            with suppress(Exception):
                self.backend.close(task.result())
        self._free_slot()

    def _pick(self, table: str, tried: set[Host[Any]]) -> Host[Any]:
        """The host to connect to next, chosen as Postfix's dict_*_get_active() does."""
        assert self._loop is not None
        if self._closed:
            raise TableRetry(f"{table}: the table was closed")
        now = self._loop.time()
        usable = [
            h
            for h in self.hosts
            if h not in tried and (h.failed_until is None or h.failed_until < now)
        ]
        if usable:
            choice = [h for h in usable if h.conns and h.failed_until is None] or usable
            best = min(h.kind for h in choice)
            return random.choice([h for h in choice if h.kind == best])
        if tried or self._backoff.blocked() is not None:
            causes = "; ".join(dict.fromkeys(f"{h.label}: {h.cause}" for h in self.hosts))
            what = f"{self.backend.name} {self.backend.what}"
            raise TableRetry(f"{table}: no {what} available ({causes})")
        # Every host is in its retry interval: try the one whose interval ends first.
        return min(self.hosts, key=lambda h: h.failed_until or 0.0)

    # --- giving connections back --------------------------------------------------------

    def _reusable(self, conn: _Conn[C]) -> bool:
        assert self._loop is not None
        return (
            not self._closed
            and conn.host.failed_until is None
            and self._loop.time() - conn.born < MAX_LIFETIME
        )

    def _release(self, conn: _Conn[C], seats: int) -> None:
        """A lookup gives its seats back: to the lookups waiting in line, else the
        connection goes idle once its last user leaves (closed, if it cannot be reused)."""
        assert self._loop is not None
        conn.users -= seats
        conn.used = self._loop.time()
        if conn.broken or not self._reusable(conn):
            conn.broken = True
            if not conn.users:
                self._busy.discard(conn)
                self._dispose(conn)
            return
        waiters = self._waiters
        while waiters and conn.users < self._depth:
            waiter, wanted = waiters[0]
            if waiter.done():
                waiters.popleft()
            elif conn.users and conn.users + wanted > self._depth:
                break  # it needs the connection to itself: it keeps its place in line
            else:
                waiters.popleft()
                conn.users += wanted
                waiter.set_result(conn)
        if conn.users:
            return
        self._busy.discard(conn)
        self._idle.append(conn)
        expires = self._expires(conn)
        if self._sweeper is None or expires < self._sweep_at:
            self._sweep_after(expires)

    def _expires(self, conn: _Conn[C]) -> float:
        """When an idle connection reaches its idle or age limit."""
        return min(conn.used + self._max_idle, conn.born + MAX_LIFETIME)

    def _sweep_after(self, when: float) -> None:
        assert self._loop is not None
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = when
        self._sweeper = self._loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        """Close the idle connections that reached their limit; wait for the next one."""
        assert self._loop is not None
        now = max(self._loop.time(), self._sweep_at)  # a timer may fire a little early
        self._sweeper = None
        expired = [c for c in self._idle if self._expires(c) <= now]
        if expired:
            self._idle = [c for c in self._idle if c not in expired]
            for conn in expired:
                self._dispose(conn)
        if self._idle:
            self._sweep_after(min(self._expires(c) for c in self._idle))

    def _close(self, conn: _Conn[C]) -> None:
        """Close a connection but keep its slot."""
        conn.host.conns -= 1
        with suppress(Exception):  # a connection of a closed event loop, say
            self.backend.close(conn.raw)

    def _dispose(self, conn: _Conn[C]) -> None:
        self._close(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter, still counted
                return
        self._live -= 1

    def _host_failed(self, host: Host[Any], cause: str) -> None:
        """Skip the host for retry_interval and close its idle connections."""
        assert self._loop is not None
        host.failed_until = self._loop.time() + self._retry_interval
        host.cause = cause
        self._backoff.failed(cause)
        for conn in [c for c in self._idle if c.host is host]:
            self._idle.remove(conn)
            self._dispose(conn)

    def _warn_host_failed(self, table: str, what: str, host: Host[Any], cause: str) -> None:
        self._log.warning("%s: %s %s: %s", table, what, self._where(host), cause)
        self._host_failed(host, cause)

    def stats(self) -> dict[str, int]:
        return {
            "pool_in_use": self._live - len(self._idle),
            "pool_idle": len(self._idle),
            "pool_waiting": sum(not w.done() for w, _ in self._waiters),
        }

    def close(self) -> None:
        """Close idle connections now, busy ones when their lookup ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._idle:
            self._dispose(conn)
        self._idle.clear()
        self.backend.shutdown()


_lock = threading.Lock()  # tables are opened in worker threads
_shared: dict[Hashable, tuple[Pool[Any], int]] = {}


def share(key: Hashable, make: Callable[[], Pool[Any]]) -> Pool[Any]:
    """The pool for ``key`` (every setting that makes connections differ), made by
    ``make`` for its first user; release it with :func:`unshare`."""
    with _lock:
        pool, users = _shared.get(key, (None, 0))
        if pool is None:
            pool = make()
        _shared[key] = (pool, users + 1)
        return pool


def unshare(key: Hashable) -> None:
    """One table stopped using the pool for ``key``; the last one closes it."""
    with _lock:
        pool, users = _shared[key]
        if users > 1:
            _shared[key] = (pool, users - 1)
            return
        del _shared[key]
    pool.close()
