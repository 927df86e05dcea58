"""Progress of a bulk run that reads anywhere: a live bar on a terminal, plain lines in a log.

Counts are of input lines, each in exactly one state at a time (queued, submitting, generating,
saving, saved, failed, ...); a line moves between states, so no count can go negative. A line
is ``saving`` while one of its images is being downloaded, so a slow image server shows as such
rather than as a slow job. Shown, a line queued or submitting is "to send" (not yet taken by
the gateway), and one generating is "at the gateway" (its job queued there, or generating).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Final, Literal

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Mode = Literal["rich", "plain", "none"]
LineState = Literal[
    "queued",
    "submitting",
    "generating",
    "saving",
    "saved",
    "failed",
    "moderated",
    "rejected",
    "uncertain",
    "not_sent",
    "other_gateway",
]
ENDED: Final = (
    "saved",
    "failed",
    "moderated",
    "rejected",
    "uncertain",
    "not_sent",
    "other_gateway",
)
PLAIN_INTERVAL_S: Final = 10.0


class Tally:
    """Where every input line is now, moved by transitions only.

    Each outcome is counted under its own name (as the summary says it). Rates count only
    lines this run waited for: a line a re-run leaves as an earlier run ended it is settled
    (:meth:`settle`), counted in its outcome but not in the rate.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.states: Counter[str] = Counter(queued=total)
        self._where: dict[int, str] = {}
        self.images = 0
        self.settled = 0
        self.started = time.monotonic()

    def move(self, line: int, to: LineState) -> None:
        """Line ``line`` is now in state ``to``."""
        before = self._where.get(line, "queued")
        if before == to:
            return
        self.states[before] -= 1
        self.states[to] += 1
        self._where[line] = to

    def settle(self, line: int, to: LineState) -> None:
        """Line ``line`` ended in an earlier run as ``to``; this run does not touch it."""
        if self._where.get(line, "queued") == "queued":
            self.settled += 1
        self.move(line, to)

    @property
    def ended(self) -> int:
        """Lines that have ended (saved or not), settled ones included."""
        return sum(self.states[state] for state in ENDED)

    def rates(self) -> tuple[float, float]:
        """(lines/s, images/s) of this run's own work since its start."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (self.ended - self.settled) / elapsed, self.images / elapsed

    def detail(self) -> str:
        """The counts and rates, one short line."""
        jobs, images = self.rates()
        states = self.states
        # "queued" and "generating" are the gateway's words for a job's status: a line not
        # sent yet is "to send", and one whose job the gateway took (queued there or
        # generating) is "at the gateway".
        parts = [
            f"to send {states['queued'] + states['submitting']}",
            f"at the gateway {states['generating']}",
            f"saving {states['saving']}",
            f"saved {states['saved']}",
        ]
        parts += [f"{name} {states[name]}" for name in ENDED[1:] if states[name]]
        return " · ".join([*parts, f"{jobs:.1f} lines/s", f"{images:.1f} img/s"])

    def plain_line(self) -> str:
        """A full progress line for logs."""
        percent = 100.0 * self.ended / self.total if self.total else 100.0
        eta = ""
        jobs, _ = self.rates()
        if 0 < self.ended < self.total and jobs > 0:
            eta = f" · ETA {_clock((self.total - self.ended) / jobs)}"
        return f"progress: {self.ended}/{self.total} lines ({percent:.0f}%){eta} · {self.detail()}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _TwoLineProgress(Progress):
    """Bar, count and ETA on the first line (they fit 80 columns), the counts below it."""

    def __init__(self, tally: Tally, console: Console) -> None:
        self._tally = tally
        super().__init__(
            TextColumn("[bold]lines"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=8,
        )

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text(self._tally.detail(), no_wrap=True, overflow="ellipsis")


class Display:
    """Shows a run's progress in ``mode`` and prints per-line messages above it."""

    def __init__(
        self,
        tally: Tally,
        console: Console,
        *,
        mode: Mode,
        quiet: bool = False,
        interval: float = PLAIN_INTERVAL_S,
    ) -> None:
        self.tally = tally
        self.console = console
        self.mode = mode
        self.quiet = quiet
        self._interval = interval
        self._progress: _TwoLineProgress | None = None
        self._task: int | None = None

    def note(self, message: str) -> None:
        """A one-line message (foreign text must already be cleaned); never markup."""
        if not self.quiet:
            self.console.print(Text(message), soft_wrap=True)

    def refresh(self) -> None:
        """Show the latest counts (the plain mode prints on its own clock)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.tally.ended)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Show progress for the duration of the block."""
        if self.mode == "rich" and not self.quiet:
            with _TwoLineProgress(self.tally, self.console) as progress:
                self._progress = progress
                self._task = int(progress.add_task("lines", total=self.tally.total))
                try:
                    yield
                finally:
                    self.refresh()
                    self._progress = None
            return
        if self.mode == "plain" and not self.quiet:
            ticker = asyncio.get_running_loop().create_task(self._tick())
            try:
                yield
            finally:
                ticker.cancel()
                self.console.print(Text(self.tally.plain_line()), soft_wrap=True)
            return
        yield

    async def _tick(self) -> None:
        self.console.print(Text(self.tally.plain_line()), soft_wrap=True)
        while True:
            await asyncio.sleep(self._interval)
            self.console.print(Text(self.tally.plain_line()), soft_wrap=True)
