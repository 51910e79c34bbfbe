"""The pool group's one checkout API, without sockets: checkout_now, check-in clean or dirty, waiters, bans."""

from __future__ import annotations

import asyncio

from pypool.config import default_config_dict, dump_config, parse_config
from pypool.pool.group import CheckoutAgain, CheckoutTask, PoolGroup
from pypool.pool.pool import CallbackWaiter, PoolTimeout
from pypool.pool.server import IDLE, ServerConnection, ServerError
from pypool.roles import PRIMARY, REPLICA

from tests.unit._fakes import idle_server


def group(checkout_timeout_ms: int = 60_000) -> PoolGroup:
    cfg = default_config_dict({})
    pool = cfg["pools"]["postgres"]
    pool["users"]["0"]["pool_size"] = 1
    pool["checkout_timeout"] = checkout_timeout_ms
    config = parse_config(dump_config(cfg))
    pool_config = config.pools["postgres"]
    (user,) = pool_config.users.values()
    return PoolGroup(pool_config, user, config.general)


class Calls:
    """Records the waiter's callback and lets a test await it."""

    def __init__(self) -> None:
        self.ready: list[ServerConnection] = []
        self.errors: list[Exception] = []
        self.called = asyncio.Event()

    def on_ready(self, conn: ServerConnection) -> None:
        self.ready.append(conn)
        self.called.set()

    def on_error(self, exc: Exception) -> None:
        self.errors.append(exc)
        self.called.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.called.wait(), 10)


def test_an_idle_connection_is_checked_out_at_once_and_checked_in_clean_or_dirty():
    async def scenario() -> None:
        g = group()
        conn = idle_server(g.primary)
        calls = Calls()
        assert g.checkout_now(PRIMARY, calls.on_ready, calls.on_error) is conn
        assert g.primary.active == 1 and not g.primary.idle
        g.checkin(conn)
        assert list(g.primary.idle) == [conn] and conn.state == IDLE and g.primary.active == 0
        assert g.checkout_now(PRIMARY, calls.on_ready, calls.on_error) is conn
        g.checkin(conn, clean=False)
        assert conn.closed and g.primary.size == 0 and g.primary.stats.closed_dirty == 1

    asyncio.run(scenario())


def test_a_full_pool_queues_a_callback_served_by_the_next_check_in():
    async def scenario() -> None:
        g = group()
        conn = idle_server(g.primary)
        first, second = Calls(), Calls()
        assert g.checkout_now(PRIMARY, first.on_ready, first.on_error) is conn
        waiter = g.checkout_now(PRIMARY, second.on_ready, second.on_error)
        assert isinstance(waiter, CallbackWaiter)
        g.checkin(conn)
        assert not second.ready, "called back from the event loop, never from inside check-in"
        await second.wait()
        assert second.ready == [conn] and g.primary.active == 1

    asyncio.run(scenario())


def test_a_queued_wait_past_checkout_timeout_reports_pool_timeout():
    async def scenario() -> None:
        g = group(checkout_timeout_ms=20)
        conn = idle_server(g.primary)
        calls = Calls()
        g.checkout_now(PRIMARY, calls.on_ready, calls.on_error)
        g.checkout_now(PRIMARY, calls.on_ready, calls.on_error)
        await calls.wait()
        assert [type(e) for e in calls.errors] == [PoolTimeout] and not calls.ready
        g.checkin(conn)
        assert list(g.primary.idle) == [conn], "a timed-out waiter does not take the connection"

    asyncio.run(scenario())


def test_a_replica_that_cannot_be_reached_is_banned_and_the_caller_told_to_check_out_again():
    async def scenario() -> None:
        g = group()
        reachable, unreachable = g.replicas[0], g.replicas[1]
        g.ban(reachable, "test: out of rotation")
        unreachable.size = unreachable.settings.pool_size  # full: a checkout must queue
        calls = Calls()
        waiter = g.checkout_now(REPLICA, calls.on_ready, calls.on_error)
        assert isinstance(waiter, CallbackWaiter) and waiter.pool is unreachable
        waiter.set_exception(ServerError("could not connect to server: refused"))
        await calls.wait()
        assert [type(e) for e in calls.errors] == [CheckoutAgain]
        assert g.is_banned(unreachable)

    asyncio.run(scenario())


def test_a_paused_pool_waits_in_a_checkout_task_until_resumed():
    async def scenario() -> None:
        g = group()
        conn = idle_server(g.primary)
        g.primary.pause()
        calls = Calls()
        waiting = g.checkout_now(PRIMARY, calls.on_ready, calls.on_error)
        assert isinstance(waiting, CheckoutTask)
        await asyncio.sleep(0)
        assert not calls.called.is_set()
        g.primary.resume()
        await calls.wait()
        assert calls.ready == [conn]

    asyncio.run(scenario())


def test_a_primary_failure_in_a_queued_wait_is_reported_as_the_primary_being_unavailable():
    async def scenario() -> None:
        g = group()
        g.primary.size = g.primary.settings.pool_size
        calls = Calls()
        waiter = g.checkout_now(PRIMARY, calls.on_ready, calls.on_error)
        waiter.set_exception(ServerError("could not connect", {"C": "08006"}))
        await calls.wait()
        (error,) = calls.errors
        assert isinstance(error, ServerError) and error.sqlstate == "08006"
        assert "primary server" in str(error) and "is unavailable" in str(error)

    asyncio.run(scenario())
