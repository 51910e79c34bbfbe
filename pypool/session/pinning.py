"""Session pinning: a client whose transactions leave state on their server connection keeps it.

Temporary tables, WITH HOLD cursors, session advisory locks and SQL
``PREPARE`` outlive a transaction on the server connection that ran it. In
transaction mode the client's next transaction would run elsewhere, so a
statement that creates such state reserves one of the pool's pinnable
connections (``PoolGroup.reserve_pin``; refused with 0A000 when
``session_pinning = "refuse"`` or all are taken). When the transaction ends
the server's catalogs are asked what the connection really holds
(CHECKING_PIN): something -> PINNED, where the client's bytes go straight to
its connection as in session mode; nothing -> back to transaction pooling.
A pinned client's statements that may release the state (DROP, DISCARD,
CLOSE, DEALLOCATE, the advisory unlock functions) make pypool ask again
after their transaction. The transaction's final ReadyForQuery waits for the
answer (``hold_ready``; the relay keeps it, ``_release_ready`` sends it), so the client's next statement already meets its
new state. Clients that never pin pay two attribute tests per transaction.
Part of ClientSession's chain (pypool/session/base.py), after SessionEffects.
"""

from __future__ import annotations

import asyncio
import logging

from pypool import sqlstates
from pypool.pool.server import ServerConnection, ServerError
from pypool.session import session_state as session
from pypool.session import states
from pypool.session.effects import SessionEffects

log = logging.getLogger("pypool.client")


class SessionPinning(SessionEffects):
    __slots__ = ()

    def _pinning_refusal(self, effects: session.Effects) -> str | None:
        """A statement may create or release state on its server connection: note it.

        Returns the text to send instead when the client may not be pinned.
        """
        if effects.pins is not None and self.pin_reason is None:
            group = self.group
            if group.config.session_pinning == "refuse":  # type: ignore[union-attr]
                return session.refusal_sql(*session.pin_refusal(effects.pins))
            if not group.reserve_pin():  # type: ignore[union-attr]
                return session.refusal_sql(*session.pin_refusal(
                    effects.pins, f"pypool would keep this client on its server connection, but all "
                                  f"max_pinned_connections ({group.max_pinned}) of pool "  # type: ignore[union-attr]
                                  f"\"{self.database}\" are pinned by other clients"))
            self.pin_reason = effects.pins[0]
            self.hold_ready = True
        elif self.pin_reason is not None and (effects.may_release or self.state is not states.PINNED):
            self.hold_ready = True
        return None

    def _pinned_request_done(self, server: ServerConnection) -> None:
        """A transaction of a client holding a pin ended: stay, or ask the catalogs what is left."""
        ticket = self._commit_ticket
        if ticket is not None:
            # Its connection stays busy with the client: the primary's current position covers the write.
            self._commit_ticket = None
            self._asynchronous_commit = False
            ticket.failed()
        if not self.hold_ready and self.state is states.PINNED:
            return
        was_pinned = self.state is states.PINNED
        if server.reported_change:
            self._settings_dirty = True  # the read-back after unpinning must not miss it
        self.server = None
        self.statements.unnamed_on = None  # type: ignore[union-attr]  # the catalog query drops it
        server.detach()
        if self._walker.held:
            self._pending[:0] = self._walker.take_held()
        self.set_state(states.CHECKING_PIN)
        self._checkout_task = self.io.spawn(self._check_pinned_state(server, was_pinned))

    async def _check_pinned_state(self, server: ServerConnection, was_pinned: bool) -> None:
        group = self.group
        assert group is not None
        try:
            if self.own_notify_pid:
                await self._deliver_own_notifications()
            rows = await server.query(session.PINNED_STATE_QUERY)
            held = session.held_state(rows[0]) if rows else ""
            if held and self.hold_ready and self._settings_dirty:
                await self._restore_startup_settings(server)  # a RESET on the connection it keeps
        except ServerError as exc:
            self._checkout_task = None
            group.checkin(server, clean=False)
            log.warning("client %s: cannot check the session state it keeps on %s: %s", self.peer, server.label, exc)
            self.close_with_error(sqlstates.CONNECTION_FAILURE,
                                  f"the server connection holding this session's state failed: {exc}")
            return
        except asyncio.CancelledError:
            group.checkin(server, clean=False)  # it holds the leaving client's state
            raise
        self._checkout_task = None
        if held or not self._settings_dirty:
            # The client learns its transaction ended once pypool knows where its next one runs
            # (and, when it is unpinned, which settings it has: after the read-back).
            self._release_ready()
        if held:
            if not was_pinned:
                log.info("client %s pinned to server connection %s (pid %s) for %s: it keeps %s",
                         self.peer, server.label, server.backend_pid, self.pin_reason, held)
            self.set_state(states.PINNED)
            self.server = server
            server.attach(self)
            data = bytes(self._pending)
            self._pending.clear()
            self._walker.reset()
            if data:
                self._forward(server, data)
            return
        self._unpin()
        if was_pinned:
            log.info("client %s unpinned from server connection %s: its session state is gone", self.peer,
                     server.label)
        if self._settings_dirty:
            self._settings_dirty = False
            self.set_state(states.READING_BACK)
            self._checkout_task = self.io.spawn(self._after_transaction(server, True, None))
            return
        self.set_state(states.IDLE)
        group.checkin(server)
        if self._pending:
            self._dispatch_pending()

    def _unpin(self) -> None:
        """Give back the pool's pin slot this client holds (or reserved)."""
        if self.pin_reason is not None:
            self.pin_reason = None
            self.group.release_pin()  # type: ignore[union-attr]

    @property
    def pinned(self) -> bool:
        """Keeps its server connection between transactions (SHOW CLIENTS, SHOW POOLS cl_pinned)."""
        return self.state is states.PINNED
