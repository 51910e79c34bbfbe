"""Sharded pools in the session: which shard's group runs a request, and requests pypool answers itself.

Only clients of a pool with several shards come here (``shard_groups`` is set
at login); the relay's fast path never does (``Router.route_default`` returns
None for them). Each shard has its own PoolGroup (primary, replicas, bans,
health); ``_use_shard`` points ``self.group`` at the one the routing decision
names, and the ordinary checkout runs there.

Two requests run "aside" (state FANNED_OUT): pypool sends them to servers
itself, an ``_Aside`` standing in for the client keeps each reply, and the
client gets pypool's answer. A keyless read with ``default_shard = "all"``
runs on a server of every shard at once and the replies are merged
(FanoutCollector). A Parse/Describe batch ending in Flush (asyncpg prepares
this way, the key's value comes in a later Bind) is described by one shard,
so that the Bind starts a request of its own, routed by its values.
Part of ClientSession's chain (pypool/session/base.py), after SessionCheckout.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Coroutine

from pypool import sqlstates
from pypool.causal.decide import Fail
from pypool.pool.group import latest_group
from pypool.pool.pool import PoolRetired, PoolTimeout
from pypool.pool.server import ClientIO, RelayTarget, ServerConnection, ServerError
from pypool.protocol import messages as m
from pypool.protocol.frames import ProtocolViolation
from pypool.routing.fanout import FanoutCollector, FanoutPlan, FanoutRefused  # the tests import FanoutRefused here
from pypool.roles import PRIMARY, REPLICA
from pypool.routing.shard_key import bind_parameters
from pypool.session.prepared import server_name
from pypool.session import states
from pypool.session.checkout import SessionCheckout

if TYPE_CHECKING:
    from pypool.pool.group import PoolGroup
    from pypool.routing.router import Decision

log = logging.getLogger("pypool.client")

_IDLE = ord("I")
_PARSE_COMPLETE = m.message(m.PARSE_COMPLETE)
_READY_IDLE = m.ready_for_query(b"I")
# What may follow a Parse without a Bind in the same batch (the values come later or never).
_BATCH_ENDS = frozenset((m.SYNC, m.FLUSH, m.QUERY, m.FUNCTION_CALL))
# The extended-protocol messages a fanned-out request may consist of.
_FANOUT_EXTENDED = frozenset((m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.SYNC))


_NO_BIND = object()  # a batch that ends without a Bind


def _messages(data: bytes | bytearray, start: int = 0):
    """(tag, start, end) of each whole message of ``data`` from ``start``; stops at a partial one."""
    pos, n = start, len(data)
    while n - pos >= 5:
        end = pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
        if end > n:
            return
        yield data[pos], pos, end
        pos = end


def shard_requests(plan: FanoutPlan, request: bytes, shards: int,
                   named: dict[bytes, tuple[bytes, bytes]] | None = None) -> tuple[list[bytes], bool]:
    """What each shard's server is sent for a fanned-out ``request`` (a Query, or a batch ending in Sync),
    and whether a Parse was added, whose ParseComplete the client must not see.

    Each shard runs the unnamed statement: a named one would stay prepared on
    servers other clients use next, unknown to pypool's statement cache. A
    Bind of a statement the client prepared earlier (``named``: the client's
    name -> (server name, Parse body)) gets an unnamed Parse of its text first.
    """
    if request[0] == m.QUERY:
        return [m.message(m.QUERY, m.cstr(plan.shard_sql))] * shards, False
    out = []
    added = False
    for tag, start, end in _messages(request):
        payload = request[start + 5:end]
        if tag not in _FANOUT_EXTENDED:
            raise FanoutRefused(f"message type {chr(tag)!r} in a request that runs on every shard")
        if tag == m.PARSE:
            name, pos = m.read_cstring(payload)
            _, pos = m.read_cstring(payload, pos)
            if name:
                raise FanoutRefused("a read that runs on every shard cannot be prepared under a name in the same "
                                    f"request (statement {name!r}); prepare it first, or use the unnamed statement")
            out.append(_parse(plan, payload[pos:]))
        elif tag == m.BIND:
            portal_end = payload.index(b"\x00")
            statement_end = payload.index(b"\x00", portal_end + 1)
            statement = payload[portal_end + 1:statement_end]
            if statement:
                entry = (named or {}).get(statement)
                if entry is None:
                    raise FanoutRefused(f"prepared statement {statement.decode(errors='replace')!r} does not exist")
                _, pos = m.read_cstring(entry[1])
                out.append(_parse(plan, entry[1][pos:]))
                added = True
                payload = payload[:portal_end + 1] + payload[statement_end:]
            out.append(m.message(m.BIND, payload))
        elif tag == m.DESCRIBE and payload[:1] == b"S" and payload[1:2] != b"\x00":
            out.append(m.message(m.DESCRIBE, b"S\x00"))  # the statement is the unnamed one on the shards
        else:
            out.append(request[start:end])
    return [b"".join(out)] * shards, added


def _parse(plan: FanoutPlan, parameter_types: bytes) -> bytes:
    """An unnamed Parse of the shards' text, with the client's parameter types."""
    return m.message(m.PARSE, b"\x00" + m.cstr(plan.shard_sql) + parameter_types)


class _Aside(RelayTarget["_Aside"]):
    """Stands in for the client on a server running a request pypool answers itself: keeps the reply."""

    __slots__ = ("client_io", "reply", "done")

    def __init__(self, client_io: ClientIO) -> None:
        self.io = self  # the server's relay writes its replies to ``write``
        self.hold_ready = False  # the whole reply, ReadyForQuery included, is kept
        self.client_io = client_io  # a server that cannot take more pauses the client
        self.reply = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        self.reply += data

    def pause_reading(self) -> None:
        self.client_io.pause_reading()

    def resume_reading(self) -> None:
        self.client_io.resume_reading()

    def hold_ready_for_query(self, data: bytes, end: int) -> int:
        return 0  # never asked: ``hold_ready`` is False

    def server_request_done(self, server: ServerConnection) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def server_lost(self, server: ServerConnection, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ServerError(f"server connection to {server.label} was lost during the request",
                                                {"C": sqlstates.CONNECTION_FAILURE}))


def describe_request(batch: bytes) -> bytes | None:
    """A Parse/Describe batch that ends in Flush as a request a server answers on its own: unnamed,
    ending in Sync (None if the batch holds anything else). The replies are the same."""
    out = []
    for tag, start, end in _messages(batch):
        payload = batch[start + 5:end]
        if tag == m.PARSE and b"\x00" in payload:
            out.append(m.message(m.PARSE, b"\x00" + payload[payload.index(b"\x00") + 1:]))
        elif tag == m.DESCRIBE and payload[:1] == b"S":
            out.append(m.message(m.DESCRIBE, b"S\x00"))
        elif tag == m.FLUSH:
            out.append(m.message(m.SYNC))
        else:
            return None
    return b"".join(out)


def _binds_unnamed(payload: bytes) -> bool:
    """Whether a Bind payload binds the unnamed statement."""
    portal_end = payload.find(b"\x00")
    return 0 <= portal_end < len(payload) - 1 and payload[portal_end + 1] == 0


class SessionShards(SessionCheckout):
    __slots__ = ()

    def _route_sharded(self, tag: int, payload: bytes) -> "Decision | None":
        """The decision for the request at the head of ``_pending``; None: wait for its Bind.

        A key may be a $n parameter: its value is in the batch's Bind, which the
        server would not answer before Sync or Flush anyway, so waiting costs nothing.
        A batch without a Bind only prepares or describes: any shard can, none
        runs it, so neither a missing key nor fan-out applies.
        """
        if tag == m.QUERY:
            return self.app.route(self, tag, payload)
        if tag == m.PARSE and payload[:1] == b"\x00":
            self._unnamed_parse = None  # replaced by this one
        elif tag == m.BIND and self._unnamed_parse is not None and _binds_unnamed(payload):
            tag, payload = m.PARSE, b"\x00" + self._unnamed_parse  # described aside earlier: its text
        found = self._batch_bind()
        if found is None:
            return None
        if found is _NO_BIND:
            decision = self.app.route(self, tag, payload, [])
            return replace(decision, shard=self.routing.shard, fanout=None, error=None)
        return self.app.route(self, tag, payload, found)  # type: ignore[arg-type]

    def _batch_bind(self) -> object:
        """The values of the first Bind of the batch in ``_pending``, _NO_BIND, or None: not all here yet."""
        buf = self._pending
        for tag, start, end in _messages(buf):
            if tag == m.BIND:
                try:
                    return bind_parameters(bytes(buf[start + 5:end]))
                except (ValueError, struct.error):
                    return []  # PostgreSQL reports the malformed Bind
            if tag in _BATCH_ENDS:
                return _NO_BIND
        return None

    def _shard_group(self, shard: int) -> "PoolGroup":
        group = self.shard_groups[shard]
        if group.successor is not None:  # a config reload rebuilt the pool
            group = latest_group(group)
            self.shard_groups = self.shard_groups[:shard] + (group,) + self.shard_groups[shard + 1:]
        return group

    def _use_shard(self, decision: "Decision") -> None:
        """Point ``self.group`` at the shard ``decision`` runs on (its own, else the pool's default_shard)."""
        sharding = self._router.sharding  # type: ignore[union-attr]
        healthy = None
        if decision.shard is None and sharding.default_shard.kind == "random_healthy":
            healthy = [i for i, g in enumerate(self.shard_groups) if g.primary is not None and g.primary.healthy]
        self.group = group = self._shard_group(sharding.target(decision.shard, healthy))
        if self._causal_writes:
            self.causal = self._causal_by_shard.get(group.shard)  # what reads on this shard must see

    # ------------------------------------------------- requests pypool answers

    async def _run_aside(self, group: "PoolGroup", role: str, request: bytes) -> bytes:
        """Run ``request`` (ending in Query or Sync) on a server of ``group``; its whole reply.

        Causal reads as on the ordinary path, with the client's state for this
        shard: a read waits for a replica that replayed the client's (or, in
        ``global`` mode, everyone's) writes there; a request that may have
        written takes its ticket before the caller writes the reply, and its
        connection learns the commit position before it goes back.
        """
        causal = self._causal_by_shard.get(group.shard) if self._causal_writes else None
        preferred = None
        if causal is not None and role != PRIMARY and group.causal.must_wait(causal, group.replica_candidates()):
            where = await self._where_causal_read_runs(role, group, causal)
            if isinstance(where, Fail):
                raise ServerError(where.message, {"C": where.sqlstate})
            role, preferred = where
        server = await group.checkout(role, preferred)
        clean = False
        ticket = None
        try:
            await self.sync_parameters(server)
            aside = _Aside(self.io)
            server.attach(aside)  # type: ignore[arg-type]
            for tag, _, _ in _messages(request):
                server.requests.sent(tag)
            server.bytes_sent += len(request)
            server.transport.write(request)  # type: ignore[union-attr]
            await aside.done
            clean = not server.closed and server.requests.status == _IDLE
            if clean and self._causal_writes and role != REPLICA and self._may_write(server, role, group):
                if causal is None:
                    causal = self._causal_by_shard[group.shard] = group.causal.client()  # type: ignore[assignment]
                    if group is self.group:
                        self.causal = causal
                ticket = group.causal.write_ended(causal)  # type: ignore[arg-type]
            return bytes(aside.reply)
        finally:
            if ticket is not None:
                server.detach()
                self._learn_commit_position(server, ticket, False)  # once the caller wrote the reply
            else:
                group.checkin(server, clean=clean)

    def _take_batch(self, first_length: int) -> bytes | None:
        """The request at the head of ``_pending`` (a Query, or messages up to Sync), removed; None: not whole."""
        buf = self._pending
        if buf[0] == m.QUERY:
            end = 1 + first_length
        else:
            end = next((e for tag, _, e in _messages(buf) if tag == m.SYNC), -1)
            if end < 0:
                return None
        request = bytes(buf[:end])
        del buf[:end]
        return request

    def _start_describe(self, decision: "Decision") -> bool:
        """A Parse/Describe batch ending in Flush, whose Bind (the key's value) comes after the replies.

        Attaching a shard's server now would tie the rest of the batch to it;
        instead one shard answers the description and the Bind starts a
        request routed by its values (the statement is re-prepared there).
        False: not such a batch, left to the ordinary path.
        """
        if self.statements is None or self._held_begin is not None:
            return False  # session mode keeps its server; a held BEGIN starts on its first statement's shard
        buf = self._pending
        ends = [tag for tag, _, _ in _messages(buf) if tag in _BATCH_ENDS]
        if not ends or ends[0] != m.FLUSH:
            return False
        batch = bytes(buf[:next(e for tag, _, e in _messages(buf) if tag == m.FLUSH)])
        request = describe_request(batch)
        if request is None:
            return False
        del buf[:len(batch)]
        for tag, start, end in _messages(batch):
            payload = batch[start + 5:end]
            if tag == m.PARSE:
                name_end = payload.index(b"\x00")
                body = payload[name_end + 1:]
                if name_end:
                    self.statements.names[payload[:name_end]] = (server_name(body), body)
                else:
                    self._unnamed_parse = body  # the Bind that follows needs it on its shard
        self._use_shard(decision)
        self._run_in_state(self._answer_aside(decision.role, request, flushed=True))
        return True

    def _start_unnamed_bind(self, decision: "Decision", first_length: int) -> bool:
        """A Bind of the unnamed statement described aside: it runs aside on its shard after a Parse of it.

        False: not such a request (or not whole yet: then ``_pending`` keeps it).
        """
        buf = self._pending
        if self._unnamed_parse is None or buf[0] != m.BIND or not _binds_unnamed(bytes(buf[5:1 + first_length])):
            return False
        request = self._take_batch(first_length)
        if request is None:
            return True  # wait for its Sync
        parse = m.message(m.PARSE, b"\x00" + self._unnamed_parse)
        self._use_shard(decision)
        self._run_in_state(self._answer_aside(decision.role, parse + request, added_parse=True))
        return True

    def _run_in_state(self, work: "Coroutine[Any, Any, None]") -> None:
        self.set_state(states.FANNED_OUT)
        self._checkout_task = self.io.spawn(self._answered_aside(work))

    async def _answered_aside(self, work: "Coroutine[Any, Any, None]") -> None:
        try:
            await work
        except (PoolTimeout, PoolRetired, ServerError) as exc:
            log.warning("client %s: %s", self.peer, exc)
            self.error_count += 1
            self.io.write(m.error_response(getattr(exc, "sqlstate", sqlstates.CONNECTION_FAILURE),
                                                  str(exc)) + m.ready_for_query())
        self._checkout_task = None
        if self.state is states.FANNED_OUT:
            self.set_state(states.IDLE)
            if self._pending:
                self._dispatch_pending()

    async def _answer_aside(self, role: str, request: bytes, flushed: bool = False, added_parse: bool = False) -> None:
        reply = await self._run_aside(self.group, role, request)  # type: ignore[arg-type]
        if added_parse and reply.startswith(_PARSE_COMPLETE):
            reply = reply[len(_PARSE_COMPLETE):]
        if flushed and reply.endswith(_READY_IDLE):
            reply = reply[:-len(_READY_IDLE)]  # the client sent Flush: its batch goes on
        self.io.write(reply)

    # ---------------------------------------------------------------- fan-out

    def _start_fanout(self, decision: "Decision", first_length: int) -> bool:
        """Run the request at the head of ``_pending`` on every shard; False: the batch is not whole yet."""
        request = self._take_batch(first_length)
        if request is None:
            return False
        assert decision.fanout is not None
        try:
            requests, added_parse = shard_requests(decision.fanout, request, len(self.shard_groups),
                                                   self.statements.names if self.statements is not None else None)
        except (FanoutRefused, ValueError, ProtocolViolation) as exc:
            self._pending[:0] = request
            self._fail_request(sqlstates.FEATURE_NOT_SUPPORTED, str(exc))
            return True
        self._run_in_state(self._fan_out(decision.fanout, decision.role, requests, added_parse))
        return True

    async def _fan_out(self, plan: FanoutPlan, role: str, requests: list[bytes], added_parse: bool) -> None:
        replies = await asyncio.gather(*(self._run_aside(self._shard_group(i), role, request)
                                         for i, request in enumerate(requests)), return_exceptions=True)
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        collector = FanoutCollector(plan, len(replies))
        for shard, reply in enumerate(replies):
            collector.feed(shard, reply)  # type: ignore[arg-type]
        result = collector.result()
        if added_parse and result.startswith(_PARSE_COMPLETE):
            result = result[len(_PARSE_COMPLETE):]
        self.query_count += 1
        self.xact_count += 1
        self.io.write(result)
