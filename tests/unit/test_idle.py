"""idle_client_in_transaction_timeout's sweep (pypool/idle.py), without sockets: which clients it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from pypool.idle import IdleTransactionReaper
from pypool.session import states
from pypool.session.tracker import RequestTracker

TIMEOUT = 1.0


@dataclass(eq=False)
class Client:
    """The parts of a ClientSession the reaper reads, and what it does to one."""

    held_begin: str | None = None
    server: object = None
    state: states.ClientState = states.IDLE
    xact_count: int = 0
    peer: str = "127.0.0.1:1"
    user: str = "app"
    database: str = "db"
    closed_with: list[tuple[str, str]] = field(default_factory=list)

    def close_with_error(self, sqlstate: str, text: str, severity: str = "FATAL") -> None:
        self.closed_with.append((sqlstate, text))


def in_transaction_on_a_server() -> SimpleNamespace:
    requests = RequestTracker()
    requests.status = ord("T")  # its last ReadyForQuery: inside a transaction, nothing owed
    return SimpleNamespace(requests=requests, bytes_sent=10, bytes_received=20)


def sweeps(clients: list[Client], *times: float) -> IdleTransactionReaper:
    reaper = IdleTransactionReaper(SimpleNamespace(clients=clients))
    for now in times:
        reaper.sweep(TIMEOUT, now)
    return reaper


def test_a_held_begin_idle_past_the_timeout_is_ended_like_a_client_holding_a_server():
    held, on_server = Client(held_begin="BEGIN"), Client(server=in_transaction_on_a_server())
    reaper = sweeps([held, on_server], 0.0, 0.5, 1.0)
    assert reaper.terminated == 2
    assert held.closed_with == on_server.closed_with
    [(sqlstate, text)] = held.closed_with
    assert sqlstate == "25P03" and "idle_client_in_transaction_timeout (1000 ms)" in text


def test_a_held_begin_waiting_for_a_server_is_not_idle():
    waiting = Client(held_begin="BEGIN", state=states.WAITING)  # its first statement waits for a connection
    assert sweeps([waiting], 0.0, 0.5, 1.0, 5.0).terminated == 0


def test_a_new_held_begin_after_an_empty_transaction_starts_a_new_wait():
    client = Client(held_begin="BEGIN")
    reaper = sweeps([client], 0.0, 0.5)
    client.xact_count += 1  # BEGIN; COMMIT answered by pypool, then BEGIN held again (the same text)
    reaper.sweep(TIMEOUT, 1.0)
    reaper.sweep(TIMEOUT, 1.9)
    assert reaper.terminated == 0
    reaper.sweep(TIMEOUT, 2.0)
    assert reaper.terminated == 1


def test_a_client_outside_a_transaction_is_left_alone():
    assert sweeps([Client()], 0.0, 1.0, 10.0).terminated == 0
