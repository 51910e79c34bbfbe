"""One client connection: the asyncio adapter around a client's session.

It owns the transport (TLS included) and flow control, runs the login
coroutine (pypool/login.py), and hands the bytes of a logged-in client to the
relay (pypool/session/relay.py), its checkouts (pypool/session/checkout.py)
and statement effects (pypool/session/effects.py). The client's state is a
ClientState (pypool/session/states.py), changed only in ``set_state``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from pypool import limits, listen, sqlstates
from pypool.causal.pool_causal import CommitTicket
from pypool.causal.requirement import ClientCausal
from pypool.flow import ReadingPause
from pypool.login import LoginHandshake
from pypool.pool.server import ServerConnection, ServerError
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import FrameWalker, MessageBuffer
from pypool.routing.router import Router, RoutingState
from pypool.session.checkout import SessionCheckout
from pypool.session.effects import SessionEffects
from pypool.session.pinning import SessionPinning
from pypool.session.prepared import ClientStatements
from pypool.session.relay import SessionRelay
from pypool.session import states
from pypool.session.shards import SessionShards
from pypool.session.states import ClientState, IllegalTransition

if TYPE_CHECKING:
    from pypool.pool.group import CheckoutTask, PoolGroup
    from pypool.pool.pool import CallbackWaiter
    from pypool.routing.router import Decision

__all__ = ["ClientConnection", "new_cancel_key"]

log = logging.getLogger("pypool.client")



class AdminConsole(Protocol):
    """The admin console a client is handed to (pypool.admin.AdminConsole)."""

    busy: bool

    async def run(self) -> None: ...


class ClientHost(Protocol):
    """What a client needs of the pooler it belongs to (pypool.app.Application)."""

    config: Any
    client_tls: Any
    user_clients: limits.UserConnectionCounts
    routers: dict[str, Router]

    def client_connected(self, client: "ClientConnection") -> None: ...
    def client_disconnected(self, client: "ClientConnection") -> None: ...
    def check_accepting(self, client: "ClientConnection") -> None: ...
    def is_admin_database(self, database: str) -> bool: ...
    async def admin_login(self, client: "ClientConnection") -> AdminConsole: ...
    def find_group(self, database: str, user: str) -> "PoolGroup | None": ...
    def has_database(self, database: str) -> bool: ...
    def register_cancel_key(self, client: "ClientConnection") -> tuple[int, int]: ...
    def cancel(self, process_id: int, secret_key: int) -> "asyncio.Task[None] | None": ...
    def scram_verifier(self, group: "PoolGroup") -> auth.ScramVerifier: ...
    def route(self, client: "ClientConnection", tag: int, payload: bytes,
              params: Sequence[tuple[int, bytes | None]] | None = None) -> "Decision": ...
    def shard_groups(self, database: str, user: str) -> tuple["PoolGroup", ...]: ...


class ClientConnection(LoginHandshake, SessionRelay, SessionCheckout, SessionEffects, SessionShards,
                       SessionPinning, asyncio.Protocol):
    def __init__(self, app: ClientHost) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.reading = ReadingPause()  # paused while its server cannot take more
        self.state = states.STARTUP  # changed only by ``set_state``
        self.peer = "?"
        self.peer_host = ""  # the client's IP address, for the hba rules
        self.tls = False  # the connection was upgraded to TLS
        self.auth_method = app.config.general.client_auth_method  # hba may choose another per login
        self._counted_as: tuple[str, str] | None = None  # key in app.user_clients while logged in
        self.user = ""
        self.database = ""
        self.group: PoolGroup | None = None  # of the shard the current request runs on
        self.shard_groups: tuple[PoolGroup, ...] = ()  # a sharded pool's groups, by shard; () if unsharded
        self._unnamed_parse: bytes | None = None  # sharded: the unnamed statement last described aside
        self.session_parameters: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        # handshake (coroutine) side
        self._buffer = MessageBuffer(app.config.general.max_message_size)
        self._waiter: asyncio.Future[None] | None = None
        self._handshake_task: asyncio.Task[None] | None = None
        # relay side
        self.server: ServerConnection | None = None
        self._pending = bytearray()  # bytes received while no server is attached
        self._checkout_task: asyncio.Task[None] | None = None
        self._queued: CallbackWaiter | CheckoutTask | None = None  # waiting for ``_begin_request``'s checkout
        self._queued_role = ""  # ... for this role
        self._queued_ready = self._on_queued_ready  # bound once: passed on every checkout
        self._queued_failed = self._on_queued_failed
        self._walker = FrameWalker(app.config.general.max_message_size)  # the client's messages, relayed
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
        self._max_message = app.config.general.max_message_size
        self.admin: AdminConsole | None = None  # set when logged in to the admin database
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

    # ------------------------------------------------------------ asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reading.transport = self.transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            self.peer_host = str(peer[0]) if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.app.client_connected(self)
        self._handshake_task = asyncio.get_running_loop().create_task(self._handshake())

    def data_received(self, data: bytes) -> None:
        if self.state.relaying:
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
            return
        elif self.state is not states.CLOSED:
            self._buffer.feed(data)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        # The client reads slower than its server sends: stop reading that server.
        server = self.server
        if server is not None:
            server.reading.pause()

    def resume_writing(self) -> None:
        server = self.server
        if server is not None:
            server.reading.resume()

    # --------------------------------------------------------------- handshake

    # ------------------------------------------------------------------- relay

    # ------------------------------------------- statements that need rewriting

    # Called by the attached ServerConnection --------------------------------

    # ----------------------------------------------------------------- errors

    def close_with_error(self, sqlstate: str, text: str, severity: str = "FATAL") -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(m.error_response(sqlstate, text, severity=severity))
        self.close()

    def terminate_for_shutdown(self) -> None:
        self.close_with_error(sqlstates.ADMIN_SHUTDOWN, "pypool is shutting down")

    def close(self) -> None:
        if self.state is states.CLOSED:
            return
        self.set_state(states.CLOSED)
        self.app.client_disconnected(self)
        if self._counted_as is not None:
            self.app.user_clients.release(self._counted_as)
            self._counted_as = None
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
        if self._handshake_task is not None and not self._handshake_task.done() \
                and self._handshake_task is not asyncio.current_task():
            self._handshake_task.cancel()
        server = self.server
        if server is not None:
            self.server = None
            self._release_on_disconnect(server, pinned)
        if self.transport is not None:
            self.transport.close()

    def _release_on_disconnect(self, server: ServerConnection, pinned: bool) -> None:
        group = self.group
        assert group is not None
        clean = not server.requests.in_transaction and not self._walker.mid_message
        if clean and group.pool_mode != "session" and not pinned:
            group.checkin(server)
        elif clean:
            # Session mode, or pinned: the next client must not inherit this one's session state.
            server.detach()
            asyncio.get_running_loop().create_task(self._reset_and_checkin(group, server))
        else:
            # Mid-transaction or mid-request: its state can't be trusted, close it.
            log.info("client %s left mid-transaction; closing server connection %s", self.peer, server.label)
            group.checkin(server, clean=False)

    @staticmethod
    async def _reset_and_checkin(group: "PoolGroup", server: ServerConnection) -> None:
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


def new_cancel_key() -> tuple[int, int]:
    return secrets.randbits(31), secrets.randbits(32)
