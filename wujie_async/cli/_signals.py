"""Stopping a waiting command on Ctrl-C or SIGTERM: gently first, at once the second time.

``docker stop``, systemd and Kubernetes send SIGTERM (then SIGKILL after a grace period), a
terminal sends SIGINT: both stop a run the same way. The first signal sets ``stop``: no new
submits, those on the wire get their keys (the journal keeps them), then the run closes and
prints its summary and how to continue. A second signal cancels the run at once; so does the
end of ``TERM_GRACE_S`` after a SIGTERM, within the grace period of whoever sent it.

Once the run has ended (:meth:`Signals.run_ended`), its closing waits (rows still to write,
the journal's last commit, each bounded: a disk that stopped answering holds them) are
entered with :meth:`Signals.cut_short`, and the handlers stay until the summary is printed: a
signal after the first one ends those waits at once, and the summary (with the keys of what
was not written) is printed all the same. Restored with the loop's defaults, a second signal
there killed the process before its summary, and those keys were never said. Every command
that runs a bulk job (``bulk``, ``resume``, ``status --wait``, ``journal resend``) goes so:
:meth:`Signals.run_or_quit` for the run, ``BulkRun.end`` for its closing waits, the handlers
held (``stopping_on_signals``) until the summary is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import anyio
from rich.console import Console
from rich.text import Text

# After a SIGTERM, how long submits on the wire may take to finish before the run quits as at a
# second signal (they end uncertain): a submit whose gateway hangs would otherwise hold the run
# for Timeouts.request (30 s), past docker stop's 10 s, and SIGKILL leaves no summary.
TERM_GRACE_S = 8.0

_T = TypeVar("_T")


def uncancel() -> None:
    """Undo the cancel our own second signal sent to this task (the run closed normally)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def unread(task: asyncio.Future[Any]) -> None:
    """A task nobody waits for any more: its error, if any, is taken (never logged)."""
    if not task.cancelled():
        task.exception()


class Signals:
    """What the signals did to a run, and the closing waits they may cut short.

    Attributes:
        quit_now: set when a second signal cancelled the run at once.
        terminated: a SIGTERM came (the command exits 143 rather than 130).
        received: a signal came, during the run or after it (the command exits 130 or 143).
        hurried: a signal asked the closing waits to end at once (see :meth:`cut_short`).
    """

    def __init__(self) -> None:
        self.quit_now = anyio.Event()
        self.terminated = False
        self.received = False
        self.hurried = False
        self.closing = False  # the run has ended: a signal no longer cancels it
        self.grace: asyncio.TimerHandle | None = None
        self._waits: set[anyio.CancelScope] = set()

    def run_ended(self) -> None:
        """The run has ended (its grace for submits on the wire with it): from now on a
        signal after the first ends the closing waits instead of cancelling the run."""
        self.closing = True
        if self.grace is not None:
            self.grace.cancel()

    async def run_or_quit(self, run: Callable[[], Awaitable[_T]], quit: Callable[[], _T]) -> _T:
        """``run()`` to its end, or ``quit()`` (what it did so far) when our own second signal
        cancelled it at once; either way the run has ended (:meth:`run_ended`)."""
        try:
            result = await run()
        except asyncio.CancelledError:
            if not self.quit_now.is_set():
                raise
            uncancel()  # our own second signal: close everything normally, then report
            result = quit()
        self.run_ended()
        return result

    async def close(self, closing: Coroutine[Any, Any, None]) -> None:
        """Wait for ``closing`` (a client's close: the journal's last commit, at most 2 s on
        a disk that stopped answering), run in a task of its own, which a signal after the
        first stops waiting for: the close itself is shielded from cancels, to settle every
        job and socket. Left so, it goes on while the summary is printed (the process exits
        at most ``EXIT_GRACE_S`` after its end)."""
        task = asyncio.ensure_future(closing)
        with self.cut_short():
            await asyncio.shield(task)
        if not task.done():
            task.add_done_callback(unread)  # cut short: its end is nobody's to report

    @contextlib.contextmanager
    def cut_short(self) -> Iterator[anyio.CancelScope]:
        """A closing wait that a signal ends at once: the block's scope is cancelled (at
        once if a signal asked so already; ``cancelled_caught`` says whether it was)."""
        with anyio.CancelScope() as scope:
            if self.hurried:
                scope.cancel()
            self._waits.add(scope)
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    def hurry(self) -> None:
        """End every closing wait now, and every later one at once."""
        self.hurried = True
        for scope in self._waits:
            scope.cancel()


@contextlib.contextmanager
def stopping_on_signals(stop: anyio.Event, console: Console) -> Iterator[Signals]:
    """Within the block, SIGINT and SIGTERM stop the run (see the module docstring)."""
    # Raw asyncio here: signal handlers on the loop, and the second signal cancels the main
    # task itself (uncancelled once the run is closed), which is asyncio's API.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = Signals()

    def quit_now() -> None:
        if main is not None and not signals.quit_now.is_set() and not signals.closing:
            signals.quit_now.set()
            main.cancel()

    def on_signal(number: signal.Signals) -> None:
        signals.received = True
        if number == signal.SIGTERM:
            signals.terminated = True
        again = "Ctrl-C" if number == signal.SIGINT else "SIGTERM again"
        if signals.closing:
            if stop.is_set():
                signals.hurry()  # the waits end; the summary follows at once
                return
            stop.set()
            console.print(
                Text(
                    f"{number.name}: the run has ended; writing what is left "
                    f"({again} to stop waiting for the disk)"
                )
            )
            return
        if stop.is_set() and main is not None:
            quit_now()
            return
        stop.set()
        if number == signal.SIGTERM:
            signals.grace = loop.call_later(TERM_GRACE_S, quit_now)
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
        if signals.grace is not None:
            signals.grace.cancel()
        for number in installed:
            loop.remove_signal_handler(number)
