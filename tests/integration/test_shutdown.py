"""Graceful shutdown (SIGINT, SIGTERM, admin SHUTDOWN) seen from real clients and from the primary."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import psycopg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER
from tests.integration._ops import admin, login_error, show, wait_for_log
from tests.integration._support import PRIMARY_ONLY, merge

pytestmark = pytest.mark.integration

SHUTDOWN_TIMEOUT = 20.0  # seconds: far above what the transactions below need


@pytest.fixture
def table(pg_cluster):
    name = f"pypool_shutdown_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int)")
    yield name
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        # A test that stops pypool at once may leave a backend sleeping with the table locked.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE "
                     "'shutdown-test-%%' AND state <> 'idle'")
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def primary_dsn(pg_cluster) -> str:
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_cluster[0].port}/{DATABASE}?sslmode=disable"


def rows_on_primary(pg_cluster, table: str) -> int:
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def sleeping_backends(pg_cluster, application_name: str) -> int:
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'",
                            [application_name]).fetchone()[0]






class LongTransaction(threading.Thread):
    """BEGIN; INSERT; SELECT pg_sleep(seconds); COMMIT -- through pypool, in a thread."""

    def __init__(self, pypool, table: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.application_name = f"shutdown-test-{uuid.uuid4().hex[:8]}"
        self.conn = psycopg.connect(pypool.dsn(), prepare_threshold=None, application_name=self.application_name)
        self.table, self.seconds = table, seconds
        self.sleeping = threading.Event()
        self.committed = False
        self.error: BaseException | None = None

    @classmethod
    def running(cls, pypool, table: str, seconds: float) -> "LongTransaction":
        tx = cls(pypool, table, seconds)
        tx.start()
        assert tx.sleeping.wait(10)
        time.sleep(0.3)  # pg_sleep has started on the server
        return tx

    def run(self) -> None:
        try:
            self.conn.execute(f"INSERT INTO {self.table} VALUES (1)")
            self.sleeping.set()
            self.conn.execute("SELECT pg_sleep(%s)", [self.seconds])
            self.conn.commit()
            self.committed = True
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.sleeping.set()


def start(start_pypool, shutdown_timeout: float = SHUTDOWN_TIMEOUT):
    return start_pypool(merge(PRIMARY_ONLY, {"general": {"shutdown_timeout": int(shutdown_timeout * 1000)}}))


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SHUTDOWN"])
def test_transaction_in_flight_commits_new_clients_are_refused(start_pypool, pg_cluster, table, how):
    pypool = start(start_pypool)
    idle = psycopg.connect(pypool.dsn(), autocommit=True)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    tx = LongTransaction.running(pypool, table, seconds=3)
    started = time.monotonic()
    if how == "SHUTDOWN":
        with admin(pypool) as conn:
            assert conn.execute("SHUTDOWN").fetchall() == [("t",)]
    else:
        pypool.proc.send_signal(getattr(signal, how))
    wait_for_log(pypool, "shutting down")

    # A new client is told why, with the admin-shutdown SQLSTATE.
    sqlstate, message = login_error(pypool)
    assert sqlstate == "57P01" and "shutting down" in message, (sqlstate, message)
    # A client between transactions is closed at once, with the same error.
    with pytest.raises(psycopg.OperationalError) as idle_error:
        for _ in range(50):
            idle.execute("SELECT 1")
            time.sleep(0.1)
    assert "shutting down" in str(idle_error.value)

    tx.join(30)
    assert tx.error is None, tx.error
    assert tx.committed and rows_on_primary(pg_cluster, table) == 1
    pypool.proc.wait(SHUTDOWN_TIMEOUT)
    elapsed = time.monotonic() - started
    assert pypool.proc.returncode == 0, pypool.log()[-3000:]
    assert elapsed < SHUTDOWN_TIMEOUT, f"exited after {elapsed:.1f}s"
    assert "no transaction in flight" in pypool.log() or "pypool stopped" in pypool.log()
    tx.conn.close()
    idle.close()


@pytest.mark.parametrize("how", ["SIGTERM", "SHUTDOWN"])
def test_admin_console_works_during_the_drain(start_pypool, pg_cluster, table, how):
    """As in PgCat: the operator can log in to the console and watch the drain; pool clients cannot."""
    pypool = start(start_pypool)
    tx = LongTransaction.running(pypool, table, seconds=3)
    with admin(pypool) as before:
        if how == "SHUTDOWN":
            assert before.execute("SHUTDOWN").fetchall() == [("t",)]
        else:
            pypool.proc.send_signal(signal.SIGTERM)
        wait_for_log(pypool, "shutting down")
        # The session that asked for the shutdown keeps working ...
        assert any(p["database"] == DATABASE for p in show(before, "POOLS"))

        # ... and a new admin login is let in while the transaction drains.
        with admin(pypool) as during:
            clients = show(during, "CLIENTS")
            draining = [c for c in clients if c["application_name"] == tx.application_name]
            assert [c["state"] for c in draining] == ["active"], clients
            pools = {p["database"]: p for p in show(during, "POOLS")}
            assert pools[DATABASE]["cl_active"] == 1 and pools[DATABASE]["sv_active"] == 1, pools
            # A reload would start pools the drain never closes: refused, the session stays usable.
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="shutting down"):
                during.execute("RELOAD")
            # SHUTDOWN again: answered, and the transaction still gets to commit (below).
            assert during.execute("SHUTDOWN").fetchall() == [("t",)]
            assert show(during, "VERSION")

        # A pool client is still turned away.
        sqlstate, message = login_error(pypool)
        assert sqlstate == "57P01" and "shutting down" in message, (sqlstate, message)

    tx.join(30)
    assert tx.error is None and tx.committed, tx.error
    pypool.proc.wait(SHUTDOWN_TIMEOUT)
    assert pypool.proc.returncode == 0, pypool.log()[-3000:]
    tx.conn.close()


def test_shutdown_timeout_bounds_the_wait(start_pypool, pg_cluster, table):
    pypool = start(start_pypool, shutdown_timeout=2)
    tx = LongTransaction.running(pypool, table, seconds=60)
    started = time.monotonic()
    pypool.proc.send_signal(signal.SIGINT)
    pypool.proc.wait(15)
    elapsed = time.monotonic() - started
    assert pypool.proc.returncode == 0
    assert elapsed < 10, f"shutdown_timeout is 2 s but pypool took {elapsed:.1f}s to exit"
    tx.join(30)
    # The unfinished transaction was rolled back, and its client was told.
    assert not tx.committed and tx.error is not None
    assert rows_on_primary(pg_cluster, table) == 0
    assert "still in a transaction" in pypool.log()
    # pypool cancelled the query before closing: the server is not left sleeping with the row lock.
    deadline = time.monotonic() + 10
    while sleeping_backends(pg_cluster, tx.application_name):
        assert time.monotonic() < deadline, "the server still runs the cancelled transaction's pg_sleep"
        time.sleep(0.2)
    tx.conn.close()


def test_second_signal_stops_at_once(start_pypool, table):
    pypool = start(start_pypool, shutdown_timeout=60)
    tx = LongTransaction.running(pypool, table, seconds=60)
    started = time.monotonic()
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for_log(pypool, "shutting down")
    pypool.proc.send_signal(signal.SIGINT)
    pypool.proc.wait(15)
    assert time.monotonic() - started < 10
    assert "closing every connection now" in pypool.log()
    tx.join(30)
    tx.conn.close()
