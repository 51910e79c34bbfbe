"""Session state in transaction mode: each client keeps its own settings on shared server connections.

With pool_size = 1 every client below runs on the same backend (checked by
pid), so any setting that leaked from one client to the next would show.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import user_overrides
from tests.integration._support import PRIMARY_ONLY, merge

pytestmark = pytest.mark.integration

SHOW = ("SELECT current_setting('search_path'), current_setting('statement_timeout'), "
        "current_setting('application_name')")


@pytest.fixture
def one_connection(start_pypool):
    return start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))


def connect(pypool, **params) -> psycopg.Connection:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return psycopg.connect(pypool.dsn() + extra, autocommit=True)


def backend(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_settings_of_one_client_are_never_seen_by_another(one_connection):
    with connect(one_connection, application_name="client-a") as a, \
            connect(one_connection, application_name="client-b") as b:
        defaults = b.execute(SHOW).fetchone()
        assert defaults[2] == "client-b"
        a.execute("SET search_path = a_schema, public")
        a.execute("SET statement_timeout = '4321ms'")
        a.execute("SET application_name = 'renamed-a'")
        assert a.execute(SHOW).fetchone() == ("a_schema, public", "4321ms", "renamed-a")
        assert backend(a) == backend(b), "pool_size = 1 must put both clients on one backend"
        for _ in range(3):  # interleaved transactions on the one shared backend
            assert b.execute(SHOW).fetchone() == defaults
            assert a.execute(SHOW).fetchone() == ("a_schema, public", "4321ms", "renamed-a")
        b.execute("SET statement_timeout = '999ms'")
        assert b.execute(SHOW).fetchone() == (defaults[0], "999ms", "client-b")
        assert a.execute(SHOW).fetchone() == ("a_schema, public", "4321ms", "renamed-a")
    # A client that arrives later gets a clean session on the same backend.
    with connect(one_connection) as c:
        search_path, timeout, _ = c.execute(SHOW).fetchone()
        assert (search_path, timeout) == (defaults[0], "0")


def test_set_local_and_rolled_back_set_follow_postgresql(one_connection):
    with connect(one_connection) as a, connect(one_connection) as b:
        with a.transaction():
            a.execute("SET LOCAL statement_timeout = '1s'")
            assert a.execute("SHOW statement_timeout").fetchone() == ("1s",)
        assert a.execute("SHOW statement_timeout").fetchone() == ("0",)

        a.execute("BEGIN")
        a.execute("SET statement_timeout = '2s'")
        a.execute("ROLLBACK")
        assert a.execute("SHOW statement_timeout").fetchone() == ("0",)

        with a.transaction():
            a.execute("SET statement_timeout = '3s'")
        assert a.execute("SHOW statement_timeout").fetchone() == ("3s",)
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)

        a.execute("SELECT set_config('statement_timeout', '5s', false)")
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert a.execute("SHOW statement_timeout").fetchone() == ("5s",)


def test_reset_returns_to_the_clients_own_startup_values(one_connection):
    with connect(one_connection, application_name="startup-name") as a, connect(one_connection) as b:
        a.execute("SET application_name = 'changed'")
        a.execute("SET work_mem = '7MB'")
        b.execute("SELECT 1")
        a.execute("RESET work_mem")
        assert a.execute("SHOW work_mem").fetchone() == b.execute("SHOW work_mem").fetchone()
        assert a.execute("SHOW application_name").fetchone() == ("changed",)
        a.execute("RESET ALL")
        b.execute("SELECT 1")
        assert a.execute("SHOW application_name").fetchone() == ("startup-name",)
        a.execute("SET statement_timeout = '6s'")
        a.execute("DISCARD ALL")
        b.execute("SELECT 1")
        assert a.execute("SHOW statement_timeout").fetchone() == ("0",)


@pytest.mark.parametrize("sql, why", [
    ("PREPARE stmt AS SELECT 1", "SQL PREPARE"),
    ("EXECUTE stmt", "SQL EXECUTE"),
    ("SELECT pg_advisory_lock(42)", "advisory lock"),
    ("CREATE TEMP TABLE t_session (id int)", "temporary object"),
])
def test_what_cannot_survive_pooling_is_refused_with_a_hint_when_pinning_is_off(start_pypool, sql, why):
    # session_pinning = "auto" pins such clients instead (tests/integration/test_pinning.py).
    refusing = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1),
                                  {"pools": {"postgres": {"session_pinning": "refuse"}}}))
    with connect(refusing) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute(sql)
        diag = info.value.diag
        assert why in diag.message_primary and "transaction mode" in diag.message_primary
        assert diag.message_hint
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session carries on


def test_with_hold_cursor_is_refused_and_the_transaction_rolls_back_when_pinning_is_off(start_pypool):
    refusing = start_pypool(merge(PRIMARY_ONLY, {"pools": {"postgres": {"session_pinning": "refuse"}}}))
    with connect(refusing) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="WITH HOLD"):
            conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_transaction_scoped_alternatives_work(one_connection):
    with connect(one_connection) as conn:
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE scratch (id int) ON COMMIT DROP")
            conn.execute("INSERT INTO scratch VALUES (1), (2)")
            assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (2,)
            conn.execute("SELECT pg_advisory_xact_lock(42)")
            conn.execute("DECLARE c CURSOR FOR SELECT generate_series(1, 3)")
            assert conn.execute("FETCH ALL FROM c").fetchall() == [(1,), (2,), (3,)]
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)


def test_deallocate_forgets_only_the_clients_own_statement(one_connection):
    with psycopg.connect(one_connection.dsn(), autocommit=True, prepare_threshold=0) as a, \
            psycopg.connect(one_connection.dsn(), autocommit=True, prepare_threshold=0) as b:
        assert a.execute("SELECT 1 + %s", (1,)).fetchone() == (2,)
        assert b.execute("SELECT 1 + %s", (2,)).fetchone() == (3,)  # shares the server's copy
        a.execute("DEALLOCATE ALL")
        assert b.execute("SELECT 1 + %s", (3,)).fetchone() == (4,)
        assert a.execute("SELECT 1 + %s", (4,)).fetchone() == (5,)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute("DEALLOCATE never_prepared")


def test_startup_options_apply_on_every_server_connection(one_connection):
    with connect(one_connection, options="-c%20statement_timeout%3D2500ms%20-c%20search_path%3Dopt_schema") as a, \
            connect(one_connection) as b:
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert a.execute(SHOW).fetchone()[:2] == ("opt_schema", "2500ms")
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)
        a.execute("RESET statement_timeout")  # back to the value the client started with
        b.execute("SELECT 1")
        assert a.execute("SHOW statement_timeout").fetchone() == ("2500ms",)


def test_setting_changed_inside_a_function_is_noticed_through_parameter_status(one_connection):
    """The statement text shows no SET, but the server reports the new application_name."""
    with connect(one_connection, application_name="fn-a") as a, connect(one_connection, application_name="fn-b") as b:
        a.execute("DO $$BEGIN PERFORM pg_catalog.set_config('application_name', 'changed-in-do', false); END$$")
        assert b.execute("SHOW application_name").fetchone() == ("fn-b",)
        assert a.execute("SHOW application_name").fetchone() == ("changed-in-do",)


def test_clients_leaving_while_their_settings_are_synced_leave_nothing_behind(one_connection):
    """A client that leaves while pypool syncs or reads back its settings must not leave the
    reply to that query for whoever gets the server connection next."""
    with connect(one_connection) as stayer:
        own = stayer.execute(SHOW).fetchone()
        for i in range(15):
            leaver = connect(one_connection, application_name=f"leaver-{i}")
            leaver.execute(f"SET statement_timeout = '{1000 + i}ms'")
            assert stayer.execute(SHOW).fetchone() == own  # the server now carries stayer's settings
            leaver.close()  # its Terminate must not start a sync that the departure cuts short
            assert stayer.execute(SHOW).fetchone() == own


def test_a_prepared_set_executed_again_is_still_tracked(one_connection):
    """psycopg prepares a statement run often enough, SET included: later runs send only Bind."""
    with psycopg.connect(one_connection.dsn(), autocommit=True, prepare_threshold=0) as a, \
            connect(one_connection) as b:
        default = b.execute("SHOW search_path").fetchone()
        # psycopg prepares (Parse + Sync) and then executes (Bind ... Sync) in two requests:
        # the setting changes in the second, whose message carries no SQL text.
        a.execute("SET search_path = first_schema")
        a.execute("RESET search_path")
        b.execute("SELECT 1")
        assert a.execute("SHOW search_path").fetchone() == default
        a.execute("SET search_path = first_schema")  # the same statement again: Bind only
        assert b.execute("SHOW search_path").fetchone() != ("first_schema",)
        assert a.execute("SHOW search_path").fetchone() == ("first_schema",)
