"""Who may log in and how many: hba rules, max_client_conn, per-user limits, login timeout, message size."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import asyncpg
import psycopg
import pytest

from tests.conftest import DATABASE, PASSWORD, USER
from tests.integration._certs import make_certificates
from tests.integration._support import (PRIMARY_ONLY, assert_closed, error_fields, login, merge, psql,
                                        read_message, read_until_error_or_close, simple_query, startup_packet)

pytestmark = pytest.mark.integration

REPORTER = {"username": "reporter", "password": "reporter-pw", "pool_size": 2,
            "server_username": USER, "server_password": PASSWORD}


def hba(*lines: str) -> dict:
    return {"general": {"hba": list(lines)}}


def first_auth_request(port: int, user: str = USER, database: str = DATABASE) -> tuple[str, int | dict]:
    """Send a startup packet; return ("R", auth code) or ("E", error fields)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(startup_packet(user=user, database=database))
        tag, payload = read_message(sock)
    if tag == "E":
        return tag, error_fields(payload)
    return tag, struct.unpack("!I", payload[:4])[0]


async def _asyncpg_refusal(port: int, user: str, password: str, **kwargs) -> asyncpg.PostgresError | None:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                     database=DATABASE, **kwargs)
    except asyncpg.PostgresError as exc:
        return exc
    await conn.close()
    return None


def refusal(port: int, user: str = USER, password: str = PASSWORD, **kwargs) -> asyncpg.PostgresError | None:
    return asyncio.run(_asyncpg_refusal(port, user, password, **kwargs))


def test_hba_rules_choose_the_method_or_reject(start_pypool):
    proc = start_pypool(merge({"pools": {DATABASE: {"users": {"1": REPORTER}}}}, hba(
        f"host {DATABASE} reporter 127.0.0.1/32 reject",
        f"host all {USER} 127.0.0.1/32 md5",
        "host all all all scram-sha-256")))
    assert first_auth_request(proc.port) == ("R", 5)  # md5 for USER, as the second rule says
    with psycopg.connect(proc.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    exc = refusal(proc.port, "reporter", "reporter-pw")
    assert exc is not None and exc.sqlstate == "28000"
    assert 'pypool hba rejects connection for host "127.0.0.1", user "reporter"' in str(exc)
    # The rejection comes before any password exchange: no auth request is ever sent.
    tag, fields = first_auth_request(proc.port, "reporter")
    assert tag == "E" and fields["C"] == "28000"


def test_no_matching_rule_refuses_the_login(start_pypool):
    proc = start_pypool(hba("host all all 10.0.0.0/8 trust"))
    exc = refusal(proc.port)
    assert exc is not None and exc.sqlstate == "28000"
    assert f'no pypool hba entry for host "127.0.0.1", user "{USER}", database "{DATABASE}", no encryption' \
        in str(exc)


def test_trust_skips_the_password_but_never_for_the_admin_console(start_pypool):
    proc = start_pypool(hba("host all all 127.0.0.1/32 trust"))
    out = psql(proc, "-Atc", "SELECT 'trusted'", password="not-the-password")
    assert out.returncode == 0 and out.stdout.strip() == "trusted", out.stderr
    admin = proc.config["general"]["admin_username"]
    # Admin credentials are still required for the admin console.
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(startup_packet(user=admin, database="pgcat"))
        tag, payload = read_message(sock)
        assert tag == "R" and struct.unpack("!I", payload[:4])[0] in (5, 10)
    with pytest.raises(AssertionError, match="28P01"):
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            login(sock, admin, "wrong", "pgcat")
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        login(sock, admin, proc.config["general"]["admin_password"], "pgcat")
        assert simple_query(sock, "SHOW VERSION")


def test_hostssl_rule_needs_tls(start_pypool, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    proc = start_pypool(merge({"general": {"tls_certificate": str(certs.cert), "tls_private_key": str(certs.key)}},
                              hba("hostssl all all 127.0.0.1/32 scram-sha-256")))
    exc = refusal(proc.port, ssl=False)
    assert exc is not None and exc.sqlstate == "28000" and "no encryption" in str(exc)
    out = psql(proc, "-Atc", "SELECT 'tls ok'", sslmode="require")
    assert out.returncode == 0 and out.stdout.strip() == "tls ok", out.stderr


def test_hba_file_in_pg_hba_format(start_pypool, tmp_path):
    rules = tmp_path / "clients.conf"
    rules.write_text(f"# pypool clients\nhost {DATABASE} {USER} 127.0.0.1/32 reject\n")
    proc = start_pypool({"general": {"hba_file": str(rules)}})
    exc = refusal(proc.port)
    assert exc is not None and exc.sqlstate == "28000" and "rejects connection" in str(exc)


def test_max_client_conn_refuses_with_53300_and_frees_slots(start_pypool):
    proc = start_pypool(merge(PRIMARY_ONLY, {"general": {"max_client_conn": 3}}))
    held = [psycopg.connect(proc.dsn(), autocommit=True) for _ in range(3)]
    try:
        exc = refusal(proc.port)
        assert exc is not None and exc.sqlstate == "53300"
        assert "too many client connections: max_client_conn is 3" in str(exc)
        for conn in held:  # the admitted clients keep working
            assert conn.execute("SELECT 1").fetchone() == (1,)
        held.pop().close()
        deadline = time.monotonic() + 10
        while refusal(proc.port) is not None:  # the slot frees as soon as pypool sees the close
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for conn in held:
            conn.close()


def test_per_user_max_client_connections(start_pypool):
    proc = start_pypool(merge(PRIMARY_ONLY, {"pools": {DATABASE: {"users": {
        "0": {"max_client_connections": 2}, "1": REPORTER}}}}))
    held = [psycopg.connect(proc.dsn(), autocommit=True) for _ in range(2)]
    try:
        exc = refusal(proc.port)
        assert exc is not None and exc.sqlstate == "53300"
        assert f'too many connections for user "{USER}" to pool "{DATABASE}": max_client_connections is 2' \
            in str(exc)
        # Another user of the same pool is not limited by it.
        with psycopg.connect(proc.dsn(user="reporter", password="reporter-pw"), autocommit=True) as other:
            assert other.execute("SELECT current_user").fetchone() == (USER,)
        # A wrong password does not learn about the limit: it is checked after authentication.
        exc = refusal(proc.port, USER, "wrong")
        assert exc is not None and exc.sqlstate == "28P01"
    finally:
        for conn in held:
            conn.close()
    with psycopg.connect(proc.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_silent_client_is_dropped_after_client_login_timeout(start_pypool):
    proc = start_pypool({"general": {"client_login_timeout": 1000}})
    # The 20 s socket timeout only stops a hang: a wait that ends in it finds no ErrorResponse.
    with socket.create_connection(("127.0.0.1", proc.port), timeout=20) as silent, \
            socket.create_connection(("127.0.0.1", proc.port), timeout=20) as half:
        half.sendall(startup_packet(user=USER, database=DATABASE)[:7])  # a startup packet that never ends
        for sock in (silent, half):
            fields = read_until_error_or_close(sock)
            assert fields is not None and fields["C"] == "57014", fields
            assert "client_login_timeout (1000 ms)" in fields["M"]
            assert_closed(sock)
    # A client that does log in is unaffected by the timeout once it is in.
    with psycopg.connect(proc.dsn(), autocommit=True) as conn:
        time.sleep(1.5)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_oversized_message_gets_08P01_and_others_keep_working(start_pypool):
    proc = start_pypool(merge(PRIMARY_ONLY, {"general": {"max_message_size": 65536}}))
    with psycopg.connect(proc.dsn(), autocommit=True) as bystander:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=20) as sock:
            login(sock)
            big = b"SELECT '" + b"x" * 70000 + b"'\0"
            sock.sendall(b"Q" + struct.pack("!I", len(big) + 4) + big)
            fields = read_until_error_or_close(sock)
            assert fields is not None and fields["C"] == "08P01", fields
            assert "invalid message length" in fields["M"]
            assert_closed(sock)
        # Just under the limit is fine.
        ok = "x" * 60000
        assert bystander.execute(f"SELECT length('{ok}')").fetchone() == (60000,)
