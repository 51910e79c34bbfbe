"""A client's session, sans-IO: fed client bytes, server replies and checkout results.

``ClientSession`` is a client as the pooler knows it: its state (one
ClientState, changed only in ``set_state``), identity, routing, named
statements, settings, pin, causal-read state and SHOW CLIENTS statistics. Its
behaviour is composed from one module per concern: the relay
(pypool/session/relay.py), checkouts (checkout.py), what statements do to the
session (effects.py), sharded pools (shards.py) and pinning (pinning.py).
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
import time
from typing import TYPE_CHECKING, Any, Coroutine, Protocol, Sequence

from pypool import limits, listen, sqlstates
from pypool.causal.pool_causal import CommitTicket
from pypool.causal.requirement import ClientCausal
from pypool.pool.server import ServerError
from pypool.protocol import messages as m
from pypool.protocol.frames import FrameWalker
from pypool.routing.router import Router, RoutingState
from pypool.session import states
from pypool.session.checkout import SessionCheckout
from pypool.session.effects import SessionEffects
from pypool.session.pinning import SessionPinning
from pypool.session.prepared import ClientStatements
from pypool.session.relay import SessionRelay
from pypool.session.shards import SessionShards
from pypool.session.states import ClientState, IllegalTransition

if TYPE_CHECKING:
    from pypool.pool.group import CheckoutTask, PoolGroup
    from pypool.pool.pool import CallbackWaiter
    from pypool.pool.server import ServerConnection
    from pypool.routing.router import Decision

__all__ = ["ClientSession", "SessionIO", "SessionHost", "Spawned"]

log = logging.getLogger("pypool.client")


class Spawned(Protocol):
    """A coroutine started by ``SessionIO.spawn`` (an asyncio.Task)."""

    def cancel(self) -> Any: ...


class SessionIO(Protocol):
    """Everything a session does to the outside world; the asyncio adapter implements it.

    ``write`` is read on every relayed reply (``ServerConnection._relay`` calls
    ``client.io.write``): the adapter binds it to its transport's ``write``,
    so no call layer is added.
    """

    def write(self, data: bytes) -> None:
        """Send ``data`` to the client."""

    def is_closing(self) -> bool:
        """The client's connection is closing or closed: nothing more reaches it."""

    def disconnect(self) -> None:
        """Close the connection to the client (the session has let go of everything else)."""

    def spawn(self, work: Coroutine[Any, Any, None]) -> Spawned:
        """Run ``work`` in the background, kept referenced until it ends; ``cancel()`` stops it."""

    def pause_reading(self) -> None:
        """Stop reading the client: the server it sends to cannot take more (flow control)."""

    def resume_reading(self) -> None:
        """Read the client again."""


class SessionHost(Protocol):
    """What a session needs of the pooler it belongs to (pypool.app.Application)."""

    config: Any
    user_clients: limits.UserConnectionCounts
    routers: dict[str, Router]

    def client_disconnected(self, client: "ClientSession") -> None: ...
    def route(self, client: "ClientSession", tag: int, payload: bytes,
              params: Sequence[tuple[int, bytes | None]] | None = None) -> "Decision": ...
    def shard_groups(self, database: str, user: str) -> tuple["PoolGroup", ...]: ...


class ClientSession(SessionRelay, SessionCheckout, SessionEffects, SessionShards, SessionPinning):
    # Slots for what __init__ sets: past 30 attributes an instance dict stops sharing its keys and is
    # rebuilt as it grows (a third of a login's object set-up) and takes 1.5 KiB per client. The
    # mixins have no __slots__, so a __dict__ remains for what they set (``_needs_care``).
    __slots__ = (
        "app", "io", "state", "peer", "counted_as", "user", "database", "group", "shard_groups", "_unnamed_parse",
        "session_parameters", "process_id", "secret_key", "server", "_pending", "_checkout_task", "_queued",
        "_queued_role", "_queued_ready", "_queued_failed", "_max_message", "_walker", "_discarding", "routing",
        "_router", "_session_mode", "_parameters_key", "_held_begin", "_replay", "_causal_writes", "causal",
        "_causal_by_shard", "_commit_ticket", "_asynchronous_commit", "statements", "_startup_settings",
        "_desired_settings", "_settings_dirty", "_schema_changing", "_hub", "_listen_error", "_notifications",
        "pin_reason", "hold_ready", "_held_ready", "own_notify_pid", "admin", "connected_at", "xact_count",
        "query_count", "error_count", "wait_started", "max_wait",
    )

    def __init__(self, app: SessionHost, io: SessionIO, peer: str = "?") -> None:
        self.app = app
        self.io = io
        self.state = states.STARTUP  # changed only by ``set_state``
        self.peer = peer
        self.counted_as: tuple[str, str] | None = None  # key in app.user_clients while logged in
        self.user = ""
        self.database = ""
        self.group: PoolGroup | None = None  # of the shard the current request runs on
        self.shard_groups: tuple[PoolGroup, ...] = ()  # a sharded pool's groups, by shard; () if unsharded
        self._unnamed_parse: bytes | None = None  # sharded: the unnamed statement last described aside
        self.session_parameters: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self.server: ServerConnection | None = None
        self._pending = bytearray()  # bytes received while no server is attached
        self._checkout_task: Spawned | None = None
        self._queued: CallbackWaiter | CheckoutTask | None = None  # waiting for ``_begin_request``'s checkout
        self._queued_role = ""  # ... for this role
        self._queued_ready = self._on_queued_ready  # bound once: passed on every checkout
        self._queued_failed = self._on_queued_failed
        self._max_message = app.config.general.max_message_size
        self._walker = FrameWalker(self._max_message)  # the client's messages, relayed
        self._discarding = False  # after an error we answered, drop messages until Sync
        self.routing = RoutingState()
        self._router: Router | None = None
        self._session_mode = False
        self._parameters_key: tuple[tuple[str, str], ...] = ()
        self._held_begin: str | None = None  # a BEGIN answered locally, replayed on the server
        self._replay: tuple[bytes, str, str | None] | None = None
        # Causal reads (pypool.causal): whether its writes are tracked, what its reads on the current
        # shard must see (None: nothing yet, or off), the same by shard (each shard's primary has its own
        # WAL), the ticket of a write whose commit position is learnt once it is released.
        self._causal_writes = False
        self.causal: ClientCausal | None = None
        self._causal_by_shard: dict[int, ClientCausal] = {}
        self._commit_ticket: CommitTicket | None = None
        self._asynchronous_commit = False  # its transaction ran SET LOCAL synchronous_commit = off
        # Transaction mode: named statements (None in session mode), a message that needs
        # rewriting and is not complete yet, session settings (see _set_settings), LISTEN.
        self.statements: ClientStatements | None = None
        self._startup_settings: dict[str, str] = {}
        self._desired_settings: dict[str, str] = {}
        self._settings_dirty = False
        self._schema_changing = False  # DDL sent in the current transaction (see SessionEffects)
        self._hub: listen.ListenHub | None = None
        self._listen_error: str | None = None
        self._notifications: list[bytes] = []
        # Why this client holds (or, in its current transaction, reserved) one of its pool's
        # pinnable server connections (pypool/session/pinning.py); None: it shares them all.
        self.pin_reason: str | None = None
        # The final ReadyForQuery of its transaction waits for pypool's follow-up (its own
        # notifications delivered, the catalog check, the startup values set again):
        # ServerConnection._relay keeps it in ``_held_ready``, ``_release_ready`` sends it.
        self.hold_ready = False
        self._held_ready: bytes | None = None
        # A transaction of this listening client ran NOTIFY on this backend PID (it holds its
        # ReadyForQuery until the listener has handed those notifications out).
        self.own_notify_pid = 0
        self.admin: Any = None  # the admin console (its ``busy``), when logged in to the admin database
        # Statistics for SHOW CLIENTS (plain ints, read at scrape time).
        self.connected_at = time.monotonic()
        self.xact_count = 0
        self.query_count = 0
        self.error_count = 0
        self.wait_started = 0.0  # monotonic start of the current checkout wait, 0 = not waiting
        self.max_wait = 0.0  # seconds

    def __repr__(self) -> str:
        return f"<Client {self.user}@{self.database} from {self.peer}>"

    def set_state(self, new: ClientState) -> None:
        """The one place a client changes state; the transitions are listed in pypool/session/states.py."""
        state = self.state
        if new not in state.may_become and new is not state:
            raise IllegalTransition(f"client {self.peer}: {state.name} -> {new.name}")
        self.state = new

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

    sync_parameters = SessionEffects._sync_parameters  # the login applies them to learn how they are reported

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
