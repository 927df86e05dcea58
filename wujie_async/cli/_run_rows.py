"""A run's manifest rows as the run sees them: each queued for the disk as it comes (see
``_rows``: the loop never waits on the disk), and every row a disk refused, stopped taking or
lost with a deleted manifest kept for the summary (keys included), the problem handed to the
run, which stops sending: a job whose outcome cannot be recorded would be paid again by a
re-run without a journal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._manifest import Manifest
from ._rows import RowWriter
from ._stops import OutputUnwritableError


class RunRows:
    """The manifest rows of one run.

    Args:
        manifest: the manifest, open for this run's rows.
        not_written: the run's list of rows the disk did not take (its result's): appended
            to, emptied by :meth:`rewrite_refused`, never replaced.
        stop: told of each problem that stops the sending (the run keeps the first).
        make_room: called once, at the first row the disk refuses (see ``RowWriter``).
        spare_room: called for each later refused ``pending`` row (see ``RowWriter``).
        journaled: the run keeps a journal (said when the manifest is deleted under it).
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        not_written: list[dict[str, Any]],
        stop: Callable[[OutputUnwritableError], None],
        make_room: Callable[[], None] | None = None,
        spare_room: Callable[[int], None] | None = None,
        journaled: bool = False,
    ) -> None:
        self._manifest = manifest
        self._not_written = not_written
        self._stop = stop
        self._make_room = make_room
        self._spare_room = spare_room
        self._journaled = journaled
        self._rows: RowWriter | None = None  # started with the first row
        self._stuck = False  # the disk stopped answering: nothing more waits on it

    def write(self, record: dict[str, Any]) -> None:
        """Queue one manifest row. A manifest that cannot be written (disk full, say) stops
        the run like a systemic error: nothing more is sent, the jobs out are still
        collected, and the summary lists the rows it could not write, keys included."""
        if self._rows is None:
            self._rows = RowWriter(
                self._manifest,
                make_room=self._make_room,
                spare_room=self._spare_room,
                refused=self._refused,
                gone=self._gone,
            )
        self._rows.write(record)

    def waiting_for(self) -> float:
        """Seconds the oldest row queued has waited for the disk (0: none waits)."""
        return self._rows.waiting_for() if self._rows is not None else 0.0

    def _refused(self, record: dict[str, Any] | None, exc: OSError) -> None:
        if record is not None:
            self._not_written.append(record)
        self._stop(OutputUnwritableError.of("the manifest could not be written", exc))

    def _gone(self, written: list[dict[str, Any]]) -> None:
        # Every row of this run went with the file: listed (keys included) in the summary.
        self._not_written += written
        self._stop(OutputUnwritableError.manifest_gone(journaled=self._journaled))

    async def settle(self) -> None:
        """Wait until the rows queued are written, as long as the disk keeps taking them (a
        backlog of many rows is no stalled disk). Rows left once it has taken none for
        ``ROWS_DEADLINE_S`` (it stopped answering) are listed with the rows it refused, and
        the run ends as a refusal ends it (exit 3, keys in the summary). A cancel (a signal
        that ends the closing waits) lists the rows not written yet the same way."""
        rows = self._rows
        if rows is None or self._stuck:
            return
        drained = cut = False
        try:
            drained = await rows.drain()
        except BaseException:
            cut = True
            raise
        finally:
            if not drained:
                self._stuck = True
                unwritten = rows.unwritten()
                self._not_written += unwritten
                if not cut:
                    self._stop(OutputUnwritableError.manifest_held())
                elif unwritten:  # the disk may answer yet, but nothing waits for it
                    self._stop(OutputUnwritableError.manifest_cut_short())

    @property
    def held(self) -> bool:
        """The manifest's disk took no row for ``ROWS_DEADLINE_S`` (or a signal stopped the
        wait): nothing more waits on that disk."""
        return self._stuck

    async def rewrite_refused(self, make_room: Callable[[], None]) -> None:
        """Once every download has ended: ``make_room`` (blocking), then the rows the disk
        refused, written again as far as it takes them now (bounded like :meth:`settle`)."""
        rows = self._rows
        if rows is None or self._stuck or not self._not_written:
            return
        records = list(self._not_written)
        self._not_written.clear()
        rows.rewrite(records, make_room)
        await self.settle()

    def close(self) -> None:
        """Close the manifest once its rows are written (never waits: see ``_rows``)."""
        if self._rows is not None:
            self._rows.close()
        else:
            self._manifest.close()
