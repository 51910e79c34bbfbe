"""One worker process of a multi-process pypool (``[general] workers = N``).

The supervisor (``pypool.workers``) starts N of these; each is a complete
pooler on the shared listen port (SO_REUSEPORT). What makes N of them one
instance lives here:

* pool shares: worker ``i`` runs every pool with its share of ``pool_size`` and
  ``min_pool_size`` (the shares add up to the configured numbers), so the
  servers see no more connections than the config allows;
* cancel keys: the worker index sits in the low bits of every BackendKeyData
  process id this worker hands out, so a CancelRequest that the kernel gives
  to another worker is passed to the owner;
* global causal reads: every worker publishes the commit positions it learns
  in its slot of a table the supervisor created (``commit_slots``);
* a control socket (unix, JSON lines, in the supervisor's private directory)
  through which peers forward cancels, ask for each other's statistics
  snapshots (``pypool.snapshot``, merged for admin ``SHOW``), run admin
  commands that must reach every worker (PAUSE, BAN, RELOAD ...), and through
  which the supervisor collects the snapshots it renders as ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import types
from typing import TYPE_CHECKING, Any, Protocol

from pypool import probes, snapshot, sqlstates
from pypool.admin.commands import AdminCommands, AdminError, Pooler
from pypool.admin.tables import TEXT
from pypool.causal import shared as causal_shared
from pypool.client import new_cancel_key
from pypool.protocol import messages as m

if TYPE_CHECKING:
    from pypool.config import Config

log = logging.getLogger("pypool.instance")

WORKER_INDEX_BITS = 6  # config.MAX_WORKERS == 64
_INDEX_MASK = (1 << WORKER_INDEX_BITS) - 1
CONTROL_TIMEOUT = 5.0  # seconds a peer has to answer


def share(total: int, index: int, count: int) -> int:
    """Worker ``index``'s part of ``total`` split over ``count`` workers; the parts add up to ``total``."""
    return total // count + (1 if index < total % count else 0)


def config_share(config: "Config", index: int, count: int) -> "Config":
    """The config one worker runs: every user's pool_size and min_pool_size replaced by its share."""
    pools = {}
    for name, pool in config.pools.items():
        users = {username: dataclasses.replace(user, pool_size=share(user.pool_size, index, count),
                                               min_pool_size=share(user.min_pool_size, index, count))
                 for username, user in pool.users.items()}
        pools[name] = dataclasses.replace(pool, users=types.MappingProxyType(users))
    return dataclasses.replace(config, pools=types.MappingProxyType(pools))


# Admin commands that change state: every worker must run them.
BROADCAST_COMMANDS = frozenset({"RELOAD", "PAUSE", "RESUME", "BAN", "UNBAN"})


def control_socket_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"worker-{index}.sock")


def cancel_key_owner(process_id: int) -> int:
    return process_id & _INDEX_MASK


async def ask_control_socket(path: str, request: dict, timeout: float = CONTROL_TIMEOUT) -> dict:
    """One request, one JSON answer over a worker's control socket."""
    async def exchange() -> dict:
        reader, writer = await asyncio.open_unix_connection(path, limit=64 * 1024 * 1024)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        if not line:
            raise ConnectionError(f"{path} closed without an answer")
        return json.loads(line)

    async with asyncio.timeout(timeout):  # not wait_for: a cancelled caller must not get the answer
        return await exchange()


class WorkerPooler(Pooler, snapshot.StatsSource, Protocol):
    """The pooler a worker runs (``pypool.app.Application``): what its peers ask of it."""

    accepting: bool

    def cancel(self, process_id: int, secret_key: int) -> "asyncio.Task[None] | None": ...


class Worker:
    def __init__(self, index: int, count: int, rundir: str) -> None:
        if not 0 <= index < count:
            raise ValueError(f"worker index {index} outside 0..{count - 1}")
        self.index = index
        self.count = count
        self.rundir = rundir
        self.app: WorkerPooler | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._commit_table: causal_shared.CommitTable | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.index}/{self.count}>"

    # ------------------------------------------------------------- pools

    def share(self, config: "Config") -> "Config":
        return config_share(config, self.index, self.count)

    # ------------------------------------------------------- causal reads

    def commit_slots(self, pool_name: str) -> causal_shared.SharedSlots | None:
        """This worker's slot among every worker's commit positions for ``pool_name``.

        None (the pool then keeps its positions to this worker, and logs why)
        if the supervisor's table is missing or already holds its most pools.
        """
        try:
            if self._commit_table is None:
                self._commit_table = causal_shared.CommitTable(causal_shared.table_path(self.rundir), self.index)
            return self._commit_table.slots(pool_name)
        except (OSError, ValueError, causal_shared.TableFull) as exc:
            log.error("pool %s: global causal reads cannot see other workers' writes: %s", pool_name, exc)
            return None

    # ------------------------------------------------------------ cancel

    def cancel_key(self) -> tuple[int, int]:
        process_id, secret = new_cancel_key()
        return (process_id & ~_INDEX_MASK) | self.index, secret

    def forward_cancel(self, process_id: int, secret_key: int) -> bool:
        """True when the key belongs to another worker: the cancel goes there instead."""
        owner = cancel_key_owner(process_id)
        if owner == self.index or owner >= self.count:
            return False
        log.debug("CancelRequest for a client of worker %d: passed on", owner)
        self._spawn(self._forward_cancel(owner, process_id, secret_key))
        return True

    async def _forward_cancel(self, owner: int, process_id: int, secret_key: int) -> None:
        try:
            await self.ask(owner, {"op": "cancel", "process_id": process_id, "secret_key": secret_key})
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("could not pass a CancelRequest to worker %d: %s", owner, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------- control socket

    async def start(self, app: WorkerPooler) -> None:
        self.app = app
        path = control_socket_path(self.rundir, self.index)
        if os.path.exists(path):
            os.unlink(path)  # left by a crashed predecessor
        self._server = await asyncio.start_unix_server(self._serve, path, limit=1024 * 1024)
        os.chmod(path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._commit_table is not None:
            self._commit_table.close()
            self._commit_table = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                line = await reader.readline()
            try:
                reply = await self._answer(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - a bad request must not end the control socket
                log.exception("control request failed")
                reply = {"error": [sqlstates.INTERNAL_ERROR, f"worker {self.index}: {exc}"]}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: dict) -> dict:
        assert self.app is not None
        op = request.get("op")
        if op == "ping":
            ready = probes.app_readiness(self.app)
            return {"pid": os.getpid(), "index": self.index, "accepting": self.app.accepting,
                    "ready": [ready.ok, ready.reason]}
        if op == "cancel":
            self.app.cancel(int(request["process_id"]), int(request["secret_key"]))
            return {}
        if op == "drain":  # the supervisor's first stop: a no-op for a worker already draining on its own signal
            if not self.app.leaving:
                self.app.request_shutdown(str(request.get("reason", "supervisor")))
            return {}
        if op == "admin":
            return await self._run_admin_locally(str(request["statement"]))
        if op == "snapshot":
            # This worker's own figures, and its instance-wide SHOW STATS averages.
            return {"snapshot": snapshot.take(self.app).to_dict(),
                    "averages": [[list(key), value] for key, value in self.app.averager.averages.items()]}
        return {"error": [sqlstates.PROTOCOL_VIOLATION, f"unknown control request {op!r}"]}

    async def _run_admin_locally(self, statement: str) -> dict:
        assert self.app is not None
        try:
            await AdminCommands(self.app, f"worker {self.index} control socket").run(statement)
        except AdminError as exc:
            return {"error": [exc.sqlstate, str(exc)]}
        return {}

    # ------------------------------------------------------------- peers

    async def ask(self, index: int, request: dict) -> dict:
        return await ask_control_socket(control_socket_path(self.rundir, index), request)

    async def ask_peers(self, request: dict) -> list[dict]:
        """Every other worker's answer; a worker that cannot answer (restarting) is left out and logged."""
        peers = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self.ask(i, request) for i in peers), return_exceptions=True)
        out = []
        for index, answer in zip(peers, answers):
            if isinstance(answer, BaseException):
                log.warning("worker %d did not answer %s: %s", index, request.get("op"), answer)
            else:
                out.append(answer)
        return out

    # ------------------------------------------------------------- admin

    async def instance_snapshot(self) -> snapshot.Snapshot:
        """This worker's snapshot merged with every peer's: the figures of the whole instance."""
        assert self.app is not None
        answers = await self.ask_peers({"op": "snapshot"})
        peers = [snapshot.Snapshot.from_dict(a["snapshot"]) for a in answers if "snapshot" in a]
        return snapshot.merge([snapshot.take(self.app), *peers])

    async def admin_command(self, commands: AdminCommands, statement: str) -> bytes:
        """Run one admin statement for the whole instance; AdminError propagates like a local one.

        SHOW needs nothing here: the console renders ``Application.stats_snapshot``,
        which a worker answers with ``instance_snapshot``. Commands that change
        state run here and on every peer.
        """
        tokens = statement.split()
        verb = tokens[0].upper() if tokens else ""
        if verb == "SHUTDOWN":
            # The supervisor drains every worker (and does not restart this one).
            log.info("admin %s: SHUTDOWN of the instance", commands.peer)
            os.kill(os.getppid(), signal.SIGINT)
            return m.result_set([("success", TEXT)], [["t"]], tag="SHUTDOWN")
        local = await commands.run(statement)
        if verb in BROADCAST_COMMANDS:
            for answer in await self.ask_peers({"op": "admin", "statement": statement}):
                if "error" in answer:
                    log.warning("admin %r on a peer worker failed: %s", statement, answer["error"][1])
        return local
