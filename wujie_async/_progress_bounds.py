"""The latest a job's first progress reading says it ends (``Progress.bound``): when such a
bound is kept, how a later reading's rate confirms or voids it, when a model's progress proves
too uneven to bound anything, and when a job with a bound is asked."""

from __future__ import annotations

import math

from ._config import PollPolicy
from ._key_timing import KeyTiming, Progress, gateway_model, left_by_rate
from ._predicted_spans import PredictedSpans
from ._quantiles import Quantiles
from ._schedule_tuning import TUNING


class ProgressBounds:
    """The bounds first progress readings set on their jobs' ends, for one schedule."""

    __slots__ = ("_bound_ratios", "_percent_in_tenths", "_policy", "_predicted", "uneven_progress")

    def __init__(
        self,
        policy: PollPolicy,
        predicted: PredictedSpans,
        percent_in_tenths: set[str | None],
    ) -> None:
        self._policy = policy
        # The schedule's: read here, never written (what its jobs' spans say, and the models
        # whose progress has come with a fraction).
        self._predicted = predicted
        self._percent_in_tenths = percent_in_tenths
        # Models a job of which was still far from done when asked past its bound: their
        # progress does not grow evenly, and bounds it tells are not used (Progress.bound).
        self.uneven_progress: set[str | None] = set()
        # Per model: the time first readings while generating leave a job at most, against
        # the time its estimate leaves it (note_bound).
        self._bound_ratios: dict[str | None, Quantiles] = {}

    def note_bound(
        self,
        timing: KeyTiming,
        progress: Progress,
        seen: float,
        latest: float,
        predicted: float,
        learn: bool = True,
    ) -> None:
        """Keep ``latest`` (the first reading's bound on the job's end, read at ``seen``) as
        ``progress.bound`` when it lies well before ``predicted`` (the estimate's end): the
        job may have been told far longer than it runs. A right estimate's end lies at or
        before that bound when the progress grows evenly; a progress of a model found to grow
        unevenly (``uneven_progress``) bounds nothing.

        Bounds are for the few jobs told far too long: once ``TUNING.min_samples`` first
        readings of its model are known, a job's bound is used only when the time it leaves
        is well under what the model's readings leave against their estimates
        (``TUNING.bound_outlier`` times their ``bound_quantile``). Every estimate three times
        too long (a bound and a reading for the rate cost every job an ask more: 4.1 asks per
        key instead of 3.1), or a progress that starts above 0 (10% as generation starts:
        every first reading bounds far too soon), leave every job about the same: the
        learned window serves them, and the one job in 20 told 3x its length still stands
        out. A job told far longer than its model's jobs usually are is read for a rate
        whatever its first reading says (``inf``: read at 0%)."""
        span = predicted - timing.created_at
        if timing.model in self.uneven_progress:
            return
        if self._predicted.told_far_longer(timing.model, span):
            # Told far longer than its model's jobs usually are: read for a rate whatever its
            # first reading says (one first read generating at 1.8%, after a queue it cannot
            # see, bounded nothing, and was seen 29 s late; one read at 0%, 40 s late).
            progress.bound = latest
            return
        left = predicted - seen
        if left <= 0.0 or latest == math.inf:
            return
        ratios = self._bound_ratios.get(timing.model)
        if ratios is None:
            ratios = self._bound_ratios[timing.model] = Quantiles()
        ratio = (latest - seen) / left
        if learn:  # (see report)
            ratios.add(ratio)
        if latest + self._bound_margin(span) >= predicted:
            return
        low = ratios.quantile(TUNING.bound_quantile) if len(ratios) >= TUNING.min_samples else 1.0
        if ratio <= TUNING.bound_outlier * low:
            progress.bound = latest

    def _bound_margin(self, span: float) -> float:
        """How far before its estimate's end a job's bound must lie to be used."""
        margin, least = TUNING.bound_margin * span, 1.0 + self._policy.min_interval
        return least if least > margin else margin  # (max: this runs per first reading)

    def rate_bound(
        self,
        timing: KeyTiming,
        progress: Progress,
        seen: float,
        percent: float | None,
        told: float | None,
        predicted: float,
    ) -> None:
        """A job with a bound read again while generating, before its bound: its progress's
        rate since its first reading puts its end somewhere (even a rate too rough to go by,
        as a bound). Near its estimate's end (``predicted``), the bound was not one:
        a progress that starts above 0 (10% as generation starts) bounds every job's end far
        too early, and each was asked at its bound far from done, which turned bounds off
        for its model (1 job in 20 told 3x its length then seen up to 40 s late). Far before
        it, the rate's end (give or take what whole percents or tenths leave unsure) is the
        bound."""
        rate = (
            None
            if percent is None
            else left_by_rate(progress, seen, percent, tenths=self._in_tenths(timing))
        )
        if rate is None:
            return  # stalled: the first reading's bound stands (check_bound judges it)
        left, unsure = rate
        if seen + left + self._bound_margin(predicted - timing.created_at) >= predicted:
            progress.bound = None
        elif told is not None:
            progress.bound = seen + told  # a rate known well enough (left_by_progress)
        else:
            progress.bound = seen + left + unsure

    def check_bound(
        self, timing: KeyTiming, progress: Progress, seen: float, percent: float | None
    ) -> None:
        """A job still running when asked past its bound: far from done, it proves its
        model's progress uneven (``TUNING.bound_short``: fast and then slowly), and no bound
        of that model is used any more; close to done (an end recorded late), it is asked
        again soon (``bound_ask``) for ``_bound_slack``."""
        bound = progress.bound
        assert bound is not None
        if seen <= bound:
            return
        if percent is not None and percent < 100.0 - TUNING.bound_short:
            self.uneven_progress.add(timing.model)
            progress.bound = None
        elif seen > bound + self._bound_slack():
            progress.bound = None

    def _in_tenths(self, timing: KeyTiming) -> bool:
        return gateway_model(timing) in self._percent_in_tenths

    def _bound_slack(self) -> float:
        """How long past its bound a job close to done is asked every ``min_interval``."""
        return TUNING.near + 2 * self._policy.min_interval

    def bound_ask(self, timing: KeyTiming, now: float) -> float:
        """When a job with a bound (``Progress.bound``) is asked: once its progress can tell
        a rate (``TUNING.bound_rate_after``), just after the bound, then every
        ``min_interval`` for ``_bound_slack``. ``inf``: no such ask."""
        progress = timing.progress
        if progress is None or progress.bound is None or timing.model in self.uneven_progress:
            return math.inf
        policy = self._policy
        at = progress.bound + TUNING.open_delay * policy.min_interval
        rate_at = progress.since + TUNING.bound_rate_after
        if progress.told_end is None and now + policy.min_interval < rate_at < at:
            return rate_at
        if at > now + policy.min_interval:
            return at
        if now < progress.bound + self._bound_slack():
            return now + policy.min_interval
        return math.inf
