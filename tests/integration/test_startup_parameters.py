"""Startup parameters and ParameterStatus through pypool as PostgreSQL has them (issue 12, case 4).

Each check runs against the primary directly and through pypool (transaction
mode, one server connection shared by every client), and both must agree:
the ParameterStatus values a driver is told at login (PostgreSQL reports a
setting as it stores it: ``utf8`` comes back as ``UTF8``), and startup
settings whose names the client spelled in lower case (libpq's ``PGTZ`` and
``PGDATESTYLE``, asyncpg's ``server_settings``), which PostgreSQL matches
case-insensitively.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import psycopg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, user_overrides
from tests.integration._support import PRIMARY_ONLY, merge

pytestmark = pytest.mark.integration

SHOW = "SELECT current_setting('TimeZone'), current_setting('DateStyle'), current_setting('IntervalStyle')"


@pytest.fixture
def targets(start_pypool, pg_cluster):
    """{"direct": port, "pypool": port}; pool_size 1, so every client shares one backend."""
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    return {"direct": pg_cluster[0].port, "pypool": pypool.port}


def dsn(port: int, **params: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}?sslmode=disable{extra}"


def both(targets, check) -> None:
    results = {name: check(port) for name, port in targets.items()}
    assert results["pypool"] == results["direct"]


def test_psycopg_is_told_client_encoding_as_postgresql_spells_it(targets):
    def check(port: int):
        with psycopg.connect(dsn(port, client_encoding="utf8", application_name="enc-check"),
                             autocommit=True) as conn:
            info = conn.info
            told = {name: info.parameter_status(name) for name in
                    ("client_encoding", "application_name", "DateStyle", "TimeZone")}
            return told, conn.execute("SHOW client_encoding").fetchone()[0]

    both(targets, check)
    told, shown = check(targets["pypool"])
    assert told["client_encoding"] == "UTF8" and shown == "UTF8"


def test_libpq_environment_pgtz_and_pgdatestyle_apply(targets):
    def check(port: int):
        env = {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable", "PGTZ": "America/New_York",
               "PGDATESTYLE": "SQL, DMY", "PGCLIENTENCODING": "latin1"}
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", DATABASE, "-AtX",
                              "-c", "SHOW timezone", "-c", "SHOW datestyle", "-c", "SHOW client_encoding"],
                             env=env, capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.split()

    both(targets, check)
    assert check(targets["pypool"]) == ["America/New_York", "SQL,", "DMY", "LATIN1"]


def test_asyncpg_server_settings_with_lower_case_names(targets):
    async def session(port: int):
        con = await asyncpg.connect(dsn(port), server_settings={
            "timezone": "Asia/Tokyo", "datestyle": "German", "intervalstyle": "iso_8601",
            "statement_timeout": "12345"})
        try:
            settings = con.get_settings()
            told = (settings.client_encoding, settings.TimeZone, settings.DateStyle, settings.IntervalStyle)
            shown = tuple(await con.fetchrow(SHOW)) + (await con.fetchval("SHOW statement_timeout"),)
            # Another client on the same backend keeps the server's defaults.
            other = await asyncpg.connect(dsn(port))
            try:
                theirs = tuple(await other.fetchrow(SHOW))
            finally:
                await other.close()
            return told, shown, theirs
        finally:
            await con.close()

    def check(port: int):
        return asyncio.run(asyncio.wait_for(session(port), 60))

    both(targets, check)
    told, shown, theirs = check(targets["pypool"])
    assert told == ("UTF8", "Asia/Tokyo", "German, DMY", "iso_8601")
    assert shown == ("Asia/Tokyo", "German, DMY", "iso_8601", "12345ms")
    assert theirs != shown[:3]


def test_a_startup_value_postgresql_refuses_refuses_the_login(targets):
    async def connect(port: int):
        try:
            con = await asyncpg.connect(dsn(port), server_settings={"TimeZone": "Nowhere/Bogus"})
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        await con.close()
        return None

    def check(port: int):
        return asyncio.run(asyncio.wait_for(connect(port), 60))

    both(targets, check)
    assert check(targets["pypool"])[0] == "22023"
