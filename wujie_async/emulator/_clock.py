"""The emulator's one clock: every duration it measures, and the unix stamps derived from it.

Job lives, rate-limit windows, 429 bursts and stats all read ``GatewayClock.now()``: by
default the running event loop's clock, the one ``asyncio.sleep`` and the client's timers run
on, so a test that fast-forwards the loop (``looptime``) moves the emulator's jobs with it.
Unix seconds appear only where the wire contract or a reader in another process needs them
(``start_gen_time``/``complete_time``, the signature's timestamp check, the stats timelines):
they are the same clock plus an epoch offset taken once, so the two never drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

Clock = Callable[[], float]
"""A zero-argument callable returning seconds that never go backwards."""


def loop_clock() -> float:
    """The running event loop's clock (``loop.time()``).

    Read outside a running loop (``emu.stats()`` after ``asyncio.run`` returned), it falls back
    to ``time.monotonic``, which is what asyncio's own loops read: the readings agree.
    """
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class GatewayClock:
    """Seconds for durations (``now``) and the unix time of any reading (``unix``).

    Args:
        clock: the source of seconds; default: the running loop's clock.
    """

    __slots__ = ("_clock", "_epoch_offset")

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = loop_clock if clock is None else clock
        self._epoch_offset: float | None = None

    def now(self) -> float:
        """The clock's reading, in seconds (only differences between readings mean anything)."""
        return self._clock()

    def start(self) -> float:
        """Fix the epoch offset (once; the first ``unix`` call does it when nothing did before).

        Returns:
            The offset: unix seconds minus the clock's reading.
        """
        if self._epoch_offset is None:
            self._epoch_offset = time.time() - self._clock()
        return self._epoch_offset

    def unix(self, at: float) -> float:
        """Unix seconds of the reading ``at`` (the offset is fixed once, so both move together)."""
        return at + self.start()

    def unix_now(self) -> float:
        """Unix seconds now, as this clock sees it."""
        return self.unix(self.now())
