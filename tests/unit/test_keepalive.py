"""TCP keepalive options from the config, on real sockets (no pooler needed)."""

from __future__ import annotations

import socket

import pytest

from pypool import keepalive
from pypool.config import General, parse_config
from tests.unit._minimal_config import MINIMAL


def general(*lines: str) -> General:
    """The minimal config's [general] table, with ``lines`` added to it."""
    return parse_config(MINIMAL.format(general="\n".join(lines)), "pgcat.toml").general


def _options(sock: socket.socket) -> tuple[int, ...]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


@pytest.fixture(autouse=True)
def _reset():
    yield
    keepalive.configure(general("tcp_keepalives_idle = 0"))


def test_pgcat_defaults_reach_a_listener_and_the_connections_it_accepts() -> None:
    keepalive.configure(general())  # PgCat's defaults: 5 s, 5 s, 5 probes, 10 s
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        keepalive.apply(listener)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert _options(accepted) == (1, 5, 5, 5, 10_000)
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0  # untouched


def test_configured_values_and_off() -> None:
    others = ("tcp_keepalives_count = 3", "tcp_keepalives_interval = 7", "tcp_user_timeout = 0")
    keepalive.configure(general("tcp_keepalives_idle = 60", *others))
    with socket.socket() as sock:
        keepalive.apply(sock)
        assert _options(sock) == (1, 60, 7, 3, 0)
    assert keepalive.socket_options(general("tcp_keepalives_idle = 0", *others)) == ()


def test_unix_sockets_are_left_alone() -> None:
    keepalive.configure(general())
    left, right = socket.socketpair()
    with left, right:
        keepalive.apply(left)  # no TCP options on a Unix socket: no error


def test_nodelay_for_server_sockets() -> None:
    keepalive.configure(general())
    with socket.socket() as sock:
        keepalive.apply(sock, nodelay=True)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert _options(sock) == (1, 5, 5, 5, 10_000)
