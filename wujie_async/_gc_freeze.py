"""Opt-in (``WujieClient(gc_freeze=True)``): keep full garbage collections short under load.

Each pending job is three objects the cyclic garbage collector tracks (the job, its future and
the poller's record of it). CPython's full (generation 2) collection walks every tracked object
of the process, so with 100,000 jobs pending a single collection stalls the event loop for a
few hundred milliseconds, and they recur while jobs pile up (each time the old generation grew
by a quarter).

``gc.freeze()`` moves every object alive now into a permanent generation that collections skip.
It is process-wide, which is why a library only does it when asked: while any such client is
open, an unreachable reference cycle among frozen objects (yours too) is not reclaimed; the
last such client to close calls ``gc.unfreeze()``, and the next full collection reclaims them.
Objects freed by reference counting (most of them, a settled job included) are freed as usual.

Before each freeze a young collection (generations 0 and 1, cheap) clears recent garbage, so
little of it is frozen.
"""

from __future__ import annotations

import gc

# Freeze after this many new jobs (about three tracked objects each): the part a full
# collection still walks stays near ``3 x FREEZE_EVERY`` objects plus the rest of the process.
FREEZE_EVERY = 2048

_open_freezers = 0  # clients with gc_freeze=True that are open: the last one unfreezes


class GcFreezer:
    """Freezes the process's objects as a client's jobs pile up (see the module doc)."""

    __slots__ = ("_active", "_since_freeze")

    def __init__(self) -> None:
        self._since_freeze = 0
        self._active = False

    def start(self) -> None:
        """The client opened: what is alive by now (imported modules, say) is frozen at once."""
        global _open_freezers
        if not self._active:
            self._active = True
            _open_freezers += 1
            _freeze()

    def job_tracked(self) -> None:
        """One more job is pending: freeze once enough new jobs have piled up."""
        self._since_freeze += 1
        if self._active and self._since_freeze >= FREEZE_EVERY:
            self._since_freeze = 0
            _freeze()

    def stop(self) -> None:
        """The client closed; the last open freezing client gives the objects back to gc."""
        global _open_freezers
        if self._active:
            self._active = False
            _open_freezers -= 1
            if _open_freezers == 0:
                gc.unfreeze()


def _freeze() -> None:
    gc.collect(1)  # young garbage only (cheap): little of it gets frozen
    gc.freeze()
