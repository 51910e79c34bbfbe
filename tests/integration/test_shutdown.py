"""Graceful shutdown (SIGINT, SIGTERM, admin SHUTDOWN) seen from real clients and from the primary."""

from __future__ import annotations

import copy
import signal
import threading
import uuid

import psycopg
import psycopg.errors
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, local_config, user_overrides
from tests.integration._ops import admin, login_error, show, wait_for_log
from tests.integration._support import PRIMARY_ONLY, merge, wait_for

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


def running_backends(pg_cluster, application_name: str, sql: str) -> int:
    """How many backends of ``application_name`` run ``sql`` on the primary now."""
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND query = %s AND state = 'active'", [application_name, sql]).fetchone()[0]


class LongTransaction(threading.Thread):
    """BEGIN; INSERT; ``wait_sql``; COMMIT -- through pypool, in a thread.

    ``wait_sql`` is a long pg_sleep, or an advisory lock that the test holds and
    releases when it has seen what it wants to see during the transaction.
    """

    def __init__(self, pypool, table: str, wait_sql: str) -> None:
        super().__init__(daemon=True)
        self.application_name = f"shutdown-test-{uuid.uuid4().hex[:8]}"
        self.conn = psycopg.connect(pypool.dsn(), prepare_threshold=None, application_name=self.application_name)
        self.table, self.wait_sql = table, wait_sql
        self.committed = False
        self.error: BaseException | None = None

    @classmethod
    def running(cls, pypool, pg_cluster, table: str, wait_sql: str) -> "LongTransaction":
        """Started, with ``wait_sql`` seen running on the primary."""
        tx = cls(pypool, table, wait_sql)
        tx.start()
        wait_for(lambda: running_backends(pg_cluster, tx.application_name, wait_sql) or tx.error,
                 what=f"{wait_sql} on the primary")
        assert tx.error is None, tx.error
        return tx

    def run(self) -> None:
        try:
            self.conn.execute(f"INSERT INTO {self.table} VALUES (1)")
            self.conn.execute(self.wait_sql)
            self.conn.commit()
            self.committed = True
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


TEN_MINUTES = "SELECT pg_sleep(600)"  # far longer than any test waits: pypool must not wait for it


def start(start_pypool, shutdown_timeout: float = SHUTDOWN_TIMEOUT):
    return start_pypool(merge(PRIMARY_ONLY, {"general": {"shutdown_timeout": int(shutdown_timeout * 1000)}}))


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SHUTDOWN"])
def test_transaction_in_flight_commits_new_clients_are_refused(start_pypool, pg_cluster, table, how):
    pypool = start(start_pypool)
    idle = psycopg.connect(pypool.dsn(), autocommit=True)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    key = uuid.uuid4().int & 0x7FFFFFFF
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as gate:
        # The transaction stays in flight, blocked on this lock, until the checks below are done.
        gate.execute("SELECT pg_advisory_lock(%s)", [key])
        tx = LongTransaction.running(pypool, pg_cluster, table, f"SELECT pg_advisory_xact_lock({key})")
        if how == "SHUTDOWN":
            with admin(pypool) as conn:
                assert conn.execute("SHUTDOWN").fetchall() == [("t",)]
        else:
            pypool.proc.send_signal(getattr(signal, how))
        wait_for_log(pypool, "shutting down")

        # A new client is told why, with the admin-shutdown SQLSTATE.
        sqlstate, message = login_error(pypool)
        assert sqlstate == "57P01" and "shutting down" in message, (sqlstate, message)
        # A client between transactions is closed, with the same error (30 s only stops a hang).
        with pytest.raises(psycopg.OperationalError) as idle_error:
            wait_for(lambda: idle.execute("SELECT 1") is None, timeout=30, what="pypool to close the idle client")
        assert "shutting down" in str(idle_error.value)
        assert pypool.proc.poll() is None and not tx.committed  # still draining: the transaction holds it
        gate.execute("SELECT pg_advisory_unlock(%s)", [key])

    tx.join(30)
    assert tx.error is None, tx.error
    assert tx.committed and rows_on_primary(pg_cluster, table) == 1
    pypool.proc.wait(SHUTDOWN_TIMEOUT + 30)  # only stops a hang
    assert pypool.proc.returncode == 0, pypool.log()[-3000:]
    # pypool stopped because the last transaction ended, not because shutdown_timeout ran out.
    assert "shutdown: no transaction in flight" in pypool.log(), pypool.log()[-3000:]
    assert "still in a transaction" not in pypool.log()
    tx.conn.close()
    idle.close()


@pytest.mark.parametrize("how", ["SIGTERM", "SHUTDOWN"])
def test_admin_console_works_during_the_drain(start_pypool, pg_cluster, table, how):
    """As in PgCat: the operator can log in to the console and watch the drain; pool clients cannot."""
    pypool = start(start_pypool)
    key = uuid.uuid4().int & 0x7FFFFFFF
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as gate, admin(pypool) as before:
        # The transaction stays in flight, blocked on this lock, until the checks below are done.
        gate.execute("SELECT pg_advisory_lock(%s)", [key])
        tx = LongTransaction.running(pypool, pg_cluster, table, f"SELECT pg_advisory_xact_lock({key})")
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
        assert pypool.proc.poll() is None and not tx.committed  # still draining: the transaction holds it
        gate.execute("SELECT pg_advisory_unlock(%s)", [key])

    tx.join(30)
    assert tx.error is None and tx.committed, tx.error
    pypool.proc.wait(SHUTDOWN_TIMEOUT + 30)  # only stops a hang
    assert pypool.proc.returncode == 0, pypool.log()[-3000:]
    assert "shutdown: no transaction in flight" in pypool.log(), pypool.log()[-3000:]
    tx.conn.close()


def test_shutdown_timeout_bounds_the_wait(start_pypool, pg_cluster, table):
    pypool = start(start_pypool, shutdown_timeout=2)
    tx = LongTransaction.running(pypool, pg_cluster, table, TEN_MINUTES)
    pypool.proc.send_signal(signal.SIGINT)
    pypool.proc.wait(60)  # only stops a hang
    assert pypool.proc.returncode == 0
    tx.join(30)
    # The unfinished transaction was rolled back, and its client was told.
    assert not tx.committed and tx.error is not None
    assert rows_on_primary(pg_cluster, table) == 0
    assert "still in a transaction" in pypool.log()
    # pypool cancelled the query before closing: the server is not left sleeping with the row lock.
    wait_for(lambda: not running_backends(pg_cluster, tx.application_name, TEN_MINUTES),
             what="the server to stop running the cancelled transaction's pg_sleep")
    tx.conn.close()


def test_second_signal_stops_at_once(start_pypool, pg_cluster, table):
    # shutdown_timeout and the transaction both last ten minutes: only the second signal ends the wait.
    pypool = start(start_pypool, shutdown_timeout=600)
    tx = LongTransaction.running(pypool, pg_cluster, table, TEN_MINUTES)
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for_log(pypool, "shutting down")
    pypool.proc.send_signal(signal.SIGINT)
    pypool.proc.wait(60)  # only stops a hang
    assert "closing every connection now" in pypool.log()
    assert "still in a transaction; cancelling" in pypool.log()
    assert not tx.committed
    tx.join(30)
    tx.conn.close()


def test_a_transaction_whose_begin_pypool_held_may_finish_during_the_drain(start_pypool, table):
    # Read/write splitting on (the default config): BEGIN alone is answered by pypool itself.
    pypool = start_pypool({"general": {"shutdown_timeout": int(SHUTDOWN_TIMEOUT * 1000)}})
    conn = psycopg.connect(pypool.dsn(), autocommit=True)
    conn.execute("BEGIN")  # the client is inside a transaction from here on
    pypool.proc.send_signal(signal.SIGTERM)
    wait_for_log(pypool, "shutting down")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.execute("COMMIT")
    conn.close()
    assert pypool.proc.wait(30) == 0
    assert "shutdown: no transaction in flight" in pypool.log(), pypool.log()[-3000:]


@pytest.mark.parametrize("asks", ["during the drain", "before the drain"])
def test_a_held_begin_waits_for_a_connection_the_drain_frees(start_pypool, pg_cluster, table, asks):
    """pool_size 1, held by a transaction in flight: the held-BEGIN client gets the connection after it.

    Asking before the drain, it waits in the pool when the drain closes it: the closing pool drops
    that wait, and the client, inside its transaction, asks again rather than get an error.
    """
    pypool = start_pypool(merge(user_overrides(pool_size=1),
                                {"general": {"shutdown_timeout": int(SHUTDOWN_TIMEOUT * 1000)}}))
    key = uuid.uuid4().int & 0x7FFFFFFF
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", [key])
        tx = LongTransaction.running(pypool, pg_cluster, table, f"SELECT pg_advisory_xact_lock({key})")
        held = psycopg.connect(pypool.dsn(), autocommit=True)
        held.execute("BEGIN")  # answered by pypool: the only server connection is still tx's
        if asks == "before the drain":
            inserted = Statement.started(held, f"INSERT INTO {table} VALUES (2)")
            wait_until_waiting(pypool)
        pypool.proc.send_signal(signal.SIGINT)
        wait_for_log(pypool, "shutting down")
        assert "waiting up to 20.0 s for 2 transaction(s) in flight" in pypool.log(), pypool.log()[-3000:]
        if asks == "during the drain":
            inserted = Statement.started(held, f"INSERT INTO {table} VALUES (2)")
            wait_until_waiting(pypool)  # the console stays open during the drain
        gate.execute("SELECT pg_advisory_unlock(%s)", [key])
    tx.join(30)
    inserted.join(30)
    assert tx.error is None and tx.committed, tx.error
    assert not inserted.is_alive() and inserted.error is None, inserted.error
    held.execute("COMMIT")
    assert rows_on_primary(pg_cluster, table) == 2
    assert pypool.proc.wait(SHUTDOWN_TIMEOUT + 30) == 0  # only stops a hang
    assert "shutdown: no transaction in flight" in pypool.log(), pypool.log()[-3000:]
    held.close()
    tx.conn.close()


class Statement(threading.Thread):
    """One statement on ``conn``, in a thread: it may wait for a server connection meanwhile."""

    def __init__(self, conn: psycopg.Connection, sql: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.error: psycopg.Error | None = None

    @classmethod
    def started(cls, conn: psycopg.Connection, sql: str) -> "Statement":
        statement = cls(conn, sql)
        statement.start()
        return statement

    def run(self) -> None:
        try:
            self.conn.execute(self.sql)
        except psycopg.Error as exc:
            self.error = exc


def wait_until_waiting(pypool) -> None:
    """Until one client of the default pool waits for a server connection (SHOW POOLS)."""
    with admin(pypool) as console:
        wait_for(lambda: {p["database"]: p for p in show(console, "POOLS")}[DATABASE]["cl_waiting"] == 1,
                 what="a client to wait for the connection the transaction in flight holds")


def test_a_client_waiting_between_transactions_when_the_drain_starts_gets_one_fatal(start_pypool, pg_cluster,
                                                                                    table):
    """It is closed as the idle ones are: FATAL 57P01 "pypool is shutting down", no ERROR before it.

    Refused with an ERROR (and closed by the drain's FATAL moments later), an asyncpg pool's
    connection took the second, unasked error for a broken protocol and its next statement failed
    (test_several_instances' drain test, 1 run in 3). Closing a second pool lets the event loop run
    between the refusal and the drain's first round: what made that ERROR reach the client.
    """
    other = copy.deepcopy(local_config(pg_cluster, 6432)["pools"][DATABASE])  # the port is not used
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1), {
        "general": {"shutdown_timeout": int(SHUTDOWN_TIMEOUT * 1000)}, "pools": {"pypool_other": other}}))
    key = uuid.uuid4().int & 0x7FFFFFFF
    with psycopg.connect(primary_dsn(pg_cluster), autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", [key])
        tx = LongTransaction.running(pypool, pg_cluster, table, f"SELECT pg_advisory_xact_lock({key})")
        waiting = psycopg.connect(pypool.dsn(), autocommit=True)
        inserted = Statement.started(waiting, f"INSERT INTO {table} VALUES (2)")
        wait_until_waiting(pypool)
        pypool.proc.send_signal(signal.SIGTERM)
        inserted.join(30)
        assert not inserted.is_alive()
        gate.execute("SELECT pg_advisory_unlock(%s)", [key])
    error = inserted.error
    assert isinstance(error, psycopg.errors.AdminShutdown), error
    assert (error.diag.severity_nonlocalized, error.diag.message_primary) == ("FATAL", "pypool is shutting down")
    tx.join(30)
    assert tx.error is None and tx.committed, tx.error
    assert rows_on_primary(pg_cluster, table) == 1  # the waiting INSERT never ran
    assert pypool.proc.wait(SHUTDOWN_TIMEOUT + 30) == 0  # only stops a hang
    waiting.close()
    tx.conn.close()
