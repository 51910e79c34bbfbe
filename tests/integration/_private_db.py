"""A database of the operations tests' own, with pgbench tables, on the shared cluster.

Other test sessions on the same cluster run ``pgbench -i`` on the default
database, which drops and recreates the pgbench tables under a running
benchmark; and the servers' ``pg_stat_database`` counters of a database only
these tests use move only with their traffic. Pools reach it through their
shard's ``database`` while clients still connect to the pool ``postgres``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from pypool import cluster
from tests.conftest import DATABASE, PASSWORD, USER, wait_replicas_caught_up

PRIVATE_DB = "pypool_ops"


@pytest.fixture(scope="session")
def private_db(pg_cluster) -> str:
    primary = pg_cluster[0]
    if cluster.run_sql(primary, f"SELECT 1 FROM pg_database WHERE datname = '{PRIVATE_DB}'") != "1":
        cluster.run_sql(primary, f"CREATE DATABASE {PRIVATE_DB}")
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(primary.port), "-U", USER,
                    PRIVATE_DB], env=env, check=True, capture_output=True, timeout=120)
    wait_replicas_caught_up(pg_cluster)
    return PRIVATE_DB


def on_private_db() -> dict:
    """Config overrides: the pool ``postgres`` serves the private database."""
    return {"pools": {DATABASE: {"shards": {"0": {"database": PRIVATE_DB}}}}}
