"""A client's life as explicit states, and every transition between them (sans-IO).

Everything that moves a client from one state to another goes through
``ClientState.may_become``, checked in the client's one ``set_state``; add a
state here (pinned, waiting for a replica to catch up, fanned out) rather
than a flag elsewhere.

    STARTUP ──> AUTHENTICATING ──> IDLE ─────────────> ATTACHED ──> IDLE ...
                      │             │  ▲                  ▲ │  │
                      v             v  │ (error)          │ │  └──> READING_BACK ──> IDLE
                    ADMIN        WAITING ──> SYNCING ─────┘ │
                                    ▲                       └──> WAITING_FOR_LISTENER ──> ATTACHED
                                    │                   (its own NOTIFY answered: ──> IDLE or READING_BACK)
                                    ├── ATTACHED (its server died before answering a read: retry)
                                    └── WAITING_FOR_REPLICA <── IDLE, ATTACHED (retry), WAITING (again)
                                          (a read that must see a write no usable replica is known
                                          to have replayed; ends in WAITING, or IDLE with an error)
    ATTACHED ──> CHECKING_PIN ──> PINNED ──> CHECKING_PIN ──> IDLE (or READING_BACK)
    (a transaction that may leave or release session state ends; the catalogs decide)
                    IDLE ──> FANNED_OUT ──> IDLE  (sharded pools: pypool runs a request aside: a read on every shard, a describe)
    any state ──> CLOSED

``shown`` is the state in PgBouncer's vocabulary, as SHOW CLIENTS, SHOW POOLS
and /metrics report it.
"""

from __future__ import annotations

import enum


class IllegalTransition(RuntimeError):
    """pypool tried to move a client between two states that do not follow each other (a bug)."""


class ClientState(enum.Enum):
    STARTUP = "startup"  # reading the startup packet, TLS negotiation included
    AUTHENTICATING = "authenticating"  # password exchange and login checks
    ADMIN = "admin console"  # logged in to the admin database: the console runs the connection
    IDLE = "idle"  # logged in, between requests, no server connection
    WAITING = "waiting for a server"  # queued in a pool, or connecting one
    SYNCING = "syncing settings"  # its server connection is given the client's settings (or a held BEGIN)
    ATTACHED = "attached"  # relaying a request or transaction on its server connection
    READING_BACK = "reading back settings"  # learning the settings its transaction left, then releasing
    # A LISTEN waits for the pool's listener connection, or the end of a transaction that notified a
    # channel the client listens on waits for the listener to have received its notifications.
    WAITING_FOR_LISTENER = "waiting for the listener"
    WAITING_FOR_REPLICA = "waiting for a replica"  # a causal read waits for a replica to replay its write
    # Keeps its server connection between transactions: state that outlives a transaction
    # (temporary tables, WITH HOLD cursors, session advisory locks, SQL PREPARE) lives there.
    PINNED = "pinned"
    # A transaction that may have created or released such state ended: the server's catalogs say.
    CHECKING_PIN = "checking its session state"
    FANNED_OUT = "fanned out"  # pypool runs the request on servers itself (every shard) and answers from their replies
    CLOSED = "closed"

    # Set below for every member (plain attributes: read on the relay's hot path).
    may_become: tuple["ClientState", ...]
    relaying: bool  # logged in to a pool: client bytes go to the relay, not the handshake
    shown: str  # PgBouncer's name for it: login, active, idle, waiting


_S = ClientState
_TRANSITIONS: dict[ClientState, tuple[ClientState, ...]] = {
    _S.STARTUP: (_S.AUTHENTICATING, _S.CLOSED),
    _S.AUTHENTICATING: (_S.IDLE, _S.ADMIN, _S.CLOSED),
    _S.ADMIN: (_S.CLOSED,),
    _S.IDLE: (_S.ATTACHED, _S.WAITING, _S.SYNCING, _S.WAITING_FOR_REPLICA, _S.FANNED_OUT, _S.CLOSED),
    _S.WAITING: (_S.SYNCING, _S.ATTACHED, _S.IDLE, _S.WAITING_FOR_REPLICA, _S.CLOSED),
    _S.WAITING_FOR_REPLICA: (_S.WAITING, _S.IDLE, _S.CLOSED),
    _S.SYNCING: (_S.ATTACHED, _S.IDLE, _S.CLOSED),
    _S.ATTACHED: (_S.IDLE, _S.READING_BACK, _S.WAITING_FOR_LISTENER, _S.WAITING, _S.WAITING_FOR_REPLICA,
                  _S.CHECKING_PIN, _S.CLOSED),
    _S.READING_BACK: (_S.IDLE, _S.CLOSED),
    _S.WAITING_FOR_LISTENER: (_S.ATTACHED, _S.PINNED, _S.IDLE, _S.WAITING, _S.READING_BACK, _S.CLOSED),
    _S.PINNED: (_S.CHECKING_PIN, _S.WAITING_FOR_LISTENER, _S.CLOSED),
    _S.CHECKING_PIN: (_S.PINNED, _S.IDLE, _S.READING_BACK, _S.CLOSED),
    _S.FANNED_OUT: (_S.IDLE, _S.CLOSED),
    _S.CLOSED: (),
}
_SHOWN = {
    _S.STARTUP: "login", _S.AUTHENTICATING: "login", _S.ADMIN: "active", _S.IDLE: "idle",
    _S.WAITING: "waiting", _S.SYNCING: "waiting", _S.ATTACHED: "active", _S.READING_BACK: "active",
    _S.WAITING_FOR_LISTENER: "waiting", _S.WAITING_FOR_REPLICA: "waiting", _S.PINNED: "active",
    _S.CHECKING_PIN: "active", _S.FANNED_OUT: "active",
    _S.CLOSED: "closed",
}
for _state in ClientState:
    _state.may_become = _TRANSITIONS[_state]
    _state.relaying = _state not in (_S.STARTUP, _S.AUTHENTICATING, _S.ADMIN, _S.CLOSED)
    _state.shown = _SHOWN[_state]

# The members as module names: reading ``ClientState.IDLE`` goes through the Enum class (about 0.1 us on
# Python 3.11), ``states.IDLE`` is a plain module attribute; the relay reads them per request.
(STARTUP, AUTHENTICATING, ADMIN, IDLE, WAITING, SYNCING, ATTACHED, READING_BACK, WAITING_FOR_LISTENER,
 WAITING_FOR_REPLICA, PINNED, CHECKING_PIN, FANNED_OUT, CLOSED) = ClientState

# PgBouncer's client states, as counted by SHOW POOLS (cl_*) and /metrics.
CLIENT_STATES = ("active", "idle", "waiting")
