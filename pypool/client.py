"""One client connection: the asyncio adapter around a client's session.

``ClientConnection`` owns the transport (TLS included; both event loops set
TCP_NODELAY on every TCP transport they make, accepted ones too) and flow
control (pypool/flow.py), and runs the login coroutine (pypool/login.py),
the admin hand-off included. The client itself, as the pooler knows it, is a
``ClientSession`` (pypool/session/session.py), sans-IO: this adapter is its
``SessionIO``. Once logged in, the client's bytes go straight to
``ClientSession.data_received`` (bound over this adapter's own, no call layer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Protocol

from pypool.flow import ReadingPause
from pypool.login import LoginHandshake
from pypool.protocol import auth
from pypool.protocol.frames import MessageBuffer
from pypool.session import states
from pypool.session.session import ClientSession, SessionHost

if TYPE_CHECKING:
    from pypool.pool.group import PoolGroup

__all__ = ["ClientConnection", "new_cancel_key"]

log = logging.getLogger("pypool.client")

# Coroutines the sessions run in the background (the loop keeps only weak references to tasks).
_RUNNING: set["asyncio.Task[None]"] = set()


class AdminConsole(Protocol):
    """The admin console a client is handed to (pypool.admin.AdminConsole)."""

    busy: bool

    async def run(self) -> None: ...


class ClientHost(SessionHost[ClientSession], Protocol):
    """What a client needs of the pooler it belongs to (pypool.app.Application)."""

    client_tls: Any

    def client_connected(self, client: ClientSession) -> None: ...
    def check_accepting(self, client: ClientSession) -> None: ...
    def is_admin_database(self, database: str) -> bool: ...
    async def admin_login(self, client: "ClientConnection") -> AdminConsole: ...
    def find_group(self, database: str, user: str) -> "PoolGroup | None": ...
    def has_database(self, database: str) -> bool: ...
    def register_cancel_key(self, client: ClientSession) -> tuple[int, int]: ...
    def cancel(self, process_id: int, secret_key: int) -> "asyncio.Task[None] | None": ...
    def scram_verifier(self, group: "PoolGroup") -> auth.ScramVerifier: ...


def _not_connected(data: bytes) -> None:
    raise ConnectionResetError("client not connected")


class ClientConnection(LoginHandshake, asyncio.Protocol):
    """The asyncio side of one client: its transport, the login, and the ``SessionIO`` of its session."""

    write: Callable[[bytes], None]  # SessionIO.write: the transport's own ``write``, bound once

    def __init__(self, app: ClientHost) -> None:
        self.app = app
        self.session = ClientSession(app, self)
        self.transport: asyncio.Transport | None = None
        self.write = _not_connected
        self.reading = ReadingPause()  # paused while its server cannot take more
        self.peer_host = ""  # the client's IP address, for the hba rules
        self.tls = False  # the connection was upgraded to TLS
        self.auth_method = app.config.general.client_auth_method  # hba may choose another per login
        # handshake (coroutine) side
        self._buffer = MessageBuffer(app.config.general.max_message_size)
        self._waiter: asyncio.Future[None] | None = None
        self._handshake_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: each lookup is a getpid()
        self._login_timer: asyncio.TimerHandle | None = None  # client_login_timeout
        self.login_timed_out = False
        self.auth_reply_held = b""  # the SASL exchange's last message, sent with the greeting

    def __repr__(self) -> str:
        return f"<ClientConnection {self.session!r}>"

    def _use_transport(self, transport: asyncio.Transport) -> None:
        """At connect and after the TLS upgrade: where writes go and what flow control pauses."""
        self.transport = transport
        self.write = transport.write
        self.reading.transport = transport

    # ------------------------------------------------------------ asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._use_transport(transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        if peer:
            self.session.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            self.peer_host = str(peer[0]) if isinstance(peer, tuple) else ""
        self.app.client_connected(self.session)
        self._loop = loop = asyncio.get_running_loop()
        # The login coroutine starts with the client's first bytes (data_received): no wait before them.
        self._login_timer = loop.call_later(self.app.config.general.client_login_timeout / 1000, self._login_too_slow)

    def data_received(self, data: bytes) -> None:
        """Before and outside the relay: the login's and the admin console's bytes.

        Once logged in to a pool the session's own ``data_received`` takes this
        one's place (``_relay_to_session``); the first branch is for a
        transport that still calls this one.
        """
        session = self.session
        if session.state.relaying:
            session.data_received(data)
        elif session.state is not states.CLOSED:
            self._buffer.feed(data)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            elif self._handshake_task is None:
                self._handshake_task = self._loop.create_task(self._handshake())  # type: ignore[union-attr]

    def _relay_to_session(self) -> None:
        """Logged in to a pool: the event loop hands the client's bytes to the session directly."""
        self.data_received = self.session.data_received  # type: ignore[method-assign]
        transport = self.transport
        if transport is not None:
            # uvloop keeps the ``data_received`` it found when the protocol was set: set it again.
            transport.set_protocol(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        # The client reads slower than its server sends: stop reading that server.
        server = self.session.server
        if server is not None:
            server.reading.pause()

    def resume_writing(self) -> None:
        server = self.session.server
        if server is not None:
            server.reading.resume()

    # ------------------------------------------------------------ SessionIO

    def is_closing(self) -> bool:
        transport = self.transport
        return transport is None or transport.is_closing()

    def disconnect(self) -> None:
        self._stop_login_timer()
        task = self._handshake_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    def spawn(self, work: Coroutine[Any, Any, None]) -> "asyncio.Task[None]":
        task = (self._loop or asyncio.get_running_loop()).create_task(work)
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)
        return task

    def pause_reading(self) -> None:
        self.reading.pause()

    def resume_reading(self) -> None:
        self.reading.resume()

    # ------------------------------------------------- the client, for the login

    def close_with_error(self, sqlstate: str, text: str, severity: str = "FATAL") -> None:
        held = self.auth_reply_held
        if held:  # authenticated, then refused (max_client_connections, a setting): as PostgreSQL orders them
            self.auth_reply_held = b""
            if not self.is_closing():
                self.write(held)
        self.session.close_with_error(sqlstate, text, severity)

    def close(self) -> None:
        self.session.close()


def new_cancel_key() -> tuple[int, int]:
    """A random BackendKeyData pair (31-bit process id, 32-bit secret), from one getrandom call."""
    bits = int.from_bytes(os.urandom(8), "big")
    return bits >> 33, bits & 0xFFFFFFFF
