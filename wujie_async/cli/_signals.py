"""Stopping a waiting command on Ctrl-C or SIGTERM: gently first, at once the second time.

``docker stop``, systemd and Kubernetes send SIGTERM (then SIGKILL after a grace period), a
terminal sends SIGINT: both stop a run the same way. The first signal sets ``stop``: no new
submits, those on the wire get their keys (the journal keeps them), then the run closes and
prints its summary and how to continue. A second signal cancels the run at once.
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

    def on_signal(number: signal.Signals) -> None:
        if number == signal.SIGTERM:
            signals.terminated = True
        if stop.is_set() and main is not None:
            if not signals.quit_now.is_set():
                signals.quit_now.set()
                main.cancel()
            return
        stop.set()
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
        for number in installed:
            loop.remove_signal_handler(number)
