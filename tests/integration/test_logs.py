"""Logs: JSON lines tagged with the client, and never a password or a SCRAM secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket

import psycopg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER, free_port, local_config, start_pypool_process
from tests.integration._ops import ADMIN_PASSWORD, admin, login_error
from tests.integration._support import login, psql, simple_query

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "Wr0ng-Passw0rd-xyzzy"


class RecordingSocket:
    """A socket that keeps every byte it received (to learn the SCRAM salt the server chose)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.received += data
        return data


def scram_secrets(password: str, received: bytes) -> list[str]:
    """Every form of the password's SCRAM secrets a careless log line could contain."""
    match = re.search(rb"r=[^,]+,s=([A-Za-z0-9+/=]+),i=(\d+)", received)
    assert match, "no SCRAM server-first-message seen"
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(match.group(1)),
                                 int(match.group(2)))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    out = []
    for secret in (salted, client_key, server_key, stored_key):
        out += [base64.b64encode(secret).decode(), secret.hex()]
    return out


@pytest.fixture
def json_pypool(tmp_path, pg_cluster):
    port = free_port()
    config = local_config(pg_cluster, port, {"general": {"log_client_connections": True,
                                                          "log_client_disconnections": True}})
    proc = start_pypool_process(config, tmp_path, port, ["--log-format", "json", "--log-level", "debug"])
    yield proc
    proc.stop()


def test_json_log_tags_clients_and_holds_no_secrets(json_pypool):
    pypool = json_pypool
    # Successful SCRAM logins: a raw client (recording the salt), psycopg, asyncpg, psql, the admin console.
    with socket.create_connection(("127.0.0.1", pypool.port), timeout=10) as raw:
        recording = RecordingSocket(raw)
        login(recording)
        assert simple_query(raw, "SELECT 1") == [["1"]]
        good_peer = "%s:%d" % raw.getsockname()
    secrets = scram_secrets(PASSWORD, recording.received)
    with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    assert login_error(pypool) == (None, "logged in")
    assert psql(pypool, "-c", "SELECT 1").returncode == 0
    with admin(pypool) as conn:
        conn.execute("SHOW CONFIG").fetchall()
    # Failed logins: a wrong password over SCRAM, for the pool and for the admin console.
    with socket.create_connection(("127.0.0.1", pypool.port), timeout=10) as raw:
        with pytest.raises(AssertionError, match="28P01"):
            login(raw, password=WRONG_PASSWORD)
        bad_peer = "%s:%d" % raw.getsockname()
    assert login_error(pypool, password=WRONG_PASSWORD)[0] == "28P01"
    assert psql(pypool, "-c", "SELECT 1", password=WRONG_PASSWORD).returncode != 0

    log = pypool.log()
    for secret in [PASSWORD, ADMIN_PASSWORD, WRONG_PASSWORD, *secrets,
                   "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()]:
        assert secret not in log, f"the log contains a secret ({secret[:4]}...)"

    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)
    assert any(e["level"] == "debug" for e in entries) or any(e["level"] == "info" for e in entries)
    failed = [e for e in entries if "authentication failed" in e["msg"]]
    assert failed and all(e.get("client") for e in failed)
    assert any(e["client"] == bad_peer for e in failed), (bad_peer, failed)
    assert any(e.get("client") == good_peer and "logged in" in e["msg"] for e in entries)
    assert any(e.get("client") == good_peer and "disconnected" in e["msg"] for e in entries)
