"""Python cost of one relayed transaction, without sockets.

Drives a real ClientConnection and ServerConnection through fake transports:
the client sends pgbench's select-only Query, the server answers with
RowDescription + DataRow + CommandComplete + ReadyForQuery, the connection
goes back to the pool. Prints microseconds per transaction; with --profile,
a cProfile summary. Used to measure hot-path changes before/after:

    python -m benchmarks.micro_relay [--routing] [--profile] [-n 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from pypool.app import Application
from pypool.client import ClientConnection
from pypool.session.states import ClientState
from pypool.config import default_config_dict, parse_config, dump_config
from pypool.pool.server import Credentials, ServerConnection
from pypool.protocol import messages as m


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.closing = False

    def write(self, data) -> None:
        self.sent += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None:
        self.closing = True


def build(routing: bool) -> tuple[ClientConnection, ServerConnection, bytes, bytes]:
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    pool["query_parser_enabled"] = routing
    pool["query_parser_read_write_splitting"] = routing
    config = parse_config(dump_config(cfg))
    app = Application(config)
    group = app.groups[("postgres", "postgres", 0)]
    client = ClientConnection(app)
    client.transport = FakeTransport()
    client.group = group
    client.database = "postgres"
    client.state = ClientState.IDLE  # logged in
    client._router = app.routers["postgres"]
    client._parameters_key = ()
    client._join_causal(group)  # as login does: causal_reads is "session" with --routing
    # One idle server connection in each server pool.
    servers = []
    for sp in group.all_pools:
        conn = ServerConnection(sp.address, Credentials("postgres", "x", "postgres"))
        conn.transport = FakeTransport()
        conn.pool = sp
        conn.applied_parameters["application_name"] = "pypool"
        conn.applied_key = ()
        sp.idle.append(conn)
        sp.size += 1
        servers.append(conn)
    query = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
    reply = (m.row_description(["abalance"]) + m.data_row([4242]) + m.command_complete("SELECT 1")
             + m.ready_for_query())
    return client, servers, query, reply


def run(n: int, routing: bool, profile: bool) -> None:
    client, servers, query, reply = build(routing)

    def one() -> None:
        client.data_received(query)
        server = client.server
        server.data_received(reply)

    for _ in range(1000):
        one()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    start = time.perf_counter()
    for _ in range(n):
        one()
    elapsed = time.perf_counter() - start
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    print(f"{'routing' if routing else 'primary-only'}: {elapsed / n * 1e6:.2f} us per transaction "
          f"(Python side of pypool, no syscalls)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--routing", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    async def go() -> None:
        run(args.n, args.routing, args.profile)

    asyncio.run(go())


if __name__ == "__main__":
    main()
