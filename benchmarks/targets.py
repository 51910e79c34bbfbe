"""The things pgbench talks to: PostgreSQL directly, pypool, PgBouncer, PgCat.

Each pooler runs from its own generated config in a private temporary
directory, listens on a free 127.0.0.1 port and is stopped by the pid this
module started. Per-process accounting (CPU time, RSS) reads ``/proc``.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pypool.config import dump_config

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
OS_USER = "postgres"  # PgBouncer refuses to run as root


class TargetError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, alive, describe, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            time.sleep(0.2)  # let the log reach the file
            raise TargetError(f"exited before listening on {port}: {describe()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TargetError(f"did not listen on {port} within {timeout:.0f}s:\n{describe()}")


def _tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, on one line (they end up in CSV and markdown cells)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return " / ".join(line.strip() for line in text) or f"({path.name} is empty)"


# --------------------------------------------------------------------------
# /proc accounting


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


class CpuTime(NamedTuple):
    """CPU seconds a process tree has used: in its own code (user) and in the kernel (system)."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_time(root: int) -> CpuTime:
    """utime and stime of ``root`` and its descendants (threads are included in each process's figure)."""
    user = system = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        user += int(fields[11])  # fields 14 and 15 of proc(5): utime, stime
        system += int(fields[12])
    return CpuTime(user / CLK_TCK, system / CLK_TCK)


def rss_kib(root: int) -> int:
    """Sum of VmRSS (KiB) over ``root`` and its descendants."""
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------
# targets


@dataclass
class Target:
    """One thing to benchmark. ``kind`` is direct / pypool / pgbouncer / pgcat."""

    name: str
    kind: str
    label: str
    port: int = 0
    database: str = ""
    workdir: Path | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def is_pooler(self) -> bool:
        return self.kind != "direct"

    def root_pid(self) -> int | None:
        """The pooler's own process (for PgBouncer: the pid in its pidfile, not runuser's)."""
        if self.proc is None:
            return None
        if self.kind == "pgbouncer":
            try:
                return int((self.workdir / "pgbouncer.pid").read_text().strip())
            except (OSError, ValueError, TypeError):
                return None
        return self.proc.pid

    def alive(self) -> bool:
        if self.kind == "direct":
            return True
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        if self.workdir is None:
            return ""
        return _tail(self.workdir / ("pgbouncer.log" if self.kind == "pgbouncer" else "pooler.log"))

    def cpu(self) -> CpuTime | None:
        pid = self.root_pid()
        return cpu_time(pid) if pid else None

    def rss(self) -> int | None:
        pid = self.root_pid()
        return rss_kib(pid) if pid else None

    # -- lifecycle

    def start(self) -> None:
        if self.kind == "direct":
            return
        starter = {"pypool": _start_pypool_like, "pgcat": _start_pypool_like, "pgbouncer": _start_pgbouncer,
                   "floor": _start_floor}
        starter[self.kind](self)

    def ensure_running(self) -> bool:
        """Restart a pooler that died; True if it had to."""
        if self.alive():
            return False
        self.restarts += 1
        self.stop()
        self.start()
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        proc = self.proc
        if proc.poll() is None:
            pid = self.root_pid() if self.kind == "pgbouncer" else None
            try:
                if pid and pid != proc.pid:
                    os.kill(pid, signal.SIGTERM)  # pgbouncer under runuser: stop the pooler itself
                else:
                    proc.terminate()
                proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                proc.kill()
                proc.wait(5)
        self.proc = None
        log = self.extra.pop("logfile", None)
        if log is not None:
            log.close()

    def cleanup(self) -> None:
        self.stop()
        if self.workdir is not None and not self.extra.get("keep"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def direct_target(primary_port: int, database: str) -> Target:
    return Target("direct", "direct", "PostgreSQL (direct)", port=primary_port, database=database)


# -- pypool and PgCat share the config format


def pgcat_style_config(*, port: int, database: str, user: str, password: str, pool_size: int,
                       primary: tuple[str, int], replicas: list[tuple[str, int]], split: bool,
                       workers: int | str = 1, causal_reads: str | None = None) -> dict:
    """A PgCat-format config: one pool named like the database, transaction mode.

    split=False: the primary only, no query parser (a plain pooler, like PgBouncer).
    split=True: primary + replicas, the parser routes reads to the replicas and
    ``primary_reads_enabled = false`` keeps them off the primary.
    workers other than 1: pypool's worker processes (each with its share of pool_size), or "auto"
    causal_reads: pypool's key, written when given ("off", "session", "global").
    """
    servers = [[primary[0], primary[1], "primary"]]
    if split:
        servers += [[h, p, "replica"] for h, p in replicas]
    general = {"workers": workers} if workers != 1 else {}
    causal = {"causal_reads": causal_reads} if causal_reads is not None else {}
    return {
        "general": {
            **general,
            "host": "127.0.0.1",
            "port": port,
            "enable_prometheus_exporter": False,
            "prometheus_exporter_port": free_port(),
            "admin_username": "bench_admin",
            "admin_password": "bench_admin_pass",
            "log_client_connections": False,
            "log_client_disconnections": False,
        },
        "pools": {
            database: {
                "pool_mode": "transaction",
                "default_role": "any" if split else "primary",
                "query_parser_enabled": split,
                "query_parser_read_write_splitting": split,
                "primary_reads_enabled": not split,
                "load_balancing_mode": "random",
                **causal,
                "users": {"0": {"username": user, "password": password,
                                "pool_size": pool_size, "min_pool_size": 0, "statement_timeout": 0}},
                "shards": {"0": {"database": database, "servers": servers}},
            }
        },
    }


def pypool_target(name: str, label: str, *, database: str, split: bool, cfg_args: dict,
                  kind: str = "pypool", binary: str | None = None, pypool_path: Path | None = None,
                  workers: int | str = 1, causal_reads: str | None = None) -> Target:
    t = Target(name, kind, label, database=database)
    t.extra.update(split=split, cfg_args=cfg_args, binary=binary, pypool_path=pypool_path or REPO, workers=workers,
                   causal_reads=causal_reads)
    return t


def snapshot_pypool(src: Path, dest: Path) -> tuple[Path, str]:
    """Copy ``src/pypool`` to ``dest/pypool``, pure Python; return (dest, short content hash of the .py files)."""
    import hashlib

    # Not ``*.so``: a tree built with its hot path compiled (setup.py) keeps mypyc's shared library at its
    # root, outside this copy; the compiled target builds its own.
    shutil.copytree(src / "pypool", dest / "pypool", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    h = hashlib.sha256()
    for path in sorted((dest / "pypool").rglob("*.py")):
        h.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return dest, h.hexdigest()[:12]


def compiled_snapshot(src: Path, dest: Path) -> Path:
    """``src``'s pypool with its hot path compiled (setup.py, ``PYPOOL_COMPILE=1``) in ``dest``; raises TargetError."""
    snapshot_pypool(src, dest)
    for name in ("setup.py", "pyproject.toml", "README.md"):  # setuptools reads the metadata beside setup.py
        shutil.copy2(src / name, dest / name)
    build = subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=dest,
                           env=dict(os.environ, PYPOOL_COMPILE="1"), capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        raise TargetError(f"compiled build failed (pip install mypy?): {(build.stdout + build.stderr)[-400:]}")
    return dest


def check_importable(path: Path) -> str | None:
    """None if ``python -c 'import pypool.app'`` works from ``path``, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", "import pypool.app, pypool.cli"], cwd="/",
                          env=dict(os.environ, PYTHONPATH=str(path)), capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def expected_workers(workers: int | str, pool_size: int) -> int:
    """The processes pypool starts for ``workers`` (``"auto"``: one per usable core, at most pool_size)."""
    if workers == "auto":
        from pypool.config import usable_cores

        return min(usable_cores(), pool_size)
    return int(workers)


def _launch(t: Target, argv: list[str], cwd: Path, log_name: str = "pooler.log",
            env: dict[str, str] | None = None) -> None:
    """Start ``t``'s process with its output in ``log_name`` (in its workdir); return once its port answers."""
    log = open(t.workdir / log_name, "ab")  # type: ignore[operator]
    t.extra["logfile"] = log
    t.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd), env=env,
                              stdin=subprocess.DEVNULL)
    wait_for_port(t.port, t.alive, t.log_tail)


def _start_pypool_like(t: Target) -> None:
    if t.workdir is None:
        t.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{t.name}-"))
    t.port = free_port()
    cfg = pgcat_style_config(port=t.port, database=t.database, split=t.extra["split"],
                             workers=t.extra.get("workers", 1), causal_reads=t.extra.get("causal_reads"),
                             **t.extra["cfg_args"])
    cfg_path = t.workdir / "pooler.toml"
    cfg_path.write_text(dump_config(cfg))
    if t.kind == "pypool":
        # `python -m pypool CONFIG` from the snapshot taken at the start of the run
        # (see run.snapshot_pypool), so that edits made meanwhile do not leak in.
        # info: startup lines only (client logins are not logged), among them "all N workers ready"
        argv = [sys.executable, "-m", "pypool", str(cfg_path), "--log-level", "info"]
        env = dict(os.environ, PYTHONPATH=str(t.extra["pypool_path"]))
    else:
        argv = [t.extra["binary"], str(cfg_path)]
        env = dict(os.environ, RUST_LOG="warn")
    _launch(t, argv, t.workdir, env=env)
    workers = expected_workers(t.extra.get("workers", 1), t.extra["cfg_args"]["pool_size"])
    if t.kind == "pypool" and workers > 1:
        # The port answers once the first worker listens; measure only when all of them do.
        ready = f"all {workers} workers ready"
        deadline = time.monotonic() + 30
        while ready not in (t.workdir / "pooler.log").read_text(errors="replace"):
            if not t.alive() or time.monotonic() > deadline:
                raise TargetError(f"not all {workers} workers became ready: {t.log_tail()}")
            time.sleep(0.1)


# -- the floor: benchmarks/floor_relay.py, the cheapest uvloop relay (no pooling, no framing)


def floor_target(primary: tuple[str, int], database: str) -> Target:
    t = Target("floor", "floor", "uvloop byte relay (floor)", database=database)
    t.extra["primary"] = primary
    return t


def _start_floor(t: Target) -> None:
    if t.workdir is None:
        t.workdir = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    t.port = free_port()
    _launch(t, [sys.executable, "-m", "benchmarks.floor_relay", "--listen-port", str(t.port),
                "--server-port", str(t.extra["primary"][1])], REPO)


# -- PgBouncer


def installed_binary(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin (Debian puts daemons there, often off a non-root PATH)."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)


def pgbouncer_binary() -> str | None:
    return installed_binary("pgbouncer")


def install_debian_package(package: str, binary: str, log=print) -> str:
    """apt-get install ``package`` without letting Debian start its own service; the path of ``binary``."""
    found = installed_binary(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise TargetError(f"{package} is not installed and we are not root to apt-get install it")
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
            log(f"$ {' '.join(cmd)}")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                raise TargetError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    finally:
        if created:
            policy.unlink(missing_ok=True)
    found = installed_binary(binary)
    if not found:
        raise TargetError(f"installed {package} but found no {binary} binary")
    return found


def install_pgbouncer(log=print) -> str:
    return install_debian_package("pgbouncer", "pgbouncer", log)


def pgbouncer_target(*, database: str, user: str, scram_verifier: str, primary: tuple[str, int],
                     pool_size: int, max_client_conn: int = 12000) -> Target:
    t = Target("pgbouncer", "pgbouncer", "PgBouncer", database=database)
    t.extra.update(user=user, verifier=scram_verifier, primary=primary, pool_size=pool_size,
                   max_client_conn=max_client_conn)
    return t


def _pgbouncer_ini(t: Target) -> str:
    host, port = t.extra["primary"]
    return f"""\
[databases]
{t.database} = host={host} port={port} dbname={t.database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {t.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {t.workdir}/userlist.txt
pool_mode = transaction
default_pool_size = {t.extra['pool_size']}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {t.extra['max_client_conn']}
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 60
logfile = {t.workdir}/pgbouncer.log
pidfile = {t.workdir}/pgbouncer.pid
"""


def _start_pgbouncer(t: Target) -> None:
    binary = pgbouncer_binary()
    if binary is None:
        raise TargetError("pgbouncer is not installed")
    pw = pwd.getpwnam(OS_USER) if os.geteuid() == 0 else None
    if t.workdir is None:
        t.workdir = Path(tempfile.mkdtemp(prefix="bench-pgbouncer-"))
    t.port = free_port()
    (t.workdir / "pgbouncer.pid").unlink(missing_ok=True)
    (t.workdir / "pgbouncer.ini").write_text(_pgbouncer_ini(t))
    (t.workdir / "userlist.txt").write_text(f'"{t.extra["user"]}" "{t.extra["verifier"]}"\n')
    for p in (t.workdir, *t.workdir.iterdir()):
        if pw is not None:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
    # runuser's PAM session resets the soft fd limit to 1024: raise it again for
    # the 10,000-idle-client measurement, then exec so pgbouncer is runuser's child.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    inner = f'ulimit -n {nofile} 2>/dev/null; exec "$0" "$1"'
    argv = ["sh", "-c", inner, binary, str(t.workdir / "pgbouncer.ini")]
    if pw is not None:
        argv = ["runuser", "-u", OS_USER, "--", *argv]
    _launch(t, argv, t.workdir, log_name="stdout.log")
    deadline = time.monotonic() + 5
    while t.root_pid() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def pgcat_binary() -> str | None:
    env = os.environ.get("PGCAT_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("pgcat")
