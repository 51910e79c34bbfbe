"""A real HAProxy (Debian's package) in TCP mode in front of several pypool instances.

Each server is health-checked with ``GET /readyz`` on its metrics port, as in
the README's example; the runtime API (a stats socket) tells a test what
HAProxy thinks of each server.
"""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.targets import install_debian_package
from tests.conftest import free_port, stop_process

CHECK_INTERVAL_MS = 200


@dataclass
class Backend:
    name: str
    port: int  # PostgreSQL clients
    check_port: int  # /readyz


def haproxy_config(listen_port: int, backends: list[Backend], stats_socket: Path) -> str:
    servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.port} check port {b.check_port}" for b in backends)
    return f"""\
global
    maxconn 4000
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 5m
    timeout server 5m
    timeout check 1s
    # A connection refused (an instance that just died) is tried again on another instance.
    retries 3
    option redispatch

frontend postgres
    bind 127.0.0.1:{listen_port}
    default_backend pypool

backend pypool
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {CHECK_INTERVAL_MS}ms fall 1 rise 2
{servers}
"""


class HAProxy:
    def __init__(self, directory: Path, backends: list[Backend]) -> None:
        self.binary = install_debian_package("haproxy", "haproxy")
        self.port = free_port()
        self.socket_path = directory / "haproxy.sock"
        self.config_path = directory / "haproxy.cfg"
        self.config_path.write_text(haproxy_config(self.port, backends, self.socket_path))
        self.log_path = directory / "haproxy.log"
        check = subprocess.run([self.binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.socket_path.exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "haproxy did not open its stats socket"
            time.sleep(0.05)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: status (UP, DOWN, DRAIN, MAINT, ...), scur, ..."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == "pypool" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def status(self, name: str) -> str:
        return self.servers()[name]["status"].split()[0]

    def stop(self) -> None:
        stop_process(self.proc)
