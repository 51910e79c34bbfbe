"""Which role (primary or replica) runs a client's next transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pypool.pool.group import PRIMARY

if TYPE_CHECKING:
    from pypool.client import ClientConnection
    from pypool.config import Pool


class Router:
    def __init__(self, pool: "Pool") -> None:
        self.pool = pool

    def route(self, client: "ClientConnection", tag: int, payload: bytes) -> str:
        return PRIMARY
