"""Shared fixtures: the local PostgreSQL cluster and pypool processes started from real configs.

Integration tests talk to a real primary + 2 streaming replicas (started by
``pypool.cluster`` on 127.0.0.1:5433-5435 unless PG1_PORT... say otherwise)
through a real ``pypool`` process listening on a free loopback port.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from pypool import cluster
from pypool.causal.lsn import format_lsn
from pypool.causal.requirement import COMMIT_POSITION_QUERY, parse_commit_row
from pypool.config import default_config_dict, dump_config

USER = os.environ.get("POSTGRESQL_USERNAME", "postgres")
PASSWORD = os.environ.get("POSTGRESQL_PASSWORD", "mysecretpassword")

# No per-example time limit: it measures wall-clock time, which a loaded 2-core machine stretches.
hypothesis_settings.register_profile("pypool", deadline=None)
hypothesis_settings.load_profile("pypool")
DATABASE = os.environ.get("POSTGRESQL_DATABASE", "postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class PyPoolProcess:
    port: int
    config_path: Path
    log_path: Path
    proc: subprocess.Popen
    config: dict = field(default_factory=dict)

    def dsn(self, user: str = USER, password: str = PASSWORD, database: str = DATABASE, **extra: str) -> str:
        params = "".join(f"&{k}={v}" for k, v in extra.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}?sslmode=disable{params}"

    def env(self, password: str = PASSWORD) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it is still there 10 s later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pypool exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pypool did not listen on {port} within {timeout}s:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def pg_cluster() -> list[cluster.Node]:
    """The local primary + 2 replicas, started (idempotently) for the test session."""
    return cluster.up()


def run_database_name(prefix: str) -> str:
    """``prefix`` and this test run's pid: a test run sharing the cluster with this one uses another database."""
    return f"{prefix}_{os.getpid()}"


def drop_database(nodes: list[cluster.Node], database: str) -> None:
    cluster.run_sql(nodes[0], f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def pgbench_database(nodes: list[cluster.Node], database: str) -> str:
    """``database`` (created if missing) with fresh pgbench tables (scale 1), replicated to the replicas."""
    primary = nodes[0]
    if cluster.run_sql(primary, f"SELECT 1 FROM pg_database WHERE datname = '{database}'") != "1":
        cluster.run_sql(primary, f"CREATE DATABASE {database}")
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(primary.port),
                    "-U", USER, database], env=env, check=True, capture_output=True, timeout=120)
    wait_replicas_caught_up(nodes)
    return database


@pytest.fixture(scope="session")
def pgbench_tables(pg_cluster: list[cluster.Node]) -> None:
    """pgbench tables (scale 1) on the primary, replicated to both replicas."""
    pgbench_database(pg_cluster, DATABASE)


def wait_replicas_caught_up(nodes: list[cluster.Node], timeout: float = 30) -> None:
    """Wait until every replica has replayed every commit made on the primary so far.

    An asynchronous commit (this cluster runs synchronous_commit = off) may still
    sit in the primary's WAL buffers, past ``pg_current_wal_lsn()`` (what is
    written) for up to 3 x wal_writer_delay: the insert position covers it. It
    is the position pypool's causal reads wait for after such a commit.
    """
    primary = nodes[0]
    row = cluster.run_sql(primary, COMMIT_POSITION_QUERY).split("|")
    lsn = format_lsn(parse_commit_row(row, asynchronous=True).lsn)
    deadline = time.monotonic() + timeout
    for replica in nodes[1:]:
        while True:
            done = cluster.run_sql(replica, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn").strip()
            if done == "t":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.name} did not catch up to {lsn}")
            time.sleep(0.1)


def local_config(nodes: list[cluster.Node], port: int, overrides: dict | None = None) -> dict:
    env = {"PGCAT_PORT": str(port), "PG1_PORT": str(nodes[0].port), "PG2_PORT": str(nodes[1].port),
           "PG3_PORT": str(nodes[2].port), "POSTGRESQL_USERNAME": USER, "POSTGRESQL_PASSWORD": PASSWORD,
           "POSTGRESQL_DATABASE": DATABASE}
    base = default_config_dict(env)
    base["general"]["enable_prometheus_exporter"] = False
    base["general"]["prometheus_exporter_port"] = free_port()
    return deep_merge(base, overrides or {})


def start_pypool_process(config: dict, directory: Path, port: int, extra_args: list[str] | None = None) -> PyPoolProcess:
    config_path = directory / f"pypool-{port}.toml"
    config_path.write_text(dump_config(config))
    log_path = directory / f"pypool-{port}.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pypool", str(config_path), "--log-level", "debug",
                             *(extra_args or [])], stdout=log_file, stderr=subprocess.STDOUT)
    wait_for_port(port, proc, log_path)
    return PyPoolProcess(port, config_path, log_path, proc, config)


@pytest.fixture
def start_pypool(tmp_path: Path, pg_cluster: list[cluster.Node]):
    """Factory: ``start_pypool({"pools": {"postgres": {...}}})`` -> a running PyPoolProcess."""
    started: list[PyPoolProcess] = []

    def _start(overrides: dict | None = None, nodes: list[cluster.Node] | None = None) -> PyPoolProcess:
        port = free_port()
        config = local_config(nodes or pg_cluster, port, overrides)
        proc = start_pypool_process(config, tmp_path, port)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.stop()


def user_overrides(**values: object) -> dict:
    """Overrides for the single configured user of the default pool."""
    return {"pools": {DATABASE: {"users": {"0": values}}}}


def pool_overrides(**values: object) -> dict:
    return {"pools": {DATABASE: values}}
