"""Stand-ins for sockets in sans-IO tests."""

from __future__ import annotations

import asyncio

from pypool.app import Application
from pypool.client import ClientConnection
from pypool.config import default_config_dict, dump_config, parse_config
from pypool.pool.pool import ServerPool
from pypool.pool.server import IDLE, Credentials, ServerConnection
from pypool.session.prepared import ClientStatements
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

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


def primary_only_app(pool_mode: str = "transaction", pool_size: int = 1, **keys: object) -> Application:
    """An Application whose one pool sends everything to its primary; nothing is started.

    ``keys``: more keys of that pool.
    """
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    pool["default_role"] = "primary"
    pool["query_parser_enabled"] = False
    pool["query_parser_read_write_splitting"] = False
    pool["pool_mode"] = pool_mode
    pool.update(keys)
    pool["users"]["0"]["pool_size"] = pool_size
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
    sp.connections.add(conn)
    return conn


def logged_in_client(app: Application) -> ClientConnection:
    """A client of the ``postgres`` pool as login leaves it, writing to a Recorder."""
    group = app.groups[("postgres", "postgres", 0)]
    client = ClientConnection(app)
    client.transport = Recorder()
    client.group = group
    client.database = "postgres"
    client.user = "postgres"
    client._router = app.routers["postgres"]
    client._session_mode = group.pool_mode == "session"
    if not client._session_mode:
        client.statements = ClientStatements()  # as login sets it up in transaction mode
    client.state = ClientState.IDLE
    app.clients.add(client)
    return client


def logged_in(pool_mode: str = "transaction", pool_size: int = 1,
              **keys: object) -> tuple[ClientConnection, ServerConnection, Application]:
    """A client past login on a primary-only pool with one idle server connection."""
    app = primary_only_app(pool_mode, pool_size, **keys)
    server = idle_server(app.groups[("postgres", "postgres", 0)].primary)
    return logged_in_client(app), server, app


def feed(receiver, data: bytes, one_byte_at_a_time: bool) -> None:
    """``data`` to a connection's ``data_received``, whole or one byte at a time (the worst TCP split)."""
    if one_byte_at_a_time:
        for i in range(len(data)):
            receiver.data_received(data[i:i + 1])
    else:
        receiver.data_received(data)
