"""Errors pypool itself reports: authentication, unknown names, broken protocol, SSL negotiation.

Every refusal must be a proper ErrorResponse with the right SQLSTATE, and no
misbehaving client may take the pooler down for anyone else.
"""

from __future__ import annotations

import os
import socket
import struct

import asyncpg
import psycopg
import pytest

from tests.conftest import DATABASE, USER, user_overrides
from tests.integration._support import (
    PRIMARY_ONLY,
    assert_closed,
    login,
    merge,
    psql,
    read_message,
    read_until_error_or_close,
    simple_query,
    startup_packet,
)

pytestmark = pytest.mark.integration

SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)


@pytest.fixture
def pypool(start_pypool):
    return start_pypool(PRIMARY_ONLY)


def assert_serving(pypool) -> None:
    assert pypool.proc.poll() is None, pypool.log()
    with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 'still serving'").fetchone() == ("still serving",)


def raw(pypool) -> socket.socket:
    return socket.create_connection(("127.0.0.1", pypool.port), timeout=10)


# ---------------------------------------------------------------- authentication

async def test_wrong_password_is_28P01(pypool):
    with pytest.raises(asyncpg.InvalidPasswordError) as excinfo:
        await asyncpg.connect(pypool.dsn(password="not-the-password"))
    assert excinfo.value.sqlstate == "28P01"
    assert f'password authentication failed for user "{USER}"' in str(excinfo.value)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pypool.dsn(password="not-the-password"))
    assert_serving(pypool)


async def test_unknown_database_is_3D000_and_named(pypool):
    with pytest.raises(asyncpg.InvalidCatalogNameError) as excinfo:
        await asyncpg.connect(pypool.dsn(database="no_such_db_xyz"))
    assert excinfo.value.sqlstate == "3D000"
    assert "no_such_db_xyz" in str(excinfo.value)
    with pytest.raises(psycopg.OperationalError, match="no_such_db_xyz"):
        psycopg.connect(pypool.dsn(database="no_such_db_xyz"))


async def test_unknown_user_looks_like_a_wrong_password(pypool):
    with pytest.raises(asyncpg.InvalidPasswordError) as excinfo:
        await asyncpg.connect(pypool.dsn(user="nobody_xyz"))
    assert excinfo.value.sqlstate == "28P01"
    assert "nobody_xyz" in str(excinfo.value)
    # Through psql too: the message names the user, the exit status is 2 (connection failure).
    result = psql(pypool, "-c", "SELECT 1", user="nobody_xyz")
    assert result.returncode == 2, result
    assert 'password authentication failed for user "nobody_xyz"' in result.stderr, result


def test_md5_client_auth(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, {"general": {"client_auth_method": "md5"}}))
    with raw(pypool) as sock:
        sock.sendall(startup_packet(user=USER, database=DATABASE))
        tag, payload = read_message(sock)
        assert (tag, struct.unpack("!I", payload[:4])[0]) == ("R", 5), "pypool did not ask for md5"
    with raw(pypool) as sock:
        login(sock)
        assert simple_query(sock, "SELECT 'md5 raw'") == [["md5 raw"]]
    result = psql(pypool, "-A", "-t", "-c", "SELECT 'md5 psql'")
    assert result.returncode == 0 and result.stdout.strip() == "md5 psql", result
    with psycopg.connect(pypool.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 'md5 psycopg'").fetchone() == ("md5 psycopg",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pypool.dsn(password="wrong"))
    result = psql(pypool, "-c", "SELECT 1", password="wrong")
    assert result.returncode == 2 and "password authentication failed" in result.stderr, result


# ------------------------------------------------------------- broken startup

def _startup_body(body: bytes) -> bytes:
    return struct.pack("!II", 8 + len(body), 196608) + body


@pytest.mark.parametrize("packet, message", [
    (struct.pack("!II", 8, 1234 << 16), "unsupported frontend protocol 1234.0"),
    (struct.pack("!II", 4, 196608), "invalid startup packet length 4"),
    (_startup_body(b"user\0postgres\0"), "expected terminator"),
    (_startup_body(b"user\0postgres\0database\0"), "unpaired parameter"),
    (_startup_body(b"database\0postgres\0\0"), "no PostgreSQL user name"),
    (b"GET / HTTP/1.1\r\nHost: pypool\r\n\r\n", "invalid startup packet length"),
    (b"\xff" * 64, "invalid startup packet length"),
], ids=["bad-protocol", "short-length", "unterminated", "unpaired", "no-user", "http", "ff"])
def test_malformed_startup_is_refused_and_pooler_keeps_serving(pypool, packet, message):
    with raw(pypool) as sock:
        sock.sendall(packet)
        fields = read_until_error_or_close(sock)
        assert fields is not None, "pypool dropped the socket without an ErrorResponse"
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
        assert message in fields["M"], fields
        assert_closed(sock)
    assert_serving(pypool)


# ------------------------------------------------------ broken protocol after login

def _dup_socket(conn: psycopg.Connection) -> socket.socket:
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.setblocking(True)
    sock.settimeout(10)
    return sock


def _expect_08P01_and_close(conn: psycopg.Connection, garbage: bytes, message_part: str) -> None:
    """Send ``garbage`` on a logged-in client's socket: an 08P01 naming the problem, then close."""
    with _dup_socket(conn) as sock:
        sock.sendall(garbage)
        fields = read_until_error_or_close(sock)
        assert fields is not None, "pypool closed without an ErrorResponse"
        assert fields["C"] == "08P01", fields
        assert message_part in fields["M"], fields
        assert_closed(sock)


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in-transaction"])
def test_garbage_after_login_is_08P01_and_closes(start_pypool, in_transaction):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    conn = psycopg.connect(pypool.dsn(), autocommit=True)
    try:
        if in_transaction:
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE dirty_marker (x int) ON COMMIT DROP")
        # A Query whose length cannot hold even itself.
        _expect_08P01_and_close(conn, b"Q\x00\x00\x00\x02", "length")
    finally:
        conn.close()
    assert_serving(pypool)
    # The only server connection did not come back with the broken client's transaction.
    with psycopg.connect(pypool.dsn(), autocommit=True) as nxt:
        assert nxt.execute("SELECT now() = statement_timestamp(), txid_current_if_assigned(), "
                           "to_regclass('pg_temp.dirty_marker')").fetchone() == (True, None, None)


def test_unknown_message_type_after_login_is_08P01_and_costs_no_server_connection(start_pypool):
    pypool = start_pypool(merge(PRIMARY_ONLY, user_overrides(pool_size=1)))
    with psycopg.connect(pypool.dsn(), autocommit=True) as keeper:
        backend = keeper.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn = psycopg.connect(pypool.dsn(), autocommit=True)
        try:
            # A backend message type, sent by a client.
            _expect_08P01_and_close(conn, b"Z\x00\x00\x00\x04", "invalid frontend message type")
        finally:
            conn.close()
        # The pool's only server connection was never handed to the broken client.
        assert keeper.execute("SELECT pg_backend_pid()").fetchone()[0] == backend
    assert_serving(pypool)


# ---------------------------------------------------------------- SSL / GSS

def test_ssl_request_is_answered_n_then_startup_works_on_the_same_socket(pypool):
    with raw(pypool) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"N"
        login(sock)
        assert simple_query(sock, "SELECT 'plain after N'") == [["plain after N"]]


def test_gssenc_then_ssl_request_then_startup(pypool):
    with raw(pypool) as sock:
        sock.sendall(GSSENC_REQUEST)
        assert sock.recv(1) == b"N"
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"N"
        login(sock)
        assert simple_query(sock, "SELECT 1 + 1") == [["2"]]


def test_psql_with_sslmode_prefer(pypool):
    result = psql(pypool, "-A", "-t", "-c", "SELECT 'prefer ok'", sslmode="prefer")
    assert result.returncode == 0, result
    assert result.stdout.strip() == "prefer ok"
    with psycopg.connect(pypool.dsn().replace("sslmode=disable", "sslmode=prefer"), autocommit=True) as conn:
        assert conn.execute("SELECT 'psycopg prefer'").fetchone() == ("psycopg prefer",)
        assert conn.pgconn.ssl_in_use is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pypool.dsn().replace("sslmode=disable", "sslmode=require"))
