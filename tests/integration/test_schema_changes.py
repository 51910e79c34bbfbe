"""Prepared statements across schema changes, through pypool as directly (issue 12, case 3).

Each scenario runs twice with asyncpg (statement cache on): once on the
primary directly, once through pypool in transaction mode, and both runs
must see the same outcomes. Through pypool the server-side statements are
shared between clients and server connections, so a stale one would show
as an error the direct run does not have, or as a value encoded for the old
type.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid

import asyncpg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, user_overrides
from tests.integration._support import PRIMARY_ONLY, merge

pytestmark = pytest.mark.integration


@pytest.fixture
def dsns(start_pypool, pg_cluster):
    """(direct, pooled) DSNs; pool_size 2 so a re-prepare may land on either server connection."""
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=2)))
    direct = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pg_cluster[0].port}/{DATABASE}?sslmode=disable"
    return direct, pypool.dsn()


async def attempt(awaitable) -> object:
    """The value, or the name of the asyncpg error: what a user of the driver sees."""
    try:
        value = await awaitable
    except asyncpg.PostgresError as exc:
        return type(exc).__name__
    return [tuple(r) for r in value] if isinstance(value, list) else value


def run_both(dsns, scenario) -> None:
    direct, pooled = dsns
    expected = asyncio.run(asyncio.wait_for(scenario(direct, direct, f"t_{uuid.uuid4().hex[:8]}"), 60))
    got = asyncio.run(asyncio.wait_for(scenario(pooled, direct, f"t_{uuid.uuid4().hex[:8]}"), 60))
    assert got == expected


@contextlib.asynccontextmanager
async def connected(dsn: str, cleanup: str = ""):
    """An asyncpg connection (statement cache on), running ``cleanup`` before it closes."""
    con = await asyncpg.connect(dsn)
    try:
        yield con
    finally:
        if cleanup:
            await con.execute(cleanup)
        await con.close()


async def alter_table_then_select(dsn: str, _direct: str, table: str) -> list:
    seen = []
    query = f"SELECT * FROM {table}"
    async with connected(dsn, f"DROP TABLE IF EXISTS {table}") as con:
        await con.execute(f"CREATE TABLE {table} (a int)")
        await con.execute(f"INSERT INTO {table} VALUES (1)")
        for _ in range(3):  # cached, and on both server connections
            seen.append(await attempt(con.fetch(query)))
        await con.execute(f"ALTER TABLE {table} ADD COLUMN b text DEFAULT 'x'")
        seen.append(await attempt(con.fetch(query)))  # asyncpg re-prepares once, outside a transaction
        seen.append(await attempt(con.fetch(query)))
        await con.execute(f"ALTER TABLE {table} ALTER COLUMN a TYPE text")
        seen.append(await attempt(con.fetch(query)))
        async with connected(dsn) as fresh:  # a brand-new client prepares the same text
            seen.append(await attempt(fresh.fetch(query)))
            seen.append(await attempt(fresh.fetchval(f"SELECT a FROM {table} WHERE a = $1", "1")))
    return seen


def test_alter_table_between_selects(dsns):
    run_both(dsns, alter_table_then_select)


async def alter_table_elsewhere(dsn: str, direct_dsn: str, table: str) -> list:
    """The DDL comes from a connection pypool never sees: PostgreSQL's own errors must do."""
    seen = []
    query = f"SELECT * FROM {table}"
    async with connected(direct_dsn, f"DROP TABLE IF EXISTS {table}") as other, connected(dsn) as con:
        await other.execute(f"CREATE TABLE {table} (a int)")
        await other.execute(f"INSERT INTO {table} VALUES (1)")
        for _ in range(3):
            seen.append(await attempt(con.fetch(query)))
        await other.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 2")
        seen.append(await attempt(con.fetch(query)))
        seen.append(await attempt(con.fetch(query)))
        async with connected(dsn) as fresh:
            seen.append(await attempt(fresh.fetch(query)))
    return seen


def test_alter_table_by_another_connection(dsns):
    run_both(dsns, alter_table_elsewhere)


async def recreate_type(dsn: str, _direct: str, table: str) -> list:
    seen = []
    typ = f"{table}_mood"
    query = f"SELECT $1::{typ}"
    async with connected(dsn, f"DROP TYPE IF EXISTS {typ}") as con:
        await con.execute(f"CREATE TYPE {typ} AS ENUM ('a', 'b')")
        for _ in range(3):
            seen.append(await attempt(con.fetchval(query, "a")))
        await con.execute(f"DROP TYPE {typ}")
        await con.execute(f"CREATE TYPE {typ} AS ENUM ('a', 'b', 'c')")
        await con.reload_schema_state()
        seen.append(await attempt(con.fetchval(query, "c")))
        seen.append(await attempt(con.fetchval(query, "b")))
    return seen


def test_drop_and_create_type_then_reload_schema_state(dsns):
    run_both(dsns, recreate_type)


async def recreate_table_with_another_type(dsn: str, _direct: str, table: str) -> list:
    seen = []
    insert = f"INSERT INTO {table} VALUES ($1)"
    async with connected(dsn) as first:
        await first.execute(f"CREATE TABLE {table} (v timestamp)")
        for _ in range(3):
            seen.append(await attempt(first.execute(insert, datetime.datetime(2024, 1, 2, 3, 4, 5))))
        await first.execute(f"DROP TABLE {table}")
        await first.execute(f"CREATE TABLE {table} (v time)")
    # The next client: its INSERT must be described with the new type.
    async with connected(dsn, f"DROP TABLE IF EXISTS {table}") as second:
        seen.append(await attempt(second.execute(insert, datetime.time(3, 4, 5))))
        seen.append(await attempt(second.fetch(f"SELECT v FROM {table}")))
    return seen


def test_table_recreated_with_another_column_type(dsns):
    run_both(dsns, recreate_table_with_another_type)


async def new_client_after_ddl_elsewhere(dsn: str, direct_dsn: str, table: str) -> list:
    """No client of pypool has hit the stale statement yet when a new one prepares the same text."""
    seen = []
    query = f"SELECT * FROM {table}"
    async with connected(direct_dsn, f"DROP TABLE IF EXISTS {table}") as other:
        await other.execute(f"CREATE TABLE {table} (a int)")
        await other.execute(f"INSERT INTO {table} VALUES (1)")
        async with connected(dsn) as con:
            for _ in range(4):
                seen.append(await attempt(con.fetch(query)))
        await other.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 2")
        async with connected(dsn) as fresh:
            seen.append(await attempt(fresh.fetch(query)))
            seen.append(await attempt(fresh.fetch(query)))
    return seen


@pytest.mark.xfail(strict=True, reason=(
    "known gap: DDL pypool does not relay leaves the shared server-side copy stale until some client's "
    "statement fails on it; a new client whose Parse was answered from that copy gets the one "
    "InvalidCachedStatementError (asyncpg does not retry a prepare), the next call works. Not retried "
    "by pypool: the client was already sent the copy's stale description (asyncpg describes in the "
    "request before the Bind that fails), so rows of the new shape would be decoded with the old one; "
    "telling a stale copy from a fresh one takes a real Parse per client, the cost sharing avoids"))
def test_new_client_after_ddl_by_another_connection(dsns):
    run_both(dsns, new_client_after_ddl_elsewhere)
