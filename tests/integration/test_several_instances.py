"""Three pypool instances behind a real HAProxy: rolling restarts that lose nothing, and a kill -9.

HAProxy (Debian's package, installed if missing) runs in TCP mode in front of
three pypool processes and health-checks ``GET /readyz`` on each one's metrics
port, as in the README's example. Clients only know HAProxy's port:

* pgbench tpcb-like with ``-C`` (a connection per transaction) while every
  instance is restarted in turn with SIGTERM (``shutdown_delay`` keeps it
  serving while its failing /readyz takes it out of HAProxy, then it drains):
  no failed transaction, no aborted client;
* persistent clients (pgbench without ``-C``, an asyncpg pool that reconnects)
  while one instance drains: only that instance's clients are closed, each
  with 57P01 between transactions, and the pool's transactions all commit;
* kill -9 of one instance: only the clients it held see an error, and they
  reconnect through HAProxy to the others.

Every test ends by checking pgbench's invariant on the primary: the sums of
the account, teller and branch balances equal the sum of the history deltas.

Short form by default (about a minute); ``PYPOOL_LONG=1`` restarts every
instance three times under more clients.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import (DATABASE, PASSWORD, USER, PyPoolProcess, free_port, local_config, pgbench_database,
                            start_pypool_process)
from benchmarks.targets import install_debian_package
from tests.integration._haproxy import CHECK_INTERVAL_MS, Backend, HAProxy, haproxy_config
from tests.integration._ops import admin_rows
from tests.integration._support import PRIMARY_ONLY, PgbenchResult, merge, pgbench, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = os.environ.get("PYPOOL_LONG") == "1"
ROUNDS = 3 if LONG else 1  # rolling restarts of all three instances under pgbench -C
CLIENTS = 8 if LONG else 4
PRIVATE_DB = "pypool_instances"  # its own pgbench tables: other tests re-initialise the default database's
POOL_SIZE = 4  # per instance: 3 x 4 server connections, far under the primary's max_connections
SHUTDOWN_TIMEOUT_MS = 15000
# Serve on with /readyz failing for ten of HAProxy's check intervals before draining (README).
SHUTDOWN_DELAY_MS = 10 * CHECK_INTERVAL_MS


@dataclass
class Instance:
    name: str
    config: dict
    directory: Path
    process: PyPoolProcess | None = None
    starts: int = 0

    @property
    def port(self) -> int:
        return self.config["general"]["port"]

    def start(self) -> None:
        self.starts += 1
        log = self.directory / f"pypool-{self.port}.log"
        if log.exists():  # keep the log of the previous run
            log.rename(self.directory / f"pypool-{self.port}.run{self.starts - 1}.log")
        self.process = start_pypool_process(self.config, self.directory, self.port)

    def clients(self, application_name: str) -> int:
        """Clients of this instance (its own admin console, not through HAProxy)."""
        return sum(1 for row in admin_rows(self.process, "SHOW CLIENTS")
                   if row["application_name"] == application_name)


@dataclass
class Front:
    """HAProxy's port, shaped like a PyPoolProcess for the pgbench helper."""

    port: int

    def env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


@dataclass
class Fleet:
    instances: list[Instance]
    haproxy: HAProxy
    front: Front
    primary_port: int

    def wait_up(self, instance: Instance) -> None:
        wait_for(lambda: self.haproxy.status(instance.name) == "UP", what=f"HAProxy marking {instance.name} UP")

    def invariant(self) -> tuple[int, int, int, int, int]:
        with psycopg.connect(host="127.0.0.1", port=self.primary_port, user=USER, password=PASSWORD,
                             dbname=PRIVATE_DB, sslmode="disable") as conn:
            return conn.execute(
                "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
                " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
                " (SELECT count(*) FROM pgbench_history)").fetchone()

    def assert_invariant(self) -> int:
        accounts, tellers, branches, history, rows = self.invariant()
        assert accounts == tellers == branches == history, (accounts, tellers, branches, history)
        return rows


@pytest.fixture(scope="module")
def fleet(pg_cluster, tmp_path_factory):
    pgbench_database(pg_cluster, PRIVATE_DB)
    directory = tmp_path_factory.mktemp("instances")
    instances = []
    for name in ("a", "b", "c"):
        port = free_port()
        config = local_config(pg_cluster, port, merge(PRIMARY_ONLY, {
            "general": {"enable_prometheus_exporter": True, "shutdown_timeout": SHUTDOWN_TIMEOUT_MS,
                        "shutdown_delay": SHUTDOWN_DELAY_MS},
            "pools": {DATABASE: {"shards": {"0": {"database": PRIVATE_DB}},
                                 "users": {"0": {"pool_size": POOL_SIZE}}}}}))
        instances.append(Instance(name, config, directory))
    started: list[Instance] = []
    haproxy = None
    try:
        for instance in instances:
            instance.start()
            started.append(instance)
        haproxy = HAProxy(directory, [Backend(i.name, i.port, i.config["general"]["prometheus_exporter_port"])
                                      for i in instances])
        fleet = Fleet(instances, haproxy, Front(haproxy.port), pg_cluster[0].port)
        for instance in instances:
            fleet.wait_up(instance)
        yield fleet
    finally:
        if haproxy is not None:
            haproxy.stop()
        for instance in started:
            instance.process.stop()


def rolling_restart(fleet: Fleet, instance: Instance) -> None:
    """SIGTERM, wait for the drain to end, start again, wait until HAProxy sends clients again.

    Nothing else: during ``shutdown_delay`` /readyz fails while pypool still
    serves, HAProxy's check takes the instance out, and only then the drain
    starts.
    """
    instance.process.proc.send_signal(signal.SIGTERM)
    assert instance.process.proc.wait(SHUTDOWN_TIMEOUT_MS / 1000 + 15) == 0, instance.process.log()[-3000:]
    instance.start()
    fleet.wait_up(instance)


class PgbenchLoop(threading.Thread):
    """Back-to-back pgbench runs through HAProxy until stopped: load through every step of a restart."""

    def __init__(self, front: Front, *args: str) -> None:
        super().__init__(daemon=True)
        self.front = front
        self.args = args
        self.stop_event = threading.Event()
        self.results: list[PgbenchResult] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.results.append(pgbench(self.front, *self.args, "-T", "2", timeout=60))

    def finish(self) -> list[PgbenchResult]:
        self.stop_event.set()
        self.join(90)
        return self.results


def test_rolling_restart_with_a_connection_per_transaction_fails_nothing(fleet):
    rows_before = fleet.assert_invariant()
    load = PgbenchLoop(fleet.front, "-C", "-c", str(CLIENTS), "-j", "2")
    load.start()
    try:
        wait_for(lambda: load.results, what="a first pgbench run")  # the load runs before the first restart
        for _ in range(ROUNDS):
            for instance in fleet.instances:
                rolling_restart(fleet, instance)
    finally:
        results = load.finish()
    processed = sum(r.processed for r in results)
    for r in results:
        assert r.returncode == 0 and r.failed == 0 and "aborted" not in r.output, r.output
    rows = fleet.assert_invariant()
    assert rows - rows_before == processed  # every committed transaction counted once, none lost
    print(f"\n-C through HAProxy: {processed} transactions in {len(results)} pgbench runs over "
          f"{ROUNDS * len(fleet.instances)} restarts, 0 failed")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg's default reset on release starts with pg_advisory_unlock_all(), which pypool's
    transaction mode refuses (0A000); pypool resets its server connections itself."""


@dataclass
class AppPool:
    """An asyncpg pool through HAProxy running pgbench's tpcb-like transaction in a loop.

    What an application's pool that reconnects does: a transaction refused
    before it began (the connection closed with 57P01 when it asks for one,
    or gone before BEGIN was answered) is run again on a fresh connection.
    An error after BEGIN was answered is a failed transaction.
    """

    port: int
    size: int
    committed: int = 0
    refused_at_start: list[str] = field(default_factory=list)
    failed_inside: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)

    async def _transaction(self, pool: asyncpg.Pool) -> None:
        aid, tid, bid, delta = random.randint(1, 100000), random.randint(1, 10), 1, random.randint(-5000, 5000)
        began = False
        try:
            async with pool.acquire() as conn:
                transaction = conn.transaction()
                await transaction.start()
                began = True
                await conn.execute("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", delta, aid)
                await conn.execute("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", delta, tid)
                await conn.execute("UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2", delta, bid)
                await conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                                   "VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)", tid, bid, aid, delta)
                await transaction.commit()
            self.committed += 1
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            what = f"{type(exc).__name__} {sqlstate or ''}: {exc}"
            (self.failed_inside if began else self.refused_at_start).append(what)

    async def _worker(self, pool: asyncpg.Pool) -> None:
        while not self.stop.is_set():
            await self._transaction(pool)

    async def _main(self) -> None:
        pool = await asyncpg.create_pool(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                                         database=DATABASE, ssl=False, min_size=self.size, max_size=self.size,
                                         server_settings={"application_name": "app-pool"}, reset=_no_reset)
        self.ready.set()
        try:
            await asyncio.gather(*(self._worker(pool) for _ in range(self.size)))
        finally:
            pool.terminate()

    def run_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        thread.start()
        assert self.ready.wait(30), "the app pool did not connect"
        return thread


# pgbench 15 words an abort two ways: with the server's message ("client 3 script 0 aborted in command 4
# query 0: FATAL: ..."), or when it found the connection closed ("client 7 aborted in command 4 (SQL) of
# script 0; perhaps the backend died while processing").
ABORT = re.compile(r"client (\d+) (?:script 0 )?aborted in command (\d+)(?: query \d+: | \(SQL\) of script \d+; )(.*)")
TPCB_BEGIN = 4  # the command number of BEGIN in pgbench's tpcb-like script (after four \set)


def test_drain_closes_only_that_instances_persistent_clients_between_transactions(fleet):
    rows_before = fleet.assert_invariant()
    app = AppPool(fleet.front.port, size=6)
    app_thread = app.run_in_thread()
    clients = 9  # a count of transactions rather than a duration: the drain comes before any client ends
    bench = subprocess.Popen(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(fleet.front.port), "-U", USER,
                              "-c", str(clients), "-j", "3", "-t", "600" if LONG else "200", DATABASE],
                             env=fleet.front.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: sum(i.clients("pgbench") for i in fleet.instances) == clients, what="pgbench connected")
        drained = fleet.instances[1]
        on_drained = drained.clients("pgbench")
        app_on_drained = drained.clients("app-pool")
        assert on_drained > 0 and app_on_drained > 0  # HAProxy's round robin spread both over the three
        # SIGTERM: /readyz fails at once and HAProxy stops sending new clients there; the drain follows.
        holder = psycopg.connect(drained.process.dsn())
        holder.execute("SELECT 1")  # a transaction in flight on the drained instance keeps the drain going
        drained.process.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: fleet.haproxy.status(drained.name) == "DOWN", what="HAProxy marking the draining one DOWN")
        assert drained.process.proc.poll() is None  # DOWN from /readyz while the listener still answers
        holder.commit()
        holder.close()
        out, _ = bench.communicate(timeout=90)
        assert drained.process.proc.wait(30) == 0
    finally:
        if bench.poll() is None:
            bench.kill()
        app.stop.set()
        app_thread.join(30)
    drained.start()
    fleet.wait_up(drained)

    aborts = ABORT.findall(out)
    # Exactly the drained instance's pgbench clients were closed, each when it asked for its next BEGIN.
    assert len(aborts) == on_drained, out
    for _, command, message in aborts:
        assert int(command) == TPCB_BEGIN, out
        # FATAL 57P01 (or the socket found closed), whether closed while idle or when its BEGIN asked a closing pool.
        assert "shutting down" in message or "backend died" in message, out
    assert "number of failed transactions: 0" in out, out
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    # The app pool: the drain refused transactions at their start (57P01); it reconnected; none failed.
    assert app.failed_inside == [], app.failed_inside[:5]
    assert app.committed > 0
    assert all("57P01" in e or "closed" in e.lower() for e in app.refused_at_start), app.refused_at_start[:5]
    rows = fleet.assert_invariant()
    assert rows - rows_before == processed + app.committed
    print(f"\npersistent clients: {len(aborts)} of {clients} pgbench clients closed (all on the drained "
          f"instance, at BEGIN), {processed} pgbench transactions; app pool: {app.committed} committed, "
          f"{len(app.refused_at_start)} refused at their start and run again, 0 failed")


def test_kill_9_only_its_clients_see_an_error_and_they_reconnect(fleet):
    for instance in fleet.instances:  # a check that timed out under load (fall 1) may have taken one out
        fleet.wait_up(instance)
    app = AppPool(fleet.front.port, size=6)
    app_thread = app.run_in_thread()
    try:
        wait_for(lambda: app.committed > 50, what="the app pool running")
        # The one holding most of the app's connections (HAProxy may have had one out as the pool connected).
        victim = max(fleet.instances, key=lambda i: i.clients("app-pool"))
        held = victim.clients("app-pool")
        assert held > 0
        victim.process.proc.kill()
        victim.process.proc.wait(10)
        wait_for(lambda: fleet.haproxy.status(victim.name) == "DOWN", what="HAProxy marking the dead one DOWN")
        errors_after_kill = len(app.failed_inside) + len(app.refused_at_start)
        committed = app.committed
        wait_for(lambda: app.committed > committed + 50, what="the app pool going on over the other two")
        # Every pool connection back, on the two others (a pool reconnects a closed one at its next acquire).
        wait_for(lambda: sum(i.clients("app-pool") for i in fleet.instances if i is not victim) == 6,
                 what="6 app connections on the two others")
    finally:
        app.stop.set()
        app_thread.join(30)
    # Only the connections the dead instance held failed, each once; then they reconnected to the others.
    assert 1 <= errors_after_kill <= held, (held, app.failed_inside, app.refused_at_start)
    assert len(app.failed_inside) + len(app.refused_at_start) == errors_after_kill
    victim.start()
    fleet.wait_up(victim)
    fleet.assert_invariant()
    print(f"\nkill -9: the dead instance held {held} of 6 app connections; {errors_after_kill} errors, "
          f"then {app.committed} transactions committed in all over the two others")


def test_readme_haproxy_example_is_valid_and_checks_what_this_file_checks(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = re.search(r"### Behind HAProxy.*?```\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "readme-haproxy.cfg"
    path.write_text(example)
    check = subprocess.run([install_debian_package("haproxy", "haproxy"), "-c", "-f", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = haproxy_config(5432, [], tmp_path / "s.sock")
    for line in ("mode tcp", "option redispatch", "option httpchk GET /readyz", "http-check expect status 200"):
        assert line in example and line in tested, line
