"""The relay: a logged-in client's bytes to its server connection, and what happens between requests.

The hot path is a straight line: bytes in -> one frame walk (FrameWalker)
-> one routing lookup -> one checkout -> the server's ``transport.write``; the server's
reply -> one frame walk for ReadyForQuery -> ``server_request_done`` ->
check-in. With no server attached the client's bytes wait in ``_pending``
until the first message is whole and routed. What goes to the client goes
through ``self.io`` (SessionIO). The last of ClientSession's chain (pypool/session/base.py), after
SessionShards.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pypool import sqlstates
from pypool.pool.group import WAITERS
from pypool.pool.server import ServerConnection, ServerError
from pypool.roles import PRIMARY, REPLICA
from pypool.protocol import messages as m
from pypool.protocol.frames import (ALL_TAGS, HEADER_SIZE, NO_TAGS, ProtocolViolation, first_message, length_at,
                                     tag_table)
from pypool.session import states
from pypool.session.effects import may_notify, needs_care
from pypool.session.shards import SessionShards

if TYPE_CHECKING:
    from pypool.routing.router import Decision

log = logging.getLogger("pypool.client")

_Q = m.QUERY
_S = m.SYNC
_F = m.FUNCTION_CALL
_X = m.TERMINATE
_P = m.PARSE
_B = m.BIND
_D = m.DESCRIBE
_STATEMENT = ord("S")  # Describe's target: a statement, not a portal
_COPY_TAGS = frozenset((m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL))
# Messages that may start a transaction. Anything else with no server attached is a
# COPY tail to drop, a Terminate, or not a frontend message at all.
_STARTS_TRANSACTION = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.FLUSH,
                                 m.FUNCTION_CALL))
# Messages that may need rewriting in transaction mode (named statements, session statements).
_CAREFUL_TAGS = tag_table((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE))
_IDLE = ord("I")


class SessionRelay(SessionShards):
    __slots__ = ()

    def _forward(self, server: ServerConnection, data: bytes) -> None:
        """Relay client bytes to ``server``, telling its request tracker about each message."""
        n = len(data)
        server.bytes_sent += n
        if not server.query_start:
            server.request_started()
        walker = self._walker
        if walker.held or walker.skip:
            data, pos = walker.start(data)
            n = len(data)
        else:
            pos = 0
        write = server.transport.write  # type: ignore[union-attr]
        if pos >= n:
            if n:
                write(data)
            return
        start = 0  # first byte not yet written (moves past messages rewritten on the way)
        # Transaction mode: these may need rewriting, so the walker gathers them whole.
        statements = self.statements
        careful = _CAREFUL_TAGS if statements is not None else NO_TAGS
        requests = server.requests
        # The client's unnamed statement may not be on this server connection: a Bind (or Describe) of it
        # parses it again first. ``parsed:parsed_end``: the body of the last unnamed Parse relayed as is.
        missing = statements is not None and statements.unnamed_on is not server and statements.unnamed is not None
        parsed = parsed_end = -1
        try:
            while True:
                pos, end = walker.next(data, pos, n, ALL_TAGS, careful)
                if end < 0:
                    break
                tag = data[pos]
                if careful[tag] and (needs_care(tag, data, pos + 5, end)
                                     or self._hub is not None and may_notify(tag, data, pos + 5, end)):
                    if pos > start:
                        write(data[start:pos])
                    if parsed >= 0:
                        statements.unnamed, statements.unnamed_on = data[parsed:parsed_end], server  # type: ignore[union-attr]
                        parsed = -1
                    if not self._forward_with_care(server, data, pos, end):
                        return  # paused: the rest waits in _pending
                    missing = missing and statements.unnamed_on is not server  # type: ignore[union-attr]
                    start = end
                elif tag == _X:
                    if pos > start:
                        write(data[start:pos])
                    self.close()
                    return
                else:
                    requests.sent(tag)
                    if careful[tag]:  # transaction mode: a Query, or a message naming no statement
                        if tag == _P:
                            parsed, parsed_end = pos + 6, end  # its body: after the (empty) name
                            missing = False
                        elif missing and (tag == _B or tag == _D and data[pos + 5] == _STATEMENT):
                            if pos > start:
                                write(data[start:pos])
                                start = pos
                            self._parse_unnamed_again(server)
                            missing = False
                if end == n:
                    pos = n
                    break
                pos = end
        except ProtocolViolation as exc:
            self._protocol_violation(str(exc))
            return
        if parsed >= 0:
            statements.unnamed, statements.unnamed_on = data[parsed:parsed_end], server  # type: ignore[union-attr]
        if pos > start:
            write(data[start:pos] if start or pos < n else data)

    def _dispatch_pending(self) -> None:
        """No server attached: route the first complete message and get a connection."""
        if self.state is not states.IDLE:
            return
        buf = self._pending
        while buf:
            try:
                first = first_message(buf, self._max_message)
            except ProtocolViolation as exc:
                self._protocol_violation(str(exc))
                return
            if first is None:
                return  # wait for the whole first message: routing may need its text
            tag, end = first
            length = end - 1
            if tag == _X:
                self.close()
                return
            if tag in _COPY_TAGS:
                # The tail of a COPY the server already ended with an error (it went
                # idle and was checked in): PostgreSQL drops these, so must we,
                # rather than check out a server and keep it for an idle client.
                del buf[:1 + length]
                continue
            if tag not in _STARTS_TRANSACTION:
                # PostgreSQL closes the connection too; forwarding would cost a server connection.
                self._protocol_violation(f"invalid frontend message type {tag} ({chr(tag)!r})")
                return
            if self._discarding:
                del buf[:1 + length]
                if tag == _S:
                    self._discarding = False
                    self._write_ready()
                continue
            if self.shard_groups:
                decision = self._route_sharded(*self._routable(tag, bytes(buf[5:1 + length])))
                if decision is None:
                    return  # the batch's Bind (the key's value) has not arrived
            else:
                decision = self.app.route(self, *self._routable(tag, bytes(buf[5:1 + length])))
            if decision.reply is not None or decision.hold_begin or decision.ends_empty_transaction:
                self._answer_locally(decision, length)
                continue
            if self.shard_groups:
                if decision.error is not None:
                    self._refuse_request(decision.error)
                    continue
                if decision.fanout is not None:
                    if self._start_fanout(decision, length) and self.state is states.IDLE:
                        continue  # refused at once: the next request may follow
                    return
                if tag != _Q and (self._start_describe(decision) or self._start_unnamed_bind(decision, length)):
                    return
                self._use_shard(decision)
            try:
                self._begin_request(decision.role)
            except ServerError as exc:
                self._fail_request(exc.sqlstate, str(exc))
                continue
            return

    def _start_fast(self, data: bytes) -> bool:
        """Start a transaction from ``data`` with an idle connection, without copying or waiting.

        The common case of transaction pooling: a client in the default routing
        state sends one request, its routing decision is memoised, and the
        chosen server has an idle connection already set up like this client.
        Only a client that never changed its routing state (PgCat's custom
        commands) can use memoised decisions. Returns False to leave anything
        else to ``_dispatch_pending``.
        """
        routing = self.routing
        if routing.role_override is not None or routing.primary_reads is not None \
                or self._held_begin is not None or self._discarding:
            return False
        n = len(data)
        if n < HEADER_SIZE or data[0] not in _STARTS_TRANSACTION:
            return False
        end = 1 + length_at(data, 1)[0]
        if end > n or end < HEADER_SIZE or end > self._max_message:
            return False
        decision = self._router.route_default(data if end == n else data[:end])  # type: ignore[union-attr]
        if decision is None:
            return False
        role = decision.role
        if self.causal is not None and role != PRIMARY and self._must_wait_for_replica():
            self._pending += data
            self._wait_for_replica(role)
            return True
        try:
            got = self.group.checkout_now(role, self._queued_ready, self._queued_failed)  # type: ignore[union-attr]
        except ServerError:
            return False  # ``_dispatch_pending`` answers it with the error
        if got.__class__ in WAITERS or got.applied_key != self._parameters_key:  # type: ignore[union-attr]
            self._pending += data
            self._not_ready_yet(role, got)
            return True
        # ``_attach`` without the copy through ``_pending``.
        self.set_state(states.ATTACHED)
        self.server = got  # type: ignore[assignment]
        got.attach(self)  # type: ignore[union-attr]
        if self._causal_writes and role != REPLICA:
            self._track_writes(got, role)  # type: ignore[arg-type]
        self._replay = (data, role, None) if role != PRIMARY else None
        self._forward(got, data)  # type: ignore[arg-type]
        return True

    def _routable(self, tag: int, payload: bytes) -> tuple[int, bytes]:
        """What the router sees of a message: a Bind of a named statement shows its text."""
        statements = self.statements
        if tag == m.BIND and statements is not None and statements.names:
            portal_end = payload.find(b"\x00")
            entry = statements.names.get(payload[portal_end + 1:payload.find(b"\x00", portal_end + 1)])
            if entry is not None:
                return m.PARSE, b"\x00" + entry[1]
        return tag, payload

    def _answer_locally(self, decision: "Decision", length: int) -> None:
        """Answer a simple Query without a server: custom commands and a held-back BEGIN."""
        del self._pending[:1 + length]
        if decision.hold_begin:
            self._held_begin = decision.statement
            self.io.write(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
            return
        if decision.ends_empty_transaction:
            self._held_begin = None
            self.xact_count += 1  # a transaction too (and the idle reaper sees the next held BEGIN as new)
            self.io.write(m.command_complete(decision.end_tag) + m.ready_for_query())
            return
        self.io.write(decision.reply + self._ready_bytes())  # type: ignore[operator]

    @property
    def in_transaction(self) -> bool:
        """Attached to a server connection that is inside a transaction or still owes replies,
        inside a transaction whose BEGIN pypool answered and holds (no server yet), or waiting
        for the servers of a request pypool runs itself (a read on every shard)."""
        server = self.server
        if server is None:
            return self._held_begin is not None or self.state is states.FANNED_OUT
        return server.requests.in_transaction

    def _ready_bytes(self) -> bytes:
        return m.ready_for_query(b"T" if self._held_begin is not None else b"I")

    def _write_ready(self) -> None:
        self.io.write(self._ready_bytes())

    def server_request_done(self, server: ServerConnection) -> None:
        """The server answered everything asked; in transaction mode, give it back."""
        if self._notifications:
            self.io.write(b"".join(self._notifications))
            self._notifications.clear()
        self._replay = None
        self.query_count += 1
        if server.requests.status != _IDLE:
            return
        self.xact_count += 1
        if self._session_mode:
            return
        if self._schema_changing:
            self._schema_changing = False
            self.group.schema.bump()  # type: ignore[union-attr]
        if self.pin_reason is not None:
            self._pinned_request_done(server)
            return
        self.server = None
        self.statements.unnamed_on = None  # type: ignore[union-attr]  # it may run others' statements now
        if self._walker.held:
            # A message that started arriving after the end of the request goes to the next one.
            self._pending[:0] = self._walker.take_held()
        ticket = self._commit_ticket
        asynchronous = False
        if ticket is not None:
            self._commit_ticket = None
            asynchronous, self._asynchronous_commit = self._asynchronous_commit, False
        read_back = self._settings_dirty or server.reported_change
        if read_back or self.hold_ready:
            self._settings_dirty = False
            self.set_state(states.WAITING_FOR_LISTENER if self.own_notify_pid else states.READING_BACK)
            server.detach()  # no longer relaying: pypool itself asks it (SHOW SERVERS: tested)
            self._checkout_task = self.io.spawn(
                self._after_transaction(server, read_back, ticket, asynchronous))
            return
        self.set_state(states.IDLE)
        if ticket is None:
            self.group.checkin(server)  # type: ignore[union-attr]
        else:
            server.detach()  # pypool itself asks it where the commit lies, then checks it in
            self._learn_commit_position(server, ticket, asynchronous)
        if self._pending:
            self._dispatch_pending()

    def write_committed(self, server: ServerConnection) -> None:
        """A transaction that may have written on the primary ended; its reply is not written yet.

        Its commit position is pending from now on (in ``global`` mode for
        every worker's reads too): a read that must see it waits for the
        lookup the connection runs once it is released. Session pools have no
        causal state, so this is transaction pooling only.
        """
        group = self.group
        causal = group.causal  # type: ignore[union-attr]
        if self.causal is None:
            # Its first write (on this shard): from now on its reads must see its writes.
            self.causal = self._causal_by_shard[group.shard] = causal.client()  # type: ignore[union-attr, assignment]
        self._commit_ticket = causal.write_ended(self.causal)  # type: ignore[arg-type]

    def server_lost(self, server: ServerConnection, exc: Exception | None) -> None:
        self.server = None
        self._walker.reset()
        group = self.group
        replay = self._replay
        self._replay = None
        if group is not None:
            group.checkin(server, clean=False)
        if group is not None and replay is not None and not server.replied and self.state.relaying:
            # The read never got an answer: ban that replica and run it elsewhere.
            data, role, held_begin = replay
            group.ban_address(server.address, f"connection lost during a request: {exc or 'closed'}")
            log.warning("client %s: server %s died before answering; retrying the read elsewhere",
                        self.peer, server.label)
            self._pending[:0] = data
            self._held_begin = held_begin
            self._start_checkout(role, None)
            return
        log.warning("client %s: server %s closed the connection during a request", self.peer, server.label)
        self.close_with_error(sqlstates.CONNECTION_FAILURE,
                                   f"server connection to {server.label} was lost; the transaction, "
                                   "if any, was rolled back")

    def _fail_request(self, sqlstate: str, text: str) -> None:
        """Answer the request at the head of ``_pending`` with an error, as a server would."""
        self._refuse_request(m.error_response(sqlstate, text))

    def _refuse_request(self, error: bytes) -> None:
        """Answer the request at the head of ``_pending`` with the ErrorResponse ``error``."""
        io = self.io
        if io.is_closing():
            return
        self.error_count += 1
        io.write(error)
        buf = self._pending
        while True:
            try:
                first = first_message(buf)
            except ProtocolViolation:
                first = None
            if first is None:
                break
            tag, end = first
            del buf[:end]
            if tag in (_Q, _F, _S):
                io.write(m.ready_for_query())
                return
        # An extended-protocol batch whose Sync has not arrived yet.
        self._discarding = True

    def _protocol_violation(self, text: str) -> None:
        log.warning("client %s: protocol violation: %s", self.peer, text)
        self.close_with_error(sqlstates.PROTOCOL_VIOLATION, text)
