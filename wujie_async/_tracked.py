"""The poller's record of one outstanding key (``_Tracked``: its timing, as ``KeyTiming``, and
the poller's own state of it), and its quick construction (``_new_tracked``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._jobs import ImageJob
from ._key_timing import KeyTiming

if TYPE_CHECKING:
    from ._otel import JobTrace


@dataclass(slots=True, kw_only=True)
class _Tracked(KeyTiming):
    """A tracked job with the poller's own state of it: none of this is the user's to see."""

    job: ImageJob  # its changing fields too: this poller is their one writer
    # When the key is asked about next; ``inf`` while it is in a call on the wire.
    due: float = math.inf
    # When the gateway last listed the key (None: not yet).
    last_seen: float | None = None
    # When a reply first left the key out since it was last listed (None: the last reply
    # listed it, or none has come back): absence is measured from here, over replies.
    absent_since: float | None = None
    # When a reply about the key last came back (listing it or not; None: none yet).
    answered_at: float | None = None
    # Whether a call that asked about the key failed since a reply about it last came back.
    failed_since_answer: bool = False
    asks: int = 0  # batch calls (or a fleet's reports) that asked about the key so far
    # Why the last call that asked about the key failed, until the gateway lists it again.
    failed_call: str | None = None
    trace: JobTrace | None = None  # its span and metrics record, while telemetry is on
    # Whether its reports and end teach the schedule (see ``set_learning``).
    learns: bool = True


_new = object.__new__


def _new_tracked(
    created_at: float,
    model: str | None,
    job: ImageJob,
    trace: JobTrace | None,
) -> _Tracked:
    """``_Tracked(created_at=..., ...)`` made field by field: half the instructions of the
    dataclass's ``__init__`` (29 keyword parameters), on every submit. Every field of
    ``KeyTiming`` and ``_Tracked`` is set here, to its default but for the arguments
    (tests/test_poller.py compares the two)."""
    tracked = _new(_Tracked)
    tracked.created_at = created_at
    tracked.model = model
    tracked.last_ask = tracked.predicted_end = tracked.predicted_span = None
    tracked.estimate_live = True
    tracked.live_reports = 0
    tracked.queued = tracked.predicted_queued = False
    tracked.last_expected = tracked.expected_since = None
    tracked.recheck = tracked.scout = tracked.lookout = False
    tracked.sentinel = tracked.tentative = False
    tracked.progress = None
    tracked.job = job
    tracked.due = math.inf
    tracked.last_seen = tracked.absent_since = tracked.answered_at = None
    tracked.failed_since_answer = False
    tracked.asks = 0
    tracked.failed_call = None
    tracked.trace = trace
    tracked.learns = True
    return tracked
