"""Sharded pools in the session: which shard's group runs a request, and fan-out to every shard.

Only clients of a pool with several shards come here (``shard_groups`` is set
at login); the relay's fast path never does (``Router.route_default`` returns
None for them). Each shard has its own PoolGroup (primary, replicas, bans,
health); ``_use_shard`` points ``self.group`` at the one the routing decision
names, and the ordinary checkout runs there. A keyless read with
``default_shard = "all"`` runs on a server of every shard at once
(FANNED_OUT): each shard's replies go to a FanoutCollector through a
``_ShardLeg`` standing in for the client, and the client gets the merged
answer. Mixed into ClientConnection.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, Sequence

from pypool import sqlstates
from pypool.flow import ReadingPause
from pypool.pool.pool import PoolRetired, PoolTimeout
from pypool.pool.server import ServerConnection, ServerError
from pypool.protocol import messages as m
from pypool.routing.fanout import FanoutCollector, FanoutPlan
from pypool.routing.shard_key import bind_parameters
from pypool.session.states import ClientState

if TYPE_CHECKING:
    from pypool.pool.group import PoolGroup
    from pypool.routing.router import Decision

log = logging.getLogger("pypool.client")

_IDLE = ord("I")
# What may follow a Parse without a Bind in the same batch (the values come later or never).
_BATCH_ENDS = frozenset((m.SYNC, m.FLUSH, m.QUERY, m.FUNCTION_CALL))
# The extended-protocol messages a fanned-out request may consist of.
_FANOUT_EXTENDED = frozenset((m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.SYNC))


class FanoutRefused(Exception):
    """This request cannot run on every shard as sent; the text says why."""


def _messages(data: bytes | bytearray, start: int = 0):
    """(tag, start, end) of each whole message of ``data`` from ``start``; stops at a partial one."""
    pos, n = start, len(data)
    while n - pos >= 5:
        end = pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
        if end > n:
            return
        yield data[pos], pos, end
        pos = end


def shard_requests(plan: FanoutPlan, request: bytes, shards: int) -> list[bytes]:
    """What each shard's server is sent for a fanned-out ``request`` (a Query, or a batch ending in Sync).

    Only the unnamed statement and portal: a named one would stay prepared
    on servers other clients use next, unknown to pypool's statement cache.
    """
    if request[0] == m.QUERY:
        return [m.message(m.QUERY, m.cstr(plan.shard_sql))] * shards
    out = []
    for tag, start, end in _messages(request):
        payload = request[start + 5:end]
        if tag not in _FANOUT_EXTENDED:
            raise FanoutRefused(f"message type {chr(tag)!r} in a request that runs on every shard")
        if tag == m.PARSE:
            name, pos = m.read_cstring(payload)
            _, pos = m.read_cstring(payload, pos)
            if name:
                raise FanoutRefused("a read that runs on every shard must use the unnamed prepared statement "
                                    f"(got statement {name!r})")
            out.append(m.message(m.PARSE, b"\x00" + m.cstr(plan.shard_sql) + payload[pos:]))
            continue
        if tag == m.BIND:
            statement = payload[payload.index(b"\x00") + 1:payload.index(b"\x00", payload.index(b"\x00") + 1)]
            if statement:
                raise FanoutRefused("a read that runs on every shard must use the unnamed prepared statement "
                                    f"(got statement {statement.decode(errors='replace')!r})")
        out.append(request[start:end])
    return [b"".join(out)] * shards


class _ShardLeg:
    """Stands in for the client on one shard's server connection: its replies go to the collector."""

    __slots__ = ("transport", "reading", "shard", "collector", "done", "legs")

    def __init__(self, shard: int, collector: FanoutCollector, done: "asyncio.Future[None]",
                 reading: ReadingPause, legs: list[int]) -> None:
        self.transport = self  # the server's relay writes its replies to ``write``
        self.reading = reading  # the client's: a server that cannot take more pauses the client
        self.shard = shard
        self.collector = collector
        self.done = done
        self.legs = legs  # [shards still owing their final ReadyForQuery], shared by the legs

    def write(self, data: bytes) -> None:
        self.collector.feed(self.shard, data)

    def server_request_done(self, server: ServerConnection) -> None:
        self.legs[0] -= 1
        if self.legs[0] == 0 and not self.done.done():
            self.done.set_result(None)

    def server_lost(self, server: ServerConnection, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ServerError(
                f"server connection to {server.label} (shard {self.shard}) was lost during a read on every shard",
                {"C": sqlstates.CONNECTION_FAILURE}))


class SessionShards:
    def _route_sharded(self, tag: int, payload: bytes) -> "Decision | None":
        """The decision for the request at the head of ``_pending``; None: wait for its Bind.

        A key may be a $n parameter: its value is in the batch's Bind, which the
        server would not answer before Sync or Flush anyway, so waiting costs nothing.
        """
        params: Sequence[tuple[int, bytes | None]] | None = None
        if tag != m.QUERY:
            params = self._batch_params()
            if params is None:
                return None
        return self.app.route(self, tag, payload, params)

    def _batch_params(self) -> list[tuple[int, bytes | None]] | None:
        """The values of the first Bind of the batch in ``_pending`` ([] if it ends without one); None: incomplete."""
        buf = self._pending
        for tag, start, end in _messages(buf):
            if tag == m.BIND:
                try:
                    return bind_parameters(bytes(buf[start + 5:end]))
                except (ValueError, struct.error):
                    return []  # PostgreSQL reports the malformed Bind
            if tag in _BATCH_ENDS:
                return []
        return None

    def _shard_group(self, shard: int) -> "PoolGroup":
        group = self.shard_groups[shard]
        if group.successor is not None:  # a config reload rebuilt the pool
            while group.successor is not None:
                group = group.successor
            self.shard_groups = self.shard_groups[:shard] + (group,) + self.shard_groups[shard + 1:]
        return group

    def _use_shard(self, decision: "Decision") -> None:
        """Point ``self.group`` at the shard ``decision`` runs on (its own, else the pool's default_shard)."""
        sharding = self._router.sharding  # type: ignore[union-attr]
        healthy = None
        if decision.shard is None and sharding.default_shard.kind == "random_healthy":
            healthy = [i for i, g in enumerate(self.shard_groups) if g.primary is not None and g.primary.healthy]
        self.group = self._shard_group(sharding.target(decision.shard, healthy))

    # ---------------------------------------------------------------- fan-out

    def _start_fanout(self, decision: "Decision", first_length: int) -> bool:
        """Run the request at the head of ``_pending`` on every shard; False: the batch is not whole yet."""
        buf = self._pending
        if buf[0] == m.QUERY:
            end = 1 + first_length
        else:
            end = next((e for tag, _, e in _messages(buf) if tag == m.SYNC), -1)
            if end < 0:
                return False
        request = bytes(buf[:end])
        del buf[:end]
        assert decision.fanout is not None
        try:
            requests = shard_requests(decision.fanout, request, len(self.shard_groups))
        except (FanoutRefused, ValueError) as exc:
            self._pending[:0] = request
            self._fail_request(sqlstates.FEATURE_NOT_SUPPORTED, str(exc))
            return True
        self.set_state(ClientState.FANNED_OUT)
        self._checkout_task = asyncio.get_running_loop().create_task(
            self._fan_out(decision.fanout, decision.role, requests))
        return True

    async def _fan_out(self, plan: FanoutPlan, role: str, requests: list[bytes]) -> None:
        groups = [self._shard_group(i) for i in range(len(requests))]
        got = await asyncio.gather(*(g.checkout(role) for g in groups), return_exceptions=True)
        servers = [s for s in got if isinstance(s, ServerConnection)]
        clean = False
        try:
            failed = next((e for e in got if isinstance(e, BaseException)), None)
            if failed is not None:
                clean = True  # none of them was sent anything
                raise failed
            await asyncio.gather(*(self._sync_parameters(s) for s in servers))
            collector = FanoutCollector(plan, len(servers))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            legs = [len(servers)]
            for shard, (server, request) in enumerate(zip(servers, requests)):
                server.attach(_ShardLeg(shard, collector, done, self.reading, legs))  # type: ignore[arg-type]
                for tag, _, _ in _messages(request):
                    server.requests.sent(tag)
                server.bytes_sent += len(request)
                server.transport.write(request)  # type: ignore[union-attr]
            await done
            clean = True
        except (PoolTimeout, PoolRetired, ServerError) as exc:
            self._end_fanout(servers, clean)
            log.warning("client %s: %s", self.peer, exc)
            self.error_count += 1
            self.transport.write(m.error_response(getattr(exc, "sqlstate", sqlstates.CONNECTION_FAILURE),  # type: ignore[union-attr]
                                                  str(exc)) + m.ready_for_query())
        except asyncio.CancelledError:
            self._end_fanout(servers, False)
            raise
        else:
            self._end_fanout(servers, True)
            self.query_count += 1
            self.xact_count += 1
            self.transport.write(collector.result())  # type: ignore[union-attr]
        if self.state is ClientState.FANNED_OUT:
            self.set_state(ClientState.IDLE)
            if self._pending:
                self._dispatch_pending()

    def _end_fanout(self, servers: list[ServerConnection], clean: bool) -> None:
        self._checkout_task = None
        for server in servers:
            ok = clean and not server.closed and server.requests.status == _IDLE and not server.requests.owed
            self.group.checkin(server, clean=ok)  # type: ignore[union-attr]
