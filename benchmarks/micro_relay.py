"""Python cost of one relayed transaction, without sockets.

Drives a real client session (ClientSession, or before it ClientConnection)
and ServerConnection through fake transports,
as a logged-in transaction-mode client (named-statement bookkeeping on):

* simple (default): pgbench's select-only Query; the server answers with
  RowDescription + DataRow + CommandComplete + ReadyForQuery;
* ``--extended``: pgbench ``-M extended``'s Parse/Bind/Describe/Execute/Sync
  of an unnamed statement, answered with ParseComplete + BindComplete +
  RowDescription + DataRow + CommandComplete + ReadyForQuery;
* ``--transaction``: each transaction is three requests, ``BEGIN``, the
  SELECT (simple or ``--extended``) and ``END``, as pgbench's scripts send
  them; the client keeps its server connection until ``END``. Without
  ``--routing`` only: with the split, pypool answers ``BEGIN`` itself and
  replays it in a coroutine this loop does not run.

* ``--connect``: ``pgbench -C``'s unit of work: a client connects, logs in
  with SCRAM-SHA-256 (the startup packet, the SASL exchange, the greeting), runs
  the simple SELECT, sends Terminate and its connection is lost. Runs on uvloop
  (what ``python -m pypool`` runs on); the harness plays libpq's side of SCRAM.

* ``--queued``: two clients share one server connection and each sends its
  next request while the other's runs, so every transaction waits in the
  pool's queue and gets its connection from the other's check-in (the path of
  pgbench with more clients than pool_size); the loop's ``call_soon`` runs in
  line. Simple protocol only.

The connection goes back to the pool after each transaction. The simple
Query's ``aid`` takes ``--keys`` values in turn (default 100,000, like pgbench's
random accounts: the router's memo of exact texts misses and the fingerprint
cache answers; ``--keys 1`` repeats one text). Prints the best of ``--runs``
short runs of CPU time (``time.process_time``) per transaction; with --profile,
a cProfile summary and the Python calls per transaction instead. Used to measure hot-path changes
before/after, also against an older checkout (its pypool on PYTHONPATH):

    python -m benchmarks.micro_relay [--extended] [--transaction] [--queued] [--connect] [--routing] [--profile] [-n 20000]
        [--runs 15] [--keys N]
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
Exchange = list[tuple[bytes, bytes]]  # (what the client sends, what the server answers), in order


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


class InlineLoop:
    """The pool's event loop for ``--queued``: callbacks wait in ``ready`` until the harness runs them."""

    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, callback, *args) -> None:
        self.ready.append((callback, args))

    def call_at(self, when, callback, *args) -> asyncio.TimerHandle:
        return asyncio.TimerHandle(when, callback, args, asyncio.get_running_loop())

    def run_ready(self) -> None:
        ready, self.ready = self.ready, []
        for callback, args in ready:
            callback(*args)


def logged_in_client(app: Application, group) -> ClientConnection:
    """A client of ``group``'s pool ("postgres"), set up as its login leaves it in transaction mode."""
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
    return client


def build(routing: bool, extended: bool, transaction: bool = False,
          primary_only: bool = False) -> tuple[ClientConnection, list[ServerConnection], Exchange]:
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    if primary_only:  # one server: its one connection is the only one there is
        pool["shards"]["0"]["servers"] = pool["shards"]["0"]["servers"][:1]
        pool["users"]["0"]["pool_size"] = 1  # and the pool is full, as under contention
    pool["query_parser_enabled"] = routing
    pool["query_parser_read_write_splitting"] = routing
    config = parse_config(dump_config(cfg))
    app = Application(config)
    # Keyed (pool, user, shard) since sharding, (pool, user) before: either checkout can be measured.
    group = next(g for key, g in app.groups.items() if key[:2] == ("postgres", "postgres"))
    client = logged_in_client(app, group)
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
    status = b"T" if transaction else b"I"  # the ReadyForQuery after the SELECT
    rows = m.row_description(["abalance"]) + m.data_row([4242]) + m.command_complete("SELECT 1") \
        + m.ready_for_query(status)
    if extended:
        request = extended_request(SELECT.format("$1"), "12345")
        reply = m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + rows
    else:
        request = m.query(SELECT.format(12345))
        reply = rows
    if not transaction:
        return client, servers, [(request, reply)]
    return client, servers, [(m.query("BEGIN;"), m.command_complete("BEGIN") + m.ready_for_query(b"T")),
                             (request, reply),
                             (m.query("END;"), m.command_complete("COMMIT") + m.ready_for_query())]


# What PostgreSQL 15 reports at login, less the per-session ones (what a pool learns from its first connection).
SERVER_PARAMETERS = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY", "default_transaction_read_only": "off",
                     "in_hot_standby": "off", "integer_datetimes": "on", "IntervalStyle": "postgres",
                     "server_encoding": "UTF8", "server_version": "15.10 (Debian 15.10-0+deb12u1)",
                     "standard_conforming_strings": "on", "TimeZone": "Etc/UTC"}


class ConnectTransport(FakeTransport):
    """A client's socket for ``--connect``: keeps what pypool sends, so the harness can answer it."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    def write(self, data) -> None:
        self.received += data

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default


def _last_auth_payload(received: bytearray) -> bytes:
    """The payload (after the auth code) of the last Authentication message pypool sent."""
    pos, last = 0, b""
    while pos < len(received):
        length = int.from_bytes(received[pos + 1:pos + 5], "big")
        if received[pos] == m.AUTHENTICATION:
            last = bytes(received[pos + 9:pos + 1 + length])
        pos += 1 + length
    return last


async def _settle(done) -> None:
    """Let the login coroutine run until ``done()``: one loop turn at a time."""
    for _ in range(50):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the login did not get there")


async def run_connect(n: int, runs: int, profile: bool) -> None:
    from pypool.protocol import auth
    client, servers, [(request, reply)] = build(routing=False, extended=False)
    app, group = client.app, client.group
    group.server_parameters = dict(SERVER_PARAMETERS)
    for conn in servers:  # as the first pgbench client's transaction left them: its settings applied
        conn.applied_parameters["application_name"] = "pgbench"
        conn.applied_key = (("application_name", "pgbench"),)
    password = group.user.password
    startup = m.startup_message({"user": "postgres", "database": "postgres", "application_name": "pgbench"})
    ready = m.ready_for_query()

    async def one() -> None:
        conn = ClientConnection(app)
        transport = ConnectTransport()
        received = transport.received
        conn.connection_made(transport)
        await asyncio.sleep(0)  # the startup packet is read in a later loop turn than the accept
        conn.data_received(startup)
        await _settle(lambda: received)
        scram = auth.ScramClientSession("postgres", password)
        sent = len(received)
        conn.data_received(m.sasl_initial_response(auth.SCRAM_SHA_256, scram.client_first()))
        await _settle(lambda: len(received) > sent)
        final = scram.handle_server_first(_last_auth_payload(received))
        conn.data_received(m.sasl_response(final))
        await _settle(lambda: received.endswith(ready))
        conn.data_received(request)
        conn.session.server.data_received(reply)
        conn.data_received(m.terminate())
        conn.connection_lost(None)
        await asyncio.sleep(0)  # the login task's end

    for _ in range(200):
        await one()
    assert not app.clients and group.all_pools[0].idle, "a client or a server connection was left behind"
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            await one()
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(30)
        calls = sum(nc for _, nc, _, _, _ in stats.stats.values())
        print(f"{calls / n:.1f} Python calls per login + transaction (harness included: cProfile)")
        return
    clock = time.process_time
    best = float("inf")
    for _ in range(runs):
        start = clock()
        for _ in range(n):
            await one()
        best = min(best, clock() - start)
    print(f"connect: {best / n * 1e6:.3f} us CPU per login + transaction (best of {runs} x {n}; harness included)")


def run(n: int, runs: int, routing: bool, extended: bool, profile: bool, transaction: bool = False,
        keys: int = 1, queued: bool = False) -> None:
    client, servers, exchange = build(routing, extended, transaction, primary_only=queued)
    client_received = client.data_received
    if queued:
        (request, reply), = exchange
        inline_loop = InlineLoop()
        for conn in servers:
            conn.pool._loop = inline_loop  # one connection (build): the second client always queues
        clients = [client, logged_in_client(client.app, client.group)]
        client.data_received(request)  # holds the connection from now on
        holder = 0

        def one() -> None:
            nonlocal holder
            waiting = clients[1 - holder]
            waiting.data_received(request)  # queues: the connection is busy
            clients[holder].server.data_received(reply)  # its check-in hands the connection over
            inline_loop.run_ready()
            holder = 1 - holder
        harness_calls = 2  # one() and run_ready()
        client = clients[0]
    elif len(exchange) == 1:  # the single-request path stays as measured before --transaction existed
        (request, reply), = exchange
        requests = [request] if extended or keys <= 1 else [m.query(SELECT.format(aid)) for aid in range(1, keys + 1)]
        turn = iter(())

        def one() -> None:
            nonlocal turn
            message = next(turn, None)
            if message is None:
                turn = iter(requests)
                message = next(turn)
            client_received(message)
            client.server.data_received(reply)
        harness_calls = 2  # one() and next()
    else:
        def one() -> None:
            for request, reply in exchange:
                client_received(request)
                client.server.data_received(reply)
        harness_calls = 1

    for _ in range(1000):
        one()
    assert (client.server is None or queued) and client.xact_count >= 500, "the request did not complete"
    assert not queued or servers[0].pool.stats.checkout_waits >= 1000, "a transaction did not wait for the pool"
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            one()
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(25)
        calls = sum(nc for _, nc, _, _, _ in stats.stats.values()) - harness_calls * n
        print(f"{calls / n:.1f} Python calls per transaction (functions and builtins, cProfile)")
        return
    clock = time.process_time
    best = float("inf")
    loop = range(n)
    for _ in range(runs):
        start = clock()
        for _ in loop:
            one()
        best = min(best, clock() - start)
    mode = ("extended" if extended else "simple") + (", BEGIN/SELECT/END" if transaction else "") \
        + (", queued" if queued else "") \
        + (", routing" if routing else ", primary-only")
    print(f"{mode}: {best / n * 1e6:.3f} us CPU per transaction "
          f"(best of {runs} x {n}; Python side of pypool, no syscalls)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20_000, help="transactions per run")
    parser.add_argument("--runs", type=int, default=15, help="short runs; the best one is reported")
    parser.add_argument("--routing", action="store_true")
    parser.add_argument("--extended", action="store_true", help="pgbench -M extended's messages")
    parser.add_argument("--transaction", action="store_true", help="BEGIN, the SELECT, END: three requests")
    parser.add_argument("--queued", action="store_true", help="every transaction waits for the other's connection")
    parser.add_argument("--connect", action="store_true", help="pgbench -C: a SCRAM login per transaction")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keys", type=int, default=100_000, help="distinct aid values of the simple Query")
    args = parser.parse_args()
    if args.transaction and args.routing:
        parser.error("--transaction measures without --routing: with the split, pypool holds BEGIN back and "
                     "replays it in a coroutine")
    if args.queued and (args.transaction or args.extended):
        parser.error("--queued measures the simple protocol's single request")

    if args.connect:
        import uvloop
        uvloop.run(run_connect(args.n, args.runs, args.profile))
        return

    async def go() -> None:
        run(args.n, args.runs, args.routing, args.extended, args.profile, args.transaction, args.keys, args.queued)

    asyncio.run(go())


if __name__ == "__main__":
    main()
