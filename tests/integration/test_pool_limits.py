"""Pool limits and connection hygiene, seen from clients and from the primary itself.

Every pypool here keeps all traffic on the primary (PRIMARY_ONLY), so what
the primary's pg_stat_activity shows is the whole of what pypool opened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

import psycopg
import psycopg.errors
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, pool_overrides, user_overrides
from tests.integration._ops import admin_rows
from tests.integration._support import PRIMARY_ONLY, assert_clean_pgbench, local_tcp_ports, merge, pgbench

pytestmark = pytest.mark.integration

MONITOR_APPLICATION_NAME = "pypool-monitor"  # health checks: not pool connections


def primary_dsn(pg_cluster) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_cluster[0].port}/{DATABASE}?sslmode=disable"


def connect(pypool, **kwargs) -> psycopg.Connection:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(pypool.dsn(), prepare_threshold=None, **kwargs)


class BackendSampler(threading.Thread):
    """Counts, every ~100 ms, the primary's backends that belong to one pypool process.

    A backend is pypool's when its client port is one of that process's
    sockets to the primary (so other pypool processes on the same cluster do
    not count). Pool connections start as application_name 'pypool' and take
    the client's application_name once pypool syncs it; only the health
    monitor's own connection is left out.
    """

    def __init__(self, pg_cluster, pypool) -> None:
        super().__init__(daemon=True)
        self.dsn = primary_dsn(pg_cluster)
        self.primary_port = pg_cluster[0].port
        self.pid = pypool.proc.pid
        self.stop_event = threading.Event()
        self.samples: list[int] = []
        self.named_pypool: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    ports = local_tcp_ports(self.pid, self.primary_port)
                    rows = conn.execute(
                        "SELECT client_port, application_name FROM pg_stat_activity "
                        "WHERE backend_type = 'client backend' AND client_port IS NOT NULL").fetchall()
                    ours = [app for port, app in rows if port in ports and app != MONITOR_APPLICATION_NAME]
                    self.samples.append(len(ours))
                    self.named_pypool.append(sum(1 for app in ours if app == "pypool"))
                    self.stop_event.wait(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("workload", [["-S", "-M", "extended"], ["-M", "simple"]], ids=["select-only", "tpcb-like"])
def test_64_clients_share_10_server_connections(start_pypool, pg_cluster, pgbench_tables, workload):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=10)))
    sampler = BackendSampler(pg_cluster, pypool)
    sampler.start()
    try:
        result = pgbench(pypool, *workload, "-c", "64", "-j", "2", "-T", "10")
    finally:
        sampler.stop()
    assert_clean_pgbench(result)
    assert "number of clients: 64" in result.output
    # ~100 samples on a quiet machine; a loaded 2-core box (pgbench, 64 clients) starves this thread.
    assert len(sampler.samples) >= 10, "the sampler did not keep up"
    peak = max(sampler.samples)
    assert peak <= 10, f"the primary saw {peak} pool connections with pool_size = 10"
    assert peak >= 5, f"64 busy clients used only {peak} of 10 server connections"


def test_checkout_timeout_gives_a_clear_error(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1), pool_overrides(checkout_timeout=300)))
    with connect(pypool) as holder, connect(pypool) as waiter:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        with pytest.raises(psycopg.errors.TooManyConnections) as excinfo:
            waiter.execute("SELECT 2")
        assert excinfo.value.sqlstate == "53300"
        assert "became free within checkout_timeout (300 ms)" in str(excinfo.value)
        # It was queued, not refused at once: pypool's own count of waiting time holds the wait.
        waited_us = sum(int(row["total_wait_time"]) for row in admin_rows(pypool, "SHOW STATS"))
        assert waited_us >= 250_000, f"SHOW STATS total_wait_time is {waited_us} us with checkout_timeout = 300 ms"
        # The holder's transaction is untouched, and once it ends the waiter gets the connection.
        assert holder.execute("SELECT 'holder ok'").fetchone() == ("holder ok",)
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 2").fetchone() == (2,)


@pytest.fixture
def locked_table(pg_cluster):
    name = f"pypool_it_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, txt text)")
        conn.execute(f"INSERT INTO {name} VALUES (1, 'committed')")
    yield name
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def _drop_without_terminate(conn: psycopg.Connection) -> None:
    """Cut the TCP connection the way a crashed client does: no Terminate message."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    with contextlib.suppress(Exception):
        conn.close()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
@pytest.mark.parametrize("how", ["terminate", "drop"])
def test_client_leaving_mid_transaction_hands_over_no_dirty_connection(start_pypool, pg_cluster, locked_table,
                                                                       pool_mode, how):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1), pool_overrides(pool_mode=pool_mode)))
    leaver = connect(pypool)
    leaver.execute("BEGIN")
    leaver.execute("SET LOCAL statement_timeout = '4321ms'")
    leaver.execute(f"INSERT INTO {locked_table} VALUES (2, 'uncommitted')")
    leaver.execute(f"SELECT id FROM {locked_table} WHERE id = 1 FOR UPDATE")
    leaver_xid = leaver.execute("SELECT txid_current()").fetchone()[0]
    if how == "terminate":
        leaver.close()
    else:
        _drop_without_terminate(leaver)

    with connect(pypool) as nxt:
        fresh, xid, timeout = nxt.execute(
            "SELECT now() = statement_timestamp(), txid_current_if_assigned(), "
            "current_setting('statement_timeout')").fetchone()
        assert fresh is True, "the next client runs inside an older transaction"
        assert xid is None, f"the next client inherited transaction {leaver_xid}"
        assert timeout == "0", "SET LOCAL of the departed client's transaction is still in effect"
        assert nxt.execute(f"SELECT array_agg(id) FROM {locked_table}").fetchone() == ([1],)
        # The row lock is gone too (the old backend may need a moment to exit).
        with nxt.transaction():
            nxt.execute("SET LOCAL lock_timeout = '5s'")
            assert nxt.execute(f"SELECT id FROM {locked_table} WHERE id = 1 FOR UPDATE").fetchone() == (1,)
            assert nxt.execute("SELECT txid_current() <> %s", (leaver_xid,)).fetchone() == (True,)

    # Seen from the primary: the departed transaction did not commit and is not open anywhere.
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as direct:
        assert direct.execute(f"SELECT count(*) FROM {locked_table} WHERE id = 2").fetchone() == (0,)
        deadline = time.monotonic() + 5
        while direct.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_xid = %s::text::xid",
                             (leaver_xid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the departed client's transaction is still open on the primary"
            time.sleep(0.1)


def test_session_mode_keeps_the_backend_across_transactions(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=2), pool_overrides(pool_mode="session")))
    with connect(pypool) as first, connect(pypool) as second:
        first.execute("SET application_name = 'session-one'")
        pids = set()
        for _ in range(5):
            with first.transaction():
                pids.add(first.execute("SELECT pg_backend_pid()").fetchone()[0])
            pids.add(first.execute("SELECT pg_backend_pid()").fetchone()[0])
            second.execute("SELECT 1")  # another client working in between
        assert len(pids) == 1, f"session mode moved the client between backends {pids}"
        assert first.execute("SHOW application_name").fetchone() == ("session-one",)
        assert second.execute("SELECT pg_backend_pid()").fetchone()[0] not in pids


def test_session_mode_state_does_not_leak_to_the_next_client(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1), pool_overrides(pool_mode="session")))
    with connect(pypool) as first:
        first.execute("SET statement_timeout = '9876ms'")
        first.execute("PREPARE leaked AS SELECT 1")
        pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect(pypool) as nxt:
        assert nxt.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert nxt.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        # Same server connection, reset rather than reopened.
        assert nxt.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


def test_transaction_mode_one_connection_serves_two_clients(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    with connect(pypool) as a, connect(pypool) as b:
        pids = []
        for i in range(5):
            for name, conn in (("a", a), ("b", b)):
                with conn.transaction():
                    assert conn.execute("SELECT %s || %s", (name, str(i))).fetchone() == (f"{name}{i}",)
                    pids.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        assert len(pids) == 10 and len(set(pids)) == 1

        # Both clients hammering at once: each waits its turn, none fails.
        errors: list[BaseException] = []

        def work(conn: psycopg.Connection) -> None:
            try:
                for _ in range(50):
                    with conn.transaction():
                        conn.execute("SELECT pg_backend_pid()")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(c,)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
