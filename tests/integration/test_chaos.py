"""Chaos: pgbench tpcb-like through pypool while servers die, hang and come back, and clients vanish.

Runs on a private primary + 2 replicas (the failover tests' fixture), never
on the shared cluster. Per fault cycle: a replica is SIGKILLed and restarted,
the other replica is SIGSTOPped (a hung server: the health check must time
out and ban it) and later SIGCONTed; all the while raw clients open a
transaction that changes a balance by a million, then vanish without
committing. Afterwards, on the primary:

* pgbench's invariant holds: sum(pgbench_accounts.abalance) = sum(pgbench_history.delta)
  (and the same for tellers and branches), so no vanished transaction was committed;
* every transaction pgbench saw committed is there (history rows >= pgbench's count);
* no server connection is left idle in a transaction.

Short form: 2 fault cycles (about 40 s). ``PYPOOL_LONG=1``: 10 cycles.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pypool import cluster
from tests.conftest import DATABASE, PASSWORD, USER, free_port, local_config, start_pypool_process
from tests.integration._support import login
from tests.integration.test_failover import failover_dir, private_cluster  # noqa: F401 - the private cluster fixtures

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = os.environ.get("PYPOOL_LONG") == "1"
CYCLES = 10 if LONG else 2
CYCLE_SECONDS = 16
BAN_TIME = 3
VANISH_DELTA = 1_000_000


@pytest.fixture
def chaos_pooler(private_cluster, tmp_path):  # noqa: F811
    port = free_port()
    config = local_config(private_cluster, port, {
        # connect_timeout leaves room for a loaded machine: every vanished client costs a reconnect
        # to the primary, and a timed-out connect is an error for the client that waited for it.
        "general": {"ban_time": BAN_TIME, "connect_timeout": 5000, "healthcheck_timeout": 1000},
        "pools": {DATABASE: {"load_balancing_mode": "random", "checkout_timeout": 20000,
                             "users": {"0": {"pool_size": 12}}}},
    })
    proc = start_pypool_process(config, tmp_path, port)
    yield proc
    proc.stop()


def node_processes(node: cluster.Node) -> list[int]:
    """The postmaster of ``node`` and all its children (backends, walreceiver, ...)."""
    postmaster = int((node.data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == postmaster:
                children.append(int(entry.name))
    return [postmaster, *children]


def signal_node(node: cluster.Node, sig: int) -> None:
    for pid in node_processes(node):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class VanishingClients(threading.Thread):
    """Clients that open a write transaction and disconnect without committing it."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.vanished = 0
        self.vanished_before_reply = 0
        self.errors: list[str] = []

    def run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            aid = rng.randint(1, 100_000)
            sql = (f"BEGIN; UPDATE pgbench_accounts SET abalance = abalance + {VANISH_DELTA} WHERE aid = {aid}; "
                   f"SELECT pg_sleep(0.05)").encode() + b"\0"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                    login(sock)
                    sock.sendall(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
                    if rng.random() < 0.5:
                        self.vanished_before_reply += 1  # mid-statement
                    else:
                        while b"Z\x00\x00\x00\x05" not in sock.recv(65536):
                            pass
                    # An abrupt reset rather than a polite Terminate.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.vanished += 1
            except (OSError, AssertionError) as exc:  # a login that failed while a server was down
                self.errors.append(str(exc))
            time.sleep(0.05)


def run_pgbench(port: int, env: dict, args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    out: list[str] = []
    p = subprocess.Popen(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", USER, *args, DATABASE],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    p.reader = reader  # type: ignore[attr-defined]
    return p, out


def finish(p: subprocess.Popen, out: list[str]) -> str:
    p.wait(120)
    p.reader.join(10)  # type: ignore[attr-defined]
    return out[0] if out else ""


def figure(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    return int(match.group(1)) if match else -1


def wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def test_pgbench_invariant_survives_chaos(private_cluster, chaos_pooler):  # noqa: F811
    primary, pg2, pg3 = private_cluster
    base = primary.data_dir.parent
    direct = psycopg.connect(f"host=127.0.0.1 port={primary.port} user={USER} password={PASSWORD} "
                             f"dbname={DATABASE} sslmode=disable", autocommit=True)
    history_before = direct.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
    seconds = CYCLES * CYCLE_SECONDS + 4
    env = chaos_pooler.env()
    writers, writers_out = run_pgbench(chaos_pooler.port, env, ["-c", "8", "-j", "2", "-T", str(seconds)])
    readers, readers_out = run_pgbench(chaos_pooler.port, env, ["-S", "-c", "4", "-j", "1", "-T", str(seconds)])
    vanishing = VanishingClients(chaos_pooler.port)
    vanishing.start()
    faults: list[str] = []
    ban_delays: list[float] = []
    try:
        time.sleep(2)
        for _ in range(CYCLES):
            cluster.kill_node(pg2.name, base, sig=signal.SIGKILL)
            faults.append("SIGKILL pg2")
            time.sleep(3)
            cluster.start_node(pg2.name, base)
            faults.append("restart pg2")
            time.sleep(1)
            bans_before = chaos_pooler.log().count(f"banning replica 127.0.0.1:{pg3.port}")
            signal_node(pg3, signal.SIGSTOP)
            faults.append("SIGSTOP pg3")
            try:
                # The hung server answers nothing: the health check times out and bans it.
                ban_delays.append(wait_for(
                    lambda: chaos_pooler.log().count(f"banning replica 127.0.0.1:{pg3.port}") > bans_before,
                    20, "pg3 to be banned"))
                time.sleep(2)
            finally:
                signal_node(pg3, signal.SIGCONT)
                faults.append("SIGCONT pg3")
            time.sleep(max(0.0, CYCLE_SECONDS - 6 - ban_delays[-1]))
    finally:
        writers_text = finish(writers, writers_out)
        readers_text = finish(readers, readers_out)
        vanishing.stop.set()
        vanishing.join(60)
    committed = figure(r"number of transactions actually processed: (\d+)", writers_text)
    writer_failures = figure(r"number of failed transactions: (\d+)", writers_text)
    reads = figure(r"number of transactions actually processed: (\d+)", readers_text)
    reader_errors = re.findall(r"client \d+ script \d+ aborted in command \d+ query \d+: (.*)", readers_text)
    assert committed > 0, writers_text
    assert writers.returncode == 0 and writer_failures == 0 and "aborted" not in writers_text, writers_text
    assert "timed out" in chaos_pooler.log()  # the hung pg3 was caught by the health check timeout

    # No server connection stays in a transaction once the clients are gone.
    def no_idle_in_transaction() -> bool:
        return direct.execute("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
                              "AND backend_type = 'client backend'").fetchone()[0] == 0
    wait_for(no_idle_in_transaction, 20, "no server connection idle in transaction")

    accounts, tellers, branches, deltas, history_rows = direct.execute(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
        "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
        "(SELECT count(*) FROM pgbench_history)").fetchone()
    direct.close()
    new_history = history_rows - history_before
    print(f"\nchaos figures: {len(faults)} faults injected ({', '.join(sorted(set(faults)))}), "
          f"hung replica banned after {', '.join(f'{d:.1f}' for d in ban_delays)} s; "
          f"pgbench tpcb-like: {committed} committed, {writer_failures} failed; "
          f"select-only: {reads} reads, {len(reader_errors)} of 4 clients aborted {sorted(set(reader_errors))}; "
          f"{vanishing.vanished} clients vanished mid-transaction "
          f"({vanishing.vanished_before_reply} before the reply), {len(vanishing.errors)} refused logins; "
          f"checked {new_history} history rows: sum(abalance) = {accounts}, sum(delta) = {deltas}")
    assert accounts == deltas == tellers == branches, (accounts, tellers, branches, deltas)
    assert committed <= new_history, (committed, new_history)
    assert vanishing.vanished > 0
