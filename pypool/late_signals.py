"""After the shutdown: a late SIGTERM, SIGINT or SIGHUP must not kill pypool on its way out.

While the event loop runs, ``Application.install_signal_handlers`` (one
process, each worker) or ``Supervisor`` takes these signals. Once the
shutdown is done ("pypool stopped") the process still has tens to hundreds of
milliseconds to go (the event loop's teardown, then the interpreter's exit,
which frees every module), and both put the default action back: asyncio's
``loop.close()`` for each handler it added, and the interpreter's exit for
every signal that has a Python handler (uvloop's included) but not for one
that is ignored. A signal in that window, such as a second SIGTERM from an
operator or a supervisor, killed the process (status -15, or 143 in a shell)
after a clean drain, and systemd or Kubernetes reads that as a crash.
Ignoring the signals from the end of the shutdown on closes the window: there
is nothing left for them to stop, and the exit status stays 0.
"""

from __future__ import annotations

import signal

STOP_AND_RELOAD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore() -> None:
    """From now on SIGINT, SIGTERM and SIGHUP do nothing (call in the main thread, once stopped)."""
    for sig in STOP_AND_RELOAD:
        signal.signal(sig, signal.SIG_IGN)
