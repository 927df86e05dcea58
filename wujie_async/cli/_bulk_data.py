"""What a bulk run is given, rows (from the input file or the journal), and what it gives
back, its result: the plan, the summary and the journal commands read these without the run
itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._input import BulkItem
from ._outcome import LineOutcome, clean


@dataclass(frozen=True, slots=True)
class Row:
    """One input row as the run tracks it: from the input file, or from the journal."""

    line: int
    row_id: str | None
    tag: str | None
    body: dict[str, Any]

    @classmethod
    def of(cls, item: BulkItem) -> Row:
        """The row of an input-file item."""
        return cls(item.line, item.row_id, item.tag, item.request.body())

    @property
    def label(self) -> str:
        """How messages name the row."""
        named = f" (id {clean(self.row_id)})" if self.row_id is not None else ""
        return f"line {self.line}{named}" if self.line else f"id {clean(self.row_id)}"


@dataclass(slots=True)
class BulkResult:
    """What a run did."""

    outcomes: list[LineOutcome] = field(default_factory=list)
    saved_paths: list[Path] = field(default_factory=list)
    images: int = 0
    pending: int = 0
    pending_keys: list[str] = field(default_factory=list)  # the jobs of the pending lines
    systemic: BaseException | None = None
    interrupted: bool = False
    points: float = 0.0  # what this run's manifest rows record as charged
    unrecorded: list[dict[str, Any]] = field(default_factory=list)  # rows the disk refused
    # The requests of jobs that succeeded without the gateway saying what they cost.
    uncosted: list[dict[str, Any]] = field(default_factory=list)
    # What this run's jobs that saved their images were charged, per image, by kind (as
    # ``Limits.point_prices`` keys): a price for the jobs whose cost was not reported.
    prices: dict[str, float] = field(default_factory=dict)
    # The rows (of send or collect) whose submit went out: accepted, left pending, or ended
    # other than not_sent (a row may be listed more than once).
    # By the Row itself: rows of journal entries that name neither an id nor a line share
    # their outcome's name (line 0), and a resend forgets the old entry of each row sent.
    went_out: list[Row] = field(default_factory=list)
