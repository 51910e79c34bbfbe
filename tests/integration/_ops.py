"""Helpers of the operations tests: the admin console, login outcomes, the log, a private database.

The private database, one per test run: other test runs on the same cluster run ``pgbench -i`` on
the default database, which drops and recreates the pgbench tables under a running
benchmark; and the servers' ``pg_stat_database`` counters of a database only
this run uses move only with its traffic. Pools reach it through their
shard's ``database`` while clients still connect to the pool ``postgres``.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, drop_database, pgbench_database, run_database_name

PRIVATE_DB = run_database_name("pypool_ops")


@pytest.fixture(scope="session")
def private_db(pg_cluster):
    yield pgbench_database(pg_cluster, PRIVATE_DB)
    drop_database(pg_cluster, PRIVATE_DB)


def on_private_db() -> dict:
    """Config overrides: the pool ``postgres`` serves the private database."""
    return {"pools": {DATABASE: {"shards": {"0": {"database": PRIVATE_DB}}}}}


ADMIN_USER, ADMIN_PASSWORD = "admin_user", "admin_pass"  # what local_config sets


def admin(pypool, database: str = "pgcat", user: str = ADMIN_USER, password: str = ADMIN_PASSWORD):
    """A psycopg session on the admin console. ``prepare_threshold=None``: psycopg prepares (extended
    protocol, which the console refuses) any statement it has run 5 times, parameters or not."""
    return psycopg.connect(host="127.0.0.1", port=pypool.port, user=user, password=password, dbname=database,
                           sslmode="disable", autocommit=True, connect_timeout=10, prepare_threshold=None)


def rows(conn, sql: str) -> list[dict]:
    cur = conn.execute(sql)
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def show(conn, what: str) -> list[dict]:
    return rows(conn, f"SHOW {what}")


def admin_rows(pypool, sql: str) -> list[dict]:
    with admin(pypool) as conn:
        return rows(conn, sql)


def login_error(pypool, user: str = USER, password: str = PASSWORD, database: str = DATABASE) \
        -> tuple[str | None, str]:
    """(SQLSTATE, message) of a login with asyncpg, which reports both (psycopg only the text);
    (None, "logged in") when it succeeds."""
    async def attempt() -> tuple[str | None, str]:
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=pypool.port, user=user, password=password,
                                         database=database, ssl=False, timeout=10)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError) as exc:
            return None, f"closed: {exc}"
        await conn.close()
        return None, "logged in"

    return asyncio.run(attempt())


def wait_for_log(pypool, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while text not in pypool.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{pypool.log()[-3000:]}"
        time.sleep(0.05)
    return pypool.log()
