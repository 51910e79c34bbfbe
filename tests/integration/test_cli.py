"""The command line, run as users run it: `pypool [CONFIG]`, `pypool config check`, `pypool config init`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pypool.config import dump_config
from tests.conftest import DATABASE, PASSWORD, USER, free_port, local_config, wait_for_port

pytestmark = pytest.mark.integration


def pypool_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pypool", *args], env={**os.environ, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_config_check_reports_file_and_key(tmp_path, pg_cluster):
    good = tmp_path / "good.toml"
    good.write_text(dump_config(local_config(pg_cluster, 6432)))
    out = pypool_cli("config", "check", str(good))
    assert out.returncode == 0 and f"{good}: OK (1 pool(s), 1 user(s))" in out.stdout

    cases = {
        '[general]\nport = "x"\n': "general.port",
        dump_config(local_config(pg_cluster, 6432, {"pools": {"postgres": {"users": {"0": {"pool_size": -1}}}}})):
            "pools.postgres.users.0.pool_size",
        dump_config(local_config(pg_cluster, 6432, {"pools": {"postgres": {"load_balancing_mode": "dice"}}})):
            "pools.postgres.load_balancing_mode",
    }
    for text, key in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        out = pypool_cli("config", "check", str(bad))
        assert out.returncode == 1, out
        assert out.stderr.startswith(f"error: {bad}: {key}: "), out.stderr
    missing = tmp_path / "missing.toml"
    out = pypool_cli("config", "check", str(missing))
    assert out.returncode == 1 and str(missing) in out.stderr


def test_config_check_strict_turns_a_misspelt_key_into_an_error(tmp_path, pg_cluster):
    config = local_config(pg_cluster, 6432)
    config["pools"]["postgres"]["pool_mod"] = "session"
    path = tmp_path / "typo.toml"
    path.write_text(dump_config(config))
    out = pypool_cli("config", "check", str(path))
    assert out.returncode == 0, out
    assert f"warning: {path}: pools.postgres.pool_mod: unknown key in [pools.postgres], ignored; " \
           "did you mean `pool_mode`?" in out.stderr
    out = pypool_cli("config", "check", "--strict", str(path))
    assert out.returncode == 1, out
    assert out.stderr.startswith(f"error: {path}: pools.postgres.pool_mod: unknown key in [pools.postgres], "
                                 "an error with --strict; did you mean `pool_mode`?"), out.stderr


@pytest.mark.parametrize("name", ["pgcat.toml", "examples_docker_pgcat.toml", "circleci_pgcat.toml",
                                  "pgcat.minimal.toml", "circleci_pgcat_trust.toml"])
def test_config_check_passes_pgcats_own_examples(name):
    path = Path(__file__).parents[1] / "unit" / "pgcat_configs" / name
    out = pypool_cli("config", "check", str(path))
    assert out.returncode == 0, out
    assert f"{path}: OK" in out.stdout
    if name == "pgcat.toml":  # says plainly what it does not use, and why
        assert f"warning: {path}: general.worker_threads: PgCat setting accepted, not used by pypool: " in out.stderr


def test_config_init_from_the_compose_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# like docker/.env\nPOSTGRESQL_USERNAME=alice\nPOSTGRESQL_PASSWORD='s3cret'\n"
                        "POSTGRESQL_DATABASE=shop\nPGCAT_PORT=7432\nPG1_PORT=6001\nPG2_PORT=6002\nPG3_PORT=6003\n")
    written = tmp_path / "pgcat.toml"
    # The process environment wins over the file, as with Docker Compose.
    out = pypool_cli("config", "init", "--env-file", str(env_file), "--output", str(written),
                     env={"PG3_PORT": "6103"})
    assert out.returncode == 0, out.stderr
    config = tomllib.loads(written.read_text())
    assert config["general"]["port"] == 7432
    user = config["pools"]["shop"]["users"]["0"]
    assert (user["username"], user["password"]) == ("alice", "s3cret")
    shard = config["pools"]["shop"]["shards"]["0"]
    assert shard["database"] == "shop"
    assert [s[1:] for s in shard["servers"]] == [[6001, "primary"], [6002, "replica"], [6103, "replica"]]
    assert pypool_cli("config", "check", str(written)).returncode == 0
    # Without --output: to stdout; the repository's docker/.env gives the shipped defaults.
    out = pypool_cli("config", "init", "--env-file", str(Path(__file__).parents[2] / "docker" / ".env"))
    assert out.returncode == 0 and tomllib.loads(out.stdout)["general"]["port"] == 6432
    out = pypool_cli("config", "init", "--env-file", str(tmp_path / "nope.env"))
    assert out.returncode == 1 and "nope.env" in out.stderr


@pytest.mark.parametrize("how", ["CONFIG_FILE", "default pgcat.toml", "positional"])
def test_pooler_finds_its_config(tmp_path, pg_cluster, how):
    port = free_port()
    name = "pgcat.toml" if how == "default pgcat.toml" else "elsewhere.toml"
    (tmp_path / name).write_text(dump_config(local_config(pg_cluster, port)))
    args = {"positional": [name], "CONFIG_FILE": [], "default pgcat.toml": []}[how]
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "") or str(Path(__file__).parents[2])}
    if how == "CONFIG_FILE":
        env["CONFIG_FILE"] = str(tmp_path / name)
    log_path = tmp_path / "pypool.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pypool", *args, "--log-level", "warning"], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log_path)

        out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", DATABASE, "-Atc",
                              "SELECT 41 + 1"], env={**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"},
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # --log-level warning: the start-up and shutdown info lines are not logged.
    assert "listening" not in log_path.read_text()


def test_pooler_with_a_missing_or_bad_config_exits_with_the_reason(tmp_path):
    out = pypool_cli(str(tmp_path / "absent.toml"))
    assert out.returncode == 2 and f"{tmp_path / 'absent.toml'}: cannot read config file" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[general]\nport = 0\n")
    out = pypool_cli(str(bad), "--log-format", "json")
    assert out.returncode == 2 and "general.port" in out.stderr and '"level": "error"' in out.stderr
