"""``shutdown_delay`` (ms, pypool addition): serve on for a moment after SIGTERM, then drain.

From the signal on, ``/readyz`` fails, but pypool goes on serving every
client, new ones included, for ``shutdown_delay``; only then does the drain
start (``pypool.shutdown``: new clients refused with 57P01, idle ones closed,
transactions in flight finished). A load balancer that health-checks
``/readyz`` (HAProxy's ``option httpchk``) stops sending clients within its
check interval, so with ``shutdown_delay`` longer than that no client is ever
refused: the pooler's own counterpart of a Kubernetes ``preStop`` sleep. A
second signal during the delay ends it and the drain at once.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("pypool")


async def serve_on(delay_ms: int, reason: str, hurry: asyncio.Event) -> None:
    """Return after ``delay_ms``, or as soon as ``hurry`` is set."""
    if delay_ms <= 0:
        return
    log.info("%s: /readyz fails from now on; serving %.1f s more (shutdown_delay) before the drain",
             reason, delay_ms / 1000)
    try:
        async with asyncio.timeout(delay_ms / 1000):
            await hurry.wait()
    except asyncio.TimeoutError:
        pass
