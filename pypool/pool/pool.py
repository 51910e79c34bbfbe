"""A pool of connections to one PostgreSQL server for one (database, user).

Idle connections are reused last-in first-out, so the warm ones stay warm
and the surplus ages out through ``idle_timeout``. Clients that find the
pool full wait in FIFO order; a released connection goes straight to the
longest waiter. ``size`` counts connections open *and* being opened, so the
limit holds even while connects are in flight.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pypool import sqlstates
from pypool.pool.connect import open_connection
from pypool.pool.errors import HealthCheckFailed, PoolClosing, PoolRetired, PoolTimeout  # imported from here too
from pypool.pool.server import IDLE, TESTED, Credentials, ServerConnection, ServerError

if TYPE_CHECKING:
    from pypool.config import ServerAddress

log = logging.getLogger("pypool.pool")

_IDLE = ord("I")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    pool_size: int
    min_pool_size: int
    connect_timeout: float  # seconds
    checkout_timeout: float
    idle_timeout: float  # 0 = never
    server_lifetime: float  # 0 = never
    application_name: str = "pypool"
    # PgCat's healthcheck_delay: an idle connection unused for longer is checked
    # with ``;`` (within healthcheck_timeout) before a client gets it. 0 = always.
    healthcheck_delay: float = float("inf")
    healthcheck_timeout: float = 1.0
    tls: ssl.SSLContext | None = None  # server_tls: encrypt connections to PostgreSQL
    statement_timeout: int = 0  # ms, the user's statement_timeout: a session default on every connection


class CallbackWaiter:
    """A client waiting in ``ServerPool.waiters`` to be called back, not awoken.

    Under contention most transactions wait for a connection, and a Future with
    a coroutine and a timeout per wait cost more than the transaction itself.
    This waiter quacks like the Futures it queues with (done, cancelled,
    exception, set_result, set_exception), so the pool serves both kinds in one
    FIFO order. Callbacks run via ``call_soon``: the releasing code path is
    never re-entered by the next client's request. It has no timer of its own:
    the pool's single ``_expire_waiters`` timer follows the oldest waiter.
    """

    __slots__ = ("pool", "on_ready", "on_error", "started", "deadline", "_done", "_loop")

    def __init__(self, pool: "ServerPool", on_ready: "Callable[[ServerConnection], None]",
                 on_error: "Callable[[Exception], None]", loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.on_ready = on_ready
        self.on_error = on_error
        self.started = time.monotonic()
        self.deadline = self.started + pool.settings.checkout_timeout
        self._done = False
        self._loop = loop

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self) -> None:
        return None

    def cancel(self) -> None:
        """The client went away: skip this waiter (it stays queued until popped)."""
        self._done = True

    def set_result(self, conn: ServerConnection) -> None:
        self._done = True
        stats = self.pool.stats
        waited = time.monotonic() - self.started
        stats.checkouts += 1
        stats.checkout_wait_time += waited
        stats.wait_hist_sum += waited  # PoolStats.observe_wait, inlined: every queued checkout passes here
        stats.wait_hist[bisect_left(WAIT_BUCKETS, waited)] += 1
        self._loop.call_soon(self.on_ready, conn)

    def set_exception(self, exc: Exception) -> None:
        self._done = True
        self.pool.stats.checkout_wait_time += time.monotonic() - self.started
        self._loop.call_soon(self.on_error, exc)

    def time_out(self) -> None:
        self._done = True
        pool = self.pool
        pool.stats.checkout_timeouts += 1
        pool.stats.checkout_wait_time += time.monotonic() - self.started
        self._loop.call_soon(self.on_error, pool.timeout_error())


# Fixed histogram bounds (seconds) for transaction time and checkout wait; the
# hot path only bumps one slot of an int list (the last slot is +Inf).
XACT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class PoolStats:
    """Plain counters, read by the admin console and metrics at scrape time."""

    checkouts: int = 0
    checkout_waits: int = 0
    checkout_wait_time: float = 0.0  # seconds, failed and paused waits included
    checkout_timeouts: int = 0
    connects: int = 0
    connect_errors: int = 0
    closed_dirty: int = 0
    healthchecks: int = 0  # pre-checkout checks of connections idle past healthcheck_delay
    healthcheck_failures: int = 0
    # Totals of connections that have ended (live ones are added at read time).
    query_count: int = 0
    xact_count: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    # Timed transactions (see ServerConnection._relay) and waits that
    # went through the slow path; immediate checkouts are zero-second waits.
    xact_time: float = 0.0
    # Requests timed from first message to last reply (ServerConnection._request_done), seconds.
    query_time: float = 0.0
    queries_timed: int = 0
    # Named prepared statements in transaction mode (pypool/session/prepared.py), as PgBouncer counts them.
    client_parse_count: int = 0
    server_parse_count: int = 0
    bind_count: int = 0
    xact_hist: list[int] = field(default_factory=lambda: [0] * (len(XACT_BUCKETS) + 1))
    wait_hist: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    wait_hist_sum: float = 0.0

    def observe_xact(self, seconds: float) -> None:
        self.xact_time += seconds
        self.xact_hist[bisect_left(XACT_BUCKETS, seconds)] += 1

    def observe_wait(self, seconds: float) -> None:
        self.wait_hist_sum += seconds
        self.wait_hist[bisect_left(WAIT_BUCKETS, seconds)] += 1


def startup_parameters(settings: PoolSettings) -> dict[str, str]:
    """What a pool's server connections are started with."""
    params = {"application_name": settings.application_name}
    if settings.statement_timeout:
        # PostgreSQL itself cancels the statement (57014) and keeps the session;
        # a reset (DISCARD ALL) returns to this value, not to 0.
        params["statement_timeout"] = str(settings.statement_timeout)
    return params


def _handed_over(fut: "asyncio.Future[ServerConnection]") -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


class ServerPool:
    def __init__(self, address: "ServerAddress", credentials: Credentials, settings: PoolSettings) -> None:
        self.address = address
        self.credentials = credentials
        self.settings = settings
        self._check_after = settings.healthcheck_delay  # read on every checkout
        self.idle: collections.deque[ServerConnection] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[ServerConnection] | CallbackWaiter] = collections.deque()
        self._expiry_timer: asyncio.TimerHandle | None = None  # for the oldest CallbackWaiter
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, once a client waited
        self.size = 0  # open + opening
        self.active = 0  # checked out
        self.stats = PoolStats()
        self.closing = False
        self.retired = False  # replaced by a config reload: draining
        # Health, as the group's monitor and checkouts see it.
        self.healthy = True
        self.in_recovery: bool | None = None
        self.lag_ms: float | None = None
        self.banned_until = 0.0
        self.ban_reason = ""
        self.bans = 0
        self.last_error = ""
        self.banned_at = 0.0  # wall-clock time of the current ban (SHOW BANS)
        self.ban_duration = 0.0  # seconds
        self.paused = False  # admin PAUSE: no checkout until RESUME (connections in use carry on)
        self._resumed = asyncio.Event()
        self.connections: set[ServerConnection] = set()  # open ones (SHOW SERVERS); each leaves as it ends
        self._maintenance: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self._stopping: list[asyncio.Task[None]] = []  # cancelled by ``close``

    @property
    def label(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def __repr__(self) -> str:
        return f"<ServerPool {self.label} size={self.size} idle={len(self.idle)} waiting={len(self.waiters)}>"

    # ----------------------------------------------------------------- checkout

    def try_acquire(self) -> ServerConnection | None:
        """Check out an idle connection without waiting, or return None."""
        idle = self.idle
        if self.waiters or not idle or self.paused:
            return None  # FIFO: those already waiting go first
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or now >= conn.expires_at:
                self._discard(conn)
                continue
            if now - conn.last_used > self._check_after:
                idle.append(conn)  # idle too long: ``acquire`` health-checks it first
                return None
            conn.state = TESTED
            self.active += 1
            self.stats.checkouts += 1
            return conn
        return None

    async def acquire(self, in_transaction: bool = False) -> ServerConnection:
        """A connection, waiting if need be; when closing only for ``in_transaction`` clients (BEGIN held)."""
        while self.paused and not self.closing:
            started = time.monotonic()
            self._resumed.clear()
            try:
                await self._resumed.wait()
            finally:
                self.stats.checkout_wait_time += time.monotonic() - started
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if self.closing:
            if self.retired:
                raise PoolRetired(self.label)
            if not in_transaction:
                raise PoolClosing(self.label)
        if self.idle and not self.waiters and not self.paused:
            return await self._checked_idle()
        if self.size < self.settings.pool_size and not self.waiters:
            self.size += 1
            started = time.monotonic()
            try:
                conn = await self._open()
            except BaseException:
                self.size -= 1
                self._serve_waiters_after_loss()
                raise
            waited = time.monotonic() - started
            self.stats.checkout_wait_time += waited
            self.stats.observe_wait(waited)
            self.active += 1
            self.stats.checkouts += 1
            return conn
        return await self._wait()

    async def _checked_idle(self) -> ServerConnection:
        """The newest idle connection, idle past healthcheck_delay, after a ``;`` round trip (PgCat's rule).
        On failure it and every connection idle as long (no fresher) close and HealthCheckFailed is raised:
        the group bans a replica and picks another server, or reconnects to the primary."""
        conn = self.idle.pop()
        conn.state = TESTED
        self.active += 1
        self.stats.checkouts += 1
        self.stats.healthchecks += 1
        try:
            async with asyncio.timeout(self.settings.healthcheck_timeout):  # wait_for could drop a cancel
                await conn.query(";")
        except (asyncio.TimeoutError, ServerError, OSError) as exc:
            reason = (f"timed out after {self.settings.healthcheck_timeout * 1000:.0f} ms"
                      if isinstance(exc, asyncio.TimeoutError) else str(exc))
            self.stats.healthcheck_failures += 1
            self.release_broken(conn)
            self._close_stale_idle()
            raise HealthCheckFailed(f"health check of an idle connection to {self.label} failed: {reason}",
                                    {"C": sqlstates.CONNECTION_FAILURE}) from None
        except BaseException:
            self.release_broken(conn)  # cancelled mid-check: its state is unknown
            raise
        return conn

    def _close_stale_idle(self) -> None:
        for conn in [c for c in self.idle if c.last_used < time.monotonic() - self.settings.healthcheck_delay]:
            self.idle.remove(conn)
            self._discard(conn)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    async def _wait(self) -> ServerConnection:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServerConnection] = loop.create_future()
        self.waiters.append(fut)
        self.stats.checkout_waits += 1
        started = time.monotonic()
        # Room may exist (a connect failed earlier): open one for this waiter.
        self._serve_waiters_after_loss()
        try:
            async with asyncio.timeout(self.settings.checkout_timeout):  # wait_for could drop a cancel (3.11)
                conn = await fut
        except asyncio.CancelledError:
            # The client went away while waiting; a connection handed over in that instant must not be lost.
            if _handed_over(fut):
                self.release(fut.result())
            raise
        except asyncio.TimeoutError:
            if not _handed_over(fut):
                self.stats.checkout_timeouts += 1
                raise self.timeout_error() from None
            conn = fut.result()  # handed over as the timer fired
        finally:
            self.stats.checkout_wait_time += time.monotonic() - started
            if not fut.done() or fut.cancelled():
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
        self.stats.checkouts += 1
        self.stats.observe_wait(time.monotonic() - started)
        return conn

    def timeout_error(self) -> PoolTimeout:
        return PoolTimeout(
            f"no server connection to {self.label} became free within checkout_timeout "
            f"({self.settings.checkout_timeout * 1000:.0f} ms); all {self.settings.pool_size} "
            f"connections of pool_size are busy"
        )

    def queue(self, on_ready: "Callable[[ServerConnection], None]",
              on_error: "Callable[[Exception], None]") -> "CallbackWaiter | None":
        """Wait for a connection without a coroutine; None when only ``acquire`` can help.

        ``on_ready(conn)`` or ``on_error(exc)`` is called later from the event
        loop, never from inside this call. ``acquire`` is still needed while the
        pool is paused or closing, and for an idle connection due a health check.
        """
        if self.paused or self.closing or (self.idle and not self.waiters):
            return None
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = CallbackWaiter(self, on_ready, on_error, loop)
        self.waiters.append(waiter)
        self.stats.checkout_waits += 1
        if self._expiry_timer is None:
            self._expiry_timer = loop.call_at(waiter.deadline, self._expire_waiters)
        if self.size < self.settings.pool_size:
            self._serve_waiters_after_loss()  # room below pool_size: open one for it
        return waiter

    def _expire_waiters(self) -> None:
        """Time out the callback waiters past checkout_timeout, oldest first.

        One timer per pool, set for the oldest callback waiter, instead of one
        per wait. Futures queued by ``acquire`` time out by themselves.
        """
        self._expiry_timer = None
        now = time.monotonic()
        waiting = [w for w in self.waiters if type(w) is CallbackWaiter and not w._done]
        expired = [w for w in waiting if w.deadline <= now]
        for waiter in expired:
            waiter.time_out()
        if expired:
            # Dropped here rather than skipped at release: also the clients that went away.
            self.waiters = collections.deque(w for w in self.waiters if not (type(w) is CallbackWaiter and w._done))
        remaining = [w.deadline for w in waiting if w.deadline > now]
        if remaining:
            self._expiry_timer = asyncio.get_running_loop().call_at(min(remaining), self._expire_waiters)

    async def _open(self) -> ServerConnection:
        self.stats.connects += 1
        try:
            conn = await open_connection(
                self.address, self.credentials, startup_parameters(self.settings),
                self.settings.connect_timeout, tls=self.settings.tls,
            )
        except ServerError:
            self.stats.connect_errors += 1
            raise
        conn.pool = self
        conn.state = TESTED  # logged in, not yet idle or a client's
        conn.on_lost = self._on_lost
        conn.stats = self.stats
        conn.listed_in = self.connections
        self.connections.add(conn)
        if self.settings.server_lifetime:
            conn.expires_at = conn.created_at + self.settings.server_lifetime
        conn.applied_parameters["application_name"] = self.settings.application_name
        return conn

    # ------------------------------------------------------------------ checkin

    def release(self, conn: ServerConnection) -> None:
        """Return a clean connection (status idle, no pending replies)."""
        conn.detach()
        self.active -= 1
        if conn.closed or self.closing or conn.requests.status != _IDLE:
            if not conn.closed and conn.requests.status != _IDLE:
                self.stats.closed_dirty += 1
            self._discard(conn)
            return
        if conn.last_used >= conn.expires_at:
            self._discard(conn)  # past server_lifetime
            return
        if not self.waiters:
            conn.state = IDLE
            self.idle.append(conn)
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(conn)
                return
        conn.state = IDLE
        self.idle.append(conn)

    def release_broken(self, conn: ServerConnection) -> None:
        """Drop a checked-out connection whose state cannot be trusted."""
        conn.detach()
        self.active -= 1
        self.stats.closed_dirty += 1
        self._discard(conn)

    def _discard(self, conn: ServerConnection) -> None:
        if conn.pool is self:
            conn.pool = None
            conn.on_lost = None
            self.size -= 1
        conn.close()
        self._serve_waiters_after_loss()

    def _on_lost(self, conn: ServerConnection) -> None:
        # The server closed an idle connection (restart, idle_session_timeout...).
        try:
            self.idle.remove(conn)
        except ValueError:
            pass  # checked out: the client side handles it through release_broken
        else:
            conn.pool = None
            self.size -= 1
            self._serve_waiters_after_loss()

    def _serve_waiters_after_loss(self) -> None:
        """Open connections for waiters while there is room below pool_size (closing: ``in_transaction`` ones)."""
        if self.size >= self.settings.pool_size:
            return  # full: nothing to open, however many wait (checked first: queue() calls this per wait)
        pending = sum(1 for f in self.waiters if not f.done())
        while pending > len(self._connecting) and self.size < self.settings.pool_size:
            self.size += 1
            task = asyncio.get_running_loop().create_task(self._open_for_waiter())
            self._connecting.add(task)
            task.add_done_callback(self._connect_for_waiter_done)

    def _connect_for_waiter_done(self, task: "asyncio.Task[None]") -> None:
        self._connecting.discard(task)
        if task.cancelled() or task.exception() is not None:
            self.size -= 1  # cancelled by ``close``, perhaps before it ran: or SHOW DATABASES counts it

    async def _open_for_waiter(self) -> None:
        try:
            conn = await self._open()
        except ServerError as exc:
            self.size -= 1
            log.warning("connect for waiting client failed: %s", exc)
            # Fail the first waiter with the reason rather than letting it time out blind.
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_exception(exc)
                    break
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(conn)
                return
        if self.closing:
            self._discard(conn)
            return
        conn.state = IDLE
        self.idle.append(conn)

    # -------------------------------------------------------------- maintenance

    def start(self) -> None:
        if self._maintenance is None:
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        while not self.closing:
            try:
                self._expire_idle()
                await self._fill_minimum()
            except Exception:  # noqa: BLE001 - maintenance must never die
                log.exception("pool %s maintenance failed", self.label)
            await asyncio.sleep(1.0)

    def _expire_idle(self) -> None:
        now = time.monotonic()
        s = self.settings
        keep: collections.deque[ServerConnection] = collections.deque()
        for conn in self.idle:
            too_old = s.server_lifetime and now - conn.created_at > s.server_lifetime
            too_idle = s.idle_timeout and now - conn.last_used > s.idle_timeout
            if conn.closed or too_old or (too_idle and self.size - 1 >= s.min_pool_size):
                conn.pool = None
                conn.on_lost = None
                self.size -= 1
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    async def _fill_minimum(self) -> None:
        while self.size < self.settings.min_pool_size and not self.closing:
            self.size += 1
            try:
                conn = await self._open()
            except BaseException as exc:
                self.size -= 1  # failed, or cancelled by ``close``: the place is free
                if not isinstance(exc, ServerError):
                    raise
                log.debug("min_pool_size connect to %s failed: %s", self.label, exc)
                return
            conn.state = IDLE
            self.idle.appendleft(conn)

    async def close(self) -> None:
        self.closing = True
        self._resumed.set()  # paused checkouts see ``closing`` and give up
        stopping = [*self._connecting] + ([self._maintenance] if self._maintenance is not None else [])
        for task in stopping:
            task.cancel()
        while self.idle:
            conn = self.idle.pop()
            conn.pool = None
            conn.on_lost = None
            self.size -= 1
            conn.close()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(PoolRetired(self.label) if self.retired else PoolClosing(self.label))
        self._stopping = stopping  # each gives its place in ``size`` back as it unwinds (wait_closed)

    async def wait_closed(self) -> None:
        """Until the connects ``close`` cancelled have unwound (the shutdown drain does not wait for them)."""
        await asyncio.gather(*self._stopping, return_exceptions=True)
