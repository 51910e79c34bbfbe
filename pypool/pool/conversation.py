"""A server connection's conversation mode: pypool itself talks to the server, message by message.

Logging in, and the queries of health checks, settings syncs and resets: coroutines that wait for
the server's replies (``ServerConnection.data_received`` wakes them). The relay, which every client
message passes through, is pypool/pool/server.py and has no coroutine.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from pypool import sqlstates
from pypool.errors import PoolerError
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.protocol.frames import MessageBuffer


class ServerError(PoolerError):
    """The server refused us or sent an ErrorResponse; ``fields`` are its error fields."""

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        self.fields = fields or {}
        super().__init__(self.fields.get("C", sqlstates.CONNECTION_FAILURE), message)


class Conversation:
    """ServerConnection's coroutines (its base class): the state they use is the connection's."""

    __slots__ = ()  # ServerConnection's slots hold the state

    _buffer: MessageBuffer
    _waiter: asyncio.Future[None] | None
    closed: bool
    reply_owed: bool
    credentials: Any  # server.Credentials
    requests: Any  # session.tracker.RequestTracker
    backend_pid: int
    backend_secret: int
    on_notification: Callable[[bytes], None] | None

    @property
    def label(self) -> str:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _note_parameter(self, payload: bytes) -> None:
        raise NotImplementedError

    def _drain_idle_messages(self) -> None:
        raise NotImplementedError

    async def _read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self._buffer.next_message()
            if msg is not None:
                if msg[0] == m.NOTIFICATION_RESPONSE and self.on_notification is not None:
                    self.on_notification(msg[1])  # a listener connection's, between its replies
                    continue
                return msg
            if self.closed:
                raise ServerError(f"server {self.label} closed the connection unexpectedly")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def login(self, startup_params: dict[str, str]) -> None:
        """Send the startup packet and authenticate with whatever the server asks for."""
        creds = self.credentials
        params = {"user": creds.user, "database": creds.database}
        params.update(startup_params)
        self._write(m.startup_message(params))
        scram: auth.ScramClientSession | None = None
        scram_verified = False
        while True:
            tag, payload = await self._read_message()
            if tag == m.AUTHENTICATION:
                code, data = m.parse_auth_request(payload)
                if code == m.AUTH_OK:
                    # A server that skips SASLFinal never proved it knows the password.
                    if scram is not None and not scram_verified:
                        raise ServerError(f"server {self.label} ended SCRAM without proving its identity",
                                          {"C": sqlstates.INVALID_AUTHORIZATION_SPECIFICATION})
                    continue
                if code == m.AUTH_CLEARTEXT:
                    self._write(m.password_message(creds.password.encode()))
                elif code == m.AUTH_MD5:
                    self._write(m.password_message(auth.md5_hash(creds.user, creds.password, data[:4])))
                elif code == m.AUTH_SASL:
                    mechanisms = m.parse_sasl_mechanisms(data)
                    if "SCRAM-SHA-256" not in mechanisms:
                        raise ServerError(f"server {self.label} offers no supported SASL mechanism: {mechanisms}")
                    scram = auth.ScramClientSession(creds.user, creds.password)
                    self._write(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == m.AUTH_SASL_CONTINUE and scram is not None:
                    self._write(m.sasl_response(scram.handle_server_first(data)))
                elif code == m.AUTH_SASL_FINAL and scram is not None:
                    scram.verify_server_final(data)
                    scram_verified = True
                else:
                    raise ServerError(f"server {self.label} asked for unsupported authentication method {code}")
            elif tag == m.PARAMETER_STATUS:
                self._note_parameter(payload)
            elif tag == m.BACKEND_KEY_DATA:
                self.backend_pid = int.from_bytes(payload[0:4], "big")
                self.backend_secret = int.from_bytes(payload[4:8], "big")
            elif tag == m.ERROR_RESPONSE:
                fields = m.parse_error_fields(payload)
                raise ServerError(f"server {self.label}: {fields.get('M', 'login failed')}", fields)
            elif tag == m.READY_FOR_QUERY:
                self.requests.status = payload[0]
                return
            # NOTICE and anything else during login is ignored.

    async def query(self, sql: str) -> list[list[str | None]]:
        """Run a simple query in conversation mode and return its rows as text.

        Raises ServerError with the server's fields if any statement fails.
        """
        self._write(m.query(sql))
        self.reply_owed = True
        rows: list[list[str | None]] = []
        error: dict[str, str] | None = None
        while True:
            tag, payload = await self._read_message()
            if tag == m.DATA_ROW:
                rows.append(_decode_data_row(payload))
            elif tag == m.ERROR_RESPONSE:
                error = m.parse_error_fields(payload)
            elif tag == m.PARAMETER_STATUS:
                self._note_parameter(payload)
            elif tag == m.READY_FOR_QUERY:
                self.requests.status = payload[0]
                self.reply_owed = False
                if self.on_notification is not None:
                    # A listener's notification read together with the ReadyForQuery is still buffered,
                    # and no later read would hand it out (idle: data_received drains only new bytes).
                    self._drain_idle_messages()
                if error is not None:
                    raise ServerError(f"server {self.label}: {error.get('M')}", error)
                return rows
            elif tag in (m.COPY_IN_RESPONSE,):
                self._write(m.message(m.COPY_FAIL, b"pypool does not feed COPY here\x00"))


def _decode_data_row(payload: bytes) -> list[str | None]:
    count = int.from_bytes(payload[0:2], "big")
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        size = int.from_bytes(payload[pos:pos + 4], "big", signed=True)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos:pos + size].decode("utf-8", "replace"))
            pos += size
    return values
