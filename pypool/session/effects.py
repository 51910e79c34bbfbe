"""What a client's statements do to its session in transaction mode, and keeping servers in step.

Named prepared statements are renamed per server connection
(pypool/session/prepared.py), SET/RESET/DISCARD and LISTEN are noted
(pypool/session/session_state.py), the client's settings are synced onto each
server connection it gets and read back after a transaction that changed them.
The first of ClientSession's chain (pypool/session/base.py), on SessionBase.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from pypool import listen
from pypool.causal.requirement import COMMIT_POSITION_QUERY
from pypool.pool.server import ServerConnection, ServerError
from pypool.protocol import messages as m
from pypool.session import session_state as session
from pypool.session.base import SessionBase
from pypool.session.prepared import Rewriter, ServerStatements, names_statement
from pypool.session import states

if TYPE_CHECKING:
    from pypool.causal.pool_causal import CommitTicket
    from pypool.pool.group import PoolGroup

log = logging.getLogger("pypool.client")

_Q = m.QUERY
_P = m.PARSE
_B = m.BIND
_D = m.DESCRIBE
_STATEMENT = ord("S")  # Describe's target: a statement, not a portal
# NOTIFY or pg_notify() in a listening client's statement (a false positive costs one listener round trip).
_NOTIFY = re.compile(rb"(?i)notify")
# How long the end of a client's own NOTIFY waits for the listener before answering anyway.
OWN_NOTIFY_WAIT = 5.0


def needs_care(tag: int, data: bytes, start: int, end: int) -> bool:
    """Transaction mode: does this message name a statement or change the session?"""
    if end > len(data):
        return True  # cannot tell yet: gather it whole
    if tag == _Q:
        return session.might_matter(data, start, end)
    if tag == _P:
        # An empty (malformed) Parse takes the careful path, which reports it.
        if start >= end or data[start] != 0:
            return True
        # Only the query text: the parameter types after it may contain any byte (';' too).
        text_end = data.find(b"\x00", start + 1, end)
        return text_end < 0 or session.text_might_matter(data, start + 1, text_end)
    if tag == _B and start + 1 < end and data[start] == 0:  # the usual unnamed portal: named statement?
        return data[start + 1] != 0
    if tag == _D:  # 'S' or 'P', then the name: a named statement needs care (names_statement, written out)
        return start + 1 >= end or (data[start] == _STATEMENT and data[start + 1] != 0)
    return names_statement(tag, data, start, end)


def may_notify(tag: int, data: bytes, start: int, end: int) -> bool:
    """A listening client's message that ``needs_care`` let through: might it NOTIFY (a look too)?"""
    return (tag == _Q or tag == _P) and _NOTIFY.search(data, start, end) is not None


class SessionEffects(SessionBase):
    __slots__ = ()

    def _forward_with_care(self, server: ServerConnection, data: bytes, pos: int, end: int) -> bool:
        """Send one whole Query/Parse/Bind/Describe/Close at ``data[pos:end]``, rewritten as needed.

        Returns False when forwarding must pause (a LISTEN waits for the
        pool's listener): the message and what follows go to ``_pending``.
        """
        tag = data[pos]
        payload = data[pos + 5:end]
        raw = data[pos:end]
        effects = session.NOTHING
        if tag == _Q or tag == _P:
            text_at = 0 if tag == _Q else payload.find(b"\x00") + 1
            text_end = payload.find(b"\x00", text_at)
            if text_end < 0:
                self._protocol_violation(f"unterminated query text in message type {chr(tag)!r}")
                return False
            if _NOTIFY.search(payload, text_at, text_end):
                self._may_notify(server)
                if tag == _P and text_at > 1:
                    self.statements.notifying.add(payload[:text_at - 1])  # type: ignore[union-attr]
            sql = payload[text_at:text_end].decode("utf-8", "replace")
            effects = session.analyze(sql) if session.might_matter(payload, text_at, text_end) else session.NOTHING
            if effects.listen and self._must_wait_for_listener(effects):
                self._pending += data[pos:]
                resume = self.state  # ATTACHED, or PINNED
                self.set_state(states.WAITING_FOR_LISTENER)
                self._checkout_task = self.io.spawn(self._listen_then_resume(effects, resume))
                return False
            replacement = self._apply_session_effects(effects, server) if effects is not session.NOTHING else None
            if replacement is not None:
                payload = payload[:text_at] + replacement.encode() + payload[text_end:]
                raw = m.message(tag, payload)
            if tag == _P and text_at > 1 and effects.settings:
                self.statements.changing_settings.add(payload[:text_at - 1])  # type: ignore[union-attr]
        elif tag == _B and (self.statements.changing_settings or self.statements.notifying):  # type: ignore[union-attr]
            portal_end = payload.find(b"\x00")
            name = payload[portal_end + 1:payload.find(b"\x00", portal_end + 1)]
            if name in self.statements.changing_settings:  # type: ignore[union-attr]
                self._settings_dirty = True
            if name in self.statements.notifying:  # type: ignore[union-attr]
                self._may_notify(server)
        transport = server.transport
        requests = server.requests
        if tag == _Q:
            requests.sent(tag)
            transport.write(raw)  # type: ignore[union-attr]
            return True
        rewriter = self._rewriter(server)
        rewriter.message(tag, payload, raw)
        if tag == _P and payload[:1] == b"\x00":  # the unnamed statement, as the server has it
            self.statements.unnamed, self.statements.unnamed_on = payload[1:], server  # type: ignore[union-attr]
        self._send_rewritten(server, rewriter)
        if effects.forget_all:
            # A prepared DEALLOCATE ALL / DISCARD ALL drops itself too when it runs: the server
            # keeps nothing, and each Bind of it prepares it again first.
            server.statements.clear()  # type: ignore[union-attr]
        return True

    def _rewriter(self, server: ServerConnection) -> Rewriter:
        """A Rewriter of this client's statements onto ``server``, placed after what was sent to it."""
        statements = server.statements
        if statements is None:
            group = self.group
            assert group is not None
            statements = server.statements = ServerStatements(group.config.prepared_statements_cache_size,
                                                              group.schema)
        requests = server.requests
        return Rewriter(self.statements, statements, statements.epoch + requests.owed,  # type: ignore[arg-type]
                        requests.parse_rank)

    def _send_rewritten(self, server: ServerConnection, rewriter: Rewriter) -> None:
        requests = server.requests
        requests.sent_rewritten(rewriter.rank)
        if requests.failed and requests.owed <= 0:
            # The server already reported an error for this batch and skips to its Sync.
            server.statements.on_error(self.statements)  # type: ignore[union-attr]
        server.transport.write(b"".join(rewriter.out))  # type: ignore[union-attr]

    def _parse_unnamed_again(self, server: ServerConnection) -> None:
        """A Bind/Describe of the unnamed statement on a server connection that may not hold it.

        PostgreSQL keeps the unnamed statement until the next Parse of one or a
        simple Query; through pypool the client's next request may run on
        another connection, or on this one after others (and pypool) used it.
        So its last Parse is sent again first, the ParseComplete swallowed.
        """
        rewriter = self._rewriter(server)
        rewriter.parse_unnamed()
        self._send_rewritten(server, rewriter)
        self.statements.unnamed_on = server  # type: ignore[union-attr]

    def _may_notify(self, server: ServerConnection) -> None:
        """A statement that may NOTIFY runs on ``server``: its notifications carry this client's PID."""
        listen.note_sender(server, self.process_id)
        if self._hub is not None:
            self.own_notify_pid = server.backend_pid
            self.hold_ready = True  # its ReadyForQuery waits for its own notifications

    def _apply_session_effects(self, effects: session.Effects, server: ServerConnection) -> str | None:
        """Note what a statement does to the client's session; the text to send instead, if any."""
        if effects.refusal is not None:
            self._listen_error = None
            return session.refusal_sql(*effects.refusal)
        if effects.pins is not None or effects.may_release:
            refusal = self._pinning_refusal(effects)
            if refusal is not None:
                return refusal
        if effects.settings:
            self._settings_dirty = True
            if effects.resets and self._startup_settings:
                self.hold_ready = True  # its ParameterStatus must show the startup values first
        if effects.asynchronous_commit:
            self._asynchronous_commit = True  # the commit position to learn is the insert position
        if effects.schema:
            # Statements prepared from now on parse again, and again once the DDL is committed
            # (``server_request_done``): in between others may still prepare on the old schema.
            self.group.schema.bump()  # type: ignore[union-attr]
            self._schema_changing = True
        statements = self.statements
        assert statements is not None
        if effects.forget_all:
            # DEALLOCATE ALL / DISCARD ALL run on the server as sent (drivers read their command
            # tags), so it drops every statement it has; an error may make it skip them, which
            # the Close that precedes each Parse pypool sends makes harmless.
            statements.clear()
            if server.statements is not None:
                server.statements.clear()
            if effects.settings and self._hub is not None:  # DISCARD ALL: the session starts over
                self._hub.unlisten(self, "*")
        if effects.forget:
            names = [name.encode() for name in effects.forget]
            if not all(name in statements.names for name in names):
                return None  # the server's "does not exist" error is the right answer
            for name in names:
                del statements.names[name]
            return session.NOOP_STATEMENT
        if effects.listen:
            for op, channel in effects.listen:
                if op == "UNLISTEN" and self._hub is not None:
                    self._hub.unlisten(self, channel)
            if all(op == "UNLISTEN" for op, _ in effects.listen):
                # As sent: server connections listen on nothing of a client's, so the server's
                # reply is PostgreSQL's and the text may hold other statements (pool resets).
                return None
            if self._listen_error is not None:
                error, self._listen_error = self._listen_error, None
                return session.refusal_sql(f"LISTEN failed: pypool's listener connection: {error}",
                                           "retry later; the pool's primary must accept a connection")
            return session.listen_stand_in(effects.listen)
        return None

    def _must_wait_for_listener(self, effects: session.Effects) -> bool:
        if self._listen_error is not None:
            return False
        hub = self._hub
        return any(op == "LISTEN" and (hub is None or not hub.is_listening(self, channel))
                   for op, channel in effects.listen)

    async def _listen_then_resume(self, effects: session.Effects, resume: states.ClientState) -> None:
        """Make the pool's listener LISTEN before the client's LISTEN is answered, then go on."""
        hub = self._hub = listen.hub_for(self.group)  # type: ignore[arg-type]
        try:
            for op, channel in effects.listen:
                if op == "LISTEN":
                    # Shielded: the listener's conversation must not stop half-way if this client leaves.
                    registration = asyncio.ensure_future(hub.listen(self, channel))
                    try:
                        await asyncio.shield(registration)
                    except asyncio.CancelledError:
                        def forget(done: asyncio.Future[None]) -> None:
                            if not done.cancelled():
                                done.exception()  # retrieved: the client is gone anyway
                            hub.unlisten(self, "*")
                        registration.add_done_callback(forget)
                        raise
        except ServerError as exc:
            log.warning("client %s: LISTEN failed: %s", self.peer, exc)
            self._listen_error = str(exc)
        self._checkout_task = None
        data = bytes(self._pending)
        self._pending.clear()
        server = self.server
        if server is not None:
            self.set_state(resume)
            self._forward(server, data)
        else:
            self._pending += data
            self.set_state(states.IDLE)
            self._dispatch_pending()

    def deliver_notification(self, message: bytes) -> None:
        """A NotificationResponse from the pool's listener: write it between whole messages."""
        io = self.io
        if not self.state.relaying or io.is_closing():
            return
        if self.server is None:
            io.write(message)
        else:
            self._notifications.append(message)

    def hold_ready_for_query(self, data: bytes, end: int) -> int:
        """Keep the ReadyForQuery ending at ``data[end]`` for ``_release_ready``; its length."""
        self._held_ready = data[end - 6:end]
        return 6

    async def _deliver_own_notifications(self) -> None:
        """Wait for the listener to hand out what the transaction notified (before its ReadyForQuery).

        PostgreSQL delivers a session's own notifications before that
        ReadyForQuery. The server connection stays out of the pool meanwhile, so
        every notification from its backend PID until then is this client's.
        """
        assert self._hub is not None
        barrier = asyncio.ensure_future(self._hub.barrier())  # not cancelled half-way: the listener is shared
        barrier.add_done_callback(lambda done: done.cancelled() or done.exception())  # reported below, if awaited
        try:
            async with asyncio.timeout(OWN_NOTIFY_WAIT):  # not wait_for: it could drop the client's cancel
                await asyncio.shield(barrier)
        except (ServerError, asyncio.TimeoutError) as exc:
            log.warning("client %s: the listener did not confirm its notifications: %s", self.peer, exc or "timeout")
        self.own_notify_pid = 0  # the caller sends the held ReadyForQuery (``_release_ready``)

    def _idle_again(self) -> None:
        """The coroutine that ran after a transaction is done: on to the next request, if any."""
        self._checkout_task = None
        if self.state.relaying:
            self.set_state(states.IDLE)
            if self._pending:
                self._dispatch_pending()

    def _set_settings(self, session_settings: dict[str, str]) -> None:
        """The client's settings: its startup parameters, overridden by what its SETs left."""
        self._desired_settings = {**self._startup_settings, **session_settings}
        self._parameters_key = tuple(sorted(self._desired_settings.items()))
        if self.statements is not None:
            self.statements.search_path = self._desired_settings.get("search_path", "")

    async def sync_parameters(self, server: ServerConnection) -> None:
        """Make the server session carry this client's settings (and no other client's); the login too
        (to learn how they are reported)."""
        statement = session.sync_statement(self._desired_settings, server.applied_parameters)
        if statement is not None:
            try:
                await server.query(statement)
            except ServerError as exc:
                # A bad value from the client's startup packet: tell the client, keep the server.
                raise ServerError(f"cannot apply session settings: {exc}", exc.fields) from None
        server.applied_parameters = dict(self._desired_settings)
        server.applied_key = self._parameters_key

    async def _restore_startup_settings(self, server: ServerConnection) -> dict[str, str]:
        """The session settings ``server`` holds after the client's transaction, startup values restored.

        A RESET puts a setting back to its default: in PostgreSQL the value the
        client's startup packet gave, on a pooled server connection the server's
        own. pypool sets the startup values again and tells the client the
        values as PostgreSQL would have left them (ParameterStatus).
        """
        rows = await server.query(session.SETTINGS_QUERY)
        settings = {str(name).lower(): str(value) for name, value in rows}
        lost = {k: v for k, v in self._startup_settings.items() if k not in settings}
        if not lost:
            return settings
        before = dict(server.parameters)
        await server.query(session.sync_statement(lost, {}))  # type: ignore[arg-type]
        self.io.write(b"".join(m.parameter_status(k, v) for k, v in server.parameters.items()
                               if before.get(k) != v))
        return {**settings, **lost}

    def _release_ready(self) -> None:
        """Send the ReadyForQuery the server relay held back while pypool followed up the transaction.

        The one place a held ReadyForQuery is written, after whatever it waited
        for (own notifications, the pin check, startup settings restored).
        """
        self.hold_ready = False
        ready, self._held_ready = self._held_ready, None
        if ready and not self.io.is_closing():
            self.io.write(ready)

    def _learn_commit_position(self, server: ServerConnection, ticket: CommitTicket, asynchronous: bool) -> None:
        """Learn a write's commit position on its released connection; the client goes on meanwhile."""
        self.io.spawn(self._after_transaction(server, False, ticket, asynchronous))

    async def _after_transaction(self, server: ServerConnection, read_back: bool, ticket: CommitTicket | None,
                                 asynchronous: bool = False) -> None:
        """Talk to a released connection before it goes back: own notifications, settings, commit position.

        The client's own NOTIFY (``own_notify_pid``): its held ReadyForQuery
        waits in WAITING_FOR_LISTENER until the listener has handed those
        notifications out. ``read_back``: the transaction ran SET/RESET; the
        client waits in READING_BACK until its settings are known (startup
        values restored before the ReadyForQuery). ``ticket``: the transaction
        may have written (causal reads, ``write_committed``); its commit
        position is asked on the same connection, whose session is the one
        that committed, after the client was let go (``asynchronous``: it ran
        SET LOCAL synchronous_commit = off).
        """
        group = self.group
        assert group is not None
        clean = True
        holds_client = read_back or self.hold_ready
        try:
            if self.own_notify_pid:
                await self._deliver_own_notifications()
                if read_back and self.state.relaying:
                    self.set_state(states.READING_BACK)
            if read_back:
                clean = await self._read_back_settings(server)
            if holds_client:
                self._release_ready()
                self._idle_again()
            if ticket is not None and clean:
                clean = await self._learn_commit(group, server, ticket, asynchronous)
                if clean:
                    ticket = None  # learnt
        except asyncio.CancelledError:
            clean = False
            raise
        finally:
            if ticket is not None:  # not learnt here: the primary's current position covers it
                ticket.failed()
            group.checkin(server, clean=clean)

    async def _read_back_settings(self, server: ServerConnection) -> bool:
        """Learn the session settings a transaction left; False if the server could not say.

        PostgreSQL has already applied its rules (SET LOCAL ends with the
        transaction, a rolled-back SET is undone), so the server's own view is
        the client's new session state.
        """
        try:
            settings = await self._restore_startup_settings(server)
        except ServerError as exc:
            log.warning("client %s: cannot read back session settings from %s: %s", self.peer, server.label, exc)
            return False
        self._set_settings(settings)
        server.applied_parameters = settings
        server.applied_key = self._parameters_key if settings == self._desired_settings else None
        return True

    async def _learn_commit(self, group: "PoolGroup", server: ServerConnection, ticket: CommitTicket,
                            asynchronous: bool) -> bool:
        """Ask the connection that committed where its commit lies; False if it could not say.

        ``asynchronous``: the transaction ran SET LOCAL synchronous_commit = off
        (the session's own setting the query reads itself).
        """
        timeout = group.settings.healthcheck_timeout
        try:
            # A connection that hangs now (its server stopped) must not stay out of the pool for good.
            async with asyncio.timeout(timeout):  # not wait_for: it could drop the client's cancel
                rows = await server.query(COMMIT_POSITION_QUERY)
        except (ServerError, asyncio.TimeoutError) as exc:
            why = str(exc) or f"no answer within healthcheck_timeout ({timeout * 1000:.0f} ms)"
            log.warning("client %s: cannot learn the commit position from %s: %s", self.peer, server.label, why)
            return False
        ticket.learnt(rows[0] if rows else [], asynchronous)
        return True

