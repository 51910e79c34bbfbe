"""Python cost of one relayed transaction, without sockets.

Drives a real client session (ClientSession, or before it ClientConnection)
and ServerConnection through fake transports,
as a logged-in transaction-mode client (named-statement bookkeeping on):

* simple (default): pgbench's select-only Query; the server answers with
  RowDescription + DataRow + CommandComplete + ReadyForQuery;
* ``--extended``: pgbench ``-M extended``'s Parse/Bind/Describe/Execute/Sync
  of an unnamed statement, answered with ParseComplete + BindComplete +
  RowDescription + DataRow + CommandComplete + ReadyForQuery.

The connection goes back to the pool after each transaction. Prints the best
of ``--runs`` short runs of CPU time (``time.process_time``) per transaction;
with --profile, a cProfile summary instead. Used to measure hot-path changes
before/after, also against an older checkout (its pypool on PYTHONPATH):

    python -m benchmarks.micro_relay [--extended] [--routing] [--profile] [-n 20000] [--runs 15]
    PYTHONPATH=/old/checkout python benchmarks/micro_relay.py --extended
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from pypool.app import Application
from pypool.client import ClientConnection
from pypool.config import default_config_dict, parse_config, dump_config
from pypool.pool.server import Credentials, ServerConnection
from pypool.protocol import messages as m

try:
    from pypool.session.session import ClientSession
except ImportError:  # a checkout from before the sans-IO session: the asyncio protocol is the session
    ClientSession = None  # type: ignore[assignment, misc]
try:
    from pypool.session.prepared import ClientStatements
    from pypool.session.states import ClientState
except ImportError:  # a checkout from before pypool/session/ (to compare against)
    from pypool.prepared import ClientStatements  # type: ignore[no-redef]
    from pypool.client import Phase  # type: ignore[attr-defined]
    ClientState = None  # type: ignore[assignment, misc]

SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"


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

    # SessionIO (a client session's outside world): the same class for client and servers, so that
    # ``write``'s attribute caches see one type, as they did when the client's was a transport too.
    def disconnect(self) -> None:
        self.closing = True

    def spawn(self, work):
        return asyncio.get_running_loop().create_task(work)


def extended_request(sql: str, *params: str) -> bytes:
    """What libpq sends for PQexecParams (pgbench -M extended): unnamed statement and portal."""
    parse = m.message(m.PARSE, b"\x00" + sql.encode() + b"\x00" + (0).to_bytes(2, "big"))
    values = b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in params)
    bind = m.message(m.BIND, b"\x00\x00" + (0).to_bytes(2, "big") + len(params).to_bytes(2, "big") + values
                     + (0).to_bytes(2, "big"))
    describe = m.message(m.DESCRIBE, b"P\x00")
    execute = m.message(m.EXECUTE, b"\x00" + (0).to_bytes(4, "big"))
    sync = m.message(m.SYNC)
    return parse + bind + describe + execute + sync


def build(routing: bool, extended: bool) -> tuple[ClientConnection, list[ServerConnection], bytes, bytes]:
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    pool["query_parser_enabled"] = routing
    pool["query_parser_read_write_splitting"] = routing
    config = parse_config(dump_config(cfg))
    app = Application(config)
    # Keyed (pool, user, shard) since sharding, (pool, user) before: either checkout can be measured.
    group = next(g for key, g in app.groups.items() if key[:2] == ("postgres", "postgres"))
    if ClientSession is not None:
        client = ClientSession(app, FakeTransport())  # what the adapter's data_received is bound to after login
    else:
        client = ClientConnection(app)
        client.transport = FakeTransport()
    client.group = group
    client.database = "postgres"
    if ClientState is not None:
        client.state = ClientState.IDLE  # logged in
    else:
        client.phase = Phase.RELAY
    client._router = app.routers["postgres"]
    client._parameters_key = ()
    client.statements = ClientStatements()  # transaction mode, as login sets it
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
    rows = m.row_description(["abalance"]) + m.data_row([4242]) + m.command_complete("SELECT 1") \
        + m.ready_for_query()
    if extended:
        request = extended_request(SELECT.format("$1"), "12345")
        reply = m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + rows
    else:
        request = m.query(SELECT.format(12345))
        reply = rows
    return client, servers, request, reply


def run(n: int, runs: int, routing: bool, extended: bool, profile: bool) -> None:
    client, servers, request, reply = build(routing, extended)
    client_received = client.data_received

    def one() -> None:
        client_received(request)
        client.server.data_received(reply)

    for _ in range(1000):
        one()
    assert client.server is None and client.xact_count >= 1000, "the request did not complete"
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            one()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    clock = time.process_time
    best = float("inf")
    loop = range(n)
    for _ in range(runs):
        start = clock()
        for _ in loop:
            one()
        best = min(best, clock() - start)
    mode = ("extended" if extended else "simple") + (", routing" if routing else ", primary-only")
    print(f"{mode}: {best / n * 1e6:.3f} us CPU per transaction "
          f"(best of {runs} x {n}; Python side of pypool, no syscalls)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20_000, help="transactions per run")
    parser.add_argument("--runs", type=int, default=15, help="short runs; the best one is reported")
    parser.add_argument("--routing", action="store_true")
    parser.add_argument("--extended", action="store_true", help="pgbench -M extended's messages")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    async def go() -> None:
        run(args.n, args.runs, args.routing, args.extended, args.profile)

    asyncio.run(go())


if __name__ == "__main__":
    main()
