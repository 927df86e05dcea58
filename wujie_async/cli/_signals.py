"""Stopping a waiting command on Ctrl-C or SIGTERM: gently first, at once the second time.

``docker stop``, systemd and Kubernetes send SIGTERM (then SIGKILL after a grace period), a
terminal sends SIGINT: both stop a run the same way. The first signal sets ``stop``: no new
submits, those on the wire get their keys (the journal keeps them), then the run closes and
prints its summary and how to continue. A second signal cancels the run at once; so does the
end of ``TERM_GRACE_S`` after a SIGTERM, within the grace period of whoever sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
from rich.console import Console
from rich.text import Text

# After a SIGTERM, how long submits on the wire may take to finish before the run quits as at a
# second signal (they end uncertain): a submit whose gateway hangs would otherwise hold the run
# for Timeouts.request (30 s), past docker stop's 10 s, and SIGKILL leaves no summary.
TERM_GRACE_S = 8.0


@dataclass(slots=True)
class Signals:
    """What the signals did to a run.

    Attributes:
        quit_now: set when a second signal cancelled the run at once.
        terminated: a SIGTERM came (the command exits 143 rather than 130).
    """

    quit_now: anyio.Event = field(default_factory=anyio.Event)
    terminated: bool = False


@contextlib.contextmanager
def stopping_on_signals(stop: anyio.Event, console: Console) -> Iterator[Signals]:
    """Within the block, SIGINT and SIGTERM stop the run (see the module docstring)."""
    # Raw asyncio here: signal handlers on the loop, and the second signal cancels the main
    # task itself (uncancelled once the run is closed), which is asyncio's API.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = Signals()

    grace: list[asyncio.TimerHandle] = []

    def quit_now() -> None:
        if main is not None and not signals.quit_now.is_set():
            signals.quit_now.set()
            main.cancel()

    def on_signal(number: signal.Signals) -> None:
        if number == signal.SIGTERM:
            signals.terminated = True
        if stop.is_set() and main is not None:
            quit_now()
            return
        stop.set()
        if number == signal.SIGTERM:
            grace.append(loop.call_later(TERM_GRACE_S, quit_now))
        again = "Ctrl-C" if number == signal.SIGINT else "SIGTERM again"
        console.print(
            Text(
                f"{number.name}: stopping, letting submits on the wire finish ({again} to quit now)"
            )
        )

    installed: list[signal.Signals] = []
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(number, on_signal, number)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                break
            installed.append(number)
        yield signals
    finally:
        for handle in grace:
            handle.cancel()
        for number in installed:
            loop.remove_signal_handler(number)
