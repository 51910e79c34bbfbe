"""The command line, run as users run it: `pypool [CONFIG]`, `pypool config check`, `pypool config init`."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from pypool import __version__
from pypool.config import dump_config
from tests.conftest import (DATABASE, PASSWORD, USER, free_port, local_config, start_pypool_process,
                            wait_for_port)
from tests.integration._support import wait_for

pytestmark = pytest.mark.integration


def pypool_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
    return subprocess.run([sys.executable, "-m", "pypool", *args], env=merged, cwd=cwd,
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_the_moment_the_port_opens_drains_and_exits_cleanly(tmp_path, pg_cluster, sig):
    """The signal handlers are in place before the port accepts a client.

    Sent in the instant the port first accepted, SIGINT used to end pypool with a
    KeyboardInterrupt traceback (status -2) and SIGTERM killed it (-15): the handlers
    came after the listener. 11 of 15 such starts hit that window on the development machine.
    """
    for attempt in range(3):
        port = free_port()
        config_path = tmp_path / f"pgcat-{attempt}.toml"
        config_path.write_text(dump_config(local_config(pg_cluster, port)))
        log_path = tmp_path / f"pypool-{attempt}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pypool", str(config_path)], stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _accepts(port) or proc.poll() is not None, timeout=30, interval=0,
                     what="the port to accept")
            proc.send_signal(sig)  # as soon as the port takes a connection
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
        out = log_path.read_text()
        assert "Traceback" not in out and "pypool stopped" in out, out


@pytest.mark.parametrize("workers, late", [(1, signal.SIGTERM), (1, signal.SIGINT), (1, signal.SIGHUP),
                                            (2, signal.SIGTERM)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGTERM-2-workers"])
def test_signals_during_and_after_the_drain_end_in_exit_status_0(tmp_path, pg_cluster, workers, late):
    """A SIGTERM, then ``late`` every millisecond until the process is gone: it drains and exits 0.

    From "pypool stopped" to the exit (the event loop's teardown, then the interpreter's, 30 to
    200 ms) the default action of these signals used to be back: a second SIGTERM there killed a
    cleanly drained pypool (status -15, a crash to systemd or Kubernetes; SIGINT -2, SIGHUP -1),
    and the supervisor of ``workers = 2`` once all its workers had stopped.
    Sent during the drain, a second SIGTERM or SIGINT closes every connection at once, a SIGHUP
    is not a reload; neither changes the exit status.
    """
    port = free_port()
    pypool = start_pypool_process(local_config(pg_cluster, port, {"general": {"workers": workers}}), tmp_path, port)
    try:
        pypool.proc.send_signal(signal.SIGTERM)
        while pypool.proc.poll() is None:  # send_signal skips a process that has exited
            pypool.proc.send_signal(late)
            time.sleep(0.001)
        assert pypool.proc.returncode == 0, pypool.log()[-2000:]
        assert "pypool stopped" in pypool.log() and "ended with status" not in pypool.log()
    finally:
        pypool.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_signal_while_pypool_imports_drains_once_started_and_exits_0(tmp_path, pg_cluster, sig):
    """Sent while pypool still imports its modules (``-X importtime`` has just shown sqlglot's first one):
    recorded, and a drain once start-up is done, as for a signal a moment later. It used to kill
    the process (SIGTERM -15) or end it with a KeyboardInterrupt traceback (SIGINT)."""
    port = free_port()
    config_path = tmp_path / "pgcat.toml"
    config_path.write_text(dump_config(local_config(pg_cluster, port)))
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "pypool", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "sqlglot" in line:  # imported by pypool.app, before the event loop and its handlers
                break
        assert any("sqlglot" in line for line in seen), "".join(seen[-20:])
        proc.send_signal(sig)
        out = proc.stderr.read()
        assert proc.wait(30) == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "listening on" in out and f"shutting down ({sig.name})" in out and "pypool stopped" in out, out[-3000:]
    assert "Traceback" not in out


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_pooler_with_a_missing_or_bad_config_exits_with_the_reason(tmp_path):
    out = pypool_cli(str(tmp_path / "absent.toml"))
    assert out.returncode == 2 and f"{tmp_path / 'absent.toml'}: cannot read config file" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[general]\nport = 0\n")
    out = pypool_cli(str(bad), "--log-format", "json")
    assert out.returncode == 2 and "general.port" in out.stderr and '"level": "error"' in out.stderr


def test_help_lists_the_commands_and_explains_each_action():
    top = pypool_cli("--help")
    assert top.returncode == 0
    for text in ("CONFIG", "config", "cluster", "--log-level", "--log-format", "--version"):
        assert text in top.stdout, text
    assert pypool_cli("-h").stdout == top.stdout
    cluster_help = pypool_cli("cluster", "--help")
    assert cluster_help.returncode == 0 and cluster_help.stdout.startswith("usage: pypool cluster")
    for action in ("up", "down", "status", "destroy"):
        line = next(li for li in cluster_help.stdout.splitlines() if li.strip().startswith(action + " "))
        assert len(line.split()) > 3, f"no explanation for `cluster {action}`: {line!r}"
    up_help = pypool_cli("cluster", "up", "--help")
    assert "--data-dir" in up_help.stdout and "--timeout" in up_help.stdout and "base backup" in up_help.stdout
    check_help = pypool_cli("config", "check", "--help")
    assert check_help.returncode == 0 and check_help.stdout.startswith("usage: pypool config check")
    assert "the PgCat-format TOML file to check" in check_help.stdout
    assert pypool_cli("cluster").returncode == 2 and "ACTION" in pypool_cli("cluster").stderr


def test_version_flags():
    for flag in ("-V", "--version"):
        out = pypool_cli(flag)
        assert out.returncode == 0 and out.stdout.strip() == f"pypool {__version__}"


def _run_until_logged(config_path: Path, port: int, args: list[str], env: dict, wanted: str, log_path: Path) -> str:
    """Run the pooler until it listens and ``wanted`` appears in its log, stop it with SIGINT, return the log."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pypool", str(config_path), *args],
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log_path)
        wait_for(lambda: wanted in log_path.read_text() or proc.poll() is not None, 30, repr(wanted))
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log_path.read_text()


def _config_with_a_dead_replica(pg_cluster, tmp_path: Path) -> tuple[Path, int, int]:
    port, dead = free_port(), free_port()
    config = local_config(pg_cluster, port)
    config["pools"][DATABASE]["shards"]["0"]["servers"].append(["127.0.0.1", dead, "replica"])
    path = tmp_path / "pgcat.toml"
    path.write_text(dump_config(config))
    return path, port, dead


@pytest.mark.parametrize("args, env", [
    (["-l", "warn", "-F", "structured"], {}),
    (["--log-level", "WARN", "--log-format", "structured"], {}),
    ([], {"LOG_LEVEL": "warn", "LOG_FORMAT": "structured"}),
    ([], {"PYPOOL_LOG_LEVEL": "warning", "PYPOOL_LOG_FORMAT": "json", "LOG_LEVEL": "debug"}),
    (["-l", "warning", "-F", "json", "--no-color"], {"LOG_LEVEL": "debug", "LOG_FORMAT": "text"}),
], ids=["pgcat-short-flags", "pgcat-long-flags", "pgcat-env", "pypool-env-wins", "flags-win"])
def test_pgcat_log_flags_values_and_variables(pg_cluster, tmp_path, args, env):
    """PgCat's `-l warn -F structured` and LOG_LEVEL/LOG_FORMAT mean warnings and up, one JSON object a line."""
    path, port, dead = _config_with_a_dead_replica(pg_cluster, tmp_path)
    env = {"PYPOOL_LOG_LEVEL": "", "PYPOOL_LOG_FORMAT": "", "LOG_LEVEL": "", "LOG_FORMAT": "", **env}
    text = _run_until_logged(path, port, args, env, "is unreachable", tmp_path / "pypool.log")
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert lines and {entry["level"] for entry in lines} <= {"warning", "error"}, text
    assert any(f"127.0.0.1:{dead}" in entry["msg"] and "unreachable" in entry["msg"] for entry in lines), text


def test_bad_log_level_is_refused_with_the_reason(tmp_path):
    out = pypool_cli("-l", "loud", str(tmp_path / "x.toml"))
    assert out.returncode == 2 and "invalid log level: 'loud'" in out.stderr
    out = pypool_cli(str(tmp_path / "x.toml"), env={"LOG_FORMAT": "fancy", "PYPOOL_LOG_FORMAT": ""})
    assert out.returncode != 0 and "$LOG_FORMAT: invalid value 'fancy'" in out.stderr


def test_startup_log_describes_the_config_and_warns_about_bad_servers(pg_cluster, tmp_path):
    path, port, dead = _config_with_a_dead_replica(pg_cluster, tmp_path)
    config = tomllib.loads(path.read_text())
    wrong = "not-the-password-9f3c"
    config["pools"]["other"] = copy.deepcopy(config["pools"][DATABASE])
    config["pools"]["other"]["pool_mode"] = "session"
    config["pools"]["other"]["users"]["0"]["password"] = wrong
    config["pools"]["other"]["shards"]["0"]["servers"] = [["127.0.0.1", pg_cluster[0].port, "primary"]]
    path.write_text(dump_config(config))
    text = _run_until_logged(path, port, ["--log-level", "info"], {}, "refuses the login", tmp_path / "pypool.log")
    assert f"pypool {__version__} starting with config {path}" in text
    assert f'pool "{DATABASE}": transaction mode' in text and 'pool "other": session mode' in text
    servers = config["pools"][DATABASE]["shards"]["0"]["servers"]
    assert f'pool "{DATABASE}" shard 0: database {DATABASE} on ' + ", ".join(
        f"{h}:{p} ({r})" for h, p, r in servers) in text
    assert f"127.0.0.1:{dead} (replica of pool \"{DATABASE}\") is unreachable" in text
    assert (f'127.0.0.1:{pg_cluster[0].port} (primary of pool "other") refuses the login of user {USER}'
            in text)
    assert f'127.0.0.1:{pg_cluster[1].port} (replica of pool "{DATABASE}") accepts user {USER}' in text
    assert wrong not in text and PASSWORD not in text
    # The probe runs beside start-up: the listener came up, and the pooler stopped cleanly.
    assert "listening on" in text and "pypool stopped" in text


def test_config_init_from_a_config_takes_the_credentials_from_the_env_file(tmp_path):
    """What Docker Compose runs: config/pgcat.simple.toml with the credentials of docker/.env."""
    simple = Path(__file__).parents[2] / "config" / "pgcat.simple.toml"
    env_file = tmp_path / ".env"
    env_file.write_text('POSTGRESQL_USERNAME=alice\nPOSTGRESQL_PASSWORD=\'s3"cr\\et\'\nPOSTGRESQL_DATABASE=shop\n')
    written = tmp_path / "pgcat.toml"
    out = pypool_cli("config", "init", "--from", str(simple), "--env-file", str(env_file), "-o", str(written),
                     env={"POSTGRESQL_USERNAME": None, "POSTGRESQL_PASSWORD": None, "POSTGRESQL_DATABASE": None})
    assert out.returncode == 0, out.stderr
    config, original = tomllib.loads(written.read_text()), tomllib.loads(simple.read_text())
    assert list(config["pools"]) == ["shop"]
    user = config["pools"]["shop"]["users"]["0"]
    assert (user["username"], user["password"]) == ("alice", 's3"cr\\et')
    shard = config["pools"]["shop"]["shards"]["0"]
    assert shard == {**original["pools"]["postgres"]["shards"]["0"], "database": "shop"}
    assert config["general"] == original["general"]
    assert pypool_cli("config", "check", str(written)).returncode == 0
    out = pypool_cli("config", "init", "--from", str(tmp_path / "absent.toml"))
    assert out.returncode == 1 and "absent.toml" in out.stderr
