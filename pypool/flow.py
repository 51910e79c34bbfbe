"""Flow control for the relay, the same in both directions.

When the peer a connection writes to reads slower than the other side sends,
asyncio calls ``pause_writing`` on the writer's protocol; the relay then stops
reading the sending side's transport until ``resume_writing``. Each connection
owns one ReadingPause for its own transport; the other side of the relay calls it
(a client's through its session's ``io.pause_reading``/``resume_reading``).
"""

from __future__ import annotations

import asyncio


class ReadingPause:
    __slots__ = ("transport", "paused")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None  # set once connected (and again after a TLS upgrade)
        self.paused = False

    def pause(self) -> None:
        transport = self.transport
        if not self.paused and transport is not None and not transport.is_closing():
            self.paused = True
            transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
