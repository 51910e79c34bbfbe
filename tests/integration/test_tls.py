"""TLS between clients and pypool (client_tls_mode) and between pypool and PostgreSQL (server_tls).

Certificates are made at test time; the server-side tests run against a
private PostgreSQL with ``ssl = on`` so the shared cluster is not reconfigured.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys

import asyncpg
import psycopg
import pytest

from pypool.protocol import messages as m
from tests.conftest import DATABASE, PASSWORD, USER, free_port, local_config, start_pypool_process
from tests.integration._certs import make_certificates
from tests.integration._private_pg import start_for_server, start_private_server
from tests.integration._support import psql

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def tls_general(certs, mode: str | None = None) -> dict:
    general = {"tls_certificate": str(certs.cert), "tls_private_key": str(certs.key)}
    if mode is not None:
        general["client_tls_mode"] = mode
    return {"general": general}


def tls_dsn(proc, sslmode: str, certs=None) -> str:
    dsn = proc.dsn().replace("sslmode=disable", f"sslmode={sslmode}")
    if certs is not None:
        dsn += f"&sslrootcert={certs.ca}"
    return dsn


def test_allow_mode_serves_tls_and_plain_clients(start_pypool, certs):
    proc = start_pypool(tls_general(certs))  # client_tls_mode defaults to allow when a certificate is set
    with psycopg.connect(tls_dsn(proc, "verify-full", certs), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
    with psycopg.connect(proc.dsn(), autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    out = psql(proc, "-c", r"\conninfo", "-c", "SELECT 'over tls'", sslmode="require")
    assert out.returncode == 0, out.stderr
    assert "SSL connection (protocol: TLSv1." in out.stdout and "over tls" in out.stdout


def test_verify_full_rejects_a_certificate_from_another_ca(start_pypool, certs, tmp_path):
    other = make_certificates(tmp_path / "other")
    proc = start_pypool(tls_general(certs))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(tls_dsn(proc, "verify-full", other), connect_timeout=10)
    # ... and pypool keeps serving.
    with psycopg.connect(tls_dsn(proc, "verify-full", certs), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def asyncpg_error(proc, **kwargs) -> asyncpg.PostgresError:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=proc.port, user=USER, password=PASSWORD,
                                     database=DATABASE, **kwargs)
    except asyncpg.PostgresError as exc:
        return exc
    await conn.close()
    raise AssertionError("the connection was accepted")


def test_require_mode_refuses_plain_clients_with_28000(start_pypool, certs):
    proc = start_pypool(tls_general(certs, "require"))
    with pytest.raises(psycopg.OperationalError, match='requires TLS \\(client_tls_mode = "require"\\)'):
        psycopg.connect(proc.dsn(), connect_timeout=10)
    refused = asyncio.run(asyncpg_error(proc, ssl=False))
    assert refused.sqlstate == "28000", refused
    out = psql(proc, "-c", "SELECT 1", sslmode="disable")
    assert out.returncode != 0 and "requires TLS" in out.stderr
    # sslmode=prefer (psql's default) upgrades and gets in.
    out = psql(proc, "-Atc", "SELECT 'prefer ok'", sslmode="prefer")
    assert out.returncode == 0 and out.stdout.strip() == "prefer ok", out.stderr


def test_require_mode_with_asyncpg_and_pgbench(start_pypool, certs, pgbench_tables):
    proc = start_pypool(tls_general(certs, "require"))

    async def run() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=proc.port, user=USER, password=PASSWORD,
                                     database=DATABASE, ssl="require")
        try:
            return await conn.fetchval("SELECT $1::int * 2", 21)
        finally:
            await conn.close()

    assert asyncio.run(run()) == 42
    env = {**proc.env(), "PGSSLMODE": "require"}
    bench = subprocess.run(["pgbench", "-n", "-S", "-c", "4", "-t", "50", "-h", "127.0.0.1", "-p", str(proc.port),
                            "-U", USER, DATABASE], env=env, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "number of transactions actually processed: 200/200" in bench.stdout, bench.stdout


def test_plaintext_bytes_after_ssl_request_are_refused(start_pypool, certs):
    proc = start_pypool(tls_general(certs))
    ssl_request = struct.pack("!II", 8, 80877103)
    startup = m.startup_message({"user": USER, "database": DATABASE})
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(ssl_request + startup)  # injected before the TLS handshake
        reply = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply[:1] == b"E" and b"C08P01" in reply and b"unencrypted data after SSL request" in reply
    with psycopg.connect(tls_dsn(proc, "require"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unloadable_key_stops_pypool_with_a_config_error(pg_cluster, certs, tmp_path):
    other = make_certificates(tmp_path / "other")
    port = free_port()
    config = local_config(pg_cluster, port, {"general": {"tls_certificate": str(certs.cert),
                                                         "tls_private_key": str(other.key)}})
    with pytest.raises(RuntimeError) as excinfo:
        start_pypool_process(config, tmp_path, port)
    assert "general.tls_private_key" in str(excinfo.value)
    assert "do not load together" in str(excinfo.value)


# ------------------------------------------------------------ pypool -> PostgreSQL


@pytest.fixture(scope="module")
def tls_server(certs):
    server = start_private_server((certs.cert, certs.key))
    yield server
    server.stop()


def test_server_tls_encrypts_connections_to_postgres(tls_server, certs, tmp_path):
    proc = start_for_server(tmp_path, tls_server.port, {"server_tls": True, "verify_server_certificate": True,
                                                       "server_tls_ca_file": str(certs.ca)})
    try:
        with psycopg.connect(proc.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row[0] is True and row[1].startswith("TLSv1."), row
    finally:
        proc.stop()
    # Without server_tls the same server is reached in plain text.
    proc = start_for_server(tmp_path, tls_server.port, {})
    try:
        with psycopg.connect(proc.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
    finally:
        proc.stop()


def test_server_certificate_from_an_untrusted_ca_is_refused(tls_server, tmp_path):
    other = make_certificates(tmp_path / "other")
    proc = start_for_server(tmp_path, tls_server.port, {"server_tls": True, "verify_server_certificate": True,
                                                       "server_tls_ca_file": str(other.ca), "connect_timeout": 3000})
    try:
        with pytest.raises(psycopg.Error) as excinfo:
            with psycopg.connect(proc.dsn(), autocommit=True, connect_timeout=20) as conn:
                conn.execute("SELECT 1")
        assert "certificate verify failed" in str(excinfo.value), excinfo.value
        assert "certificate verify failed" in proc.log() or "TLS handshake failed" in proc.log()
    finally:
        proc.stop()


def test_server_tls_against_a_server_without_ssl_fails_clearly(pg_cluster, tmp_path):
    proc = start_for_server(tmp_path, pg_cluster[0].port, {"server_tls": True})
    try:
        with pytest.raises(psycopg.Error) as excinfo:
            with psycopg.connect(proc.dsn(), autocommit=True, connect_timeout=20) as conn:
                conn.execute("SELECT 1")
        assert "does not accept TLS" in str(excinfo.value), excinfo.value
    finally:
        proc.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
