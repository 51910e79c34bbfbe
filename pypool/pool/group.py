"""All server pools of one shard of a PgCat pool entry for one user: the primary and its replicas.

A pool with several shards has one group per shard (``shard`` is its index),
each with its own read/write split, balancing, bans, health checks and
failover; the session picks the group from the routing decision.

A client session asks the group for a connection of a role (pypool.roles);
which server answers is decided here, so choosing a server per transaction is
one call. The group is the session's only door to the pools:

* ``checkout_now``: a connection at once, or a queued callback waiter, or
  None when only the awaitable ``checkout`` can help (a paused pool, an idle
  connection due a health check, no usable replica);
* ``checkout``: the awaitable path, with failover between replicas;
* ``checkin(conn, clean)``: back to its pool, or closed when its state
  cannot be trusted;
* bans and health results beside them, so the policy lives in one place;
* ``causal``: the pool's causal reads (``pypool.causal.PoolCausal``), fed by
  its monitors' replay positions and asked by the session before a read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from pypool import sqlstates
from pypool.causal.lsn import Position
from pypool.causal.pool_causal import PoolCausal
from pypool.causal.requirement import CommitLog
from pypool.pool.balancer import Balancer
from pypool.pool.health import HealthResult, ServerMonitor
from pypool.pool.pool import (CallbackWaiter, HealthCheckFailed, PoolClosing, PoolRetired, PoolSettings, PoolTimeout,
                              ServerPool)
from pypool.pool.server import Credentials, ServerConnection, ServerError
from pypool.roles import ANY, PRIMARY, REPLICA
from pypool.session.schema import generation_for
from pypool.tls import server_context

if TYPE_CHECKING:
    from pypool.config import General, Pool, User

log = logging.getLogger("pypool.pool")


# Parameters a client is told at login even before any server was reached.
FALLBACK_PARAMETERS = {
    "server_version": "15.0",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "IntervalStyle": "postgres",
    "is_superuser": "off",
}
# Reported parameters that describe one backend session, not the server.
SESSION_PARAMETERS = ("application_name", "is_superuser", "session_authorization")


class CheckoutAgain(Exception):
    """A queued wait ended without a connection the caller can report: ask ``checkout`` instead."""


class CheckoutTask:
    """A checkout that needs the awaitable path (a paused pool, a health check due, no usable
    replica), run in a task that calls back like a CallbackWaiter."""

    __slots__ = ("task", "started")

    def __init__(self, task: "asyncio.Task[None]") -> None:
        self.task = task
        self.started = time.monotonic()

    def cancel(self) -> None:
        self.task.cancel()


WAITERS = (CallbackWaiter, CheckoutTask)  # what ``checkout_now`` returns when there is no connection yet
CheckoutWaiter = CallbackWaiter | CheckoutTask


def latest_group(group: "PoolGroup") -> "PoolGroup":
    """The group that config reloads rebuilt ``group`` into (``successor``, followed); ``group`` if none."""
    # One read of ``successor`` per step: the compiled build (setup.py) would take a narrowed second
    # read (``while g.successor is not None: g = g.successor``) for a PoolGroup even after ``g`` changed.
    successor = group.successor
    while successor is not None:
        group, successor = successor, successor.successor
    return group


def _override(user_value: int | None, pool_value: int) -> int:
    return pool_value if user_value is None else user_value


class PoolGroup:
    def __init__(self, pool: "Pool", user: "User", general: "General", shard: int = 0,
                 commits: CommitLog | None = None) -> None:
        """``commits``: the commit log of this pool's shard when its causal_reads is "global" (CommitLogs.for_shard)."""
        self.config = pool
        self.user = user
        self.general = general
        self.name = pool.name
        self.shard = shard
        # What logs and errors call it: a pool's shards share their servers' host:port.
        self.label = pool.name if len(pool.shards) <= 1 else f"{pool.name} shard {shard}"
        self.pool_mode = user.pool_mode or pool.pool_mode
        server_user = user.server_username or user.username
        server_password = user.server_password or user.password
        credentials = Credentials(server_user, server_password, pool.shards[shard].database)
        size = max(1, user.pool_size)
        settings = PoolSettings(
            pool_size=size,
            min_pool_size=min(size, user.min_pool_size),
            connect_timeout=_override(user.connect_timeout, pool.connect_timeout) / 1000,
            checkout_timeout=pool.checkout_timeout / 1000,
            idle_timeout=_override(user.idle_timeout, pool.idle_timeout) / 1000,
            server_lifetime=_override(user.server_lifetime, pool.server_lifetime) / 1000,
            healthcheck_delay=general.healthcheck_delay / 1000,
            healthcheck_timeout=general.healthcheck_timeout / 1000,
            tls=server_context(general),
            statement_timeout=user.statement_timeout,
        )
        self.settings = settings
        self.primary: ServerPool | None = None
        self.replicas: list[ServerPool] = []
        for address in pool.shards[shard].servers:
            server_pool = ServerPool(address, credentials, settings)
            if address.role == PRIMARY:
                self.primary = server_pool
            else:
                self.replicas.append(server_pool)
        self.balancer = Balancer(pool.load_balancing_mode)
        # Part of every prepared statement's identity: moved on by DDL and stale-statement errors.
        servers = pool.shards[shard].servers
        self.schema = generation_for(f"{pool.shards[shard].database}@{servers[0].host}:{servers[0].port}"
                                     if servers else pool.shards[shard].database)
        self.server_parameters: dict[str, str] | None = None
        # Reported parameters as PostgreSQL spells them once set from a client's startup values
        # (client_encoding=utf8 -> UTF8), keyed by those values: asked once per distinct set.
        self.reported_values: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        # The greeting's ParameterStatus messages, encoded, by client settings (pypool/login.py), and
        # the server_parameters they were built from.
        self.greetings: dict[tuple[tuple[str, str], ...], bytes] = {}
        self.greetings_from: dict[str, str] | None = None
        self.monitors: list[ServerMonitor] = []
        self._monitor_of: dict[ServerPool, ServerMonitor] = {}
        # Without replicas every read is on the primary: nothing to wait for, no commit position to ask.
        causal_mode = pool.causal_reads if self.replicas else "off"
        self.causal: PoolCausal[ServerPool] = PoolCausal(
            causal_mode, pool.causal_reads_timeout, self._check_position, self._primary_position,
            commits=commits, label=lambda sp: sp.label)
        # Set by a config reload that rebuilt this pool: clients move there at their next checkout.
        self.successor: PoolGroup | None = None
        self.cancel_requests = 0  # CancelRequests forwarded for this pool's clients
        self.cancels_in_flight = 0  # ... and not yet delivered (SHOW POOLS cl_cancel_req)
        # Server connections kept by one client across transactions (pypool/session/pinning.py):
        # at most ``max_pinned``, so the others keep sharing the rest of the pool.
        self.pinned = 0
        cap = pool.max_pinned_connections
        self.max_pinned = max(1, size // 2) if cap is None else min(cap, size)
        self._split_brain_logged = False
        self.listen_hub: Any = None  # listen.hub_for's ListenHub, held here: compiled groups take no weakref
        self._candidates: dict[str, list[ServerPool]] = {}
        self.refresh_candidates()

    def __repr__(self) -> str:
        return f"<PoolGroup {self.name}/{self.user.username} shard {self.shard}>"

    @property
    def all_pools(self) -> list[ServerPool]:
        return ([self.primary] if self.primary else []) + self.replicas

    def start(self) -> None:
        for server_pool in self.all_pools:
            server_pool.start()
            monitor = ServerMonitor(server_pool, self.general.healthcheck_timeout / 1000, self.health_result,
                                    positions=self.causal.positions)
            self.monitors.append(monitor)
            self._monitor_of[server_pool] = monitor
            monitor.start()

    async def close(self) -> None:
        for monitor in self.monitors:
            await monitor.stop()
        await self.causal.close()
        for server_pool in self.all_pools:
            await server_pool.close()

    async def _check_position(self, server_pool: ServerPool) -> Position | None:
        """A waiting causal read asks this replica's monitor for its replay position now."""
        return await self._monitor_of[server_pool].check_position()

    async def _primary_position(self) -> Position | None:
        return await self._monitor_of[self._primary_pool()].check_position()

    # -------------------------------------------------------- health and bans

    def is_banned(self, server_pool: ServerPool) -> bool:
        return server_pool.banned_until > time.monotonic()

    def ban(self, server_pool: ServerPool, reason: str, duration: float | None = None) -> None:
        """Take a replica out of rotation for ban_time (or ``duration`` s). The primary is never banned."""
        if server_pool is self.primary or self.is_banned(server_pool):
            return
        if duration is None:
            duration = self.general.ban_time
        server_pool.banned_until = time.monotonic() + duration
        server_pool.banned_at = time.time()
        server_pool.ban_duration = duration
        server_pool.ban_reason = reason
        server_pool.bans += 1
        self.refresh_candidates()
        log.warning("pool %s: banning replica %s for %ss: %s", self.label, server_pool.label,
                    duration, reason)

    def ban_address(self, address: object, reason: str) -> None:
        for server_pool in self.replicas:
            if server_pool.address == address:
                self.ban(server_pool, reason)

    def unban(self, server_pool: ServerPool) -> None:
        if server_pool.banned_until:
            log.info("pool %s: replica %s unbanned", self.label, server_pool.label)
        server_pool.banned_until = 0.0
        server_pool.ban_reason = ""
        self.refresh_candidates()

    def _lagging(self, server_pool: ServerPool) -> bool:
        limit = self.config.max_replica_lag_ms
        return limit is not None and server_pool.lag_ms is not None and server_pool.lag_ms > limit

    def health_result(self, server_pool: ServerPool, result: HealthResult) -> None:
        """Called by the monitor after every check of ``server_pool``."""
        self.causal.reads.notify()  # its position is recorded: wake the causal reads it satisfies
        server_pool.healthy = result.ok
        if not result.ok:
            server_pool.last_error = result.error or "health check failed"
            self.ban(server_pool, server_pool.last_error)
            self.refresh_candidates()
            return
        was_lagging = self._lagging(server_pool)
        server_pool.in_recovery = result.in_recovery
        server_pool.lag_ms = result.lag_ms
        if self._lagging(server_pool) != was_lagging:
            if was_lagging:
                log.info("pool %s: replica %s caught up (lag %.0f ms)", self.label, server_pool.label,
                         result.lag_ms)
            else:
                log.warning("pool %s: replica %s lags %.0f ms > max_replica_lag_ms %s; no reads until it "
                            "catches up", self.label, server_pool.label, result.lag_ms,
                            self.config.max_replica_lag_ms)
        self._follow_promotion()
        self.refresh_candidates()

    def _follow_promotion(self) -> None:
        """Send writes to whichever server is really out of recovery (failover without restart)."""
        current = self.primary
        writable = [sp for sp in self.all_pools if sp.healthy and sp.in_recovery is False]
        if current is not None and current in writable:
            others = [sp for sp in writable if sp is not current]
            if others and not self._split_brain_logged:
                log.error("pool %s: %s and %s both accept writes; writes stay on %s", self.label,
                          current.label, ", ".join(o.label for o in others), current.label)
                self._split_brain_logged = True
            return
        if not writable:
            return  # primary down and nobody promoted: writes fail fast until one is back
        if current is not None and current.healthy and current.in_recovery is None:
            return  # not checked yet
        new = writable[0]
        self._split_brain_logged = False
        log.warning("pool %s: %s is no longer in recovery and %s is %s; sending writes to %s",
                    self.label, new.label, current.label if current else "(none)",
                    "a standby now" if current is not None and current.in_recovery else "unreachable",
                    new.label)
        self.replicas = [sp for sp in self.replicas if sp is not new]
        if current is not None:
            self.replicas.append(current)
        self.unban(new)
        self.primary = new

    # ------------------------------------------------------------------ pinning

    def reserve_pin(self) -> bool:
        """Count one more pinned server connection, unless ``max_pinned`` are already."""
        if self.pinned >= self.max_pinned:
            return False
        self.pinned += 1
        return True

    def release_pin(self) -> None:
        self.pinned -= 1

    # ----------------------------------------------------------------- checkout

    def _primary_pool(self) -> ServerPool:
        if self.primary is None:
            raise ServerError(f"pool {self.label} has no primary server", {"C": sqlstates.CONNECTION_FAILURE})
        return self.primary

    def _read_candidates(self, role: str, exclude: set[ServerPool] | frozenset = frozenset()) -> list[ServerPool]:
        replicas = [r for r in self.replicas
                    if r not in exclude and not self.is_banned(r) and not self._lagging(r)]
        primary = self.primary
        if role == ANY and primary is not None and primary not in exclude:
            return replicas + [primary]
        if replicas:
            return replicas
        if role == ANY:
            return []
        # Every replica banned or lagging: PgCat clears the bans rather than fail reads.
        untried = [r for r in self.replicas if r not in exclude]
        if untried:
            log.warning("pool %s: every replica is banned; clearing bans", self.label)
            for r in untried:
                self.unban(r)
        return untried

    def choose(self, role: str) -> ServerPool | None:
        """The server pool the balancer picks for ``role`` now (None: no replica usable)."""
        if role == PRIMARY:
            return self._primary_pool()
        candidates = self._candidates.get(role)
        return self.balancer.pick(candidates) if candidates else None

    def replica_candidates(self) -> list[ServerPool]:
        """The replicas a read would be given now (banned and lagging ones left out)."""
        return self._candidates[REPLICA]

    def refresh_candidates(self) -> None:
        """Recompute who may serve reads; called on every health result, ban and failover.

        The hot path reads this list instead of filtering servers per transaction;
        the monitor's one-second cadence bounds how late an expired ban is noticed.
        """
        usable = [r for r in self.replicas if not self.is_banned(r) and not self._lagging(r)]
        self._candidates = {
            REPLICA: usable,
            ANY: usable + [self.primary] if self.primary is not None else usable,
        }

    def checkout_now(self, role: str, on_ready: Callable[[ServerConnection], None],
                     on_error: Callable[[Exception], None],
                     in_transaction: bool = False) -> ServerConnection | CallbackWaiter | CheckoutTask:
        """A connection for ``role`` at once, else a waiter (one of WAITERS) that calls back.

        The waiter calls ``on_ready(conn)`` later, never from inside this call, or
        ``on_error(exc)`` with an error to report to the client (PoolTimeout,
        ServerError) or with CheckoutAgain when the caller should ask ``checkout``
        itself (a replica that could not be reached, now banned, or a pool a
        reload replaced). Raises ServerError when the pool has no primary.
        ``in_transaction``: as for ``checkout``.
        """
        if role == PRIMARY:
            server_pool = self.primary
            if server_pool is None:
                server_pool = self._primary_pool()
        else:
            candidates = self._candidates.get(role)
            server_pool = self.balancer.pick(candidates) if candidates else None
        if server_pool is not None:
            conn = server_pool.try_acquire()
            if conn is not None:
                return conn
            waiter = server_pool.queue(on_ready,
                                       lambda exc: self._queued_wait_failed(role, server_pool, exc, on_error))
            if waiter is not None:
                return waiter
        # The awaitable path, on the balancer's pick: a health check due there is run there.
        return CheckoutTask(asyncio.get_running_loop().create_task(
            self._checkout_then_call(role, server_pool, on_ready, on_error, in_transaction)))

    async def _checkout_then_call(self, role: str, preferred: ServerPool | None,
                                  on_ready: Callable[[ServerConnection], None],
                                  on_error: Callable[[Exception], None], in_transaction: bool) -> None:
        try:
            conn = await self.checkout(role, preferred, in_transaction)
        except PoolRetired as exc:
            on_error(CheckoutAgain(str(exc)))
        except (PoolTimeout, ServerError) as exc:
            on_error(exc)
        else:
            on_ready(conn)

    def _queued_wait_failed(self, role: str, server_pool: ServerPool, exc: Exception,
                            on_error: Callable[[Exception], None]) -> None:
        if isinstance(exc, ServerError) and not isinstance(exc, PoolClosing):  # the drain's: no server helps
            if role == PRIMARY:
                on_error(self.primary_unavailable(server_pool, exc))
                return
            if server_pool is not self.primary:
                self.ban(server_pool, str(exc))  # it failed to connect: ``checkout`` tries the others
            on_error(CheckoutAgain(str(exc)))
        elif isinstance(exc, PoolRetired):
            on_error(CheckoutAgain(str(exc)))
        else:
            on_error(exc)

    async def checkout(self, role: str, preferred: ServerPool | None = None,
                       in_transaction: bool = False) -> ServerConnection:
        """A connection for ``role``, waiting if need be; replicas that cannot be reached are banned.

        ``preferred`` is the balancer's earlier pick, kept if still usable.
        ``in_transaction``: the client is inside a transaction already (its BEGIN
        was held by pypool), so a shutdown drain lets it have one (``ServerPool.acquire``).
        """
        if role == PRIMARY:
            primary = self._primary_pool()
            try:
                try:
                    conn = await primary.acquire(in_transaction)
                except HealthCheckFailed as exc:
                    # The stale connections are gone; a fresh one tells whether the server is.
                    log.warning("pool %s: %s; reconnecting to the primary", self.label, exc)
                    conn = await primary.acquire(in_transaction)
            except ServerError as exc:
                raise self.primary_unavailable(primary, exc) from None
            self._learn_parameters(conn)
            return conn
        tried: set[ServerPool] = set()
        errors: list[str] = []
        while True:
            candidates = self._read_candidates(role, tried)
            if not candidates:
                raise ServerError(f"pool {self.label}: no server can serve reads: " + "; ".join(errors),
                                  {"C": sqlstates.CONNECTION_FAILURE})
            if preferred is not None and preferred in candidates:
                server_pool, preferred = preferred, None
            else:
                server_pool = self.balancer.pick(candidates)
            try:
                conn = await server_pool.acquire(in_transaction)
            except PoolClosing:
                raise  # the shutdown drain: no other server helps, and none is to blame
            except ServerError as exc:
                # Only a failure to reach the server bans it; a full pool is not its fault.
                tried.add(server_pool)
                errors.append(str(exc))
                self.ban(server_pool, str(exc))
                continue
            self._learn_parameters(conn)
            return conn

    def primary_unavailable(self, primary: ServerPool, exc: ServerError) -> ServerError:
        if exc.sqlstate == sqlstates.ADMIN_SHUTDOWN:
            return exc  # pypool is draining, the primary is fine: say only that
        return ServerError(f"primary server {primary.label} of pool {self.label} is unavailable: {exc}",
                           {**exc.fields, "C": exc.sqlstate})

    @staticmethod
    def checkin(conn: ServerConnection, clean: bool = True) -> None:
        """Give a connection back: kept when ``clean``, closed when its state cannot be trusted.

        A connection whose pool was retired or closed (``pool`` is None) is closed either way.
        One with something left to ``settle`` is checked in once that is done.
        """
        settle = conn.settle
        if settle is not None:
            conn.settle = None
            settle(conn, lambda: PoolGroup.checkin(conn, clean))
            return
        pool = conn.pool
        if pool is None:
            conn.detach()
            conn.close()
        elif clean:
            pool.release(conn)
        else:
            pool.release_broken(conn)

    def _learn_parameters(self, conn: ServerConnection) -> None:
        if self.server_parameters is None and conn.parameters:
            self.server_parameters = {k: v for k, v in conn.parameters.items() if k not in SESSION_PARAMETERS}

    async def login_parameters(self) -> dict[str, str]:
        """The ParameterStatus set a newly logged-in client is told.

        Learnt from the first server connection; if none was made yet, make
        one (primary first, then replicas) so clients see real values.
        """
        if self.server_parameters is None:
            conn = await self.any_connection()
            if conn is not None:
                self.checkin(conn)
        return dict(self.server_parameters or FALLBACK_PARAMETERS)

    async def any_connection(self) -> ServerConnection | None:
        """A connection to whichever server answers, primary first, then replicas (None: none does)."""
        for role in (PRIMARY, REPLICA):
            try:
                return await self.checkout(role)
            except Exception as exc:  # noqa: BLE001 - try the next server
                log.debug("pool %s: no %s connection for login-time questions: %s", self.name, role, exc)
        return None
