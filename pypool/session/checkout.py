"""How a client gets a server connection: one checkout through the pool group, then attach.

``_begin_request`` asks ``PoolGroup.checkout_now`` once: a connection now
(attached at once when it carries the client's settings), or a waiter that
calls back (``_on_queued_ready`` / ``_on_queued_failed``). The checkout
coroutine syncs settings, replays a held BEGIN, and follows a config reload
that rebuilt the client's pool.

Causal reads (``pypool.causal``): a read after this client's write (or, in
``global`` mode, anyone's) that no usable replica is known to have replayed
waits in WAITING_FOR_REPLICA, in the checkout coroutine, for the group to say
where it runs. A read with nothing to wait for costs one ``must_wait`` call.
A transaction that may write on the primary is marked on its connection
(``track_commit``) so that its end is noticed (``write_committed``).
Part of ClientSession's chain (pypool/session/base.py), after SessionPinning.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pypool.causal.decide import Fail, UsePrimary
from pypool.causal.requirement import GLOBAL, OFF, ClientCausal
from pypool.errors import PoolerError
from pypool.pool.group import WAITERS, CheckoutAgain, CheckoutWaiter, PoolGroup, latest_group
from pypool.pool.pool import PoolClosing, PoolRetired, ServerPool
from pypool.pool.server import ServerConnection, ServerError
from pypool import sqlstates
from pypool.roles import ANY, PRIMARY, REPLICA
from pypool.session import states
from pypool.session.pinning import SessionPinning

log = logging.getLogger("pypool.client")

_IDLE = ord("I")


def sqlstate_of(exc: Exception) -> str:
    """The SQLSTATE a client gets for a checkout that failed."""
    return getattr(exc, "sqlstate", sqlstates.CONNECTION_FAILURE)


class SessionCheckout(SessionPinning):
    __slots__ = ()

    def _begin_request(self, role: str) -> None:
        """Check out a connection for ``role`` for the request in ``_pending``: attach it, or wait.

        One checkout: a connection now (attached at once when it is set up like
        this client), or a waiter that calls back. Raises ServerError when the
        pool has no primary. ``_start_fast`` is the same without ``_pending``.
        """
        if self.causal is not None and role != PRIMARY and self._must_wait_for_replica():
            self._wait_for_replica(role)
            return
        held_begin = self._held_begin is not None  # inside a transaction: the shutdown drain lets it finish
        got = self.group.checkout_now(role, self._queued_ready, self._queued_failed,  # type: ignore[union-attr]
                                      held_begin)
        if got.__class__ in WAITERS or held_begin \
                or got.applied_key != self._parameters_key:  # type: ignore[union-attr]
            self._not_ready_yet(role, got)
        else:
            self._attach(got, role)  # type: ignore[arg-type]

    def _not_ready_yet(self, role: str, got: "ServerConnection | CheckoutWaiter") -> None:
        """No connection to attach yet: wait for the waiter's call (WAITING), or set the connection up
        in the checkout coroutine (SYNCING: the client's settings, a held BEGIN)."""
        if got.__class__ in WAITERS:
            self.set_state(states.WAITING)
            self._queued = got  # type: ignore[assignment]
            self._queued_role = role
            self.wait_started = got.started  # type: ignore[union-attr]
        else:
            self._start_checkout(role, got)  # type: ignore[arg-type]

    def _start_checkout(self, role: str, server: ServerConnection | None) -> None:
        """Wait for a connection (WAITING), or set up the one given (SYNCING), in the checkout coroutine.

        A read that must first wait for a replica to catch up starts in WAITING_FOR_REPLICA.
        """
        if server is None and self.causal is not None and role != PRIMARY and self._must_wait_for_replica():
            self._wait_for_replica(role)
            return
        self.set_state(states.WAITING if server is None else states.SYNCING)
        self._checkout_task = self.io.spawn(self._checkout(role, server))

    # ------------------------------------------------------------ causal reads

    def _must_wait_for_replica(self) -> bool:
        group = self.group
        return group.causal.must_wait(self.causal, group.replica_candidates())  # type: ignore[union-attr, arg-type]

    def _wait_for_replica(self, role: str) -> None:
        """The read in ``_pending`` waits for a replica to replay what it must see, in the checkout coroutine."""
        self.set_state(states.WAITING_FOR_REPLICA)
        self._checkout_task = self.io.spawn(self._checkout(role, None))

    async def _where_causal_read_runs(self, role: str, group: PoolGroup,
                                      causal: ClientCausal) -> tuple[str, ServerPool | None] | Fail:
        """Wait until a replica of ``group`` has replayed what this read must see: (role, server pool) to
        check out. ``causal``: what the client's reads on that group's shard must see."""
        decision = await group.causal.choose(causal, group.replica_candidates, pick=group.balancer.pick,
                                             primary=group.primary if role == ANY else None)
        if decision is None:
            return role, None
        if isinstance(decision, Fail):
            return decision
        if isinstance(decision, UsePrimary) or decision.server is group.primary:
            return ANY, group.primary  # still a read: "any" server, the primary preferred
        return role, decision.server

    def _track_writes(self, server: ServerConnection, role: str) -> None:
        """Mark a transaction on the primary that may write: its end is reported (``write_committed``)."""
        if self._may_write(server, role, self.group):  # type: ignore[arg-type]
            server.track_commit = True

    def _may_write(self, server: ServerConnection, role: str, group: PoolGroup) -> bool:
        """Whether a request for ``role`` on ``server`` (of ``group``) may write.

        A read that the router sent to "any" server and that landed on the
        primary writes nothing; one sent there by SET SERVER ROLE 'any' or
        without the query parser may.
        """
        if role == PRIMARY:
            return True
        return server.pool is group.primary and (
            self.routing.role_override == ANY or not self._router.splitting)  # type: ignore[union-attr]

    def _join_causal(self, group: PoolGroup) -> None:
        """At login and when a reload moves the client: do its writes count (``_causal_writes``), and in
        ``global`` mode its reads' state. In ``session`` mode that state (``causal``) is made by the first
        write, so reads of a client that never wrote cost one attribute test.

        Each shard's primary has its own WAL, so a sharded pool's client keeps one state per shard
        (``_causal_by_shard``); ``causal`` is the one of the shard ``group`` serves.
        """
        on = group.pool_mode != "session" and group.causal.mode != OFF
        self._causal_writes = on
        by_shard = self._causal_by_shard
        if not on:
            by_shard.clear()
        elif group.causal.mode == GLOBAL:
            for shard_group in self.shard_groups or (group,):
                if shard_group.shard not in by_shard:
                    by_shard[shard_group.shard] = shard_group.causal.client()  # type: ignore[assignment]
        self.causal = by_shard.get(group.shard)

    @property
    def causal_required(self) -> str:
        """What the client's next read must see (SHOW CLIENTS): by shard in a sharded pool."""
        if not self.shard_groups:
            return "" if self.causal is None else str(self.causal)
        return "; ".join(f"shard {shard}: {required}" for shard, required in sorted(self._causal_by_shard.items())
                         if str(required))

    def _on_queued_ready(self, server: ServerConnection) -> None:
        """The pool handed over a connection this client queued for in ``_begin_request``."""
        self._queued = None
        self._end_wait()
        if self.state is not states.WAITING:
            self.group.checkin(server)  # type: ignore[union-attr]
            return
        if server.applied_key != self._parameters_key or self._held_begin is not None:
            self._start_checkout(self._queued_role, server)
            return
        self._attach(server, self._queued_role)

    def _on_queued_failed(self, exc: Exception) -> None:
        """The queued wait ended without a connection: report why, or let the coroutine try."""
        self._queued = None
        self._end_wait()
        if self.state is not states.WAITING:
            return
        if isinstance(exc, CheckoutAgain):
            self._start_checkout(self._queued_role, None)
            return
        log.warning("client %s: %s", self.peer, exc)
        if isinstance(exc, PoolClosing):
            self._refused_by_drain(self._queued_role)
            return
        self.set_state(states.IDLE)
        self._fail_request(sqlstate_of(exc), str(exc))
        self._dispatch_pending()

    def _refused_by_drain(self, role: str) -> None:
        """The shutdown drain closed the pool this client asked (57P01).

        Inside a transaction whose BEGIN pypool holds it asks again: a closing
        pool still serves those. Between transactions it is closed with the
        drain's FATAL 57P01, as every other such client is, rather than sent an
        ERROR that the drain's FATAL would follow moments later (asyncpg takes
        that second, unasked error for a broken protocol and its next statement fails).
        """
        if self._held_begin is not None:
            self._start_checkout(role, None)
        else:
            self.terminate_for_shutdown()

    def _end_wait(self) -> None:
        """A wait for a server connection ended: keep the longest (SHOW CLIENTS maxwait)."""
        waited = time.monotonic() - self.wait_started
        if waited > self.max_wait:
            self.max_wait = waited
        self.wait_started = 0.0

    async def _checkout(self, role: str, server: ServerConnection | None) -> None:
        """Wait for a connection (unless given one), make it carry this client's settings, then attach."""
        group = self.group
        assert group is not None
        self.wait_started = time.monotonic()
        try:
            if server is None:
                preferred = None
                if self.state is states.WAITING_FOR_REPLICA:
                    where = await self._where_causal_read_runs(role, group, self.causal)  # type: ignore[arg-type]
                    if isinstance(where, Fail):
                        raise PoolerError(where.sqlstate, where.message)
                    role, preferred = where
                    self.set_state(states.WAITING)
                server = await self._checkout_current(role, preferred)
                self.set_state(states.SYNCING)
            await self.sync_parameters(server)
            if self._held_begin is not None:
                await server.query(self._held_begin)
        except PoolerError as exc:  # PoolTimeout, ServerError, a causal read that timed out
            self._checkout_task = None
            if server is not None:
                group.checkin(server, clean=not server.closed and server.requests.status == _IDLE)
            log.warning("client %s: %s", self.peer, exc)
            if isinstance(exc, PoolClosing):
                self._refused_by_drain(role)
                return
            self.set_state(states.IDLE)
            self._fail_request(sqlstate_of(exc), str(exc))
            self._dispatch_pending()
            return
        except asyncio.CancelledError:
            if server is not None:
                # Cancelled half-way through syncing: the server still owes that query's reply.
                group.checkin(server, clean=server.requests.status == _IDLE and not server.reply_owed)
            raise
        finally:
            self._end_wait()
        self._checkout_task = None
        if not self.state.relaying:
            group.checkin(server)
            return
        self._attach(server, role)

    async def _checkout_current(self, role: str, preferred: ServerPool | None = None) -> ServerConnection:
        """``group.checkout``, following a config reload that rebuilt this client's pool."""
        group = self.group
        assert group is not None
        while True:
            if group.successor is not None:
                self.group = group = latest_group(group)
                router = self._router = self.app.routers.get(self.database, self._router)
                self._session_mode = group.pool_mode == "session"
                # A reload may have changed the pool's shards.
                sharded = router is not None and router.sharded
                self.shard_groups = self.app.shard_groups(self.database, self.user) if sharded else ()
                self._join_causal(group)
                preferred = None
            try:
                return await group.checkout(role, preferred, self._held_begin is not None)
            except PoolRetired:
                if group.successor is None:
                    raise ServerError(f'pool "{self.database}" for user "{self.user}" was removed from '
                                      "pypool's configuration", {"C": sqlstates.INVALID_CATALOG_NAME}) from None

    def _attach(self, server: ServerConnection, role: str) -> None:
        self.set_state(states.ATTACHED)
        self.server = server
        server.attach(self)
        if self._causal_writes and role != REPLICA:
            self._track_writes(server, role)
        if self.io.is_closing():
            return
        data = bytes(self._pending)
        self._pending.clear()
        walker = self._walker
        if walker.held or walker.skip:
            walker.reset()
        # A read whose server dies before answering can be replayed elsewhere.
        self._replay = (data, role, self._held_begin) if role != PRIMARY else None
        self._held_begin = None
        if data:
            self._forward(server, data)
