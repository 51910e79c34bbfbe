"""What a client's session holds, declared once: every attribute, typed, and the one place its state changes.

``ClientSession`` (pypool/session/session.py) is one class built as a chain,
one module per concern, each a subclass of the one before:
``SessionBase`` -> ``SessionEffects`` (effects.py) -> ``SessionPinning``
(pinning.py) -> ``SessionCheckout`` (checkout.py) -> ``SessionShards``
(shards.py) -> ``SessionRelay`` (relay.py) -> ``ClientSession``. A single
chain, not mixins: the compiled build (setup.py) supports only single
inheritance for its classes, and in it an attribute declared here is a
plain field and a method call a direct one. What a concern calls of one
later in the chain is declared here, at the end, and overridden there.

Also here: what a session needs of the outside (``SessionIO``) and of the
pooler (``SessionHost``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Protocol, Sequence, TypeVar

from pypool import limits
from pypool.pool.server import RelayTarget, ServerConnection
from pypool.protocol.frames import FrameWalker
from pypool.routing.router import Router, RoutingState
from pypool.session import states
from pypool.session.states import ClientState, IllegalTransition

if TYPE_CHECKING:
    from pypool import listen
    from pypool.causal.pool_causal import CommitTicket
    from pypool.causal.requirement import ClientCausal
    from pypool.pool.group import CheckoutTask, PoolGroup
    from pypool.pool.pool import CallbackWaiter
    from pypool.routing.router import Decision
    from pypool.session import session_state
    from pypool.session.prepared import ClientStatements

__all__ = ["SessionBase", "SessionIO", "SessionHost", "Spawned"]


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


Client = TypeVar("Client", contravariant=True)


class SessionHost(Protocol[Client]):
    """What a session needs of the pooler it belongs to (pypool.app.Application), ``Client`` its
    ClientSession (not named here: pypool/session/session.py is built on this module)."""

    config: Any
    user_clients: limits.UserConnectionCounts
    routers: dict[str, Router]

    def client_disconnected(self, client: Client) -> None: ...
    def route(self, client: Client, tag: int, payload: bytes,
              params: Sequence[tuple[int, bytes | None]] | None = None) -> "Decision": ...
    def shard_groups(self, database: str, user: str) -> tuple["PoolGroup", ...]: ...


class SessionBase(RelayTarget["SessionIO"]):
    # Slots, not an instance dict, in the pure build: past 30 attributes a dict stops sharing its keys
    # and is rebuilt as it grows (a third of a login's object set-up) and takes 1.5 KiB per client.
    # The classes of the chain add none (``__slots__ = ()``). ``io`` and ``hold_ready``: RelayTarget's.
    __slots__ = (
        "app", "state", "peer", "counted_as", "user", "database", "group", "shard_groups", "_unnamed_parse",
        "session_parameters", "process_id", "secret_key", "server", "_pending", "_checkout_task", "_queued",
        "_queued_role", "_queued_ready", "_queued_failed", "_max_message", "_walker", "_discarding", "routing",
        "_router", "_session_mode", "_parameters_key", "_held_begin", "_replay", "_causal_writes", "causal",
        "_causal_by_shard", "_commit_ticket", "_asynchronous_commit", "statements", "_startup_settings",
        "_desired_settings", "_settings_dirty", "_schema_changing", "_hub", "_listen_error", "_notifications",
        "pin_reason", "_held_ready", "own_notify_pid", "admin", "connected_at", "xact_count",
        "query_count", "error_count", "wait_started", "max_wait",
    )

    app: SessionHost[Any]
    # Bound once (ClientSession.__init__) and passed on every checkout: SessionCheckout's call-backs.
    _queued_ready: Callable[[ServerConnection], None]
    _queued_failed: Callable[[Exception], None]

    def __init__(self, app: SessionHost[Any], io: SessionIO, peer: str = "?") -> None:
        self.app = app
        self.io = io
        self.state: ClientState = states.STARTUP  # changed only by ``set_state``
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
        self._max_message: int = app.config.general.max_message_size
        self._walker = FrameWalker(self._max_message)  # the client's messages, relayed
        self._discarding = False  # after an error we answered, drop messages until Sync
        self.routing = RoutingState()
        self._router: Router | None = None
        self._session_mode = False
        self._parameters_key: tuple[tuple[str, str], ...] = ()
        self._held_begin: str | None = None  # a BEGIN answered locally, replayed on the server
        self._replay: tuple[bytes, str, str | None] | None = None  # a read to run elsewhere if its server dies
        # Causal reads (pypool.causal): whether its writes are tracked, what its reads on the current
        # shard must see (None: nothing yet, or off), the same by shard (each shard's primary has its own
        # WAL), the ticket of a write whose commit position is learnt once it is released.
        self._causal_writes = False
        self.causal: ClientCausal | None = None
        self._causal_by_shard: dict[int, ClientCausal] = {}
        self._commit_ticket: CommitTicket | None = None
        self._asynchronous_commit = False  # its transaction ran SET LOCAL synchronous_commit = off
        # Transaction mode: named statements (None in session mode), session settings (see
        # _set_settings), LISTEN.
        self.statements: ClientStatements | None = None
        self._startup_settings: dict[str, str] = {}
        self._desired_settings: dict[str, str] = {}
        self._settings_dirty = False
        self._schema_changing = False  # DDL sent in the current transaction (see SessionEffects)
        self._hub: listen.ListenHub | None = None  # set by its first LISTEN
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

    def set_state(self, new: ClientState) -> None:
        """The one place a client changes state; the transitions are listed in pypool/session/states.py."""
        state = self.state
        if new not in state.may_become and new is not state:
            raise IllegalTransition(f"client {self.peer}: {state.name} -> {new.name}")
        self.state = new

    @property
    def held_begin(self) -> str | None:
        return self._held_begin

    # -------------------------------------------- defined later in the chain

    def _pinning_refusal(self, effects: session_state.Effects) -> str | None:
        raise NotImplementedError  # SessionPinning

    def _fail_request(self, sqlstate: str, text: str) -> None:
        raise NotImplementedError  # SessionRelay

    def _dispatch_pending(self) -> None:
        raise NotImplementedError  # SessionRelay

    def _forward(self, server: ServerConnection, data: bytes) -> None:
        raise NotImplementedError  # SessionRelay

    def _protocol_violation(self, text: str) -> None:
        raise NotImplementedError  # SessionRelay

    def close(self) -> None:
        raise NotImplementedError  # ClientSession

    def close_with_error(self, sqlstate: str, text: str, severity: str = "FATAL") -> None:
        raise NotImplementedError  # ClientSession

    def terminate_for_shutdown(self) -> None:
        raise NotImplementedError  # ClientSession
