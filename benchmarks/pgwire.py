"""A tiny PostgreSQL frontend for the benchmark: log in, send simple queries.

Two uses, both measured against every target in the same way:

* the single-client ``SELECT 1`` round trip (a blocking socket, one query in
  flight, each round trip timed with ``time.perf_counter_ns``), where a full
  driver's own per-query overhead (type codecs, prepared-statement caches,
  result objects) would blur the pooler's share;
* opening thousands of idle, authenticated client connections for the memory
  figure (asyncio, bounded concurrency).

The handshake is sans-IO (:class:`Handshake`) and uses pypool's own protocol
helpers: message builders from ``pypool.protocol.messages`` and the SCRAM
client from ``pypool.protocol.auth`` (whose PBKDF2 result is cached per
password/salt/iteration count, so 10,000 logins cost the client little).
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

from pypool.protocol import auth, messages
from pypool.protocol.frames import MessageBuffer

READY = ord("Z")
ERROR = ord("E")
AUTH = ord("R")


class WireError(Exception):
    """The server answered with an ErrorResponse or broke the protocol."""


def _error_text(payload: bytes) -> str:
    try:
        fields = messages.parse_error_fields(payload)
    except Exception:  # noqa: BLE001 - best effort for a message
        return repr(payload[:200])
    return f"{fields.get('C', '?????')}: {fields.get('M', '')}"


@dataclass
class Handshake:
    """Startup + authentication as a state machine: feed server bytes, get bytes to send."""

    user: str
    password: str
    database: str
    application_name: str = "pypool-bench"
    ready: bool = False
    _buf: MessageBuffer = field(default_factory=MessageBuffer)
    _scram: auth.ScramClientSession | None = None

    def start(self) -> bytes:
        return messages.startup_message(
            {"user": self.user, "database": self.database, "application_name": self.application_name}
        )

    def feed(self, data: bytes) -> bytes:
        """Consume server bytes; return what to send back (possibly b"")."""
        self._buf.feed(data)
        out: list[bytes] = []
        while not self.ready:
            msg = self._buf.next_message()
            if msg is None:
                break
            tag, payload = msg
            if tag == AUTH:
                out.append(self._auth(payload))
            elif tag == ERROR:
                raise WireError(_error_text(payload))
            elif tag == READY:
                self.ready = True
            # ParameterStatus, BackendKeyData, NoticeResponse: not needed here.
        return b"".join(out)

    def _auth(self, payload: bytes) -> bytes:
        code, data = messages.parse_auth_request(payload)
        if code == messages.AUTH_OK:
            return b""
        if code == messages.AUTH_SASL:
            mechanisms = messages.parse_sasl_mechanisms(data)
            if auth.SCRAM_SHA_256 not in mechanisms:
                raise WireError(f"server offers no SCRAM-SHA-256 (offers {mechanisms})")
            self._scram = auth.ScramClientSession(self.user, self.password)
            return messages.sasl_initial_response(auth.SCRAM_SHA_256, self._scram.client_first())
        if code == messages.AUTH_SASL_CONTINUE and self._scram is not None:
            return messages.sasl_response(self._scram.handle_server_first(data))
        if code == messages.AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify_server_final(data)
            return b""
        if code == messages.AUTH_MD5:
            return messages.password_message(auth.md5_hash(self.user, self.password, data[:4]))
        if code == messages.AUTH_CLEARTEXT:
            return messages.password_message(auth.cleartext_response(self.password))
        raise WireError(f"unsupported authentication request {code}")


# --------------------------------------------------------------------------
# blocking client: the round-trip measurement


class BlockingClient:
    def __init__(self, host: str, port: int, user: str, password: str, database: str, timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hs = Handshake(user, password, database)
        self.sock.sendall(hs.start())
        while not hs.ready:
            data = self.sock.recv(65536)
            if not data:
                raise WireError("server closed the connection during login")
            reply = hs.feed(data)
            if reply:
                self.sock.sendall(reply)
        self._pending = b""

    def simple_query(self, query_bytes: bytes) -> None:
        """Send one pre-built Query message and read up to its ReadyForQuery."""
        sock = self.sock
        sock.sendall(query_bytes)
        buf = self._pending
        pos = 0
        while True:
            # walk complete messages; stop at ReadyForQuery
            while len(buf) - pos >= 5:
                length = int.from_bytes(buf[pos + 1:pos + 5], "big")
                end = pos + 1 + length
                if end > len(buf):
                    break
                tag = buf[pos]
                if tag == ERROR:
                    raise WireError(_error_text(buf[pos + 5:end]))
                pos = end
                if tag == READY:
                    self._pending = buf[pos:]
                    return
            data = sock.recv(65536)
            if not data:
                raise WireError("server closed the connection")
            buf = buf[pos:] + data
            pos = 0

    def close(self) -> None:
        try:
            self.sock.sendall(messages.terminate())
        except OSError:
            pass
        self.sock.close()


def round_trips(host: str, port: int, user: str, password: str, database: str,
                count: int, warmup: int = 200, sql: str = "SELECT 1") -> list[int]:
    """Latency in nanoseconds of ``count`` sequential simple-protocol queries (after ``warmup``)."""
    client = BlockingClient(host, port, user, password, database)
    try:
        q = messages.query(sql)
        for _ in range(warmup):
            client.simple_query(q)
        samples = [0] * count
        clock = time.perf_counter_ns
        run = client.simple_query
        for i in range(count):
            t0 = clock()
            run(q)
            samples[i] = clock() - t0
        return samples
    finally:
        client.close()


# --------------------------------------------------------------------------
# asyncio: many idle authenticated connections


async def _open_one(host: str, port: int, user: str, password: str, database: str,
                    timeout: float) -> asyncio.StreamWriter:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        hs = Handshake(user, password, database)
        writer.write(hs.start())
        while not hs.ready:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise WireError("server closed the connection during login")
            reply = hs.feed(data)
            if reply:
                writer.write(reply)
        return writer
    except BaseException:
        writer.close()
        raise


async def open_idle_connections(host: str, port: int, user: str, password: str, database: str,
                                count: int, concurrency: int = 64, timeout: float = 30
                                ) -> tuple[list[asyncio.StreamWriter], list[str]]:
    """Open ``count`` logged-in connections; return (open writers, error messages)."""
    sem = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                writers.append(await _open_one(host, port, user, password, database, timeout))
            except (OSError, WireError, auth.AuthError, asyncio.TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))
    return writers, errors


async def close_connections(writers: list[asyncio.StreamWriter]) -> None:
    term = messages.terminate()
    for w in writers:
        try:
            w.write(term)
            w.close()
        except (OSError, RuntimeError):
            pass
    await asyncio.sleep(0.2)
