"""The admin console (databases pgcat / pgbouncer / pypool) with psql and psycopg against the real cluster.

Column names and order are PgCat's (PgBouncer's for STATS_TOTALS and
STATS_AVERAGES): the lists below are what existing scripts and exporters read.
"""

from __future__ import annotations

import platform
import re
import subprocess
import threading
import time

import psycopg
import psycopg.errors
import pytest

from pypool import __version__
from pypool.config import dump_config
from tests.conftest import DATABASE, PASSWORD, USER, user_overrides
from tests.integration._ops import ADMIN_PASSWORD, ADMIN_USER, admin, login_error, rows, show
from tests.integration._support import merge

pytestmark = pytest.mark.integration

COLUMNS = {
    "POOLS": ["database", "user", "pool_mode", "cl_idle", "cl_active", "cl_waiting", "cl_cancel_req", "sv_active",
              "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "cl_pinned"],
    "STATS": ["instance", "database", "user", "total_xact_count", "total_query_count", "total_received",
              "total_sent", "total_xact_time", "total_query_time", "total_wait_time", "total_errors",
              "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent", "avg_errors", "avg_xact_time",
              "avg_query_time", "avg_wait_time"],
    "SERVERS": ["server_id", "database_name", "user", "address_id", "application_name", "state",
                "transaction_count", "query_count", "bytes_sent", "bytes_received", "age_seconds",
                "prepare_cache_hit", "prepare_cache_miss", "prepare_cache_eviction", "prepare_cache_size"],
    "CLIENTS": ["client_id", "database", "user", "application_name", "state", "transaction_count", "query_count",
                "error_count", "age_seconds", "maxwait", "maxwait_us", "pinned", "causal_required"],
    "DATABASES": ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool",
                  "pool_mode", "max_connections", "current_connections", "paused", "disabled"],
    "CONFIG": ["key", "value", "default", "changeable"],
    "LISTS": ["list", "items"],
    "USERS": ["name", "pool_mode"],
    "VERSION": ["version"],
    # PgCat's columns, then the port (several servers may share a host).
    "BANS": ["db", "user", "role", "host", "reason", "ban_time", "ban_duration_seconds", "ban_remaining_seconds",
             "port"],
    "STATS_TOTALS": ["database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
                     "bytes_sent", "xact_time", "query_time", "wait_time", "client_parse_count",
                     "server_parse_count", "bind_count"],
}
COLUMNS["STATS_AVERAGES"] = COLUMNS["STATS_TOTALS"]

# Reads go to the replicas only (the primary takes no reads), so routing is visible by port.
SPLITTING = {"pools": {DATABASE: {"query_parser_enabled": True, "query_parser_read_write_splitting": True,
                                  "primary_reads_enabled": False, "default_role": "any"}}}






def client(pypool, **kwargs) -> psycopg.Connection:
    return psycopg.connect(pypool.dsn(), autocommit=True, prepare_threshold=None, **kwargs)






def columns(conn, what: str) -> list[str]:
    return [d.name for d in conn.execute(f"SHOW {what}").description]


@pytest.fixture
def pypool(start_pypool):
    return start_pypool(SPLITTING)


def test_only_the_admin_credentials_get_in(pypool):
    for database in ("pgcat", "pgbouncer", "pypool"):
        with admin(pypool, database) as conn:
            [row] = show(conn, "VERSION")
            # "<name> <version>" first, as PgCat and PgBouncer answer (tools parse it), then the runtime.
            assert re.fullmatch(rf"pypool {re.escape(__version__)} \((pure Python|compiled hot path), "
                                rf"Python {platform.python_version()}, "
                                r"sqlglot \d+\.\d+\.\d+( \+ sqlglotc)?, OpenSSL \d[^,)]*\)", row["version"]), row
    # asyncpg reports the SQLSTATE of a failed login (psycopg only its text).
    assert login_error(pypool, ADMIN_USER, "not-the-admin-password", "pgcat")[0] == "28P01"
    # A pool user with its own, correct password is not an admin ...
    assert login_error(pypool, USER, PASSWORD, "pgcat")[0] == "28P01"
    # ... and the admin is not a pool user.
    assert login_error(pypool, ADMIN_USER, ADMIN_PASSWORD, DATABASE)[0] == "28P01"
    # psql too, with its own error text.
    env = {**pypool.env(password="wrong"), "PGCONNECT_TIMEOUT": "10"}
    out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", ADMIN_USER, "-d", "pgcat",
                          "-c", "SHOW POOLS"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "password authentication failed" in out.stderr


def test_every_show_has_pgcat_columns_and_live_values(pypool, pg_cluster):
    replicas = {n.port for n in pg_cluster[1:]}
    with admin(pypool) as conn, client(pypool, application_name="admin-test-app") as busy:
        for what, expected in COLUMNS.items():
            assert columns(conn, what) == expected, what
        for _ in range(10):
            assert busy.execute("SELECT inet_server_port()").fetchone()[0] in replicas
        # A transaction held open on the primary: one active client, one active server.
        busy.execute("BEGIN")
        busy.execute("CREATE TEMP TABLE admin_probe (x int) ON COMMIT DROP")

        pools = show(conn, "POOLS")
        assert [(p["database"], p["user"], p["pool_mode"]) for p in pools] == [(DATABASE, USER, "transaction")]
        assert pools[0]["cl_active"] == 1 and pools[0]["sv_active"] >= 1 and pools[0]["cl_waiting"] == 0

        clients = show(conn, "CLIENTS")
        app_client = next(c for c in clients if c["application_name"] == "admin-test-app")
        assert app_client["state"] == "active" and app_client["database"] == DATABASE
        assert app_client["transaction_count"] >= 10 and app_client["query_count"] >= 11
        assert app_client["client_id"].startswith("0x") and len(app_client["client_id"]) == 10
        assert any(c["database"] == "pgcat" and c["user"] == ADMIN_USER for c in clients)

        servers = show(conn, "SERVERS")
        assert {s["state"] for s in servers} <= {"active", "idle", "used", "tested", "login"}
        active = [s for s in servers if s["state"] == "active"]
        assert len(active) == 1
        assert active[0]["address_id"] == f"{DATABASE}_shard_0_primary"
        assert active[0]["application_name"] == "admin-test-app"
        assert sum(s["transaction_count"] for s in servers
                   if s["address_id"] != f"{DATABASE}_shard_0_primary") >= 10

        databases = show(conn, "DATABASES")
        assert [(d["name"], int(d["port"]), d["pool_size"]) for d in databases] == [
            (f"{DATABASE}_shard_0_primary", pg_cluster[0].port, 10),
            (f"{DATABASE}_shard_0_replica_0", pg_cluster[1].port, 10),
            (f"{DATABASE}_shard_0_replica_1", pg_cluster[2].port, 10)]
        assert databases[0]["current_connections"] >= 1
        assert all(d["paused"] == 0 and d["disabled"] == 0 for d in databases)

        stats = show(conn, "STATS")
        assert [s["instance"] for s in stats] == [d["name"] for d in databases]
        assert sum(s["total_xact_count"] for s in stats[1:]) >= 10
        assert all(s["total_xact_time"] > 0 for s in stats[1:] if s["total_xact_count"])

        totals = show(conn, "STATS_TOTALS")
        assert [t["database"] for t in totals] == [DATABASE]
        assert totals[0]["xact_count"] == sum(s["total_xact_count"] for s in stats)
        assert totals[0]["server_assignment_count"] >= 10
        busy.execute("ROLLBACK")

        lists = {r["list"]: r["items"] for r in show(conn, "LISTS")}
        assert lists["databases"] == 3 and lists["pools"] == 1 and lists["users"] == 1
        assert lists["free_clients"] == 1 and lists["used_clients"] == 1  # the app client, this console
        assert show(conn, "USERS") == [{"name": USER, "pool_mode": "transaction"}]

        config = {r["key"]: r["value"] for r in show(conn, "CONFIG")}
        assert config["port"] == str(pypool.port) and config["admin_username"] == ADMIN_USER
        assert not any(PASSWORD in v or ADMIN_PASSWORD in v for v in config.values())


def test_psql_show_help_and_unknown_commands(pypool):
    env = {**pypool.env(password=ADMIN_PASSWORD)}
    out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", ADMIN_USER, "-d", "pgbouncer",
                          "-c", "SHOW HELP", "-c", "SHOW FOO", "-c", "SHOW POOLS"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert "Console usage" in out.stderr and "SHOW STATS|STATS_TOTALS|STATS_AVERAGES" in out.stderr
    assert 'unsupported SHOW "FOO"' in out.stderr
    with admin(pypool) as conn:
        with pytest.raises(psycopg.errors.SyntaxError, match="unsupported admin command"):
            conn.execute("DROP TABLE everything")
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SHOW NOTHING")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple query protocol"):
            conn.execute("SHOW POOLS WHERE %s", [1])  # parameters: the extended protocol
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            conn.execute("PAUSE nosuchdb,nobody")
        with pytest.raises(psycopg.errors.SyntaxError, match="integer"):
            conn.execute("BAN 127.0.0.1 soon")
        # The session is still usable after each error.
        assert show(conn, "VERSION")[0]["version"].startswith("pypool ")
        assert conn.execute("SET application_name = 'x'").statusmessage == "SET"


def test_psycopg_polls_the_console_past_its_prepare_threshold_with_prepare_threshold_none(pypool):
    """psycopg prepares a statement it has run prepare_threshold (5) times, parameters or not: the
    extended protocol, refused with 0A000 and a hint that says what to set. A script polling
    SHOW POOLS connects with prepare_threshold=None (as admin() does) and polls on."""
    admin_user = dict(user=ADMIN_USER, password=ADMIN_PASSWORD, database="pgcat")
    with psycopg.connect(pypool.dsn(**admin_user), autocommit=True) as default:
        for _ in range(default.prepare_threshold):
            show(default, "POOLS")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            show(default, "POOLS")
        assert "prepare_threshold=None" in refused.value.diag.message_hint
    with admin(pypool) as polling:
        for _ in range(20):
            assert any(p["database"] == DATABASE for p in show(polling, "POOLS"))


def test_pause_holds_new_transactions_until_resume(pypool):
    with admin(pypool) as conn, client(pypool) as app:
        assert app.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute(f"PAUSE {DATABASE},{USER}").statusmessage == f"PAUSE {DATABASE},{USER}"
        assert all(d["paused"] == 1 for d in show(conn, "DATABASES"))
        result: list = []
        worker = threading.Thread(target=lambda: result.append(app.execute("SELECT 2").fetchone()))
        worker.start()
        deadline = time.monotonic() + 10
        while show(conn, "POOLS")[0]["cl_waiting"] != 1:
            assert time.monotonic() < deadline, "the paused query never showed up as waiting"
            time.sleep(0.1)
        worker.join(1.0)
        assert worker.is_alive() and not result  # held, not failed
        assert conn.execute(f"RESUME {DATABASE},{USER}").statusmessage == f"RESUME {DATABASE},{USER}"
        worker.join(15)
        assert result == [(2,)]
        assert all(d["paused"] == 0 for d in show(conn, "DATABASES"))


def test_ban_and_unban_steer_reads(pypool, pg_cluster):
    primary, replica1, replica2 = (n.port for n in pg_cluster)

    def read_ports(app) -> set[int]:
        return {app.execute("SELECT inet_server_port()").fetchone()[0] for _ in range(30)}

    with admin(pypool) as conn, client(pypool) as app:
        assert read_ports(app) == {replica1, replica2}
        banned = rows(conn, f"BAN 127.0.0.1:{replica1} 60")
        assert [(b["db"], b["role"], b["host"], int(b["port"])) for b in banned] == [
            (DATABASE, "replica", "127.0.0.1", replica1)]
        assert read_ports(app) == {replica2}
        bans = show(conn, "BANS")
        assert [(int(b["port"]), b["reason"], b["ban_duration_seconds"]) for b in bans] == [
            (replica1, "AdminBan(60)", "60")]
        assert 0 < int(bans[0]["ban_remaining_seconds"]) <= 60
        assert [d["disabled"] for d in show(conn, "DATABASES")] == [0, 1, 0]
        # The primary is never banned (as in PgCat).
        assert rows(conn, f"BAN 127.0.0.1:{primary} 60") == []
        unbanned = rows(conn, f"UNBAN 127.0.0.1:{replica1}")
        assert [int(u["port"]) for u in unbanned] == [replica1]
        assert show(conn, "BANS") == []
        assert read_ports(app) == {replica1, replica2}


def test_reload_applies_a_new_pool_size_and_rejects_a_bad_file(pypool):
    with admin(pypool) as conn:
        assert {d["pool_size"] for d in show(conn, "DATABASES")} == {10}
        pypool.config_path.write_text(dump_config(merge(pypool.config, user_overrides(pool_size=4))))
        assert conn.execute("RELOAD").statusmessage == "RELOAD"
        assert {d["pool_size"] for d in show(conn, "DATABASES")} == {4}

        pypool.config_path.write_text(dump_config(merge(pypool.config, user_overrides(pool_size="lots"))))
        with pytest.raises(psycopg.Error) as rejected:
            conn.execute("RELOAD")
        assert rejected.value.sqlstate == "F0000"
        assert "pool_size" in str(rejected.value) and str(pypool.config_path) in str(rejected.value)
        assert {d["pool_size"] for d in show(conn, "DATABASES")} == {4}
    with client(pypool) as app:
        assert app.execute("SELECT 1").fetchone() == (1,)
