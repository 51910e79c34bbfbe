"""``shutdown_delay`` (ms, pypool addition): serve on for a moment after SIGTERM, then drain.

From the signal on, ``/readyz`` fails, but pypool goes on serving every
client, new ones included, for ``shutdown_delay``; only then does the drain
start (new clients refused with 57P01, idle ones closed, transactions in
flight finished). A load balancer that health-checks ``/readyz`` (HAProxy's
``option httpchk``) stops sending clients within its check interval, so with
``shutdown_delay`` longer than that no client is ever refused: the pooler's
own counterpart of a Kubernetes ``preStop`` sleep. A second signal during the
delay stops at once, as during the drain.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

log = logging.getLogger("pypool")


class Stoppable(Protocol):
    """What the delay uses of ``pypool.app.Application`` (no import: the app starts the delay)."""

    config: Any

    async def shutdown(self, reason: str = ..., timeout: float | None = ...) -> None: ...


async def then_drain(app: Stoppable, reason: str, hurry: asyncio.Event) -> None:
    delay = app.config.general.shutdown_delay / 1000
    if delay > 0:
        log.info("%s: /readyz fails from now on; serving %.1f s more (shutdown_delay) before the drain",
                 reason, delay)
        try:
            await asyncio.wait_for(hurry.wait(), delay)
        except asyncio.TimeoutError:
            pass
    # Hurried by a second signal: no wait for transactions either.
    await app.shutdown(reason=reason, timeout=0.0 if hurry.is_set() else None)
