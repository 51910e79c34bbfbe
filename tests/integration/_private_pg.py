"""A private single PostgreSQL server for tests that change server settings (TLS, preloaded libraries).

The shared cluster must not be reconfigured (or restarted) under the other test
runs, so a test that needs ``ssl = on`` or ``shared_preload_libraries`` gets its
own throwaway server on a free port, and a pypool whose one pool uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pypool import cluster
from pypool.config import default_config_dict
from tests.conftest import DATABASE, PASSWORD, USER, deep_merge, free_port, start_pypool_process


@dataclass
class PrivateServer:
    port: int
    base: Path
    data_dir: Path
    bindir: Path

    def stop(self) -> None:
        subprocess.run(cluster._server_cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                                            "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def start_private_server(ssl_files: tuple[Path, Path] | None = None, settings: tuple[str, ...] = ()) -> PrivateServer:
    """initdb + start a server with SCRAM auth for USER/PASSWORD; with ``ssl_files`` (cert, key) TLS is on.

    ``settings``: more ``postgresql.conf`` lines (``"shared_preload_libraries = 'pg_stat_statements'"``).
    """
    bindir = cluster.ensure_postgres_binaries()
    base = Path(tempfile.mkdtemp(prefix="pypool-private-pg-", dir="/tmp"))
    base.chmod(0o755)
    cluster._chown_to_os_user(base)
    data_dir = base / "data"
    pwfile = base / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    cluster._chown_to_os_user(pwfile)
    pwfile.chmod(0o600)
    run = lambda argv: subprocess.run(cluster._server_cmd(argv), check=True, capture_output=True,  # noqa: E731
                                      timeout=120, cwd=str(base), env=cluster._clean_env())
    run([str(bindir / "initdb"), "-D", str(data_dir), "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust",
         "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"])
    port = free_port()
    conf = [f"port = {port}", "listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{base}'",
            "fsync = off", "max_connections = 100"]
    if ssl_files is not None:
        for src, name in zip(ssl_files, ("server.crt", "server.key")):
            dst = data_dir / name
            shutil.copy(src, dst)
            cluster._chown_to_os_user(dst)
            dst.chmod(0o600)
        conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
    conf += settings
    with (data_dir / "postgresql.conf").open("a") as fh:
        fh.write("\n" + "\n".join(conf) + "\n")
    run([str(bindir / "pg_ctl"), "-D", str(data_dir), "-l", str(base / "log"), "-w", "-t", "60", "start"])
    return PrivateServer(port, base, data_dir, bindir)


def server_env() -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": PASSWORD}


def single_server_config(port: int, server_port: int, general: dict) -> dict:
    """pypool on ``port`` with the one pool ``postgres`` on the private server as its primary."""
    env = {"PGCAT_PORT": str(port), "PG1_PORT": str(server_port), "POSTGRESQL_USERNAME": USER,
           "POSTGRESQL_PASSWORD": PASSWORD, "POSTGRESQL_DATABASE": DATABASE}
    base = default_config_dict(env)
    base["general"]["enable_prometheus_exporter"] = False
    return deep_merge(base, {"general": general, "pools": {DATABASE: {
        "query_parser_enabled": False, "query_parser_read_write_splitting": False, "default_role": "primary",
        "shards": {"0": {"database": DATABASE, "servers": [["127.0.0.1", server_port, "primary"]]}}}}})


def start_for_server(tmp_path, server_port: int, general: dict):
    port = free_port()
    return start_pypool_process(single_server_config(port, server_port, general), tmp_path, port)
