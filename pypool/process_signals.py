"""SIGINT, SIGTERM and SIGHUP while the event loop does not handle them: before it runs, and after the shutdown.

While the loop runs, ``Application.install_signal_handlers`` (one process,
each worker) or the ``Supervisor`` handles them: SIGINT and SIGTERM drain,
SIGHUP reloads. Outside it their default action is to end the process, and a
supervisor (systemd, Kubernetes) reads a death by SIGTERM (status -15, 143 in
a shell) as a crash:

* Before: from ``python -m pypool``'s first line to the loop's handlers (the
  imports and the config: about half a second), ``defer`` records them; the
  loop's handlers then act on what was recorded (a stop signal drains once
  start-up is done, as one sent a moment later would). Only the interpreter's
  own start comes before any Python code can catch a signal.
* After: once the shutdown is done ("pypool stopped"), the event loop's
  teardown and the interpreter's exit (which frees every module) take tens to
  hundreds of milliseconds, and both put the default action back (asyncio's
  ``loop.close()`` for each handler it added, the interpreter's exit for
  every Python handler, uvloop's included, but not for an ignored signal).
  A second SIGTERM there killed a cleanly drained pypool; ``ignore`` closes
  that window: there is nothing left to stop, and the exit status stays 0.
"""

from __future__ import annotations

import signal

STOP_AND_RELOAD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_pending: list[int] = []  # recorded by ``defer``, in the order they came
_deferring = False


def defer() -> None:
    """Record SIGINT, SIGTERM and SIGHUP instead of dying of them, until ``take_pending`` or ``restore``."""
    global _deferring
    if not _deferring:
        _deferring = True
        for sig in STOP_AND_RELOAD:
            signal.signal(sig, _record)


def _record(signum: int, frame: object) -> None:
    _pending.append(signum)


def take_pending() -> list[signal.Signals]:
    """The signals recorded so far (call once the real handlers are in place: later ones go there)."""
    global _deferring
    _deferring = False
    taken = [signal.Signals(s) for s in _pending]
    _pending.clear()
    return taken


def restore() -> None:
    """Not the pooler after all (``pypool config ...``): the default actions, and a recorded signal takes its own."""
    if not _deferring:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for sig in take_pending():
        signal.raise_signal(sig)


def ignore() -> None:
    """From now on SIGINT, SIGTERM and SIGHUP do nothing (call in the main thread, once stopped)."""
    for sig in STOP_AND_RELOAD:
        signal.signal(sig, signal.SIG_IGN)
