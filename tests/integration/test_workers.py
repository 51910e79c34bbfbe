"""``[general] workers = 2``: one instance, two processes on one port, one set of limits and figures.

Each test starts a real supervisor (``python -m pypool CONFIG``) that starts two
worker processes; clients are real psql, pgbench and psycopg; server-side
counts come from /proc (the workers' TCP sockets) and pg_stat_activity.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from pypool import cluster
from pypool.config import dump_config
from tests.conftest import DATABASE, PASSWORD, USER
from tests.integration._support import (PRIMARY_ONLY, assert_clean_pgbench, cancel_when_running, local_tcp_ports,
                                        merge, metric_sum, pgbench, scrape, wait_for)

pytestmark = pytest.mark.integration

ADMIN = ("admin_user", "admin_pass")  # default_config_dict's admin login


def two_workers(**user: object) -> dict:
    return {"general": {"workers": 2}, "pools": {DATABASE: {"users": {"0": user}}}}


def worker_pids(pypool) -> list[int]:
    """The supervisor's children once both workers answer (the supervisor logs it)."""
    wait_for(lambda: "all 2 workers ready" in pypool.log(), what="both workers ready")
    supervisor = pypool.proc.pid
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as fh:
        pids = [int(p) for p in fh.read().split()]
    assert len(pids) == 2, pids
    return pids


def server_ports(pids: list[int], server_port: int) -> dict[int, set[int]]:
    return {pid: local_tcp_ports(pid, server_port) for pid in pids}


def pool_sessions(node: cluster.Node, ports: set[int]) -> set[int]:
    """Of ``ports`` (the workers' connections to ``node``), those the server sees as pool connections
    (the health monitors' own connections do not count against pool_size)."""
    if not ports:
        return set()
    listed = ",".join(str(p) for p in sorted(ports))
    out = cluster.run_sql(node, f"SELECT client_port FROM pg_stat_activity WHERE client_port IN ({listed}) "
                                "AND application_name <> 'pypool-monitor'")
    return {int(p) for p in out.split()}


def admin(pypool, sql: str) -> list[dict[str, str]]:
    env = {**os.environ, "PGPASSWORD": ADMIN[1], "PGSSLMODE": "disable"}
    proc = subprocess.run(["psql", "-X", "-A", "-F", "\t", "-P", "footer=off", "-h", "127.0.0.1", "-p",
                           str(pypool.port), "-U", ADMIN[0], "-d", "pgcat", "-c", sql],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_pgbench_through_two_workers_stays_within_pool_size(start_pypool, pg_cluster, pgbench_tables):
    pool_size = 6  # 3 per worker
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=pool_size)))
    pids = worker_pids(pypool)
    primary = pg_cluster[0]
    peak = 0
    seen_serving: set[int] = set()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            ports = server_ports(pids, primary.port)
            pooled = pool_sessions(primary, set().union(*ports.values()))
            seen_serving.update(pid for pid, p in ports.items() if p & pooled)
            peak = max(peak, len(pooled))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = pgbench(pypool, "-S", "-c", "32", "-j", "2", "-T", "6", timeout=120)
    finally:
        done.set()
        sampler.join()
    assert_clean_pgbench(result)
    assert 2 <= peak <= pool_size, f"the primary saw {peak} pool connections with pool_size = {pool_size}"
    # 32 clients hashed over two listening sockets: both workers take some and run their transactions.
    assert seen_serving == set(pids), (seen_serving, pids)
    # psql too, through whichever worker it lands on.
    out = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER, "-d",
                          DATABASE, "-c", "SELECT count(*) FROM pgbench_branches"], env=pypool.env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


def test_workers_auto_starts_one_worker_per_core(start_pypool, pg_cluster):
    from pypool.config import usable_cores

    cores = min(usable_cores(), 8)
    if cores < 2:
        pytest.skip("one usable core: workers = \"auto\" runs a single process")
    pypool = start_pypool(merge(PRIMARY_ONLY, {"general": {"workers": "auto"},
                                               "pools": {DATABASE: {"users": {"0": {"pool_size": cores}}}}}))
    wait_for(lambda: f"all {cores} workers ready" in pypool.log(), what=f"{cores} workers ready")
    supervisor = pypool.proc.pid
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as fh:
        assert len(fh.read().split()) == cores
    assert {row["key"]: row["value"] for row in admin(pypool, "SHOW CONFIG")}["workers"] == f"auto ({cores})"


def test_show_and_metrics_report_the_whole_instance(start_pypool, pg_cluster):
    # min_pool_size 3 of pool_size 5: worker 0 keeps 2 and worker 1 keeps 1 connection to each server.
    pypool = start_pypool(merge(two_workers(pool_size=5, min_pool_size=3),
                                {"general": {"enable_prometheus_exporter": True}}))
    pids = worker_pids(pypool)

    def server_side() -> dict[int, int]:
        return {node.port: len(pool_sessions(node, set().union(*server_ports(pids, node.port).values())))
                for node in pg_cluster}

    wait_for(lambda: server_side() == {node.port: 3 for node in pg_cluster}, what="3 warm connections per server")
    pools = admin(pypool, "SHOW POOLS")
    assert len(pools) == 1
    assert int(pools[0]["sv_idle"]) + int(pools[0]["sv_used"]) == sum(server_side().values()) == 9
    databases = {row["port"]: row for row in admin(pypool, "SHOW DATABASES")}
    for node in pg_cluster:
        assert int(databases[str(node.port)]["pool_size"]) == 5
        assert int(databases[str(node.port)]["current_connections"]) == 3
    config = {row["key"]: row["value"] for row in admin(pypool, "SHOW CONFIG")}
    assert config[f"pools.{DATABASE}.users.{USER}.pool_size"] == "5"
    assert config["workers"] == "2"

    samples = scrape(pypool)
    for node in pg_cluster:
        assert metric_sum(samples, "pypool_server_pool_size", port=str(node.port)) == 5
        assert metric_sum(samples, "pypool_server_connections", port=str(node.port), state="idle") \
            + metric_sum(samples, "pypool_server_connections", port=str(node.port), state="used") == 3
    assert metric_sum(samples, "pgcat_databases_pool_size") == 15

    # Transactions through both workers show up once each in the totals.
    before_show = sum(int(r["total_xact_count"]) for r in admin(pypool, "SHOW STATS"))
    before_metric = metric_sum(scrape(pypool), "pypool_transactions_total")
    runs = 12
    for _ in range(runs):
        with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    after_show = sum(int(r["total_xact_count"]) for r in admin(pypool, "SHOW STATS"))
    assert after_show - before_show == runs
    assert metric_sum(scrape(pypool), "pypool_transactions_total") - before_metric == runs
    clients = admin(pypool, "SHOW CLIENTS")
    assert len(clients) == 1 and clients[0]["database"] == "pgcat"  # only this admin session is left
    # The supervisor's /metrics counts the CPU of every process, its own included.
    assert metric_sum(samples, "process_cpu_seconds_total") > 0


def test_cancel_reaches_the_worker_holding_the_client(start_pypool, pg_cluster):
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=4)))
    worker_pids(pypool)
    primary = cluster.psql_dsn(pg_cluster[0])
    owners = set()
    for attempt in range(20):
        with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
            owners.add(conn.info.backend_pid & 63)  # the worker index in the pooler's BackendKeyData
            marker = f"cancel-{attempt}-{os.getpid()}"
            canceller = cancel_when_running(conn, primary, marker)
            # Only the cancel can end it with an error (uncancelled it returns a row after a minute).
            with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request"):
                conn.execute(f"SELECT pg_sleep(60) /* {marker} */")
            canceller.join(30)
            assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        forwarded = pypool.log().count("passed on")
        if forwarded and len(owners) == 2 and attempt >= 3:
            break
    # At least one cancel landed on the worker that did not hold the client and was passed on.
    assert forwarded >= 1, pypool.log()[-3000:]
    assert owners == {0, 1}


def test_sigint_stops_every_worker_and_a_dead_worker_is_replaced(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=2)))
    _, second = worker_pids(pypool)
    os.kill(second, signal.SIGKILL)
    died = wait_for(lambda: re.search(rf"worker (\d) \(pid {second}\) died", pypool.log()),
                      what="the supervisor noticing the dead worker")
    wait_for(lambda: pypool.log().count(f"worker {died.group(1)} ready") == 2, what="a replacement worker")
    with open(f"/proc/{pypool.proc.pid}/task/{pypool.proc.pid}/children") as fh:
        pids = [int(p) for p in fh.read().split()]
    assert len(pids) == 2 and second not in pids, pids
    for _ in range(6):  # whichever worker each lands on
        with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 42").fetchone() == (42,)

    holder = psycopg.connect(pypool.dsn())
    holder.execute("SELECT 1")  # a transaction open while the instance drains: it may commit
    pypool.proc.send_signal(signal.SIGINT)
    wait_for(lambda: len(re.findall(r"\[worker \d\] pypool: shutting down", pypool.log())) == 2,
               what="both workers draining")
    holder.commit()
    holder.close()
    assert pypool.proc.wait(30) == 0
    for pid in pids:  # reaped by the supervisor before it exited
        assert not os.path.exists(f"/proc/{pid}")


def test_sigterm_to_every_process_as_systemd_sends_it_still_drains(start_pypool):
    """systemd's default KillMode=control-group sends SIGTERM to the supervisor and to each worker.

    The supervisor used to pass its SIGTERM on as a signal, each worker's second one, which closes
    every connection at once: the transaction in flight was cut (57P01) and rolled back although
    shutdown_timeout had time left. Now it asks each worker to drain on its control socket.
    """
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=2)))
    holder = psycopg.connect(pypool.dsn())
    holder.execute("SELECT 1")  # a transaction in flight
    for pid in [pypool.proc.pid, *worker_pids(pypool)]:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: "draining every worker" in pypool.log(), what="the supervisor passing the stop on")
    wait_for(lambda: len(re.findall(r"\[worker \d\] pypool: shutting down", pypool.log())) == 2,
             what="both workers draining")
    assert holder.execute("SELECT 2").fetchone() == (2,)
    holder.commit()
    holder.close()
    assert pypool.proc.wait(30) == 0, pypool.log()[-3000:]
    assert "closing every connection now" not in pypool.log()


def test_a_worker_killed_during_the_drain_makes_the_supervisor_exit_1_and_say_so(start_pypool):
    """A stop that was not clean for every worker is not status 0: the supervisor logs which worker ended
    how and exits 1 (not killed by a signal), while the other worker still drains."""
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=2), {"general": {"shutdown_delay": 60000}}))
    first, second = worker_pids(pypool)
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: len(re.findall(r"\[worker \d\] pypool: SIGTERM: /readyz fails", pypool.log())) == 2,
             what="both workers in shutdown_delay")
    os.kill(second, signal.SIGKILL)
    os.kill(first, signal.SIGTERM)  # a second signal: this one stops at once, cleanly
    assert pypool.proc.wait(30) == 1, pypool.log()[-3000:]
    log = pypool.log()
    assert re.search(rf"worker \d \(pid {second}\) ended with status -9 during the shutdown", log), log[-3000:]
    assert f"pid {first}) ended with status" not in log


def test_admin_pause_resume_and_shutdown_act_on_every_worker(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=4)))
    worker_pids(pypool)
    conns = [psycopg.connect(pypool.dsn(), autocommit=True) for _ in range(8)]  # logged in before the pause
    assert admin(pypool, "PAUSE") == []
    finished: list[int] = []

    def client(n: int) -> None:
        conns[n].execute("SELECT %s::int", (n,))
        finished.append(n)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    # Eight clients spread over both workers: every one of them waits, and SHOW POOLS sees all eight.
    wait_for(lambda: int(admin(pypool, "SHOW POOLS")[0]["cl_waiting"]) == 8, what="8 waiting clients")
    assert finished == []
    assert {row["paused"] for row in admin(pypool, "SHOW DATABASES")} == {"1"}
    admin(pypool, "RESUME")
    for thread in threads:
        thread.join(30)
    assert sorted(finished) == list(range(8))
    for conn in conns:
        conn.close()

    assert admin(pypool, "SHUTDOWN") == [{"success": "t"}]
    assert pypool.proc.wait(30) == 0
    assert "SIGINT: draining every worker" in pypool.log()


def test_sighup_and_admin_reload_resize_every_workers_share(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, two_workers(pool_size=4)))
    worker_pids(pypool)

    def rewrite(pool_size: int) -> None:
        pypool.config = merge(pypool.config, two_workers(pool_size=pool_size))
        pypool.config_path.write_text(dump_config(pypool.config))

    def pool_sizes() -> set[int]:
        return {int(row["pool_size"]) for row in admin(pypool, "SHOW DATABASES")}

    assert pool_sizes() == {4}
    rewrite(6)
    pypool.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: pool_sizes() == {6}, what="pool_size 6 (3 + 3) after SIGHUP")
    rewrite(9)
    assert admin(pypool, "RELOAD") == []
    assert pool_sizes() == {9}  # RELOAD returns once every worker has reloaded (5 + 4)
    assert len(re.findall(r"\[worker \d\] pypool: config reloaded", pypool.log())) == 4
