"""Stand-ins for sockets in sans-IO tests."""

from __future__ import annotations

import asyncio

from pypool.app import Application
from pypool.config import default_config_dict, dump_config, parse_config
from pypool.pool.pool import ServerPool
from pypool.pool.server import IDLE, Credentials, ServerConnection
from pypool.session.session import ClientSession
from pypool.session.states import ClientState


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class NotStarted:
    """A coroutine RecordingIO.spawn kept (no event loop runs): cancelling it closes it."""

    def __init__(self, work) -> None:
        self.work = work
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.work.close()


class RecordingIO:
    """A ClientSession's outside world (SessionIO): records what reaches the client and what it starts.

    ``spawn`` runs the coroutine on the event loop when a test runs one, else
    keeps it in ``spawned`` (a test without a loop may drive or close it).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.paused = False
        self.spawned: list = []  # coroutines kept while no event loop runs
        self.tasks: list = []

    def write(self, data) -> None:
        self.data += data

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out

    def is_closing(self) -> bool:
        return self.closed

    def disconnect(self) -> None:
        self.closed = True

    def spawn(self, work):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.spawned.append(work)
            return NotStarted(work)
        task = loop.create_task(work)
        self.tasks.append(task)  # referenced, as the adapter does: the loop keeps only weak references
        return task

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def primary_only_app(pool_mode: str = "transaction", pool_size: int = 1, user_keys: dict | None = None,
                     **keys: object) -> Application:
    """An Application whose one pool sends everything to its primary; nothing is started.

    ``keys``: more keys of that pool; ``user_keys``: more keys of its user.
    """
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    pool["default_role"] = "primary"
    pool["query_parser_enabled"] = False
    pool["query_parser_read_write_splitting"] = False
    pool["pool_mode"] = pool_mode
    pool.update(keys)
    pool["users"]["0"]["pool_size"] = pool_size
    pool["users"]["0"].update(user_keys or {})
    return Application(parse_config(dump_config(cfg)))


def idle_server(sp: ServerPool) -> ServerConnection:
    """A logged-in server connection idle in ``sp``, writing to a Recorder."""
    conn = ServerConnection(sp.address, Credentials("postgres", "x", "postgres"))
    conn.transport = Recorder()
    conn.pool = sp
    conn.stats = sp.stats  # as the pool sets it at connect
    conn.state = IDLE
    conn.applied_key = ()
    sp.idle.append(conn)
    sp.size += 1
    conn.listed_in = sp.connections
    sp.connections.add(conn)
    return conn


def logged_in_client(app: Application, io: RecordingIO | None = None) -> ClientSession:
    """A client session of the ``postgres`` pool as login leaves it, writing to a RecordingIO."""
    group = app.groups[("postgres", "postgres", 0)]
    client = ClientSession(app, io if io is not None else RecordingIO(), peer="127.0.0.1:5000")
    client.database = "postgres"
    client.user = "postgres"
    client.join_pool(group, {}, {})
    client.set_state(ClientState.AUTHENTICATING)
    client.logged_in(b"")
    app.clients.add(client)
    return client


def logged_in(pool_mode: str = "transaction", pool_size: int = 1,
              **keys: object) -> tuple[ClientSession, ServerConnection, Application]:
    """A client past login on a primary-only pool with one idle server connection."""
    app = primary_only_app(pool_mode, pool_size, **keys)
    server = idle_server(app.groups[("postgres", "postgres", 0)].primary)
    return logged_in_client(app), server, app


def feed(receiver, data: bytes, one_byte_at_a_time: bool) -> None:
    """``data`` to a session's or connection's ``data_received``, whole or one byte at a time (the worst TCP split)."""
    if one_byte_at_a_time:
        for i in range(len(data)):
            receiver.data_received(data[i:i + 1])
    else:
        receiver.data_received(data)
