"""What the checks of a model's jobs showed of their first figures: whether a job's first
estimate is trusted without a check of its own that it counts down."""

from __future__ import annotations

from dataclasses import dataclass

from ._schedule_tuning import TUNING


@dataclass(slots=True)
class Checks:
    """What the checks of a model's jobs showed of their first figures (each job's check
    counted once).

    A figure given while generating is trusted without a check once ``countdowns_trusted``
    checks saw such figures count down and none saw otherwise: the check is there to find a
    placeholder, and once a model's estimates are seen counting down each job's own check is
    an ask that tells nothing (a burst of 2,000 right estimates: 3 asks per key with checks,
    about 2 without). A figure given while queued is trusted too once as many checks saw the
    end it gives never come sooner (by more than their resolution): it is then at least the
    earliest the job can end, whether it counts the queue in or leaves it out (the generation
    alone, counting down once generation starts), and its window is asked at when the job is
    generating or done; when some end came later (it leaves something out), only beside
    figures given while generating that are trusted and once as many jobs saw it hold as they
    left the queue. Anything else seen, ever: each job is checked, as before anything is
    learned.
    """

    counting: int = 0  # figures given while generating, seen counting down
    odd: bool = False  # ...seen otherwise
    queued_never_sooner: int = 0  # figures given while queued, whose end never came sooner
    queued_odd: bool = False  # ...whose end came sooner
    # ...whose end came later: such figures leave something out (the queue), and the end a
    # job's figure given while queued put it at teaches nothing of the estimates' error.
    queued_later: bool = False
    queued_left: int = 0  # ...never sooner, seen from a job that has left the queue since

    def trusted(self, *, queued: bool) -> bool:
        enough = TUNING.countdowns_trusted
        generating = not self.odd and self.counting >= enough
        if not queued:
            return generating
        # A figure whose end stayed put is an estimate. One whose end came later is trusted as
        # a bound only beside figures given while generating that count down, and once jobs
        # that left the queue saw it never come sooner: a placeholder's end comes later at
        # every report too, until the job starts.
        a_bound = generating and self.queued_left >= enough
        return (
            not self.queued_odd
            and self.queued_never_sooner >= enough
            and (a_bound or not self.queued_later)
        )

    def queued_bounds(self) -> bool:
        """Whether figures given while queued are trusted as the earliest a job can end (they
        leave the queue out), not as estimates of its end."""
        return self.queued_later and self.trusted(queued=True)
