"""Hostile input on the live listener: malformed, truncated, oversized and out-of-order messages.

Hypothesis drives one running pypool with byte streams before the login
(startup packets, SASL/md5 answers) and after it (tagged messages with
random, impossible or truncated lengths, messages from the wrong phase).
Each connection must get well-framed replies whose errors carry a SQLSTATE,
or be closed; after each test's examples pypool must still be running, serve a
fresh client, hold no server connection in a transaction, and its memory must
stay bounded. Each test fuzzes a pypool of its own.

Short form by default; ``PYPOOL_LONG=1`` runs the long form. FunctionCall
('F') is never sent: with random OIDs it could call any function on the
shared cluster.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DATABASE, USER, free_port, local_config, start_pypool_process
from tests.integration._certs import make_certificates
from tests.integration._support import PRIMARY_ONLY, local_tcp_ports, login, merge, startup_packet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = os.environ.get("PYPOOL_LONG") == "1"
EXAMPLES = 3000 if LONG else 100
MAX_MESSAGE = 1 << 20
POOL_SIZE = 5
SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)

def new_figures() -> dict:
    return {"connections": 0, "bytes_sent": 0, "errors_received": 0, "probes_answered": 0, "sqlstates": set()}


@pytest.fixture
def fuzz_target(pg_cluster, tmp_path):
    port = free_port()
    certs = make_certificates(tmp_path / "certs")  # TLS offered: SSLRequests reach the upgrade path
    config = local_config(pg_cluster, port, merge(PRIMARY_ONLY, {
        "general": {"max_message_size": MAX_MESSAGE, "client_login_timeout": 5000,
                    "tls_certificate": str(certs.cert), "tls_private_key": str(certs.key)},
        "pools": {DATABASE: {"users": {"0": {"pool_size": POOL_SIZE}}}}}))
    proc = start_pypool_process(config, tmp_path, port)
    yield proc
    proc.stop()


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------ strategies

def frame(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + struct.pack("!I", len(payload) + 4) + payload


SAFE_TAGS = [t for t in range(256) if t != ord("F")]
FRONTEND_TAGS = [ord(c) for c in "QPBEDSHCXdcfp"]
SQL_SNIPPETS = ["SELECT 1", "BEGIN", "COMMIT", "ROLLBACK", "SELECT pg_sleep(0.01)", "SELECT * FROM nothing_here",
                "COPY (SELECT 1) TO STDOUT", "SET application_name = 'fuzz'", "", ";;", "SELECT 'unterminated"]
cstring = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"") + b"\0")

well_framed = st.builds(frame, st.sampled_from(FRONTEND_TAGS) | st.sampled_from(SAFE_TAGS), st.binary(max_size=300))
sql_query = st.builds(lambda sql: frame(ord("Q"), sql.encode() + b"\0"),
                      st.sampled_from(SQL_SNIPPETS) | st.text(max_size=60).map(lambda t: t.replace("\0", "")))
parse_msg = st.builds(lambda name, sql, n: frame(ord("P"), name + sql + struct.pack("!H", n)),
                      cstring, st.sampled_from(SQL_SNIPPETS).map(lambda s: s.encode() + b"\0"), st.integers(0, 3))
bind_msg = st.builds(lambda portal, stmt, rest: frame(ord("B"), portal + stmt + rest), cstring, cstring,
                     st.binary(max_size=20))
execute_msg = st.builds(lambda portal, rows: frame(ord("E"), portal + struct.pack("!I", rows)), cstring,
                        st.integers(0, 2**32 - 1))
sync_msg = st.just(frame(ord("S"), b""))
bad_length = st.builds(lambda tag, length, body: bytes([tag]) + struct.pack("!I", length) + body,
                       st.sampled_from(SAFE_TAGS), st.integers(0, 3) | st.integers(MAX_MESSAGE + 1, 2**32 - 1),
                       st.binary(max_size=20))
truncated = st.builds(lambda msg, cut: msg[:max(1, len(msg) - cut)], well_framed, st.integers(1, 50))
oversized = st.builds(lambda size: b"Q" + struct.pack("!I", size) + b"x" * min(size, 4096),
                      st.integers(MAX_MESSAGE + 1, MAX_MESSAGE * 4))
after_login = st.lists(st.one_of(well_framed, sql_query, parse_msg, bind_msg, execute_msg, sync_msg, bad_length,
                                 truncated, oversized, st.binary(min_size=1, max_size=64)), min_size=1, max_size=8)

startup_params = st.dictionaries(st.text(min_size=0, max_size=12).map(lambda t: t.replace("\0", "")),
                                 st.text(max_size=12).map(lambda t: t.replace("\0", "")), max_size=4)
random_startup = st.builds(lambda params, version: _startup(params, version), startup_params,
                           st.sampled_from([196608, 196609, 131072, 0, 2**32 - 1]))
sasl_garbage = st.builds(lambda mech, data: frame(ord("p"), mech + struct.pack("!i", len(data)) + data),
                         st.sampled_from([b"SCRAM-SHA-256\0", b"SCRAM-SHA-256-PLUS\0", b"PLAIN\0", b"\0"]),
                         st.binary(max_size=120) | st.sampled_from([b"n,,n=,r=abc", b"y,,n=,r=", b"p=x,,n=,r=a",
                                                                   b"n,,n=,r=" + b"A" * 200]))
before_login = st.one_of(
    # TLS accepted, then a handshake made of garbage (or of a plaintext startup packet).
    st.builds(lambda rest: [SSL_REQUEST, rest], st.binary(min_size=1, max_size=300) | random_startup),

    st.binary(min_size=1, max_size=200),
    random_startup,
    st.builds(lambda s, cut: s[:cut], random_startup, st.integers(1, 30)),
    st.builds(lambda req, rest: req + rest, st.sampled_from([SSL_REQUEST, GSSENC_REQUEST]), random_startup),
    st.builds(lambda pid, key: struct.pack("!IIII", 16, 80877102, pid, key), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),
    # A real user, then garbage instead of a SASL exchange.
    st.builds(lambda answer, more: startup_packet(user=USER, database=DATABASE) + answer + more,
              sasl_garbage | well_framed | bad_length, st.lists(sasl_garbage | well_framed, max_size=2).map(b"".join)),
)


def _flatten(items: list) -> list[bytes]:
    out: list[bytes] = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


def _startup(params: dict[str, str], version: int) -> bytes:
    body = struct.pack("!I", version) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


# -------------------------------------------------------------------- checking

PROBE = frame(ord("Q"), b"SELECT 'probe-end'\0")


def exchange(port: int, chunks: list[bytes], logged_in: bool, figures: dict) -> bytes:
    """Send ``chunks`` (after a real login if asked) and a probe query; collect the replies until EOF.

    The probe shows whether the session is still usable after the bad input.
    When it is not answered (a truncated message swallows it, or pypool closed
    the session), half a second of silence ends the wait; then the client
    half-closes and pypool must close its side.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        if logged_in:
            login(sock)
        for chunk in chunks + ([PROBE] if logged_in else []):
            figures["bytes_sent"] += len(chunk)
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        eof = False
        sock.settimeout(0.5)
        while b"probe-end" not in received:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                eof = True
                break
            if not data:
                eof = True
                break
            received += data
        if b"probe-end" in received:
            figures["probes_answered"] += 1
        sock.settimeout(30)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while not eof:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError(f"pypool kept the connection open 30 s after the client half-closed; "
                                     f"sent {chunks!r}") from None
            if not data:
                break
            received += data
    figures["connections"] += 1
    return received


def check_frames(data: bytes, figures: dict, skip_single_bytes: int = 0) -> None:
    """Every reply is a well-framed backend message, and every ErrorResponse carries a SQLSTATE."""
    pos = 0
    for _ in range(skip_single_bytes):  # one-byte answers to SSL/GSSENC requests
        if data[pos:pos + 1] == b"S":
            return  # TLS accepted: what follows is TLS records (a handshake failure alert), not messages
        if data[pos:pos + 1] == b"N":
            pos += 1
    while pos < len(data):
        assert len(data) - pos >= 5, f"truncated reply header at {pos}: {data[pos:]!r}"
        tag = data[pos]
        length = struct.unpack_from("!I", data, pos + 1)[0]
        assert 4 <= length and pos + 1 + length <= len(data), f"bad reply frame {data[pos:pos + 40]!r}"
        payload = data[pos + 5:pos + 1 + length]
        if tag == ord("E"):
            fields = {p[:1]: p[1:] for p in payload.split(b"\0") if p}
            assert len(fields.get(b"C", b"")) == 5, f"ErrorResponse without a SQLSTATE: {payload!r}"
            figures["errors_received"] += 1
            figures["sqlstates"].add(fields[b"C"].decode())
        pos += 1 + length


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def test_fuzz_before_login(fuzz_target, pg_cluster):
    figures = new_figures()

    @FUZZ_SETTINGS
    @given(chunks=st.lists(before_login, min_size=1, max_size=3).map(_flatten))
    def fuzz(chunks):
        data = exchange(fuzz_target.port, chunks, logged_in=False, figures=figures)
        leading = 0
        for chunk in chunks:
            if chunk[:8] in (SSL_REQUEST, GSSENC_REQUEST):
                leading += 1
            else:
                break
        check_frames(data, figures, leading)

    fuzz()
    assert_survived(fuzz_target, pg_cluster, figures)


def test_fuzz_after_login(fuzz_target, pg_cluster):
    figures = new_figures()

    @FUZZ_SETTINGS
    @given(chunks=after_login)
    def fuzz(chunks):
        check_frames(exchange(fuzz_target.port, chunks, logged_in=True, figures=figures), figures)

    fuzz()
    assert_survived(fuzz_target, pg_cluster, figures)


def assert_survived(fuzz_target, pg_cluster, figures: dict) -> None:
    """After the fuzzing: alive, serving, nothing leaked, memory bounded."""
    assert figures["connections"] > 0, "no example reached pypool"
    assert fuzz_target.proc.poll() is None, fuzz_target.log()[-3000:]
    log = fuzz_target.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-5000:]
    rss_before = rss_kib(fuzz_target.proc.pid)
    with psycopg.connect(fuzz_target.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 6 * 7").fetchone() == (42,)
    primary = pg_cluster[0]
    deadline = time.monotonic() + 20
    with psycopg.connect(f"host=127.0.0.1 port={primary.port} user={USER} dbname={DATABASE} "
                         f"password={os.environ.get('POSTGRESQL_PASSWORD', 'mysecretpassword')} sslmode=disable",
                         autocommit=True) as direct:
        while True:
            ports = sorted(local_tcp_ports(fuzz_target.proc.pid, primary.port))
            states = [r[0] for r in direct.execute(
                "SELECT state FROM pg_stat_activity WHERE client_port = ANY(%s)", (ports,)).fetchall()]
            if all(s == "idle" for s in states):
                break
            assert time.monotonic() < deadline, f"server connections not idle after fuzzing: {states}"
            time.sleep(0.2)
    # pool_size for clients, plus the health monitor's own connection.
    assert len(states) <= POOL_SIZE + 1, states
    print(f"\nfuzz figures: {figures['connections']} connections, {figures['bytes_sent']} bytes sent, "
          f"{figures['errors_received']} ErrorResponses received, "
          f"{figures['probes_answered']} sessions still answered a query after the bad input (SQLSTATEs {sorted(figures['sqlstates'])}), "
          f"pypool RSS {rss_before // 1024} MiB, {len(states)} server connections left, all idle")
    assert rss_before < 200 * 1024, f"pypool RSS {rss_before} KiB after fuzzing"
