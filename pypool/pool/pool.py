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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pypool.pool.server import Credentials, ServerConnection, ServerError, open_connection
from pypool.protocol import messages as m

if TYPE_CHECKING:
    from pypool.config import ServerAddress

log = logging.getLogger("pypool.pool")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    pool_size: int
    min_pool_size: int
    connect_timeout: float  # seconds
    checkout_timeout: float
    idle_timeout: float  # 0 = never
    server_lifetime: float  # 0 = never
    application_name: str = "pypool"


class PoolTimeout(Exception):
    """No connection became free within checkout_timeout."""


@dataclass(slots=True)
class PoolStats:
    """Plain counters, read by the admin console and metrics at scrape time."""

    checkouts: int = 0
    checkout_waits: int = 0
    checkout_wait_time: float = 0.0
    checkout_timeouts: int = 0
    connects: int = 0
    connect_errors: int = 0
    closed_dirty: int = 0


class ServerPool:
    def __init__(self, address: "ServerAddress", credentials: Credentials, settings: PoolSettings) -> None:
        self.address = address
        self.credentials = credentials
        self.settings = settings
        self.idle: collections.deque[ServerConnection] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[ServerConnection]] = collections.deque()
        self.size = 0  # open + opening
        self.active = 0  # checked out
        self.stats = PoolStats()
        self.closing = False
        # Health, as the group's monitor and checkouts see it.
        self.healthy = True
        self.in_recovery: bool | None = None
        self.lag_ms: float | None = None
        self.banned_until = 0.0
        self.ban_reason = ""
        self.bans = 0
        self.last_error = ""
        self._maintenance: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[None]] = set()

    @property
    def label(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def __repr__(self) -> str:
        return f"<ServerPool {self.label} size={self.size} idle={len(self.idle)} waiting={len(self.waiters)}>"

    # ----------------------------------------------------------------- checkout

    def try_acquire(self) -> ServerConnection | None:
        """Check out an idle connection without waiting, or return None."""
        if self.waiters:
            return None  # FIFO: those already waiting go first
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if self._usable(conn, now):
                self.active += 1
                self.stats.checkouts += 1
                return conn
            self._discard(conn)
        return None

    async def acquire(self) -> ServerConnection:
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if self.closing:
            raise ServerError(f"pool for {self.label} is shutting down", {"C": m.SQLSTATE_ADMIN_SHUTDOWN})
        if self.size < self.settings.pool_size and not self.waiters:
            self.size += 1
            try:
                conn = await self._open()
            except BaseException:
                self.size -= 1
                self._serve_waiters_after_loss()
                raise
            self.active += 1
            self.stats.checkouts += 1
            return conn
        return await self._wait()

    async def _wait(self) -> ServerConnection:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServerConnection] = loop.create_future()
        self.waiters.append(fut)
        self.stats.checkout_waits += 1
        started = time.monotonic()
        # Room may exist (a connect failed earlier): open one for this waiter.
        self._serve_waiters_after_loss()
        try:
            conn = await asyncio.wait_for(fut, self.settings.checkout_timeout)
        except asyncio.CancelledError:
            # The client went away while waiting; a connection handed over in
            # the same instant must not be lost.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            raise
        except asyncio.TimeoutError:
            self.stats.checkout_timeouts += 1
            raise PoolTimeout(
                f"no server connection to {self.label} became free within checkout_timeout "
                f"({self.settings.checkout_timeout * 1000:.0f} ms); all {self.settings.pool_size} "
                f"connections of pool_size are busy"
            ) from None
        finally:
            self.stats.checkout_wait_time += time.monotonic() - started
            if not fut.done() or fut.cancelled():
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
        self.stats.checkouts += 1
        return conn

    async def _open(self) -> ServerConnection:
        self.stats.connects += 1
        try:
            conn = await open_connection(
                self.address, self.credentials, {"application_name": self.settings.application_name},
                self.settings.connect_timeout,
            )
        except ServerError:
            self.stats.connect_errors += 1
            raise
        conn.pool = self
        conn.on_lost = self._on_lost
        conn.applied_parameters["application_name"] = self.settings.application_name
        return conn

    # ------------------------------------------------------------------ checkin

    def release(self, conn: ServerConnection) -> None:
        """Return a clean connection (status idle, no pending replies)."""
        conn.detach()
        self.active -= 1
        if conn.closed or self.closing or conn.status != ord("I"):
            if not conn.closed and conn.status != ord("I"):
                self.stats.closed_dirty += 1
            self._discard(conn)
            return
        if self.settings.server_lifetime and time.monotonic() - conn.created_at > self.settings.server_lifetime:
            self._discard(conn)
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(conn)
                return
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
        """Open connections for waiters while there is room below pool_size."""
        if self.closing:
            return
        pending = sum(1 for f in self.waiters if not f.done())
        while pending > len(self._connecting) and self.size < self.settings.pool_size:
            self.size += 1
            task = asyncio.get_running_loop().create_task(self._open_for_waiter())
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

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
        self.idle.append(conn)

    def _usable(self, conn: ServerConnection, now: float) -> bool:
        if conn.closed:
            return False
        lifetime = self.settings.server_lifetime
        return not (lifetime and now - conn.created_at > lifetime)

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
            except ServerError as exc:
                self.size -= 1
                log.debug("min_pool_size connect to %s failed: %s", self.label, exc)
                return
            self.idle.appendleft(conn)

    async def close(self) -> None:
        self.closing = True
        if self._maintenance is not None:
            self._maintenance.cancel()
        for task in list(self._connecting):
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
                fut.set_exception(ServerError(f"pool for {self.label} was closed",
                                              {"C": m.SQLSTATE_ADMIN_SHUTDOWN}))
