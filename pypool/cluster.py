"""A local replicated PostgreSQL 15 cluster for development, tests and benchmarks.

``pypool cluster up|down|status|destroy [--data-dir D]`` runs the same topology
as the Compose file, from the PostgreSQL binaries installed on this machine:

* ``pg1``: the primary, on 127.0.0.1:5433 (env ``PG1_PORT``),
* ``pg2``, ``pg3``: streaming replicas on 5434 / 5435 (``PG2_PORT``, ``PG3_PORT``).

Layout: ``<dir>/pg1``, ``<dir>/pg2``, ``<dir>/pg3``, where ``<dir>`` is the
``--data-dir`` argument, env ``PYPOOL_CLUSTER_DIR`` or ``/tmp/pypool-cluster``.
Each node directory is that node's PGDATA; it also holds the node's unix socket
and its log file (``postgresql.log``).

PostgreSQL refuses to run as root. When this process is root, every server
binary (initdb, pg_ctl, pg_basebackup) runs as the ``postgres`` OS user through
``runuser``, and the cluster directory is owned by that user. ``psql`` queries go
over TCP to 127.0.0.1 with the superuser's password and run as the caller.

The node roles are not fixed: after a failover test promotes ``pg2``, ``up()``
and :func:`status` find the primary by asking the servers (and, for stopped
nodes, by their ``standby.signal`` files and timelines).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "ClusterError",
    "Node",
    "nodes",
    "ensure_postgres_binaries",
    "up",
    "down",
    "destroy",
    "status",
    "start_node",
    "stop_node",
    "kill_node",
    "promote_node",
    "rebuild_replica",
    "psql_dsn",
    "run_sql",
    "main",
]

DEFAULT_BINDIR = Path("/usr/lib/postgresql/15/bin")
DEFAULT_DATA_DIR = Path("/tmp/pypool-cluster")
OS_USER = "postgres"
LOG_NAME = "postgresql.log"
NODE_CONF = "pypool_node.conf"
COMMON_CONF = "pypool_common.conf"

# (name, env var for the port, default port), in the Compose file's order.
_NODE_SPECS = (("pg1", "PG1_PORT", 5433), ("pg2", "PG2_PORT", 5434), ("pg3", "PG3_PORT", 5435))


class ClusterError(RuntimeError):
    """A cluster operation failed; the message says which and shows the log tail."""

    # Not a PoolerError: only the `pypool cluster` command line sees it, never a client.


@dataclass(frozen=True)
class Node:
    name: str
    port: int
    data_dir: Path  # the node's PGDATA; also holds its socket and log file

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def socket_dir(self) -> Path:
        return self.data_dir


# --------------------------------------------------------------------------
# configuration from the environment (read at call time, so tests can patch it)


def _credentials() -> dict[str, str]:
    env = os.environ
    return {
        "user": env.get("POSTGRESQL_USERNAME") or "postgres",
        "password": env.get("POSTGRESQL_PASSWORD") or "mysecretpassword",
        "database": env.get("POSTGRESQL_DATABASE") or "postgres",
        "repl_user": env.get("POSTGRESQL_REPLICATION_USER") or "repl_user",
        "repl_password": env.get("POSTGRESQL_REPLICATION_PASSWORD") or "repl_password",
    }


def _base_dir(data_dir: Path | str | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get("PYPOOL_CLUSTER_DIR") or DEFAULT_DATA_DIR
    return Path(data_dir).absolute()


def _port_from_env(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ClusterError(f"{var}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ClusterError(f"{var}={port} is out of range")
    return port


def nodes(data_dir: Path | str | None = None) -> list[Node]:
    """pg1, pg2, pg3 in that order, with ports from PG1_PORT.. (read now)."""
    base = _base_dir(data_dir)
    return [Node(name, _port_from_env(var, default), base / name) for name, var, default in _NODE_SPECS]


def _node(name: str, data_dir: Path | str | None) -> Node:
    for node in nodes(data_dir):
        if node.name == name:
            return node
    raise ClusterError(f"unknown node {name!r} (expected one of pg1, pg2, pg3)")


def psql_dsn(node: Node) -> str:
    """libpq URI for the node on 127.0.0.1 with the superuser's credentials."""
    creds = _credentials()
    user = urllib.parse.quote(creds["user"], safe="")
    password = urllib.parse.quote(creds["password"], safe="")
    database = urllib.parse.quote(creds["database"], safe="")
    return f"postgresql://{user}:{password}@127.0.0.1:{node.port}/{database}"


# --------------------------------------------------------------------------
# binaries, the OS user, running commands


def _bindir_candidates() -> list[Path]:
    found: list[Path] = []
    env_dir = os.environ.get("PG_BINDIR")
    if env_dir:
        found.append(Path(env_dir))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                found.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    found.append(DEFAULT_BINDIR)
    return found


def _has_server_binaries(bindir: Path) -> bool:
    return all((bindir / b).is_file() for b in ("initdb", "pg_ctl", "pg_basebackup", "postgres"))


def _find_bindir() -> Path | None:
    for candidate in _bindir_candidates():
        if _has_server_binaries(candidate):
            return candidate
    return None


def _quiet(step: str) -> None:
    pass


def ensure_postgres_binaries(progress: Callable[[str], None] = _quiet) -> Path:
    """Return the directory holding initdb/pg_ctl/...; install PostgreSQL 15 if missing."""
    bindir = _find_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0:
        raise ClusterError(
            "PostgreSQL 15 server binaries not found (looked in PG_BINDIR, `pg_config --bindir`, "
            f"{DEFAULT_BINDIR}); install them with: apt-get install -y postgresql-15 postgresql-client-15"
        )
    # Keep Debian from starting its own cluster on 5432 while installing.
    progress("PostgreSQL 15 not found: installing postgresql-15 with apt-get (a minute or two)")
    policy = Path("/usr/sbin/policy-rc.d")
    had_policy = policy.exists()
    if not had_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "postgresql-15", "postgresql-client-15"],
        ):
            progress(f"running `{' '.join(cmd)}`")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise ClusterError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{_tail_text(proc.stderr)}")
    finally:
        if not had_policy:
            policy.unlink(missing_ok=True)
    bindir = _find_bindir()
    if bindir is None:
        raise ClusterError(f"installed postgresql-15 but found no server binaries in {DEFAULT_BINDIR}")
    return bindir


def _as_root() -> bool:
    return os.geteuid() == 0


def _ensure_os_user() -> None:
    if not _as_root():
        return
    try:
        pwd.getpwnam(OS_USER)
        return
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/sh", OS_USER],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and "already exists" not in proc.stderr:
        raise ClusterError(f"could not create OS user {OS_USER!r}: {proc.stderr.strip()}")


def _chown_to_os_user(path: Path) -> None:
    if _as_root():
        pw = pwd.getpwnam(OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _server_cmd(argv: list[str]) -> list[str]:
    """Prefix a server binary command so that it runs as the postgres OS user when we are root."""
    if _as_root():
        return ["runuser", "-u", OS_USER, "--", *argv]
    return argv


def _clean_env(**extra: str) -> dict[str, str]:
    # Drop the caller's libpq settings (PGHOST, PGSSLMODE, PGSERVICE, ...) so they
    # cannot redirect our commands; keep our own PG_BINDIR-style names.
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PG") and not k.startswith("PG_"))}
    env.update(extra)
    return env


# A conninfo's password as PostgreSQL logs it (e.g. "parameter primary_conninfo changed to ...").
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s\"]+)")


def _tail_text(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of a server's output or log, with any conninfo password masked."""
    return _CONNINFO_PASSWORD.sub(r"\1***", "\n".join(text.strip().splitlines()[-lines:]))


def _log_tail(node: Node, lines: int = 30) -> str:
    try:
        text = node.log_file.read_text(errors="replace")
    except OSError:
        return f"(no log file at {node.log_file})"
    tail = _tail_text(text, lines)
    return f"--- last lines of {node.log_file} ---\n{tail}" if tail else f"({node.log_file} is empty)"


def _run_server(
    node: Node | None,
    what: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run initdb/pg_ctl/pg_basebackup (as the postgres user if root); raise ClusterError on failure."""
    cmd = _server_cmd(argv)
    cwd = str(node.data_dir.parent) if node is not None and node.data_dir.parent.is_dir() else "/"
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env or _clean_env(), timeout=timeout, cwd=cwd
        )
    except subprocess.TimeoutExpired:
        detail = f"\n{_log_tail(node)}" if node is not None else ""
        raise ClusterError(f"{what}: `{Path(argv[0]).name}` timed out after {timeout:.0f}s{detail}") from None
    if check and proc.returncode != 0:
        parts = [f"{what}: `{Path(argv[0]).name}` exited with {proc.returncode}"]
        output = _tail_text(proc.stderr + proc.stdout)
        if output:
            parts.append(output)
        if node is not None:
            parts.append(_log_tail(node))
        raise ClusterError("\n".join(parts))
    return proc


def _psql_bin() -> str:
    found = shutil.which("psql")
    if found:
        return found
    bindir = _find_bindir()
    if bindir is not None and (bindir / "psql").is_file():
        return str(bindir / "psql")
    raise ClusterError("psql not found on PATH")


def _psql(node: Node, sql: str, *, dbname: str = "postgres", timeout: float = 15) -> subprocess.CompletedProcess[str]:
    creds = _credentials()
    env = _clean_env(PGPASSWORD=creds["password"], PGCONNECT_TIMEOUT="3", PGSSLMODE="disable", PGAPPNAME="pypool-cluster")
    cmd = [
        _psql_bin(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
        "-h", "127.0.0.1", "-p", str(node.port), "-U", creds["user"], "-d", dbname,
    ]
    # SQL goes through stdin so statements carrying passwords never show in `ps`.
    return subprocess.run(cmd, input=sql, capture_output=True, text=True, env=env, timeout=timeout, cwd="/")


def run_sql(node: Node, sql: str, *, dbname: str | None = None, timeout: float = 15) -> str:
    """Run SQL with psql on the node as the superuser; return stdout (unaligned, tuples only)."""
    db = dbname if dbname is not None else _credentials()["database"]
    try:
        proc = _psql(node, sql, dbname=db, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{node.name}: psql timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise ClusterError(f"{node.name} (port {node.port}): psql failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _try_sql(node: Node, sql: str, timeout: float = 5) -> str | None:
    try:
        proc = _psql(node, sql, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


# --------------------------------------------------------------------------
# locking: several engineers' test sessions may call up() on the same directory


_lock_state = threading.local()
_thread_lock = threading.RLock()


def _lock_path(base: Path) -> Path:
    return base.parent / f".{base.name}.lock"


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    held: dict[str, int] = getattr(_lock_state, "held", None) or {}
    _lock_state.held = held
    key = str(base)
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    base.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(_lock_path(base), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            held[key] = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# node state on disk and in the process table


def _is_initialised(node: Node) -> bool:
    return (node.data_dir / "PG_VERSION").is_file()


def _is_standby_on_disk(node: Node) -> bool:
    return (node.data_dir / "standby.signal").exists()


def _postmaster_pid(node: Node) -> int | None:
    try:
        first = (node.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    # "pid (comm) S ...": a zombie (Z) or dead (X) postmaster is gone for our purposes.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _running_pid(node: Node) -> int | None:
    pid = _postmaster_pid(node)
    if pid is not None and _pid_alive(pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if b"postgres" in cmdline or b"postmaster" in cmdline:
            return pid
    return None


def _is_running(node: Node) -> bool:
    return _running_pid(node) is not None


def _in_recovery(node: Node) -> bool | None:
    out = _try_sql(node, "SELECT pg_is_in_recovery()")
    if out == "t":
        return True
    if out == "f":
        return False
    return None


def _timeline(node: Node) -> int:
    """The node's timeline from pg_controldata (0 if unknown)."""
    bindir = _find_bindir()
    if bindir is None:
        return 0
    proc = _run_server(node, "pg_controldata", [str(bindir / "pg_controldata"), "-D", str(node.data_dir)], check=False, timeout=30)
    for line in proc.stdout.splitlines():
        if line.startswith("Latest checkpoint's TimeLineID:"):
            try:
                return int(line.split(":", 1)[1])
            except ValueError:
                return 0
    return 0


def _wait(predicate, timeout: float, what: str, node: Node | None = None, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{_log_tail(node)}" if node is not None else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# creating nodes


def _prepare_base(base: Path) -> None:
    _ensure_os_user()
    base.mkdir(parents=True, exist_ok=True)
    if _as_root():
        _chown_to_os_user(base)
        base.chmod(0o755)
        probe = subprocess.run(["runuser", "-u", OS_USER, "--", "test", "-w", str(base), "-a", "-x", str(base)])
        if probe.returncode != 0:
            raise ClusterError(
                f"the {OS_USER!r} OS user cannot use {base}: every parent directory must be "
                "traversable (chmod o+x) by it"
            )


def _write_common_conf(node: Node) -> None:
    conf = f"""\
# Written by pypool.cluster; shared by all nodes (pg_basebackup copies it).
listen_addresses = '127.0.0.1'
max_connections = 300
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
password_encryption = 'scram-sha-256'

# Streaming replication.
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '1GB'          # replicas that fall behind can still catch up from the primary
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s

# THROWAWAY DEV CLUSTER: durability is switched off for speed. A crash of the
# machine can corrupt these data directories; never use these settings for data
# you want to keep.
fsync = off
synchronous_commit = off
full_page_writes = off

logging_collector = off        # pg_ctl -l writes the node's log file
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
"""
    (node.data_dir / COMMON_CONF).write_text(conf)


def _write_node_conf(node: Node) -> None:
    """Per-node settings: port, socket directory, cluster_name (= replication application_name)."""
    conf = f"""\
# Written by pypool.cluster for node {node.name}; rewritten on every start.
port = {node.port}
unix_socket_directories = '{node.socket_dir}'
cluster_name = '{node.name}'
"""
    path = node.data_dir / NODE_CONF
    path.write_text(conf)
    _chown_to_os_user(path)


def _write_hba(node: Node) -> None:
    hba = """\
# Written by pypool.cluster.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   scram-sha-256
host    all          all   ::1/128        scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
host    replication  all   ::1/128        scram-sha-256
"""
    (node.data_dir / "pg_hba.conf").write_text(hba)


def _init_primary(node: Node, bindir: Path) -> None:
    creds = _credentials()
    if node.data_dir.exists() and any(node.data_dir.iterdir()):
        raise ClusterError(f"{node.data_dir} exists, is not empty and holds no PostgreSQL cluster; remove it")
    if node.data_dir.exists():
        node.data_dir.rmdir()
    # The superuser's password goes through a file only the postgres user can read.
    fd, pwfile = tempfile.mkstemp(prefix=".pwfile-", dir=node.data_dir.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(creds["password"] + "\n")
        _chown_to_os_user(Path(pwfile))
        os.chmod(pwfile, 0o600)
        _run_server(
            node,
            f"initdb of {node.name}",
            [
                str(bindir / "initdb"), "-D", str(node.data_dir), "-U", creds["user"],
                f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--locale=C", "--no-sync",
            ],
        )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pwfile)
    _write_common_conf(node)
    _write_hba(node)
    conf = node.data_dir / "postgresql.conf"
    with conf.open("a") as fh:
        fh.write(f"\n# pypool.cluster settings\ninclude '{COMMON_CONF}'\ninclude_if_exists '{NODE_CONF}'\n")
    _write_node_conf(node)
    for name in (COMMON_CONF, "pg_hba.conf"):
        _chown_to_os_user(node.data_dir / name)


def _setup_primary(node: Node) -> None:
    """Idempotent: the replication role, the application database, pg_stat_statements."""
    creds = _credentials()
    repl_user, db = creds["repl_user"], creds["database"]
    role_sql = f"""
DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {_sql_literal(repl_user)}) THEN
    CREATE ROLE {_sql_ident(repl_user)} WITH REPLICATION LOGIN;
  END IF;
END
$do$;
ALTER ROLE {_sql_ident(repl_user)} WITH REPLICATION LOGIN PASSWORD {_sql_literal(creds['repl_password'])};
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
"""
    run_sql(node, role_sql, dbname="postgres")
    if db != "postgres":
        exists = run_sql(node, f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(db)}", dbname="postgres")
        if exists != "1":
            run_sql(node, f"CREATE DATABASE {_sql_ident(db)} OWNER {_sql_ident(creds['user'])}", dbname="postgres")
        run_sql(node, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;", dbname=db)


def _basebackup(node: Node, primary: Node, bindir: Path) -> None:
    creds = _credentials()
    if node.data_dir.exists():
        shutil.rmtree(node.data_dir)
    env = _clean_env(PGPASSWORD=creds["repl_password"], PGSSLMODE="disable", PGCONNECT_TIMEOUT="5")
    _run_server(
        node,
        f"pg_basebackup of {node.name} from {primary.name}",
        [
            str(bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
            "-U", creds["repl_user"], "-D", str(node.data_dir), "-R", "-X", "stream",
            "--checkpoint=fast", "--no-sync", "-w",
        ],
        env=env,
        timeout=300,
    )
    # The copy carries the primary's log file and socket lock file: not this node's.
    for leftover in [node.log_file, *node.data_dir.glob(".s.PGSQL.*")]:
        with contextlib.suppress(OSError):
            leftover.unlink()
    _write_node_conf(node)


# --------------------------------------------------------------------------
# starting, stopping, signalling


def _start(node: Node, bindir: Path, timeout: float = 60) -> None:
    if not _is_initialised(node):
        raise ClusterError(f"{node.name}: no cluster in {node.data_dir}; run `pypool cluster up` first")
    if _is_running(node):
        return
    _write_node_conf(node)
    # After a kill -9 the old postmaster's children may hold shared memory for a moment.
    deadline = time.monotonic() + timeout
    while True:
        _remove_stale_lock_files(node)
        remaining = max(5.0, deadline - time.monotonic())
        proc = _run_server(
            node,
            f"start of {node.name}",
            [str(bindir / "pg_ctl"), "start", "-w", "-t", str(int(remaining)), "-D", str(node.data_dir),
             "-l", str(node.log_file)],
            check=False,
            timeout=remaining + 10,
        )
        if proc.returncode == 0:
            return
        log_tail = _log_tail(node, 4)
        transient = "shared memory block is still in use" in log_tail or "already exists" in log_tail
        if not transient or time.monotonic() >= deadline:
            raise ClusterError(
                f"start of {node.name} (port {node.port}) failed: {_tail_text(proc.stderr + proc.stdout)}\n{_log_tail(node)}"
            )
        time.sleep(0.5)


def _remove_stale_lock_files(node: Node) -> None:
    """Drop postmaster.pid / socket lock files left by a killed postmaster.

    PostgreSQL clears a stale lock file itself when its pid is gone, but here
    PID 1 reaps orphans lazily: a killed postmaster lingers as a zombie, which
    kill(pid, 0) still reports as alive, and the new postmaster would refuse
    to start ("lock file already exists").
    """
    for lock in [node.data_dir / "postmaster.pid", *node.socket_dir.glob(".s.PGSQL.*.lock")]:
        try:
            pid = int(lock.read_text().split("\n", 1)[0].strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            with contextlib.suppress(OSError):
                lock.unlink()


def _stop(node: Node, bindir: Path, mode: str = "fast", timeout: float = 60) -> None:
    if not _is_initialised(node) or not _is_running(node):
        return
    proc = _run_server(
        node,
        f"stop of {node.name}",
        [str(bindir / "pg_ctl"), "stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(node.data_dir)],
        check=False,
        timeout=timeout + 10,
    )
    if proc.returncode != 0 and _is_running(node):
        raise ClusterError(f"stop of {node.name} failed: {_tail_text(proc.stderr + proc.stdout)}\n{_log_tail(node)}")
    pid = _postmaster_pid(node)
    if pid is not None:
        _wait(lambda: not _pid_alive(pid), 10, f"{node.name} postmaster {pid} to exit", node)


def start_node(name: str, data_dir: Path | str | None = None) -> None:
    """Start one node (no-op if it is running); waits until it accepts connections."""
    node = _node(name, data_dir)
    bindir = ensure_postgres_binaries()
    with _locked(_base_dir(data_dir)):
        _start(node, bindir)


def stop_node(name: str, data_dir: Path | str | None = None, mode: str = "fast") -> None:
    """Stop one node with pg_ctl (mode smart|fast|immediate); no-op if it is not running."""
    if mode not in ("smart", "fast", "immediate"):
        raise ClusterError(f"unknown shutdown mode {mode!r}")
    node = _node(name, data_dir)
    bindir = ensure_postgres_binaries()
    with _locked(_base_dir(data_dir)):
        _stop(node, bindir, mode)


def kill_node(name: str, data_dir: Path | str | None = None, sig: int = signal.SIGKILL) -> None:
    """Send a signal to the node's postmaster (pid from postmaster.pid).

    With SIGKILL this waits until the postmaster is gone, so the caller sees the
    crash at once; its backends notice and exit shortly after.
    """
    node = _node(name, data_dir)
    pid = _running_pid(node)
    if pid is None:
        raise ClusterError(f"{node.name} is not running (no live postmaster in {node.data_dir / 'postmaster.pid'})")
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        _wait(lambda: not _pid_alive(pid), 10, f"{node.name} postmaster {pid} to die")


def promote_node(name: str, data_dir: Path | str | None = None, timeout: float = 60) -> None:
    """pg_ctl promote a replica and wait until it is out of recovery (read-write)."""
    node = _node(name, data_dir)
    bindir = ensure_postgres_binaries()
    with _locked(_base_dir(data_dir)):
        if not _is_running(node):
            raise ClusterError(f"cannot promote {node.name}: it is not running")
        if _in_recovery(node) is False:
            return
        _run_server(
            node,
            f"promote of {node.name}",
            [str(bindir / "pg_ctl"), "promote", "-w", "-t", str(int(timeout)), "-D", str(node.data_dir)],
            timeout=timeout + 10,
        )
        _wait(lambda: _in_recovery(node) is False, timeout, f"{node.name} to leave recovery", node)


# --------------------------------------------------------------------------
# topology


def _find_primary(all_nodes: list[Node]) -> Node | None:
    """The node that is (or should be) the primary; None if nothing is initialised."""
    initialised = [n for n in all_nodes if _is_initialised(n)]
    if not initialised:
        return None
    live_primaries = [n for n in initialised if _is_running(n) and _in_recovery(n) is False]
    if len(live_primaries) == 1:
        return live_primaries[0]
    if len(live_primaries) > 1:
        # Two read-write servers (a failover test left the old primary running):
        # the one on the newest timeline wins; the other is rebuilt as a replica.
        return max(live_primaries, key=lambda n: (_timeline(n), -all_nodes.index(n)))
    candidates = [n for n in initialised if not _is_standby_on_disk(n)]
    if not candidates:
        raise ClusterError(
            "every initialised node is a standby: no primary to start. "
            "Promote one with promote_node() or recreate with `pypool cluster destroy` + `up`."
        )
    if len(candidates) == 1:
        return candidates[0]
    return max(candidates, key=lambda n: (_timeline(n), -all_nodes.index(n)))


def _streaming_replicas(primary: Node) -> set[str]:
    out = _try_sql(primary, "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
    return set(out.split()) if out else set()


def _primary_port_of(replica: Node) -> int | None:
    conninfo = _try_sql(replica, "SHOW primary_conninfo")
    if not conninfo:
        return None
    for item in conninfo.split():
        if item.startswith("port="):
            try:
                return int(item.split("=", 1)[1].strip("'"))
            except ValueError:
                return None
    return None


def _point_replica_at(replica: Node, primary: Node) -> None:
    """Make a running replica follow `primary` (primary_conninfo is reloadable since PG 13)."""
    if _primary_port_of(replica) == primary.port:
        return
    creds = _credentials()
    conninfo = (
        f"host=127.0.0.1 port={primary.port} user={creds['repl_user']} "
        f"password={_conninfo_value(creds['repl_password'])} application_name={replica.name} sslmode=disable"
    )
    run_sql(
        replica,
        f"ALTER SYSTEM SET primary_conninfo = {_sql_literal(conninfo)};\nSELECT pg_reload_conf();",
        dbname="postgres",
    )


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _rebuild(node: Node, primary: Node, bindir: Path, timeout: float, progress: Callable[[str], None] = _quiet) -> None:
    _stop(node, bindir, "immediate")
    progress(f"base backup of {node.name} from {primary.name} (pg_basebackup)")
    _basebackup(node, primary, bindir)
    progress(f"starting {node.name} (replica) on 127.0.0.1:{node.port}")
    _start(node, bindir, timeout=timeout)


def up(data_dir: Path | str | None = None, timeout: float = 120,
       progress: Callable[[str], None] = _quiet) -> list[Node]:
    """Initialise what is missing, start what is stopped, wait for the primary and streaming replicas.

    Idempotent: on a running, healthy cluster it only checks and returns.
    ``progress`` is told each step as it starts (the command line prints them).
    """
    deadline = time.monotonic() + timeout
    remaining = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
    base = _base_dir(data_dir)
    all_nodes = nodes(base)
    bindir = ensure_postgres_binaries(progress)
    with _locked(base):
        _prepare_base(base)
        primary = _find_primary(all_nodes)
        if primary is None:
            primary = all_nodes[0]
            progress(f"initdb of {primary.name} in {primary.data_dir}")
            _init_primary(primary, bindir)
        _starting(primary, "primary", progress)
        _start(primary, bindir, timeout=remaining())
        _wait(lambda: _in_recovery(primary) is False, remaining(), f"{primary.name} to accept connections", primary)
        progress(f"{primary.name} accepts connections; checking the replication role, database and extensions")
        _setup_primary(primary)

        replicas = [n for n in all_nodes if n != primary]
        for replica in replicas:
            if not _is_initialised(replica) or not _is_standby_on_disk(replica):
                # Missing, or a former primary that a failover left behind: copy afresh.
                _rebuild(replica, primary, bindir, remaining(), progress)
            else:
                _starting(replica, "replica", progress)
                _start(replica, bindir, timeout=remaining())
                with contextlib.suppress(ClusterError):
                    _wait(lambda: _in_recovery(replica) is not None, min(30.0, remaining()), f"{replica.name}")
                    _point_replica_at(replica, primary)

        # Wait for both replicas to stream; one that cannot follow the primary
        # (diverged timeline after a failover) gets one fresh base backup.
        rebuilt: set[str] = set()
        progress(f"waiting for {', '.join(r.name for r in replicas)} to stream from {primary.name}")
        while True:
            streaming = _streaming_replicas(primary)
            missing = [r for r in replicas if r.name not in streaming]
            if not missing:
                progress("cluster ready")
                return all_nodes
            now = time.monotonic()
            if now >= deadline:
                raise ClusterError(
                    f"timed out after {timeout:.0f}s waiting for replicas {', '.join(r.name for r in missing)} "
                    f"to stream from {primary.name}\n" + "\n".join(_log_tail(r) for r in missing)
                )
            for replica in missing:
                if not _is_running(replica):
                    _start(replica, bindir, timeout=remaining())
            stuck_for = now - (deadline - timeout)
            if stuck_for > min(20.0, timeout / 3):
                for replica in missing:
                    if replica.name not in rebuilt:
                        rebuilt.add(replica.name)
                        progress(f"{replica.name} does not follow {primary.name}: copying it afresh")
                        _rebuild(replica, primary, bindir, remaining(), progress)
            time.sleep(0.2)


def _starting(node: Node, role: str, progress: Callable[[str], None]) -> None:
    if _is_running(node):
        progress(f"{node.name} ({role}) already running on 127.0.0.1:{node.port}")
    else:
        progress(f"starting {node.name} ({role}) on 127.0.0.1:{node.port}")


def rebuild_replica(name: str, data_dir: Path | str | None = None, timeout: float = 120) -> None:
    """Re-create a node as a streaming replica of the current primary (e.g. after a failover test)."""
    base = _base_dir(data_dir)
    all_nodes = nodes(base)
    node = _node(name, base)
    bindir = ensure_postgres_binaries()
    with _locked(base):
        live = [n for n in all_nodes if n != node and _is_running(n) and _in_recovery(n) is False]
        if not live:
            raise ClusterError(f"cannot rebuild {name}: no other node is a running primary")
        primary = max(live, key=_timeline) if len(live) > 1 else live[0]
        _rebuild(node, primary, bindir, timeout)
        _wait(lambda: name in _streaming_replicas(primary), timeout, f"{name} to stream from {primary.name}", node)


def down(data_dir: Path | str | None = None) -> None:
    """Stop every node (fast shutdown); keep the data."""
    base = _base_dir(data_dir)
    if not base.exists():
        return
    bindir = ensure_postgres_binaries()
    with _locked(base):
        # Replicas first, so the primary does not wait on their walsenders.
        for node in sorted(nodes(base), key=lambda n: not _is_standby_on_disk(n)):
            _stop(node, bindir, "fast")


def destroy(data_dir: Path | str | None = None) -> None:
    """Stop every node and delete the cluster directory."""
    base = _base_dir(data_dir)
    if not base.exists():
        return
    bindir = ensure_postgres_binaries()
    with _locked(base):
        for node in nodes(base):
            if _is_running(node):
                _stop(node, bindir, "immediate")
        shutil.rmtree(base)
        # The lock file next to the directory goes too (a concurrent up() that
        # waited on it simply recreates the cluster).
        with contextlib.suppress(OSError):
            _lock_path(base).unlink()


def status(data_dir: Path | str | None = None) -> list[dict]:
    """Per node: name, port, running, role ("primary"/"replica"/"down"), accepting, streaming,
    replay_lag_bytes (replicas, as seen by the primary) and replay_lag_seconds."""
    all_nodes = nodes(data_dir)
    rows: list[dict] = []
    for node in all_nodes:
        running = _is_initialised(node) and _is_running(node)
        recovery = _in_recovery(node) if running else None
        if not running:
            role = "down"
        elif recovery is None:  # running but not (yet) answering: trust the files
            role = "replica" if _is_standby_on_disk(node) else "primary"
        else:
            role = "replica" if recovery else "primary"
        rows.append({
            "name": node.name, "port": node.port, "running": running, "role": role,
            "accepting": recovery is not None, "streaming": None,
            "replay_lag_bytes": None, "replay_lag_seconds": None,
        })
    primaries = [r for r in rows if r["role"] == "primary" and r["accepting"]]
    by_name = {n.name: n for n in all_nodes}
    for prow in primaries:
        out = _try_sql(
            by_name[prow["name"]],
            "SELECT application_name, state, "
            "COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), -1)::bigint, "
            "COALESCE(EXTRACT(EPOCH FROM replay_lag), 0) FROM pg_stat_replication",
        )
        for line in (out or "").splitlines():
            app, state, lag_bytes, lag_s = line.split("|")
            for row in rows:
                if row["name"] == app and row["role"] == "replica":
                    row["streaming"] = state == "streaming"
                    row["replication_state"] = state
                    row["upstream"] = prow["name"]
                    row["replay_lag_bytes"] = int(lag_bytes) if int(lag_bytes) >= 0 else None
                    row["replay_lag_seconds"] = float(lag_s)
    for row in rows:
        if row["role"] == "replica" and row["streaming"] is None:
            row["streaming"] = False
    return rows


# --------------------------------------------------------------------------
# command line


def _print_status(rows: list[dict], out=None) -> None:
    out = out if out is not None else sys.stdout
    header = f"{'name':<6} {'port':>5}  {'role':<8} {'state':<13} {'replay lag':>16}"
    print(header, file=out)
    for row in rows:
        if row["role"] == "replica":
            state = row.get("replication_state") or ("not streaming" if row["running"] else "-")
            if row["replay_lag_bytes"] is not None:
                lag = f"{row['replay_lag_bytes']} B / {row['replay_lag_seconds']:.3f} s"
            else:
                lag = "-"
        else:
            state = "running" if row["running"] else "stopped"
            if row["running"] and not row["accepting"]:
                state = "starting"
            lag = "-"
        print(f"{row['name']:<6} {row['port']:>5}  {row['role']:<8} {state:<13} {lag:>16}", file=out)


_DESCRIPTION = ("A local PostgreSQL 15 primary (pg1, 127.0.0.1:$PG1_PORT or 5433) and two streaming replicas "
                "(pg2, pg3 on 5434, 5435) for development, tests and benchmarks. A throwaway cluster: fsync is off.")
_ACTIONS = {
    "up": ("create what is missing, start what is stopped, wait for both replicas to stream",
           "Create what is missing (installing PostgreSQL 15 with apt-get when run as root and its binaries are "
           "missing; initdb of pg1; base backups of pg2 and pg3), start what is stopped, wait until both replicas "
           "stream from the primary, then print the status table. Each step is printed as it starts. Idempotent: "
           "on a healthy running cluster it only checks."),
    "down": ("stop every node (fast shutdown), keep the data", "Stop every node (replicas first), keeping the data."),
    "status": ("print each node's port, role, state and replay lag",
               "Print one line per node: port, role (primary, replica, down), state and replay lag."),
    "destroy": ("stop every node and delete the cluster directory",
                "Stop every node at once and delete the cluster directory: all its data is lost."),
}


def add_command(commands: "argparse._SubParsersAction") -> None:
    """`pypool cluster ACTION` in the program's command line."""
    parser = commands.add_parser("cluster", help="a local primary + 2 replicas for development and tests",
                                 description=_DESCRIPTION)
    _add_actions(parser)


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    title="actions")
    for name, (summary, description) in _ACTIONS.items():
        action = actions.add_parser(name, help=summary, description=description)
        action.add_argument("--data-dir", type=Path, default=None,
                            help=f"cluster directory (default: $PYPOOL_CLUSTER_DIR or {DEFAULT_DATA_DIR})")
        if name == "up":
            action.add_argument("--timeout", type=float, default=120,
                                help="seconds to wait for the cluster (default 120)")
    parser.set_defaults(run=run_command)


def _say(step: str) -> None:
    print(f"pypool cluster: {step}", flush=True)


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            up(args.data_dir, timeout=args.timeout, progress=_say)
            _print_status(status(args.data_dir))
        elif args.action == "down":
            down(args.data_dir)
            print(f"stopped cluster in {_base_dir(args.data_dir)}")
        elif args.action == "destroy":
            destroy(args.data_dir)
            print(f"removed cluster in {_base_dir(args.data_dir)}")
        else:
            _print_status(status(args.data_dir))
    except ClusterError as exc:
        print(f"pypool cluster {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pypool cluster", description=_DESCRIPTION)
    _add_actions(parser)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
