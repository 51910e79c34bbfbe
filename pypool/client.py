"""One client session: startup, authentication, then the relay loop.

The handshake runs as a coroutine (it happens once per connection). After
it, ``data_received`` relays the client's bytes straight to the attached
server connection, walking only message headers: it counts the requests
that will each end in a ReadyForQuery (Query, FunctionCall, Sync) so the
server side knows when the transaction-mode connection can go back to the
pool, and it stops at Terminate.

When no server is attached (between transactions) the client's bytes are
held in ``_pending`` until the first message is complete, the router picks
a role, and a connection is checked out -- synchronously when one is idle,
through a coroutine otherwise.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import socket
import ssl
import time
from typing import TYPE_CHECKING

from pypool import admin, limits, listen, sqlstates
from pypool import session_state as session
from pypool.errors import LoginRefused
from pypool.pool.group import PRIMARY
from pypool.pool.pool import CallbackWaiter, PoolRetired, PoolTimeout
from pypool.pool.server import ServerConnection, ServerError
from pypool.prepared import ClientStatements, Rewriter, ServerStatements, names_statement
from pypool.routing.router import Router, RoutingState
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import (
    HEADER_SIZE,
    CancelRequest,
    GSSEncRequest,
    MessageBuffer,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
)

if TYPE_CHECKING:
    from pypool.app import Application
    from pypool.pool.group import PoolGroup
    from pypool.pool.pool import ServerPool
    from pypool.routing.router import Decision

log = logging.getLogger("pypool.client")

_Q = m.QUERY
_S = m.SYNC
_F = m.FUNCTION_CALL
_X = m.TERMINATE
_COPY_TAGS = frozenset((m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL))
# First messages _start_fast leaves to _dispatch_pending: a COPY tail, and Terminate (no checkout to say goodbye).
# Messages that may start a transaction. Anything else with no server attached is a
# COPY tail to drop, a Terminate, or not a frontend message at all.
_STARTS_TRANSACTION = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.FLUSH,
                                 m.FUNCTION_CALL))
_EXECUTE = m.EXECUTE
_COPY_DATA = m.COPY_DATA
_P = m.PARSE
_B = m.BIND
_C = m.CLOSE
# Messages that may need rewriting in transaction mode (named statements, session statements).
_CAREFUL_TAGS = frozenset((m.QUERY, m.PARSE, m.BIND, m.DESCRIBE, m.CLOSE))
_IDLE = ord("I")

# Startup parameters that must match on whichever server runs the client's
# transaction; anything else in the startup packet stays with the pooler.
TRACKED_STARTUP_PARAMETERS = (
    "client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "application_name",
    "extra_float_digits", "search_path", "standard_conforming_strings",
)


_DECOY_PASSWORD = secrets.token_hex(16)


class Phase(enum.Enum):
    HANDSHAKE = 1
    RELAY = 2
    CLOSED = 3


class ClientConnection(asyncio.Protocol):
    def __init__(self, app: "Application") -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.HANDSHAKE
        self.peer = "?"
        self.peer_host = ""  # the client's IP address, for the hba rules
        self.tls = False  # the connection was upgraded to TLS
        self.auth_method = app.config.general.client_auth_method  # hba may choose another per login
        self._counted_as: tuple[str, str] | None = None  # key in app.user_clients while logged in
        self.user = ""
        self.database = ""
        self.group: PoolGroup | None = None
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
        self._queued: CallbackWaiter | None = None  # queued in a pool by the fast path
        self._skip = 0  # bytes of the current message body still to forward
        self._hold = b""  # an incomplete header carried to the next chunk
        self._discarding = False  # after an error we answered, drop messages until Sync
        self._syncs_after_execute = 0  # Syncs sent since the last Execute (see _forward)
        self.routing = RoutingState()
        self._router: Router | None = None
        self._session_mode = False
        self._parameters_key: tuple[tuple[str, str], ...] = ()
        self._held_begin: str | None = None  # a BEGIN answered locally, replayed on the server
        self._replay: tuple[bytes, str, str | None] | None = None
        # Transaction mode: named statements (None in session mode), a message that needs
        # rewriting and is not complete yet, session settings (see _set_settings), LISTEN.
        self.statements: ClientStatements | None = None
        self._careful = bytearray()
        self._startup_settings: dict[str, str] = {}
        self._desired_settings: dict[str, str] = {}
        self._settings_dirty = False
        self._hub: listen.ListenHub | None = None
        self._listen_error: str | None = None
        self._notifications: list[bytes] = []
        self._max_message = app.config.general.max_message_size
        self.admin: admin.AdminConsole | None = None  # set when logged in to the admin database
        # Statistics for SHOW CLIENTS (plain ints, read at scrape time).
        self.connected_at = time.monotonic()
        self.xact_count = 0
        self.query_count = 0
        self.error_count = 0
        self.wait_started = 0.0  # monotonic start of the current checkout wait, 0 = not waiting
        self.max_wait = 0.0  # seconds

    def __repr__(self) -> str:
        return f"<Client {self.user}@{self.database} from {self.peer}>"

    # ------------------------------------------------------------ asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
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
        if self.phase is Phase.RELAY:
            server = self.server
            if server is not None and not self._pending:
                self._forward(server, data)
                return
            if server is None and self._skip:
                # The tail of a CopyData the server stopped listening to (it ended
                # the COPY with an error and was released): PostgreSQL drops it.
                skip = self._skip
                if len(data) <= skip:
                    self._skip = skip - len(data)
                    return
                data = data[skip:]
                self._skip = 0
            if self._pending or self._checkout_task is not None or self._queued is not None \
                    or not self._start_fast(data):
                self._pending += data
                self._dispatch_pending()
            return
        if self.phase is Phase.HANDSHAKE:
            self._buffer.feed(data)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_session()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        # The client reads slower than its server sends: stop reading that server.
        server = self.server
        if server is not None:
            server.pause_reading()

    def resume_writing(self) -> None:
        server = self.server
        if server is not None:
            server.resume_reading()

    # --------------------------------------------------------------- handshake

    async def _read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self._buffer.next_message()
            if msg is not None:
                return msg
            await self._wait_for_data()

    async def _wait_for_data(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client disconnected")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _handshake(self) -> None:
        try:
            await asyncio.wait_for(self._login(), self.app.config.general.client_login_timeout / 1000)
            if self.admin is not None:
                await self.admin.run()
        except LoginRefused as exc:
            log.info("client %s (user %r, database %r) refused: %s", self.peer, self.user, self.database, exc)
            self._send_error_and_close(exc.sqlstate, str(exc), exc.severity)
        except ProtocolViolation as exc:
            log.info("client %s: protocol violation during startup: %s", self.peer, exc)
            self._send_error_and_close(exc.sqlstate, str(exc), exc.severity)
        except auth.AuthError as exc:
            log.info("client %s (user %r): authentication failed: %s", self.peer, self.user, exc)
            self._send_error_and_close(exc.sqlstate, f'password authentication failed for user "{self.user}"',
                                       exc.severity)
        except asyncio.TimeoutError:
            log.info("client %s did not log in within client_login_timeout; dropped", self.peer)
            self._send_error_and_close(
                sqlstates.QUERY_CANCELED, "canceling authentication due to timeout: the client did not log "
                f"in within client_login_timeout ({self.app.config.general.client_login_timeout} ms)")
        except ssl.SSLError as exc:
            log.info("client %s: TLS handshake failed: %s", self.peer, exc)
            self._close_session()
        except (ConnectionResetError, asyncio.CancelledError):
            self._close_session()
        except Exception:  # noqa: BLE001 - never let one client take the listener down
            log.exception("client %s: unexpected error during login", self.peer)
            self._send_error_and_close(sqlstates.INTERNAL_ERROR, "internal error in pypool during login")

    async def _login(self) -> None:
        startup = await self._read_startup()
        if startup is None:
            return
        params = startup.params
        self.user = params["user"]
        self.database = params.get("database") or self.user
        self.app.check_accepting(self)
        general = self.app.config.general
        if self.app.client_tls.required and not self.tls:
            raise LoginRefused(sqlstates.INVALID_AUTHORIZATION_SPECIFICATION,
                               'pypool requires TLS (client_tls_mode = "require"): this connection is not '
                               "encrypted; connect with sslmode=require")
        self.auth_method = limits.access_method(general.hba, general.client_auth_method, self.peer_host,
                                                self.database, self.user, self.tls)
        if self.database in admin.ADMIN_DATABASES:
            self.auth_method = limits.admin_method(general, self.auth_method)
            self.admin = await admin.login(self)
            return
        group = self.app.find_group(self.database, self.user)
        if group is None:
            # Unknown user: run the same exchange with a decoy, so it looks like a wrong password.
            if self.app.has_database(self.database):
                await self._authenticate(None)
                raise auth.AuthError("password authentication failed")
            raise LoginRefused(sqlstates.INVALID_CATALOG_NAME,
                               f'no such database: "{self.database}" is not a pool in pypool\'s config')
        self.auth_method = limits.user_method(general, self.auth_method, group.user)
        await self._authenticate(group)
        self.app.user_clients.admit((self.database, self.user), group.user.max_client_connections)
        self._counted_as = (self.database, self.user)
        self.group = group
        for name in TRACKED_STARTUP_PARAMETERS:
            if name in params:
                self.session_parameters[name] = params[name]
        self._startup_settings = {k.lower(): v for k, v in self.session_parameters.items()}
        if params.get("options"):
            self._startup_settings.update(session.startup_options(params["options"]))
        self._set_settings({})
        self._router = self.app.routers[self.database]
        self._session_mode = group.pool_mode == "session"
        if not self._session_mode:
            self.statements = ClientStatements()
        server_params = await group.login_parameters()
        server_params.update(self.session_parameters)
        self.process_id, self.secret_key = self.app.register_cancel_key(self)
        out = [m.authentication_ok()]
        out.extend(m.parameter_status(k, v) for k, v in server_params.items()
                   if k not in ("extra_float_digits", "search_path"))
        out.append(m.backend_key_data(self.process_id, self.secret_key))
        out.append(m.ready_for_query())
        self.transport.write(b"".join(out))  # type: ignore[union-attr]
        if self.app.config.general.log_client_connections:
            log.info("client %s logged in as %s to %s", self.peer, self.user, self.database)
        self.phase = Phase.RELAY
        leftover = self._buffer.take_raw()
        if leftover:
            self._pending += leftover
            self._dispatch_pending()

    async def _read_startup(self) -> StartupMessage | None:
        while True:
            packet = self._buffer.next_startup()
            if packet is None:
                await self._wait_for_data()
                continue
            if isinstance(packet, SSLRequest) and self.app.client_tls.offered and not self.tls:
                await self._start_tls()
                continue
            if isinstance(packet, (SSLRequest, GSSEncRequest)):
                self.transport.write(b"N")  # type: ignore[union-attr]
                continue
            if isinstance(packet, CancelRequest):
                self.app.cancel(packet.process_id, packet.secret_key)
                self._close_session()
                return None
            return packet

    async def _start_tls(self) -> None:
        """Answer an SSLRequest with 'S' and upgrade this connection; the startup packet follows encrypted."""
        if len(self._buffer):
            # Bytes sent before the handshake would be trusted as if encrypted (CVE-2021-23214).
            raise ProtocolViolation("received unencrypted data after SSL request")
        transport = self.transport
        assert transport is not None
        transport.write(b"S")
        # start_tls takes the transport over before any further byte is read, so the
        # ClientHello cannot land in the startup buffer.
        self.transport = await asyncio.get_running_loop().start_tls(
            transport, self, self.app.client_tls.context, server_side=True)  # type: ignore[arg-type]
        self.tls = True

    async def _authenticate(self, group: "PoolGroup | None") -> None:
        method = self.auth_method
        username = self.user
        if method == "trust":
            if group is None:
                raise auth.AuthError("no such user")
            return
        if method == "md5":
            salt = auth.random_salt()
            self.transport.write(m.authentication_md5(salt))  # type: ignore[union-attr]
            tag, payload = await self._read_message()
            if tag != m.PASSWORD:
                raise ProtocolViolation(f"expected password response, got message type {chr(tag)!r}")
            response = m.parse_password(payload)
            # An unknown user is checked against a decoy, so both failures take the same work.
            stored = group.user.password if group is not None else _DECOY_PASSWORD
            if not auth.md5_verify(username, stored, salt, response) or group is None:
                raise auth.AuthError("password authentication failed")
            return
        verifier = self.app.scram_verifier(group) if group is not None else None
        session = auth.ScramServerSession(verifier, username=username)
        self.transport.write(m.authentication_sasl(session.MECHANISMS))  # type: ignore[union-attr]
        tag, payload = await self._read_message()
        if tag != m.PASSWORD:
            raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(tag)!r}")
        mechanism, data = m.parse_sasl_initial_response(payload)
        self.transport.write(m.authentication_sasl_continue(session.handle_client_first(mechanism, data)))  # type: ignore[union-attr]
        tag, payload = await self._read_message()
        if tag != m.PASSWORD:
            raise ProtocolViolation(f"expected SASLResponse, got message type {chr(tag)!r}")
        final = session.handle_client_final(payload)
        self.transport.write(m.authentication_sasl_final(final))  # type: ignore[union-attr]

    # ------------------------------------------------------------------- relay

    def _forward(self, server: ServerConnection, data: bytes) -> None:
        """Relay client bytes to ``server``, counting requests that end in ReadyForQuery."""
        server.bytes_sent += len(data)
        if self._careful:
            # A message to rewrite is arriving in pieces: wait for all of it.
            buf = self._careful
            buf += data
            if len(buf) < HEADER_SIZE or len(buf) < 1 + int.from_bytes(buf[1:5], "big"):
                return
            data = bytes(buf)
            buf.clear()
        if self._hold:
            data = self._hold + data
            self._hold = b""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            server.transport.write(data)  # type: ignore[union-attr]
            return
        start = 0  # first byte not yet written (moves past messages rewritten on the way)
        careful = self.statements is not None
        while True:
            if n - pos < HEADER_SIZE:
                self._hold = data[pos:]
                self._skip = 0
                break
            tag = data[pos]
            length = int.from_bytes(data[pos + 1:pos + 5], "big")
            if length < 4 or length > self._max_message:
                self._protocol_violation(f"invalid message length {length} for message type {chr(tag)!r}")
                return
            if careful and tag in _CAREFUL_TAGS and self._needs_care(tag, data, pos + 5, pos + 1 + length):
                if pos > start:
                    server.transport.write(data[start:pos])  # type: ignore[union-attr]
                nxt = pos + 1 + length
                if nxt > n:
                    self._careful += data[pos:]
                    self._skip = 0
                    return
                if not self._forward_with_care(server, data, pos, nxt):
                    return  # paused: the rest waits in _pending
                start = pos = nxt
                if pos >= n:
                    self._skip = 0
                    break
                continue
            if tag == _Q or tag == _S or tag == _F:
                server.pending_syncs += 1
                server.batch_open = False
                server.ps_rank = 0
                self._syncs_after_execute = self._syncs_after_execute + 1 if tag == _S else 0
            elif tag == _X:
                if pos > start:
                    server.transport.write(data[start:pos])  # type: ignore[union-attr]
                self._close_session()
                return
            elif tag in _COPY_TAGS:
                if tag != _COPY_DATA and self._syncs_after_execute:
                    # A COPY FROM STDIN started by Execute: the server ignores Syncs that
                    # arrive in copy-in mode (libpq sends one right after Execute), so
                    # they will get no ReadyForQuery of their own.
                    server.pending_syncs -= self._syncs_after_execute
                    self._syncs_after_execute = 0
            else:
                server.batch_open = True
                if tag == _EXECUTE:
                    self._syncs_after_execute = 0
                elif tag == _P or tag == _C:
                    server.ps_rank += 1
            nxt = pos + 1 + length
            if nxt >= n:
                self._skip = nxt - n
                pos = n
                break
            pos = nxt
        if start:
            if pos > start:
                server.transport.write(data[start:pos])  # type: ignore[union-attr]
        elif pos == n:
            server.transport.write(data)  # type: ignore[union-attr]
        elif pos:
            server.transport.write(data[:pos])  # type: ignore[union-attr]

    # ------------------------------------------- statements that need rewriting

    @staticmethod
    def _needs_care(tag: int, data: bytes, start: int, end: int) -> bool:
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
            return text_end < 0 or session.might_matter(data, start + 1, text_end)
        if tag == _B and start + 1 < end and data[start] == 0:  # the usual unnamed portal: named statement?
            return data[start + 1] != 0
        return names_statement(tag, data, start, end)

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
            sql = payload[text_at:text_end].decode("utf-8", "replace")
            effects = session.analyze(sql) if session.might_matter(payload, text_at, text_end) else session.NOTHING
            if effects.listen and self._must_wait_for_listener(effects):
                self._pending += data[pos:]
                self._checkout_task = asyncio.get_running_loop().create_task(self._listen_then_resume(effects))
                return False
            replacement = self._apply_session_effects(effects, server) if effects is not session.NOTHING else None
            if replacement is not None:
                payload = payload[:text_at] + replacement.encode() + payload[text_end:]
                raw = m.message(tag, payload)
            if tag == _P and text_at > 1 and effects.settings:
                self.statements.changing_settings.add(payload[:text_at - 1])  # type: ignore[union-attr]
        elif tag == _B and self.statements.changing_settings:  # type: ignore[union-attr]
            portal_end = payload.find(b"\x00")
            if payload[portal_end + 1:payload.find(b"\x00", portal_end + 1)] in self.statements.changing_settings:  # type: ignore[union-attr]
                self._settings_dirty = True
        transport = server.transport
        if tag == _Q:
            server.pending_syncs += 1
            server.batch_open = False
            server.ps_rank = 0
            self._syncs_after_execute = 0
            transport.write(raw)  # type: ignore[union-attr]
            return True
        server.batch_open = True
        statements = server.statements
        if statements is None:
            statements = server.statements = ServerStatements(self.group.config.prepared_statements_cache_size)  # type: ignore[union-attr]
        rewriter = Rewriter(self.statements, statements, statements.epoch + server.pending_syncs,  # type: ignore[arg-type]
                            server.ps_rank)
        rewriter.message(tag, payload, raw)
        server.ps_rank = rewriter.rank
        if server.epoch_failed and server.pending_syncs <= 0:
            # The server already reported an error for this batch and skips to its Sync.
            statements.on_error(self.statements)
        if effects.forget_all:
            # A prepared DEALLOCATE ALL / DISCARD ALL drops itself too when it runs: the server
            # keeps nothing, and each Bind of it prepares it again first.
            statements.clear()
        transport.write(b"".join(rewriter.out))  # type: ignore[union-attr]
        return True

    def _apply_session_effects(self, effects: session.Effects, server: ServerConnection) -> str | None:
        """Note what a statement does to the client's session; the text to send instead, if any."""
        if effects.refusal is not None:
            self._listen_error = None
            return session.refusal_sql(*effects.refusal)
        if effects.settings:
            self._settings_dirty = True
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
            return None
        if effects.forget:
            names = [name.encode() for name in effects.forget]
            if not all(name in statements.names for name in names):
                return None  # the server's "does not exist" error is the right answer
            for name in names:
                del statements.names[name]
            return session.NOOP_STATEMENT
        if effects.listen:
            if self._listen_error is not None:
                error, self._listen_error = self._listen_error, None
                return session.refusal_sql(f"LISTEN failed: pypool's listener connection: {error}",
                                           "retry later; the pool's primary must accept a connection")
            for op, channel in effects.listen:
                if op == "UNLISTEN" and self._hub is not None:
                    self._hub.unlisten(self, channel)
            return session.listen_stand_in(effects.listen)
        return None

    def _must_wait_for_listener(self, effects: session.Effects) -> bool:
        if self._listen_error is not None:
            return False
        hub = self._hub
        return any(op == "LISTEN" and (hub is None or not hub.is_listening(self, channel))
                   for op, channel in effects.listen)

    async def _listen_then_resume(self, effects: session.Effects) -> None:
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
            self._forward(server, data)
        else:
            self._pending += data
            self._dispatch_pending()

    def deliver_notification(self, message: bytes) -> None:
        """A NotificationResponse from the pool's listener: write it between whole messages."""
        transport = self.transport
        if self.phase is not Phase.RELAY or transport is None or transport.is_closing():
            return
        if self.server is None:
            transport.write(message)
        else:
            self._notifications.append(message)

    def _dispatch_pending(self) -> None:
        """No server attached: route the first complete message and get a connection."""
        if self._checkout_task is not None or self._queued is not None or self.phase is not Phase.RELAY:
            return
        buf = self._pending
        while len(buf) >= HEADER_SIZE:
            tag = buf[0]
            length = int.from_bytes(buf[1:5], "big")
            if length < 4 or length > self._max_message:
                self._protocol_violation(f"invalid message length {length} for message type {chr(tag)!r}")
                return
            if len(buf) < 1 + length:
                return  # wait for the whole first message: routing may need its text
            if tag == _X:
                self._close_session()
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
            decision = self.app.route(self, *self._routable(tag, bytes(buf[5:1 + length])))
            if decision.reply is not None or decision.hold_begin or decision.ends_empty_transaction:
                self._answer_locally(decision, length)
                continue
            group = self.group
            assert group is not None
            try:
                chosen = group.choose(decision.role)
            except ServerError as exc:
                self._fail_request(exc.sqlstate, str(exc))
                continue
            server = chosen.try_acquire() if chosen is not None else None
            if server is not None and self._held_begin is None and not self._needs_sync(server):
                self._attach(server, decision.role)
                return
            # Wait for a connection, sync parameters or replay a held BEGIN, in a coroutine.
            self._checkout_task = asyncio.get_running_loop().create_task(
                self._checkout(decision.role, server, chosen))
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
        end = 1 + int.from_bytes(data[1:5], "big")
        if end > n or end < HEADER_SIZE or end > self._max_message:
            return False
        decision = self._router.route_default(data if end == n else data[:end])  # type: ignore[union-attr]
        if decision is None:
            return False
        group = self.group
        role = decision.role
        server_pool = group.primary if role == PRIMARY else group.choose(role)  # type: ignore[union-attr]
        if server_pool is None:
            return False
        server = server_pool.try_acquire()
        if server is None:
            self._pending += data
            waiter = server_pool.queue(lambda conn: self._queued_server_ready(role, conn),
                                       lambda exc: self._queued_wait_failed(role, server_pool, exc))
            if waiter is not None:
                self._queued = waiter
                self.wait_started = waiter.started
                return True
            self._checkout_task = asyncio.get_running_loop().create_task(
                self._checkout(role, None, server_pool))
            return True
        if server.applied_key != self._parameters_key:
            # Sync parameters first, in a coroutine.
            self._pending += data
            self._checkout_task = asyncio.get_running_loop().create_task(
                self._checkout(role, server, server_pool))
            return True
        self.server = server
        server.attach(self)
        self._skip = 0
        self._hold = b""
        self._replay = (data, role, None) if role != PRIMARY else None
        self._forward(server, data)
        return True

    def _end_wait(self) -> None:
        """A wait for a server connection ended: keep the longest (SHOW CLIENTS maxwait)."""
        waited = time.monotonic() - self.wait_started
        if waited > self.max_wait:
            self.max_wait = waited
        self.wait_started = 0.0

    def _end_queued_wait(self) -> None:
        self._queued = None
        self._end_wait()

    def _queued_server_ready(self, role: str, server: ServerConnection) -> None:
        """The pool handed over a connection this client queued for in ``_start_fast``."""
        self._end_queued_wait()
        if self.phase is not Phase.RELAY:
            if server.pool is not None:
                server.pool.release(server)
            else:
                server.close()
            return
        if self._needs_sync(server):
            self._checkout_task = asyncio.get_running_loop().create_task(
                self._checkout(role, server, server.pool))
            return
        self._attach(server, role)

    def _queued_wait_failed(self, role: str, server_pool: "ServerPool", exc: Exception) -> None:
        """The queued wait ended without a connection; fail or retry as ``group.checkout`` would."""
        self._end_queued_wait()
        group = self.group
        if self.phase is not Phase.RELAY or group is None:
            return
        if isinstance(exc, PoolTimeout):
            sqlstate = exc.sqlstate
        elif isinstance(exc, ServerError) and role == PRIMARY:
            exc = group.primary_unavailable(server_pool, exc)
            sqlstate = exc.sqlstate
        else:
            if isinstance(exc, ServerError) and server_pool is not group.primary:
                group.ban(server_pool, str(exc))  # it failed to connect: ``_checkout`` tries the others
            # Also the way to follow a reload that replaced the pool (PoolRetired).
            self._checkout_task = asyncio.get_running_loop().create_task(self._checkout(role, None, None))
            return
        log.warning("client %s: %s", self.peer, exc)
        self._fail_request(sqlstate, str(exc))
        self._dispatch_pending()

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
            self.transport.write(m.command_complete("BEGIN") + m.ready_for_query(b"T"))  # type: ignore[union-attr]
            return
        if decision.ends_empty_transaction:
            self._held_begin = None
            self.transport.write(m.command_complete(decision.end_tag) + m.ready_for_query())  # type: ignore[union-attr]
            return
        self.transport.write(decision.reply + self._ready_bytes())  # type: ignore[operator, union-attr]

    @property
    def held_begin(self) -> str | None:
        return self._held_begin

    def _ready_bytes(self) -> bytes:
        return m.ready_for_query(b"T" if self._held_begin is not None else b"I")

    def _write_ready(self) -> None:
        self.transport.write(self._ready_bytes())  # type: ignore[union-attr]

    async def _checkout(self, role: str, server: ServerConnection | None,
                        preferred: "ServerPool | None" = None) -> None:
        group = self.group
        assert group is not None
        self.wait_started = time.monotonic()
        try:
            if server is None:
                server = await self._checkout_current(role, preferred)
            await self._sync_parameters(server)
            if self._held_begin is not None:
                await server.query(self._held_begin)
        except PoolTimeout as exc:
            self._checkout_task = None
            log.warning("client %s: %s", self.peer, exc)
            self._fail_request(exc.sqlstate, str(exc))
            self._dispatch_pending()
            return
        except ServerError as exc:
            self._checkout_task = None
            if server is not None:
                if server.closed or server.status != _IDLE:
                    group.checkin_broken(server)
                else:
                    group.checkin(server)
            log.warning("client %s: %s", self.peer, exc)
            self._fail_request(exc.sqlstate, str(exc))
            self._dispatch_pending()
            return
        except asyncio.CancelledError:
            if server is not None:
                # Cancelled half-way through syncing: the server still owes that query's reply.
                if server.status == _IDLE and not server.reply_owed:
                    group.checkin(server)
                else:
                    group.checkin_broken(server)
            raise
        finally:
            self._end_wait()
        self._checkout_task = None
        if self.phase is not Phase.RELAY:
            group.checkin(server)
            return
        self._attach(server, role)

    async def _checkout_current(self, role: str, preferred: "ServerPool | None") -> ServerConnection:
        """``group.checkout``, following a config reload that rebuilt this client's pool."""
        group = self.group
        assert group is not None
        while True:
            if group.successor is not None:
                while group.successor is not None:
                    group = group.successor
                self.group = group
                self._router = self.app.routers.get(self.database, self._router)
                self._session_mode = group.pool_mode == "session"
                preferred = None
            try:
                return await group.checkout(role, preferred)
            except PoolRetired:
                if group.successor is None:
                    raise ServerError(f'pool "{self.database}" for user "{self.user}" was removed from '
                                      "pypool's configuration", {"C": sqlstates.INVALID_CATALOG_NAME}) from None

    def _needs_sync(self, server: ServerConnection) -> bool:
        return server.applied_key != self._parameters_key

    def _set_settings(self, session_settings: dict[str, str]) -> None:
        """The client's settings: its startup parameters, overridden by what its SETs left."""
        self._desired_settings = {**self._startup_settings, **session_settings}
        self._parameters_key = tuple(sorted(self._desired_settings.items()))

    async def _sync_parameters(self, server: ServerConnection) -> None:
        """Make the server session carry this client's settings (and no other client's)."""
        statement = session.sync_statement(self._desired_settings, server.applied_parameters)
        if statement is not None:
            try:
                await server.query(statement)
            except ServerError as exc:
                # A bad value from the client's startup packet: tell the client, keep the server.
                raise ServerError(f"cannot apply session settings: {exc}", exc.fields) from None
        server.applied_parameters = dict(self._desired_settings)
        server.applied_key = self._parameters_key

    async def _read_back_settings(self, server: ServerConnection) -> None:
        """After a transaction that ran SET/RESET: learn the session settings it left, then release.

        PostgreSQL has already applied its rules (SET LOCAL ends with the
        transaction, a rolled-back SET is undone), so the server's own view
        is the client's new session state.
        """
        group = self.group
        assert group is not None
        server.detach()
        try:
            rows = await server.query(session.SETTINGS_QUERY)
        except ServerError as exc:
            log.warning("client %s: cannot read back session settings from %s: %s", self.peer, server.label, exc)
            group.checkin_broken(server)
        except asyncio.CancelledError:
            group.checkin_broken(server)
            raise
        else:
            settings = {str(name).lower(): str(value) for name, value in rows}
            self._set_settings(settings)
            server.applied_parameters = settings
            server.applied_key = self._parameters_key if settings == self._desired_settings else None
            group.checkin(server)
        self._checkout_task = None
        if self._pending and self.phase is Phase.RELAY:
            self._dispatch_pending()

    def _attach(self, server: ServerConnection, role: str) -> None:
        self.server = server
        server.attach(self)
        if self.transport is not None and self.transport.is_closing():
            return
        data = bytes(self._pending)
        self._pending.clear()
        self._skip = 0
        self._hold = b""
        # A read whose server dies before answering can be replayed elsewhere.
        self._replay = (data, role, self._held_begin) if role != PRIMARY else None
        self._held_begin = None
        if data:
            self._forward(server, data)

    # Called by the attached ServerConnection --------------------------------

    def server_request_done(self, server: ServerConnection) -> None:
        """The server answered everything asked; in transaction mode, give it back."""
        if self._notifications:
            self.transport.write(b"".join(self._notifications))  # type: ignore[union-attr]
            self._notifications.clear()
        self._replay = None
        self.query_count += 1
        if server.status != _IDLE:
            return
        self.xact_count += 1
        if self._session_mode:
            return
        self.server = None
        if self._hold:
            # A message header split across reads after the end of the request.
            self._pending[:0] = self._hold
            self._hold = b""
        if self._careful:
            # Likewise a message to rewrite that is still arriving.
            self._pending[:0] = self._careful
            self._careful.clear()
        if self._settings_dirty or server.reported_change:
            self._settings_dirty = False
            self._checkout_task = asyncio.get_running_loop().create_task(self._read_back_settings(server))
            return
        pool = server.pool
        if pool is not None:
            pool.release(server)
        else:
            server.detach()
            server.close()
        if self._pending:
            self._dispatch_pending()

    def server_lost(self, server: ServerConnection, exc: Exception | None) -> None:
        self.server = None
        self._careful.clear()
        group = self.group
        replay = self._replay
        self._replay = None
        if group is not None:
            group.checkin_broken(server)
        if group is not None and replay is not None and not server.replied and self.phase is Phase.RELAY:
            # The read never got an answer: ban that replica and run it elsewhere.
            data, role, held_begin = replay
            group.ban_address(server.address, f"connection lost during a request: {exc or 'closed'}")
            log.warning("client %s: server %s died before answering; retrying the read elsewhere",
                        self.peer, server.label)
            self._pending[:0] = data
            self._held_begin = held_begin
            self._skip = 0
            self._hold = b""
            self._checkout_task = asyncio.get_running_loop().create_task(self._checkout(role, None, None))
            return
        log.warning("client %s: server %s closed the connection during a request", self.peer, server.label)
        self._send_error_and_close(sqlstates.CONNECTION_FAILURE,
                                   f"server connection to {server.label} was lost; the transaction, "
                                   "if any, was rolled back")

    # ----------------------------------------------------------------- errors

    def _fail_request(self, sqlstate: str, text: str) -> None:
        """Answer the request at the head of ``_pending`` with an error, as a server would."""
        if self.transport is None or self.transport.is_closing():
            return
        self.error_count += 1
        self.transport.write(m.error_response(sqlstate, text))
        buf = self._pending
        while len(buf) >= HEADER_SIZE:
            tag = buf[0]
            length = int.from_bytes(buf[1:5], "big")
            if len(buf) < 1 + length:
                break
            del buf[:1 + length]
            if tag in (_Q, _F, _S):
                self.transport.write(m.ready_for_query())
                return
        # An extended-protocol batch whose Sync has not arrived yet.
        self._discarding = True

    def _protocol_violation(self, text: str) -> None:
        log.warning("client %s: protocol violation: %s", self.peer, text)
        self._send_error_and_close(sqlstates.PROTOCOL_VIOLATION, text)

    def _send_error_and_close(self, sqlstate: str, text: str, severity: str = "FATAL") -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(m.error_response(sqlstate, text, severity=severity))
        self._close_session()

    def terminate_for_shutdown(self) -> None:
        self._send_error_and_close(sqlstates.ADMIN_SHUTDOWN, "pypool is shutting down")

    def _close_session(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
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
        if self._handshake_task is not None and not self._handshake_task.done() \
                and self._handshake_task is not asyncio.current_task():
            self._handshake_task.cancel()
        server = self.server
        if server is not None:
            self.server = None
            self._release_on_disconnect(server)
        if self.transport is not None:
            self.transport.close()

    def _release_on_disconnect(self, server: ServerConnection) -> None:
        group = self.group
        assert group is not None
        clean = server.status == _IDLE and server.pending_syncs <= 0 and not server.batch_open \
            and not self._skip and not self._hold and not self._careful
        if clean and group.pool_mode != "session":
            group.checkin(server)
        elif clean:
            # Session mode: the next client must not inherit this one's session state.
            server.detach()
            asyncio.get_running_loop().create_task(self._reset_and_checkin(group, server))
        else:
            # Mid-transaction or mid-request: its state can't be trusted, close it.
            log.info("client %s left mid-transaction; closing server connection %s", self.peer, server.label)
            group.checkin_broken(server)

    @staticmethod
    async def _reset_and_checkin(group: "PoolGroup", server: ServerConnection) -> None:
        try:
            await server.query("DISCARD ALL")
            if server.statements is not None:
                server.statements.clear()
            server.applied_parameters.clear()
            server.applied_key = None
        except ServerError:
            group.checkin_broken(server)
            return
        group.checkin(server)


def new_cancel_key() -> tuple[int, int]:
    return secrets.randbits(31), secrets.randbits(32)
