"""Where a model's watch window sits around a job's predicted end: the shape the schedule has
learned, one object per model, asked per waiting key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowShape:
    """Where a model's watch window sits around a job's predicted end, as things stand.

    The window of a job predicted to end at ``end`` after ``span`` seconds is
    ``end + low * span + delay`` to ``end + min(high * span, cap) + delay``.
    One object serves every job of the model until the schedule learns something new.
    """

    low: float
    high: float
    delay: float
    cap: float  # inf once the window is learned: only the prior's guess (its late side) is capped
    reach: float = 0.0  # seconds it opens earlier still: TUNING.coarse_reach, while unlearned
    # Seconds before and after the predicted end the window reaches at least, once learned:
    # where ends within a second of their predicted end fell (PollSchedule._near), whatever
    # the job's length. Errors beyond that are in low and high.
    early: float = 0.0
    late: float = 0.0

    def opens(self, end: float, span: float) -> float:
        """Loop time the window opens, for a job predicted to end at ``end`` after ``span``."""
        # (min spelled out: a builtin's call costs more, and this runs per waiting key.)
        low, early = self.low * span, -self.early
        return end + (early if early < low else low) + self.delay - self.reach

    def closes(self, end: float, span: float) -> float:
        """Loop time the window closes."""
        return end + max(min(self.high * span, self.cap), self.late) + self.delay

    def around(self, end: float, span: float) -> tuple[float, float]:
        """Loop times the window opens and closes."""
        return self.opens(end, span), self.closes(end, span)
