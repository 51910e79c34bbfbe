"""Opening connections to a server (TCP or TLS, then the login) and sending it cancel requests."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from pypool import sqlstates
from pypool.pool.conversation import ServerError
from pypool.pool.server import Credentials, ServerConnection
from pypool.protocol import auth
from pypool.protocol import messages as m
from pypool.tls import connect_tls

if TYPE_CHECKING:
    from pypool.config import ServerAddress

log = logging.getLogger("pypool.server")


async def open_connection(address: "ServerAddress", credentials: Credentials,
                          startup_params: dict[str, str], timeout: float,
                          tls: ssl.SSLContext | None = None) -> ServerConnection:
    """Connect (over TLS when ``tls`` is given) and log in within ``timeout`` seconds, or raise ServerError."""
    loop = asyncio.get_running_loop()
    label = f"{address.host}:{address.port}"

    async def _connect() -> ServerConnection:
        if tls is None:
            _, conn = await loop.create_connection(lambda: ServerConnection(address, credentials),
                                                   address.host, address.port)
        else:
            sock = await connect_tls(address.host, address.port, tls)
            try:
                _, conn = await loop.create_connection(lambda: ServerConnection(address, credentials), sock=sock,
                                                       ssl=tls, server_hostname=address.host)
            except BaseException:
                sock.close()
                raise
        try:
            await conn.login(startup_params)
        except BaseException:
            conn.close()
            raise
        return conn

    try:
        # Not wait_for: on Python 3.11 it drops a cancel that comes with the connection (a pool or
        # monitor being stopped would go on with it).
        async with asyncio.timeout(timeout):
            return await _connect()
    except asyncio.TimeoutError:
        raise ServerError(f"could not connect to server {label}: timed out after {timeout * 1000:.0f} ms",
                          {"C": sqlstates.CONNECTION_FAILURE}) from None
    except ssl.SSLCertVerificationError as exc:
        raise ServerError(f"could not connect to server {label}: TLS handshake failed: certificate verify failed "
                          f"({exc.verify_message})", {"C": sqlstates.CONNECTION_FAILURE}) from None
    except ssl.SSLError as exc:
        raise ServerError(f"could not connect to server {label}: TLS handshake failed: {exc.reason or exc}",
                          {"C": sqlstates.CONNECTION_FAILURE}) from None
    except OSError as exc:
        raise ServerError(f"could not connect to server {label}: {exc.strerror or exc}",
                          {"C": sqlstates.CONNECTION_FAILURE}) from None
    except auth.AuthError as exc:
        raise ServerError(f"authentication to server {label} failed: {exc}",
                          {"C": sqlstates.INVALID_PASSWORD}) from None


async def send_cancel(address: "ServerAddress", process_id: int, secret_key: int, timeout: float = 5.0) -> None:
    """Deliver a CancelRequest for a backend on ``address`` (best effort).

    Returns once the server has closed the connection, as libpq's PQcancel
    waits: by then the postmaster has signalled the backend.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("cancel: cannot reach %s:%s: %s", address.host, address.port, exc)
        return
    writer.write(m.cancel_request(process_id, secret_key))
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
            await reader.read()
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("cancel: %s:%s did not confirm the cancel request: %s", address.host, address.port, exc)
    finally:
        writer.close()
