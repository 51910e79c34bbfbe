"""TCP keepalives on every client and server socket (PgCat's tcp_keepalives_* and tcp_user_timeout).

Without them a peer that vanished (a dropped VM, a cut network) holds its pool
slot until the kernel gives up, hours later. The options are process-wide and
read once at start: :func:`configure` sets them, :func:`apply` puts them on a
socket. A listening socket passes them on to every connection it accepts
(Linux copies them), so clients are covered by applying them to the listener.
"""

from __future__ import annotations

import socket
from typing import Any

Option = tuple[int, int, int]  # (level, name, value) for setsockopt

_options: tuple[Option, ...] = ()


def socket_options(general: Any) -> tuple[Option, ...]:
    """The setsockopt calls for ``general``'s keys; none when tcp_keepalives_idle is 0 (off).

    Options the platform lacks are left out (macOS has no TCP_USER_TIMEOUT).
    """
    if general.tcp_keepalives_idle == 0:
        return ()
    wanted = [(socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
              (socket.IPPROTO_TCP, "TCP_KEEPIDLE", general.tcp_keepalives_idle),
              (socket.IPPROTO_TCP, "TCP_KEEPINTVL", general.tcp_keepalives_interval),
              (socket.IPPROTO_TCP, "TCP_KEEPCNT", general.tcp_keepalives_count),
              (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", general.tcp_user_timeout)]
    return tuple((level, getattr(socket, name), value) for level, name, value in wanted
                 if hasattr(socket, name))


def configure(general: Any) -> None:
    global _options
    _options = socket_options(general)


def apply(sock: socket.socket | None, nodelay: bool = False) -> None:
    """Set the configured options on a TCP socket (anything else is left alone).

    ``nodelay``: also send small writes at once (TCP_NODELAY), as the relay to a server wants.
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for level, name, value in _options:
        sock.setsockopt(level, name, value)
