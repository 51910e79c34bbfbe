"""Helpers shared by the integration tests that drive pypool with real clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from pypool import cluster
from tests.conftest import DATABASE, PASSWORD, USER, deep_merge

# Where the server choice matters (counting connections on the primary, pool
# limits): keep every query on the primary whatever the router learns later.
PRIMARY_ONLY = {"pools": {DATABASE: {"query_parser_enabled": False,
                                     "query_parser_read_write_splitting": False,
                                     "default_role": "primary"}}}


def merge(*overrides: dict) -> dict:
    out: dict = {}
    for override in overrides:
        out = deep_merge(out, override)
    return out


def scrape(pypool) -> dict[tuple[str, tuple], float]:
    """Every sample of pypool's /metrics: (name, sorted labels) -> value."""
    port = pypool.config["general"]["prometheus_exporter_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == val for k, val in labels.items()))


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _pg1_leads(base: Path) -> bool:
    """On disk, pg1 is the primary and pg2, pg3 its standbys (a promotion or a rebuild changes that)."""
    standby = {n.name: (n.data_dir / "standby.signal").exists() for n in cluster.nodes(base)}
    return standby == {"pg1": False, "pg2": True, "pg3": True}


def _pg1_streams_to_both(base: Path) -> bool:
    nodes = cluster.nodes(base)
    return all(cluster._running_pid(n) for n in nodes) and cluster._try_sql(
        nodes[0], "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'", timeout=3) == "2"


def make_standard_cluster(base: Path) -> tuple[list[cluster.Node], bool]:
    """Make the private cluster in ``base`` pg1 primary with pg2 and pg3 streaming from it, whatever
    a test left (stopped, killed, promoted, destroyed); returns its nodes and whether it is new."""
    if (base / "pg1" / "PG_VERSION").is_file():
        if not _pg1_leads(base):
            cluster.destroy(base)  # the primary moved: start afresh rather than fail back
        elif _pg1_streams_to_both(base):
            return cluster.nodes(base), False
    fresh = not (base / "pg1" / "PG_VERSION").is_file()
    return cluster.up(base, timeout=120), fresh


def cancel_when_running(conn: psycopg.Connection, server_dsn: str, marker: str,
                        timeout: float = 30) -> threading.Thread:
    """A started thread that calls ``conn.cancel()`` once the server at ``server_dsn`` runs a
    statement containing ``marker``: the cancel cannot arrive before the statement it is for."""
    def running() -> bool:
        return watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                               "AND pid <> pg_backend_pid() AND strpos(query, %s) > 0", [marker]).fetchone()[0] > 0

    def run() -> None:
        try:
            wait_for(running, timeout, what=f"a running statement with {marker!r}", interval=0.05)
            conn.cancel()
        finally:
            watcher.close()

    watcher = psycopg.connect(server_dsn, autocommit=True)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_failed_on_one_connect(message: str, connect_timeout_ms: int) -> None:
    """The error reports one failed attempt to reach the server (refused, or cut off by
    connect_timeout): the client was answered at once, not queued for a pool slot."""
    assert "could not connect to server" in message, message
    assert "Connection refused" in message or f"timed out after {connect_timeout_ms} ms" in message, message
    assert "checkout_timeout" not in message, message


def psql(pypool, *args: str, input: str | None = None, password: str = PASSWORD,
         user: str = USER, sslmode: str = "disable", timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**pypool.env(password), "PGSSLMODE": sslmode}
    return subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", user, "-d", DATABASE,
                           *args], input=input, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class PgbenchResult:
    returncode: int
    processed: int
    failed: int
    output: str


def pgbench(pypool, *args: str, timeout: float = 60) -> PgbenchResult:
    proc = subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pypool.port), "-U", USER, *args, DATABASE],
                          env=pypool.env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    return PgbenchResult(proc.returncode, int(processed.group(1)) if processed else -1,
                         int(failed.group(1)) if failed else -1, out)


def assert_clean_pgbench(result: PgbenchResult) -> None:
    assert result.returncode == 0, result.output
    assert result.failed == 0, result.output
    assert result.processed > 0, result.output
    assert "aborted" not in result.output, result.output


def local_tcp_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of ``pid``'s TCP sockets connected to 127.0.0.1:``remote_port`` (from /proc)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            if inode in inodes and state == "01" and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


# ------------------------------------------------------------ raw wire protocol

def startup_packet(**params: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[str, bytes]:
    header = recv_exactly(sock, 5)
    length = struct.unpack("!I", header[1:])[0]
    return chr(header[0]), recv_exactly(sock, length - 4)


def error_fields(payload: bytes) -> dict[str, str]:
    fields = {}
    for part in payload.rstrip(b"\0").split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def read_until_error_or_close(sock: socket.socket) -> dict[str, str] | None:
    """Read messages until an ErrorResponse (its fields) or EOF (None)."""
    while True:
        try:
            tag, payload = read_message(sock)
        except (ConnectionError, OSError):
            return None
        if tag == "E":
            return error_fields(payload)


def assert_closed(sock: socket.socket) -> None:
    sock.settimeout(5)
    try:
        rest = sock.recv(1)
    except ConnectionResetError:
        return
    assert rest == b"", f"expected the pooler to close the connection, got {rest!r}"


def _password_message(payload: bytes) -> bytes:
    return b"p" + struct.pack("!I", len(payload) + 4) + payload


def login(sock: socket.socket, user: str = USER, password: str = PASSWORD, database: str = DATABASE) -> None:
    """Send a StartupMessage and authenticate (SCRAM-SHA-256 or md5) up to the first ReadyForQuery.

    A deliberately independent client: it shares no code with pypool's own auth module.
    """
    sock.sendall(startup_packet(user=user, database=database))
    client_first_bare = server_first = without_proof = ""
    salted = b""
    while True:
        tag, payload = read_message(sock)
        if tag == "E":
            raise AssertionError(f"login failed: {error_fields(payload)}")
        if tag == "Z":
            return
        if tag != "R":
            continue
        code = struct.unpack("!I", payload[:4])[0]
        if code == 5:  # md5
            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + payload[4:8]).hexdigest()
            sock.sendall(_password_message(b"md5" + outer.encode() + b"\0"))
        elif code == 10:  # SASL: start SCRAM-SHA-256
            assert b"SCRAM-SHA-256" in payload[4:].split(b"\0")
            client_first_bare = "n=,r=" + base64.b64encode(os.urandom(18)).decode()
            first = ("n,," + client_first_bare).encode()
            sock.sendall(_password_message(b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first))
        elif code == 11:  # SASLContinue: server-first-message
            server_first = payload[4:].decode()
            attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
            salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                         int(attrs["i"]))
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            without_proof = f"c=biws,r={attrs['r']}"
            auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
            signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
            proof = bytes(a ^ b for a, b in zip(client_key, signature))
            sock.sendall(_password_message(f"{without_proof},p={base64.b64encode(proof).decode()}".encode()))
        elif code == 12:  # SASLFinal: check the server knows the password too
            server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
            auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
            expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest()).decode()
            assert payload[4:].decode() == f"v={expected}"
        elif code != 0:
            raise AssertionError(f"unexpected authentication request {code}")


def simple_query(sock: socket.socket, sql: str) -> list[list[str | None]]:
    """Run one simple Query; return its rows as text, raise AssertionError on an ErrorResponse."""
    body = sql.encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!I", len(body) + 4) + body)
    rows: list[list[str | None]] = []
    error = None
    while True:
        tag, payload = read_message(sock)
        if tag == "D":
            count, pos, row = struct.unpack("!H", payload[:2])[0], 2, []
            for _ in range(count):
                size = struct.unpack("!i", payload[pos:pos + 4])[0]
                pos += 4
                row.append(None if size < 0 else payload[pos:pos + size].decode())
                pos += max(size, 0)
            rows.append(row)
        elif tag == "E":
            error = error_fields(payload)
        elif tag == "Z":
            if error is not None:
                raise AssertionError(f"query failed: {error}")
            return rows
