"""TLS for both sides of the pooler: SSL contexts built from the [general] settings.

Clients ask for TLS in-band (an SSLRequest before the startup packet), and so
does pypool towards PostgreSQL: both upgrades happen on an open TCP
connection, so this module only builds the contexts and performs the
server-side negotiation; the client side is answered in ``client.py``.

Certificate files are read once, when the configuration is loaded, so an
unreadable key is a ConfigError naming the file and the key instead of a
failure at the first client.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pypool.config import ConfigError
from pypool.protocol import messages as m

if TYPE_CHECKING:
    from pypool.config import Config, General

# The answer a server gives to an SSLRequest.
TLS_ACCEPTED = b"S"
TLS_REFUSED = b"N"


@dataclass(frozen=True)
class ClientTls:
    """How pypool treats TLS from its clients: ``mode`` is disable, allow or require."""

    mode: str
    context: ssl.SSLContext | None

    @property
    def offered(self) -> bool:
        return self.context is not None and self.mode != "disable"

    @property
    def required(self) -> bool:
        return self.offered and self.mode == "require"


def client_tls(config: "Config") -> ClientTls:
    """The listener's TLS settings (``allow`` without a certificate means no TLS).

    Also loads the server-side context once, so that every certificate problem
    is a ConfigError when pypool starts.
    """
    general = config.general
    try:
        server_context(general)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(config.path, "general.server_tls_ca_file", f"cannot load CA certificates: {exc}") from None
    if general.tls_certificate is None or general.client_tls_mode == "disable":
        return ClientTls("disable", None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(general.tls_certificate, general.tls_private_key)
    except FileNotFoundError as exc:
        raise ConfigError(config.path, "general.tls_certificate",
                          f"cannot read certificate or key file: {exc.filename or exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(config.path, "general.tls_private_key",
                          f"certificate and private key do not load together: {exc}") from None
    return ClientTls(general.client_tls_mode, context)


@functools.lru_cache(maxsize=8)
def _server_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if verify:
        context = ssl.create_default_context(cafile=ca_file)
    else:
        # Encrypted but unauthenticated, as libpq's sslmode=require.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(general: "General") -> ssl.SSLContext | None:
    """The context for connections to PostgreSQL (shared by all pools), or None when ``server_tls`` is off."""
    if not general.server_tls:
        return None
    return _server_context(general.verify_server_certificate, general.server_tls_ca_file)


class ServerTlsRefused(OSError):
    """The server answered our SSLRequest with 'N' (it has ssl = off)."""

    # An OSError, not a PoolerError: open_connection reports every OSError as a ServerError (08006).


async def connect_tls(host: str, port: int, context: ssl.SSLContext) -> socket.socket:
    """Open a TCP connection to PostgreSQL and ask it for TLS; returns the socket, ready for the handshake.

    The SSLRequest and its one-byte answer are exchanged on the raw socket so the
    caller can hand the socket to ``loop.create_connection(ssl=...)``, which does
    the handshake and leaves nothing of the negotiation in the protocol's buffer.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, m.ssl_request())
            answer = await loop.sock_recv(sock, 1)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        if answer == TLS_ACCEPTED:
            return sock
        sock.close()
        if answer == TLS_REFUSED:
            raise ServerTlsRefused(f"server {host}:{port} does not accept TLS (server_tls is on)")
        raise OSError(f"server {host}:{port} sent {answer!r} in answer to SSLRequest")
    raise last or OSError(f"cannot resolve {host}")
