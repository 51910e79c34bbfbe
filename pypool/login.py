"""A client's login, as a coroutine: startup packet, TLS, authentication, the admin hand-off.

It runs once per connection, before the session's relay takes over
(pypool/session/session.py); ``ClientConnection`` (pypool/client.py), the
asyncio adapter, mixes it in and feeds it bytes through ``read_message``. What
the login learns of the client (user, database, its pool, settings, cancel key)
goes to the client's ``ClientSession`` (``self.session``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from typing import TYPE_CHECKING

from pypool import limits, sqlstates
from pypool.errors import LoginRefused
from pypool.pool.server import ServerError
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import CancelRequest, GSSEncRequest, ProtocolViolation, SSLRequest, StartupMessage
from pypool.session import session_state as session
from pypool.session import states
from pypool.session.session import ClientSession

if TYPE_CHECKING:
    from pypool.pool.group import PoolGroup

log = logging.getLogger("pypool.client")

# Startup packet entries that are not settings; PostgreSQL takes every other one as a
# setting (a GUC name, matched case-insensitively), and so does pypool: each server
# connection that runs the client's transactions carries them.
NOT_SETTINGS = ("user", "database", "options", "replication")
# Reported settings a client may choose whose value PostgreSQL echoes as given.
_ECHOED = ("application_name",)
_REPORTED_VALUES_KEPT = 256  # distinct startup value sets remembered per pool

_DECOY_PASSWORD = secrets.token_hex(16)
_AUTHENTICATION_OK = m.authentication_ok()
_READY_FOR_QUERY = m.ready_for_query()
_AUTHENTICATION_SASL = m.authentication_sasl(auth.ScramServerSession.MECHANISMS)


class LoginHandshake:
    """The handshake half of ClientConnection: everything before the client is IDLE (or ADMIN)."""

    session: ClientSession

    async def read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self._buffer.next_message()
            if msg is not None:
                return msg
            await self._wait_for_data()

    async def _wait_for_data(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client disconnected")
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _handshake(self) -> None:
        client = self.session
        try:
            try:
                await self._login()
            finally:
                self._stop_login_timer()
            if client.admin is not None:
                await client.admin.run()
        except LoginRefused as exc:
            log.info("client %s (user %r, database %r) refused: %s", client.peer, client.user, client.database, exc)
            self.close_with_error(exc.sqlstate, str(exc), exc.severity)
        except ProtocolViolation as exc:
            log.info("client %s: protocol violation during startup: %s", client.peer, exc)
            self.close_with_error(exc.sqlstate, str(exc), exc.severity)
        except auth.AuthError as exc:
            log.info("client %s (user %r): authentication failed: %s", client.peer, client.user, exc)
            self.close_with_error(exc.sqlstate, f'password authentication failed for user "{client.user}"',
                                  exc.severity)
        except ssl.SSLError as exc:
            log.info("client %s: TLS handshake failed: %s", client.peer, exc)
            self.close()
        except asyncio.CancelledError:
            if self.login_timed_out:
                self._refuse_slow_login()
            else:
                self.close()
        except ConnectionResetError:
            self.close()
        except Exception:  # noqa: BLE001 - never let one client take the listener down
            log.exception("client %s: unexpected error during login", client.peer)
            self.close_with_error(sqlstates.INTERNAL_ERROR, "internal error in pypool during login")

    def _login_too_slow(self) -> None:
        """client_login_timeout is up and the login is not done: cancel it (``_handshake`` answers).

        A timer per connection, not ``asyncio.timeout``: no context manager
        and no loop look-ups per login.
        """
        self._login_timer = None
        task = self._handshake_task
        if task is None:  # not a byte from the client yet
            self._refuse_slow_login()
        elif not task.done():
            self.login_timed_out = True
            task.cancel()

    def _refuse_slow_login(self) -> None:
        log.info("client %s did not log in within client_login_timeout; dropped", self.session.peer)
        self.close_with_error(
            sqlstates.QUERY_CANCELED, "canceling authentication due to timeout: the client did not log "
            f"in within client_login_timeout ({self.app.config.general.client_login_timeout} ms)")

    def _stop_login_timer(self) -> None:
        timer = self._login_timer
        if timer is not None:
            self._login_timer = None
            timer.cancel()

    async def _login(self) -> None:
        startup = await self._read_startup()
        if startup is None:
            return
        client = self.session
        client.set_state(states.AUTHENTICATING)
        params = startup.params
        client.user = user = params["user"]
        client.database = database = params.get("database") or user
        self.app.check_accepting(client)
        general = self.app.config.general
        if self.app.client_tls.required and not self.tls:
            raise LoginRefused(sqlstates.INVALID_AUTHORIZATION_SPECIFICATION,
                               'pypool requires TLS (client_tls_mode = "require"): this connection is not '
                               "encrypted; connect with sslmode=require")
        self.auth_method = limits.access_method(general.hba, general.client_auth_method, self.peer_host,
                                                database, user, self.tls)
        if self.app.is_admin_database(database):
            self.auth_method = limits.admin_method(general, self.auth_method)
            client.admin = await self.app.admin_login(self)
            client.set_state(states.ADMIN)
            return
        group = self.app.find_group(database, user)
        if group is None:
            # Unknown user: run the same exchange with a decoy, so it looks like a wrong password.
            if self.app.has_database(database):
                await self.authenticate(None)
                raise auth.AuthError("password authentication failed")
            raise LoginRefused(sqlstates.INVALID_CATALOG_NAME,
                               f'no such database: "{database}" is not a pool in pypool\'s config')
        self.auth_method = limits.user_method(general, self.auth_method, group.user)
        await self.authenticate(group)
        self.app.user_clients.admit((database, user), group.user.max_client_connections)
        parameters = {name.lower(): value for name, value in params.items()
                      if name not in NOT_SETTINGS and not name.startswith("_pq_.")}
        startup_settings = dict(parameters)
        if params.get("options"):
            startup_settings.update(session.startup_options(params["options"]))
        client.join_pool(group, parameters, startup_settings)
        statuses = await self._parameter_statuses(group)
        client.process_id, client.secret_key = self.app.register_cancel_key(client)
        self.greet(b"".join((_AUTHENTICATION_OK, statuses, m.backend_key_data(client.process_id, client.secret_key),
                             _READY_FOR_QUERY)))
        if self.app.config.general.log_client_connections:
            log.info("client %s logged in as %s to %s", client.peer, user, database)
        self._relay_to_session()
        client.logged_in(self._buffer.take_raw())

    def greet(self, greeting: bytes) -> None:
        """Send the greeting (AuthenticationOk to ReadyForQuery) after the exchange's held last message.

        One write for SASLFinal and the greeting, as PostgreSQL sends them:
        one send() less per login.
        """
        held, self.auth_reply_held = self.auth_reply_held, b""
        if not self.is_closing():
            self.write(held + greeting)

    async def _parameter_statuses(self, group: "PoolGroup") -> bytes:
        """The ParameterStatus messages of the greeting, encoded: kept per pool and set of client settings.

        They depend only on the pool's server parameters (``group.server_parameters``,
        learnt once) and the client's settings, so the messages are built
        once per distinct set of settings; a change of the server parameters
        (a new object) empties the store.
        """
        key = tuple(self.session.desired_settings.items())
        if group.greetings_from is group.server_parameters:
            statuses = group.greetings.get(key)
            if statuses is not None:
                return statuses
        server_params, learnt = await self._reported_parameters(group)
        statuses = b"".join([m.parameter_status(k, v) for k, v in server_params.items()])
        known = group.server_parameters
        if learnt and known is not None:  # not fallback values nor the client's own spelling: remember them
            if group.greetings_from is not known or len(group.greetings) >= _REPORTED_VALUES_KEPT:
                group.greetings = {}
                group.greetings_from = known
            group.greetings[key] = statuses
        return statuses

    async def _reported_parameters(self, group: "PoolGroup") -> tuple[dict[str, str], bool]:
        """The ParameterStatus a client is told at login: the server's, with its own settings applied.

        PostgreSQL reports a setting as it stores it (``client_encoding=utf8``
        comes back as ``UTF8``, ``timezone=utc`` as ``TimeZone`` ``UTC``), and
        drivers compare with that spelling. So the client's reported settings
        are applied on a server connection, which then reports them -- once per
        distinct set of values (``group.reported_values``); the connection
        keeps them for the client's first transaction. A value the server
        refuses refuses the login, as PostgreSQL does. The flag says whether
        the values are the server's spelling (False: no server answered, the
        client's spelling stands in).
        """
        server_params = await group.login_parameters()
        names = {name.lower(): name for name in server_params}
        names.update((name, name) for name in _ECHOED)
        chosen = {names[k]: v for k, v in self.session.desired_settings.items() if k in names}
        asked = tuple(sorted((name, value) for name, value in chosen.items()
                             if name not in _ECHOED and server_params.get(name) != value))
        learnt = True
        if asked:
            reported = group.reported_values.get(asked)
            if reported is None:
                reported = await self._ask_reported_values(group, asked)
                learnt = asked in group.reported_values
            chosen.update(reported)
        server_params.update(chosen)
        return server_params, learnt

    async def _ask_reported_values(self, group: "PoolGroup", asked: tuple[tuple[str, str], ...]) -> dict[str, str]:
        server = await group.any_connection()
        if server is None:
            return {}  # no server answers now: the client's spelling, as before it connects
        try:
            await self.session.sync_parameters(server)
        except ServerError as exc:
            group.checkin(server, clean=not server.closed and not server.reply_owed)
            fields = exc.fields
            raise LoginRefused(fields.get("C", sqlstates.INVALID_PARAMETER_VALUE),
                               fields.get("M", str(exc)), "FATAL") from None
        reported = {name: server.parameters[name] for name, _ in asked if name in server.parameters}
        group.checkin(server)
        if len(group.reported_values) >= _REPORTED_VALUES_KEPT:
            group.reported_values.clear()
        group.reported_values[asked] = reported
        return reported

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
                self.write(b"N")
                continue
            if isinstance(packet, CancelRequest):
                delivery = self.app.cancel(packet.process_id, packet.secret_key)
                if delivery is not None:
                    # Closed only once the server has the signal, as PostgreSQL closes it: a driver
                    # that waits for the close (asyncpg) must not see the cancel hit its next statement.
                    await asyncio.shield(delivery)
                self.close()
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
        self._use_transport(await self._loop.start_tls(  # type: ignore[arg-type]
            transport, self, self.app.client_tls.context, server_side=True))  # type: ignore[arg-type]
        self.tls = True

    async def authenticate(self, group: "PoolGroup | None") -> None:
        method = self.auth_method
        username = self.session.user
        if method == "trust":
            if group is None:
                raise auth.AuthError("no such user")
            return
        if method == "md5":
            salt = auth.random_salt()
            self.write(m.authentication_md5(salt))
            tag, payload = await self.read_message()
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
        self.write(_AUTHENTICATION_SASL)
        tag, payload = await self.read_message()
        if tag != m.PASSWORD:
            raise ProtocolViolation(f"expected SASLInitialResponse, got message type {chr(tag)!r}")
        mechanism, data = m.parse_sasl_initial_response(payload)
        self.write(m.authentication_sasl_continue(session.handle_client_first(mechanism, data)))
        tag, payload = await self.read_message()
        if tag != m.PASSWORD:
            raise ProtocolViolation(f"expected SASLResponse, got message type {chr(tag)!r}")
        # Held for the greeting (``greet``), or sent before a refusal (``close_with_error``).
        self.auth_reply_held = m.authentication_sasl_final(session.handle_client_final(payload))
