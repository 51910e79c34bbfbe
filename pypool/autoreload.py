"""PgCat's ``autoreload``: re-read the config file when it changes, with the rules of SIGHUP.

Every ``autoreload`` milliseconds the file's bytes are compared with what was
seen last; when they differ the config is reloaded exactly as SIGHUP does
(``Application.reload``): unchanged pools keep their connections, an invalid
file is logged with its file and key and the running config stays. The same
broken bytes are not reported again; the next edit is.

Comparing bytes rather than modification times is what a Kubernetes ConfigMap
volume needs: the kubelet swaps a symlink to a new directory, so the path's
content changes while times and sizes may not say so.

``autoreload`` itself is read at start, as in PgCat (``config_keys``: a
reload keeps the running value). With ``workers = N`` the supervisor watches
the file and reloads every worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Callable, Protocol

from pypool.config import Config, ConfigError, load_config

log = logging.getLogger("pypool.autoreload")


class ConfigWatcher:
    """Tells whether a file's bytes changed since the last look."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = self._fingerprint()

    def _fingerprint(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return hashlib.sha256(fh.read()).digest()
        except OSError:
            return None  # being replaced, or gone: keep the running config, look again later

    def changed(self) -> bool:
        now = self._fingerprint()
        if now is None or now == self._seen:
            return False
        self._seen = now
        return True


class Reloadable(Protocol):
    """What autoreload uses of ``pypool.app.Application`` (no import: the app starts the watcher)."""

    config: Config
    worker: Any
    accepting: bool

    def reload(self, reason: str = ...) -> None: ...


def watch(app: Reloadable) -> "list[asyncio.Task[None]]":
    """The task watching a single-process pooler's file, if any (workers: the supervisor watches)."""
    if app.config.general.autoreload is None or app.worker is not None:
        return []
    return [asyncio.get_running_loop().create_task(_run(app, ConfigWatcher(app.config.path)))]


async def _run(app: Reloadable, watcher: ConfigWatcher) -> None:
    period = app.config.general.autoreload
    log.info("autoreload: checking %s every %d ms", watcher.path, period)
    while app.accepting:
        await asyncio.sleep(period / 1000)
        if app.accepting and watcher.changed():
            try:
                app.reload(reason="autoreload")
            except ConfigError:
                pass  # logged by reload() with the file and the key; the running config stays
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad reload
                log.exception("autoreload: the reload failed; the running config stays")


class SupervisorAutoreload:
    """The supervisor's watcher: polled from its loop; a changed, valid file reloads every worker."""

    def __init__(self, path: str, config: Config, reload_workers: Callable[[str], None]) -> None:
        period = config.general.autoreload
        self.reload_workers = reload_workers
        self.watcher = ConfigWatcher(path) if period is not None else None
        self.period_s = (period or 0) / 1000
        self._next = 0.0
        if self.watcher is not None:
            log.info("autoreload: checking %s every %d ms", path, period)

    def poll(self, now: float) -> None:
        if self.watcher is None or now < self._next:
            return
        self._next = now + self.period_s
        if not self.watcher.changed():
            return
        try:
            # Checked here once, so an invalid file is reported once rather than by every worker.
            load_config(self.watcher.path)
        except ConfigError as exc:
            log.error("config reload (autoreload) rejected, the running config stays: %s", exc)
            return
        self.reload_workers("autoreload")
