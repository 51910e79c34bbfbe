"""The floor: the cheapest possible uvloop relay, to compare pypool's per-transaction CPU with.

One server connection per client, bytes passed through untouched (no framing,
no routing, no pooling), TCP_NODELAY on both sides. Whatever this costs per
pgbench transaction, no asyncio pooler can cost less on the same machine:

    python -m benchmarks.floor_relay --listen-port 6450 --server-port 5433 &
    pgbench -n -S -c 16 -j 2 -T 10 -h 127.0.0.1 -p 6450 -U postgres <db>

and read its utime/stime from /proc/<pid>/stat before and after. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop


def _nodelay(transport: asyncio.BaseTransport) -> None:
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ServerSide(asyncio.Protocol):
    def __init__(self, client: "ClientSide") -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)
        self.client.server_ready(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    server_port = 5433

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.server: asyncio.Transport | None = None
        self.early: list[bytes] = []  # the startup packet may arrive before the server connection
        loop = asyncio.get_running_loop()
        loop.create_task(loop.create_connection(lambda: ServerSide(self), "127.0.0.1", self.server_port))

    def server_ready(self, server: asyncio.Transport) -> None:
        self.server = server
        if self.early:
            server.write(b"".join(self.early))
            self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.server is None:
            self.early.append(data)
        else:
            self.server.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server is not None:
            self.server.close()


async def serve(listen_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(ClientSide, "127.0.0.1", listen_port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, default=6450)
    parser.add_argument("--server-port", type=int, default=5433)
    args = parser.parse_args()
    ClientSide.server_port = args.server_port
    uvloop.run(serve(args.listen_port))


if __name__ == "__main__":
    main()
