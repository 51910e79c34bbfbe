"""One connection from pypool to a PostgreSQL server.

A ServerConnection lives in one of two modes:

* conversation mode (no client attached): coroutines drive it message by
  message -- connect, authenticate, health checks, parameter syncing,
  rollback on a dirty release;
* relay mode (a client attached): ``data_received`` forwards the server's
  bytes to the client untouched, walking only message headers to notice
  ``ReadyForQuery`` (the end of a request) and ``ParameterStatus``.

The relay walk forwards partial messages as soon as they arrive, so a large
result streams through without being buffered whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Protocol, TypeVar

from pypool import keepalive
from pypool.pool.conversation import Conversation, ServerError  # ServerError: most modules import it from here
from pypool.session.prepared import AS_PARSE_COMPLETE, PARSE_COMPLETE, SWALLOW, ServerStatements
from pypool.session.tracker import RequestTracker
from pypool.protocol import messages as m
from pypool.flow import ReadingPause
from pypool.protocol.frames import FrameWalker, MessageBuffer, ProtocolViolation, tag_table

if TYPE_CHECKING:
    from pypool.config import ServerAddress

_monotonic = time.monotonic  # read on every request: one global lookup, not two

log = logging.getLogger("pypool.server")

_Z = m.READY_FOR_QUERY
_S = m.PARAMETER_STATUS
_E = m.ERROR_RESPONSE
_IDLE = ord("I")

# A server connection's state in PgBouncer's vocabulary, set where it changes and read by SHOW SERVERS
# and /metrics: being opened, linked to a client, idle in its pool, or held by pypool itself (syncing
# settings, reading them back, a health check, a reset). "used" (idle past healthcheck_delay) is an idle
# connection seen at snapshot time.
LOGIN, ACTIVE, IDLE, TESTED = "login", "active", "idle", "tested"
SERVER_STATES = (ACTIVE, IDLE, "used", TESTED, LOGIN)
# Replies the relay looks at; ReadyForQuery, ParameterStatus and ErrorResponse it needs whole.
_REPLY_STOPS = tag_table((m.READY_FOR_QUERY, m.PARAMETER_STATUS, m.ERROR_RESPONSE, m.PARSE_COMPLETE,
                          m.CLOSE_COMPLETE))
_REPLY_WHOLE = tag_table((m.READY_FOR_QUERY, m.PARAMETER_STATUS, m.ERROR_RESPONSE))


# What must happen before a connection serves anyone else (every listener has received the notifications
# of the client that used it: pypool/listen.py), called with the check-in to run once that is done.
Settle = Callable[["ServerConnection", Callable[[], None]], None]


class ClientIO(Protocol):
    """The client side of the relay (pypool.session.session.SessionIO): its writes, its flow control."""

    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...  # this server's socket cannot take more
    def resume_reading(self) -> None: ...


IO = TypeVar("IO", bound=ClientIO)


class RelayTarget(Generic[IO]):
    """What a ServerConnection relays to: a client's session (pypool.session.session.ClientSession), or a
    stand-in that keeps the reply (pypool/session/shards.py).

    A base class rather than a Protocol: in the compiled build (setup.py) the relay's calls into the
    session are then direct calls and its attribute reads plain field reads, not Python lookups.
    """

    __slots__ = ("io", "hold_ready")

    io: IO  # ``io.write`` is read once per relayed chunk: the adapter binds it to its transport's
    # The final ReadyForQuery ('I') of the transaction is not relayed but kept (``hold_ready_for_query``):
    # the client sends it after its follow-up (its own notifications delivered, the catalog check of
    # pypool/session/pinning.py, startup settings restored after a RESET).
    hold_ready: bool

    def hold_ready_for_query(self, data: bytes, end: int) -> int:
        raise NotImplementedError

    def server_request_done(self, server: "ServerConnection") -> None:
        raise NotImplementedError

    def write_committed(self, server: "ServerConnection") -> None:
        raise NotImplementedError

    def server_lost(self, server: "ServerConnection", exc: Exception | None) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str
    database: str


class ServerConnection(Conversation, asyncio.Protocol):
    # Slots, not an instance dict: past 30 attributes a dict stops sharing its keys with the other
    # instances' and the relay's attribute reads lose the interpreter's fast path for them.
    __slots__ = ("address", "credentials", "transport", "_buffer", "_waiter", "closed", "state", "parameters",
                 "applied_parameters", "applied_key", "backend_pid", "backend_secret", "created_at", "last_used",
                 "expires_at", "reading", "client", "requests", "replied", "_walker", "statements",
                 "reported_change", "track_commit", "settle", "reply_owed", "pool", "on_lost", "stats",
                 "query_count", "xact_count", "bytes_received", "bytes_sent", "xact_start", "query_start", "_folded",
                 "listed_in", "on_notification")

    def __init__(self, address: "ServerAddress", credentials: Credentials) -> None:
        self.address = address
        self.credentials = credentials
        self.transport: asyncio.Transport | None = None
        self._buffer = MessageBuffer()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.state = LOGIN
        # Filled at login: the server's reported parameters and its cancel key.
        self.parameters: dict[str, str] = {}
        # Session parameters pypool itself SET on this connection, as the client spelled them,
        # and the key of the client set they match (compared on every checkout).
        self.applied_parameters: dict[str, str] = {}
        self.applied_key: tuple[tuple[str, str], ...] | None = None
        self.backend_pid = 0
        self.backend_secret = 0
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.expires_at = float("inf")  # server_lifetime, set by the owning pool
        self.reading = ReadingPause()  # paused while the client reads slower than this server sends
        # Relay-mode state
        self.client: RelayTarget[ClientIO] | None = None
        self.requests = RequestTracker()  # what the attached client asked and is owed; the status byte
        self.replied = False  # any byte relayed to the client since attach
        self._walker = FrameWalker(1 << 31)  # the server's replies, while relaying
        # Named prepared statements (pypool/session/prepared.py) this session has prepared.
        self.statements: ServerStatements | None = None
        self.reported_change = False  # a ParameterStatus was relayed to the attached client
        self.track_commit = False  # causal reads: tell the client (write_committed) before it sees the commit
        self.settle: "Settle | None" = None  # to run before it serves anyone else, then check it in (listen.py)
        # A LISTEN hub's connection (pypool/listen.py) hands its NotificationResponse payloads here. A hook,
        # not a subclass: in the compiled build (setup.py) a Python subclass of this class cannot be made.
        self.on_notification: Callable[[bytes], None] | None = None
        # A query() whose ReadyForQuery has not been read (its caller was cancelled): the
        # connection's next reply is not for whoever uses it next.
        self.reply_owed = False
        self.pool: Any = None  # ServerPool, set by the owning ServerPool
        self.on_lost: Any = None  # callback(ServerConnection) set by the owning pool
        # Statistics: plain ints read by SHOW and metrics, added to the pool's PoolStats once at the end (_fold).
        self.stats: Any = None  # PoolStats
        # The owning pool's set of open connections (SHOW SERVERS), left in _fold. A set, not a WeakSet: the
        # compiled build (setup.py) cannot be weakly referenced safely (mypyc drops its weakref slot as an object).
        self.listed_in: set[ServerConnection] | None = None
        self.query_count = 0  # requests answered (ReadyForQuery)
        self.xact_count = 0  # transactions ended (ReadyForQuery 'I')
        self.bytes_received = 0
        self.bytes_sent = 0
        self.xact_start = 0.0  # when the timed transaction began (0: not timed)
        self.query_start = 0.0  # when the request being answered began (0: none)
        self._folded = False

    def __repr__(self) -> str:
        return f"<ServerConnection {self.address.host}:{self.address.port} pid={self.backend_pid}>"

    @property
    def label(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    # ------------------------------------------------------------ asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reading.transport = self.transport
        keepalive.apply(transport.get_extra_info("socket"), nodelay=True)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.bytes_received += n
        if self.client is not None:
            self._relay(data, n)
            return
        self._buffer.feed(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif waiter is None:
            self._drain_idle_messages()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fold()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ServerError(f"server {self.label} closed the connection unexpectedly"))
        client = self.client
        if client is not None:
            self.client = None
            client.server_lost(self, exc)
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        # Our writes to the server are backing up: stop reading from the client.
        client = self.client
        if client is not None:
            client.io.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.io.resume_reading()

    # ---------------------------------------------------------------- relaying

    def attach(self, client: RelayTarget[Any]) -> None:
        self.client = client
        self.state = ACTIVE
        # The client's first request starts with the attach: one clock read times both.
        self.xact_start = self.query_start = _monotonic()
        requests = self.requests
        if requests.owed or requests.batch_open or requests.failed:
            requests.begin()  # the last client left mid-request (a finished one leaves it clean)
        self.replied = False
        walker = self._walker
        if walker.held or walker.skip:
            walker.reset()
        self.reported_change = False
        self.track_commit = False
        # Bytes that arrived while idle (e.g. a NOTICE) are not the new client's.
        if self._buffer.buffered:
            self._buffer.take_raw()

    def request_started(self) -> None:
        """The client sent a new request's first message (in session mode, maybe a transaction's)."""
        now = self.query_start = _monotonic()
        if not self.xact_start:
            self.xact_start = now

    def _request_ended(self, transaction_ended: bool) -> None:
        """Count and time a request (first message to last reply owed) and a transaction (from attach)."""
        now = _monotonic()
        stats = self.stats
        started = self.query_start
        if started:
            self.query_start = 0.0
            if stats is not None:
                stats.query_time += now - started
                stats.queries_timed += 1
        if transaction_ended:
            self.xact_count += 1
            started = self.xact_start
            if started:
                self.xact_start = 0.0
                if stats is not None:
                    stats.observe_xact(now - started)

    def detach(self) -> None:
        self.client = None
        self.state = TESTED  # until its pool takes it back
        self.last_used = time.monotonic()
        if self.reading.paused:
            self.reading.resume()

    def _relay(self, data: bytes, n: int) -> None:
        """Forward server bytes to the client; notice ReadyForQuery, ParameterStatus and errors (and, while
        prepared-statement actions wait, rewrite their replies and undo what an ErrorResponse skips)."""
        if not self.replied and data[0] == _E and self._is_farewell(data):
            # The server is going away before answering (crash, shutdown): drop the
            # connection unanswered so the client side can retry a read elsewhere.
            self.transport.abort()  # type: ignore[union-attr]
            return
        self.replied = True
        walker = self._walker
        if walker.held or walker.skip:
            data, pos = walker.start(data)
            n = len(data)
        else:
            pos = 0
        client = self.client
        write = client.io.write  # type: ignore[union-attr]
        if pos >= n:
            if n:
                write(data)
            return
        statements = self.statements
        rewriting = statements is not None and statements.actions
        requests = self.requests
        start = 0  # first byte not yet written
        done = False
        try:
            while True:
                pos, end = walker.next(data, pos, n, _REPLY_STOPS, _REPLY_WHOLE)
                if end < 0:
                    break
                tag = data[pos]
                if tag == _Z:
                    self.query_count += 1
                    if rewriting:
                        statements.on_ready()  # type: ignore[union-attr]
                    if requests.ready(data[pos + 5]):
                        done = True  # everything asked is answered: the connection goes back below
                        break
                elif tag == _S:
                    self._note_parameter(data[pos + 5:end])
                elif tag == _E:
                    requests.failed = True
                    if statements is not None:
                        statements.on_error_response(data, pos + 5, end, getattr(client, "statements", None))
                else:  # ParseComplete / CloseComplete
                    requests.parse_answered += 1
                    if rewriting and statements.actions:  # type: ignore[union-attr]
                        start = self._rewrite_reply(statements, data, start, pos, end)  # type: ignore[arg-type]
                if end == n:
                    pos = n
                    break
                pos = end
        except ProtocolViolation as exc:
            log.warning("server %s sent garbage (%s); closing it", self.label, exc)
            self.transport.abort()  # type: ignore[union-attr]
            return
        if not done:
            if pos > start:
                write(data[start:pos] if start or pos < n else data)
            return
        # The final ReadyForQuery, ending at ``end`` (held back while pypool follows the transaction up): relay, hand back.
        idle = requests.status == _IDLE
        if idle and self.track_commit:
            client.write_committed(self)  # type: ignore[union-attr]  # before anyone can read after the commit
        held = client.hold_ready_for_query(data, end) if idle and client.hold_ready else 0  # type: ignore[union-attr]
        write(data if end == n and not start and not held else data[start:end - held])
        self._request_ended(idle)
        client.server_request_done(self)  # type: ignore[union-attr]
        if end < n:
            self._after_request(data[end:])

    def _rewrite_reply(self, statements: ServerStatements, data: bytes, start: int, pos: int, end: int) -> int:
        """A ParseComplete/CloseComplete at ``data[pos:end]`` while prepared-statement actions wait:
        swallow it, turn it into ParseComplete, or leave it. Returns the first byte not yet written."""
        kind = statements.on_reply(self.requests.parse_answered)
        if kind != SWALLOW and kind != AS_PARSE_COMPLETE:
            return start
        write = self.client.io.write  # type: ignore[union-attr]
        if pos > start:
            write(data[start:pos])
        if kind == AS_PARSE_COMPLETE:
            write(PARSE_COMPLETE)
        return end

    def _after_request(self, rest: bytes) -> None:
        """Messages after the final ReadyForQuery: relayed while still attached (session mode), else idle traffic."""
        if self.client is not None:
            self._relay(rest, len(rest))
        else:
            self._buffer.feed(rest)
            self._drain_idle_messages()

    @staticmethod
    def _is_farewell(data: bytes) -> bool:
        """A whole FATAL ErrorResponse of class 57P (admin/crash shutdown, cannot connect now)."""
        end = 1 + int.from_bytes(data[1:5], "big")
        if len(data) < end:
            return False
        try:
            fields = m.parse_error_fields(data[5:end])
        except ProtocolViolation:
            return False
        return fields.get("V", fields.get("S")) == "FATAL" and fields.get("C", "").startswith("57P")

    def _fold(self) -> None:
        """Add this connection's counts to its pool's totals, once, as it ends."""
        if self._folded:
            return
        self._folded = True
        if self.listed_in is not None:
            self.listed_in.discard(self)
            self.listed_in = None
        stats = self.stats
        if stats is not None:
            stats.query_count += self.query_count
            stats.xact_count += self.xact_count
            stats.bytes_received += self.bytes_received
            stats.bytes_sent += self.bytes_sent
            if self.statements is not None:
                self.statements.add_counts_to(stats)

    def _note_parameter(self, payload: bytes) -> None:
        try:
            name, value = m.parse_parameter_status(payload)
        except ProtocolViolation:
            return
        self.parameters[name] = value
        if self.client is not None:
            # A reported setting changed while relaying: however the client did it (a SET
            # inside a function, say), its session state must be read back (client.py).
            self.reported_change = True

    def _drain_idle_messages(self) -> None:
        """Handle what an idle pooled server says on its own (NOTICE, ParameterStatus, FATAL)."""
        try:
            while (msg := self._buffer.next_message()) is not None:
                tag, payload = msg
                if tag == _S:
                    self._note_parameter(payload)
                elif tag == m.NOTIFICATION_RESPONSE and self.on_notification is not None:
                    self.on_notification(payload)
                elif tag == m.ERROR_RESPONSE:
                    fields = m.parse_error_fields(payload)
                    log.warning("idle server %s reported %s: %s", self.label, fields.get("C"), fields.get("M"))
                    self.close()
                    return
        except ProtocolViolation as exc:
            log.warning("idle server %s sent garbage (%s); closing it", self.label, exc)
            self.close()

    def _write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ServerError(f"server {self.label} connection is closed")
        self.bytes_sent += len(data)
        self.transport.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fold()
        if self.transport is not None:
            try:
                self.transport.write(m.terminate())
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.transport.close()
