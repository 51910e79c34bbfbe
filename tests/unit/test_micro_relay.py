"""benchmarks/micro_relay.py still drives whole transactions through the relay, in each of its modes."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import micro_relay


@pytest.mark.parametrize("routing, extended, transaction", [
    (False, False, False), (False, True, False), (True, False, False), (True, True, False),
    (False, False, True), (False, True, True),
], ids=["simple", "extended", "simple-routing", "extended-routing", "transaction", "transaction-extended"])
def test_each_mode_completes_its_transactions(capsys, routing, extended, transaction):
    async def go() -> None:
        # run() checks that 1,000 warm-up transactions each ended with the connection checked in.
        micro_relay.run(200, 1, routing, extended, profile=False, transaction=transaction)

    asyncio.run(go())
    out = capsys.readouterr().out
    assert "us CPU per transaction" in out, out
    assert ("BEGIN/SELECT/END" in out) == transaction, out


def test_the_queued_mode_waits_for_the_pool_every_time(capsys):
    async def go() -> None:
        # run() checks that each of the 1,000 warm-up transactions waited in the pool's queue.
        micro_relay.run(200, 1, False, False, profile=False, queued=True)

    asyncio.run(go())
    assert "simple, queued" in capsys.readouterr().out


def test_the_connect_mode_logs_in_runs_and_leaves(capsys):
    import uvloop

    # run_connect() checks that its 200 warm-up logins each left no client behind and the server idle.
    uvloop.run(micro_relay.run_connect(50, 1, profile=False))
    assert "us CPU per login + transaction" in capsys.readouterr().out
