"""The client port: every connection accepted there becomes a ``ClientConnection`` of the pooler."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Callable

from pypool import keepalive

if TYPE_CHECKING:
    from pypool.client import ClientConnection
    from pypool.config import General


class Listener:
    def __init__(self) -> None:
        self._servers: list[asyncio.base_events.Server] = []

    async def start(self, new_client: Callable[[], ClientConnection], general: General,
                    sock: socket.socket | None = None, reuse_port: bool = False) -> str:
        """Listen on ``sock`` or on [general] host:port; returns where, for the log."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(new_client, sock=sock, backlog=1024)
        else:
            # Several worker processes share the port (SO_REUSEPORT); the kernel spreads connections.
            server = await loop.create_server(new_client, general.host, general.port, reuse_address=True,
                                              reuse_port=reuse_port, backlog=1024)
        self._servers.append(server)
        for listening in server.sockets:
            keepalive.apply(listening)  # accepted client sockets inherit the options
        return ", ".join(str(s.getsockname()) for s in server.sockets)

    def close(self) -> None:
        for server in self._servers:
            server.close()
