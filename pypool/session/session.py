"""A client's session, sans-IO: fed client bytes, server replies and checkout results.

``ClientSession`` is a client as the pooler knows it: its state (one
ClientState, changed only in ``set_state``), identity, routing, named
statements, settings, pin, causal-read state and SHOW CLIENTS statistics. Its
behaviour is built from one module per concern, a chain of subclasses over the
declared attributes of pypool/session/base.py: what statements do to the
session (effects.py), pinning (pinning.py), checkouts (checkout.py), sharded
pools (shards.py) and the relay (relay.py).
Everyone that holds a client (the client registry, SHOW CLIENTS, the
idle-in-transaction reaper, shutdown, the LISTEN hub, the server connection it
is attached to) holds its ClientSession.

It never touches a socket or the event loop: everything it does to the outside
goes through a ``SessionIO`` (pypool/client.py's ClientConnection, the asyncio
adapter; a recording fake in unit tests). The work it runs in the background
(checkout waits, settings sync, read-backs) are coroutines over pool and server
objects, started with ``SessionIO.spawn``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pypool import sqlstates
from pypool.pool.server import ServerError
from pypool.protocol import messages as m
from pypool.session import states
from pypool.session.base import SessionHost, SessionIO, Spawned
from pypool.session.prepared import ClientStatements
from pypool.session.relay import SessionRelay

if TYPE_CHECKING:
    from pypool.pool.group import PoolGroup
    from pypool.pool.server import ServerConnection

__all__ = ["ClientSession", "SessionIO", "SessionHost", "Spawned"]

log = logging.getLogger("pypool.client")


class ClientSession(SessionRelay):
    """A logged-in (or logging-in) client as the pooler knows it; its attributes: pypool/session/base.py."""

    __slots__ = ()

    def __init__(self, app: SessionHost["ClientSession"], io: SessionIO, peer: str = "?") -> None:
        super().__init__(app, io, peer)
        self._queued_ready = self._on_queued_ready
        self._queued_failed = self._on_queued_failed

    def __repr__(self) -> str:
        return f"<Client {self.user}@{self.database} from {self.peer}>"

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        """Bytes from a logged-in client (the adapter calls this directly once the login is done)."""
        if not self.state.relaying:
            return  # closed: nothing more is read
        server = self.server
        if server is not None and not self._pending:
            self._forward(server, data)
            return
        if server is None and self._walker.skip:
            # The tail of a CopyData the server stopped listening to (it ended
            # the COPY with an error and was released): PostgreSQL drops it.
            data, pos = self._walker.start(data)
            if pos >= len(data):
                return
            data = data[pos:]
        if self._pending or self.state is not states.IDLE or not self._start_fast(data):
            self._pending += data
            self._dispatch_pending()

    def join_pool(self, group: "PoolGroup", parameters: dict[str, str], startup_settings: dict[str, str]) -> None:
        """Logged in to ``group``'s pool: set up its routing, statements, settings and causal reads.

        ``parameters``: the settings of its startup packet as given (reported
        by SHOW CLIENTS); ``startup_settings``: those with ``options`` applied.
        """
        self.counted_as = (self.database, self.user)
        self.group = group
        self._router = router = self.app.routers[self.database]
        if router.sharded:
            self.shard_groups = self.app.shard_groups(self.database, self.user)
        self.session_parameters = parameters
        self._startup_settings = startup_settings
        self._session_mode = group.pool_mode == "session"
        self._join_causal(group)
        if not self._session_mode:
            self.statements = ClientStatements(group.schema)
        self._set_settings({})

    @property
    def desired_settings(self) -> dict[str, str]:
        """The settings each server connection running its requests must carry."""
        return self._desired_settings

    def logged_in(self, early: bytes) -> None:
        """The login is done: IDLE, and the requests the client sent before its greeting (``early``) start."""
        self.set_state(states.IDLE)
        if early:
            self._pending += early
            self._dispatch_pending()

    # ------------------------------------------------------------------ close

    def close_with_error(self, sqlstate: str, text: str, severity: str = "FATAL") -> None:
        io = self.io
        if not io.is_closing():
            io.write(m.error_response(sqlstate, text, severity=severity))
        self.close()

    def terminate_for_shutdown(self) -> None:
        self.close_with_error(sqlstates.ADMIN_SHUTDOWN, "pypool is shutting down")

    def close(self) -> None:
        """Let go of everything the client holds (its server connection back, clean or not), then hang up."""
        if self.state is states.CLOSED:
            return
        self.set_state(states.CLOSED)
        self.app.client_disconnected(self)
        if self.counted_as is not None:
            self.app.user_clients.release(self.counted_as)
            self.counted_as = None
        if self._checkout_task is not None:
            self._checkout_task.cancel()
            self._checkout_task = None
        if self._queued is not None:
            self._queued.cancel()
            self._queued = None
        if self._hub is not None:
            self._hub.unlisten(self, "*")
        pinned = self.pin_reason is not None
        self._unpin()
        server = self.server
        if server is not None:
            self.server = None
            self._release_on_disconnect(server, pinned)
        self.io.disconnect()

    def _release_on_disconnect(self, server: "ServerConnection", pinned: bool) -> None:
        group = self.group
        assert group is not None
        clean = not server.requests.in_transaction and not self._walker.mid_message
        if clean and group.pool_mode != "session" and not pinned:
            group.checkin(server)
        elif clean:
            # Session mode, or pinned: the next client must not inherit this one's session state.
            server.detach()
            self.io.spawn(_reset_and_checkin(group, server))
        else:
            # Mid-transaction or mid-request: its state can't be trusted, close it.
            log.info("client %s left mid-transaction; closing server connection %s", self.peer, server.label)
            group.checkin(server, clean=False)


async def _reset_and_checkin(group: "PoolGroup", server: "ServerConnection") -> None:
    try:
        await server.query("DISCARD ALL")
        if server.statements is not None:
            server.statements.clear()
        server.applied_parameters.clear()
        server.applied_key = None
    except ServerError:
        group.checkin(server, clean=False)
        return
    group.checkin(server)
