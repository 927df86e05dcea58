"""When the poller next asks about a running key: the schedule and its latency promise.

The promise (README, "How polling works"):

* while a job runs inside the window the poller has learned its estimates fall in, it is asked
  about every ``min_interval``: a job that ends there is seen within ``min_interval``;
* a job that overran that window (or whose gateway gives no usable estimate) is asked about
  every ``max(min_interval, age_fraction x its age)``, capped at ``max_interval``;
* before the window opens, nothing is asked (one ask at the window's start), so a job whose
  estimate is right costs about three asks: the first, one at the window, one to see it done.

The window is learned. Every ended job that had an estimate adds one sample of how far its end
fell from the predicted end, relative to the predicted duration. The window opens at the low
quantile of those errors and closes at the high one: tight when the gateway's estimates are
good, wide when they are noisy, biased or a placeholder. Until there are enough samples a mild
prior holds. An estimate that does not count down between two reports (a constant placeholder)
is not an estimate: that job is polled as if it had none.

Pure arithmetic on loop times; the poller owns the heap and the calls.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ._config import PollPolicy

# Until this many ended jobs are seen, the prior window below holds.
_MIN_SAMPLES = 8
_SAMPLES_KEPT = 256
_LOW_QUANTILE = 0.02
_HIGH_QUANTILE = 0.98
# The prior: an estimate is taken to be right, or up to 5% short (the job may end later).
_PRIOR_LOW = 0.0
_PRIOR_HIGH = 0.05
# ...and its window opens this share of ``min_interval`` after the predicted end, so a right
# estimate is asked about once, just after the end, not just before it.
_PRIOR_OPEN_DELAY = 0.25
# ...and never opens more than this many ``min_interval`` before the predicted end.
_PRIOR_MAX_STEPS = 4
# A later report may move the predicted end by this share of the time between the two reports
# (plus ``min_interval``) before the estimate counts as not counting down.
_LIVE_DRIFT = 0.5
# While nothing is learned, a check (or each step) comes this share of the way to the window.
_CHECK_SHARE = 0.25
# The predicted durations of a model's last jobs: when they are all the same, the estimate is
# a typical figure, not this job's (it says nothing of which jobs end early).
_SPANS_KEPT = 32
_SAME_SPAN_SHARE = 0.02
# Two alike are enough to suspect a typical figure. The error is cheap one way (a few extra
# steps until a differing estimate shows they are per job) and dear the other (an early end
# seen only at the predicted end: a schedule with a trickle of jobs would see its first
# several jobs that late).
_SAME_SPANS_MIN = 2
# Relative errors are kept within these bounds: one outlier must not set the scale.
_ERROR_FLOOR = -1.0
_ERROR_CEILING = 10.0


class _Quantiles:
    """The last ``_SAMPLES_KEPT`` samples, kept sorted for O(log n) quantiles."""

    __slots__ = ("_order", "_sorted")

    def __init__(self) -> None:
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, value: float) -> None:
        if len(self._order) == _SAMPLES_KEPT:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(value)
        bisect.insort(self._sorted, value)

    def quantile(self, q: float) -> float:
        data = self._sorted
        return data[min(len(data) - 1, max(0, round(q * (len(data) - 1))))]


@dataclass(slots=True)
class KeyTiming:
    """The poller's record of one key: what the schedule needs, nothing a user reads.

    Attributes:
        created_at: loop time of the submit (or attach).
        model: the request's model, when known; estimates and durations are learned per model.
        last_ask: loop time of the last answered ask about the key.
        predicted_end: loop time the gateway's last estimate says the job ends; None if no
            usable estimate.
        predicted_span: ``predicted_end - created_at`` as first predicted (the error scale).
        estimate_live: False once the estimate failed to count down (a placeholder).
        live_reports: reports whose estimate was usable and kept counting down.
    """

    created_at: float
    model: str | None = None
    last_ask: float | None = None
    predicted_end: float | None = None
    predicted_span: float | None = None
    estimate_live: bool = True
    live_reports: int = 0


class PollSchedule:
    """The schedule of one poller: next ask times, and what it learns from ended jobs."""

    __slots__ = (
        "_durations",
        "_errors",
        "_policy",
        "_spans",
        "_windows",
        "generation",
    )

    def __init__(self, policy: PollPolicy) -> None:
        self._policy = policy
        self._errors: dict[str | None, _Quantiles] = {}
        self._durations: dict[str | None, _Quantiles] = {}
        self._windows: dict[str | None, tuple[float, float]] = {}
        self._spans: dict[str | None, deque[float]] = {}
        # Bumped when the learned window widens: jobs already waiting for a later window start
        # should be looked at again (the poller reschedules them).
        self.generation = 0

    # --- learning --------------------------------------------------------------------------
    def window(self, model: str | None) -> tuple[float, float]:
        """The learned (low, high) relative error of estimates for ``model``."""
        window = self._windows.get(model)
        if window is None:
            errors = self._errors.get(model)
            if errors is None or len(errors) < _MIN_SAMPLES:
                window = (_PRIOR_LOW, _PRIOR_HIGH)
            else:
                # Taken as symmetric until shown otherwise: ends seen later than predicted are
                # evidence that others end as much earlier. Overruns are seen first (at the
                # predicted end); early ends only once a job is asked, which this makes sooner.
                early, late = errors.quantile(_LOW_QUANTILE), errors.quantile(_HIGH_QUANTILE)
                window = (min(0.0, early, -late), max(0.0, late, -early))
            self._windows[model] = window  # asked per report, changed per ended job: cached
        return window

    def samples(self, model: str | None) -> int:
        """How many ended jobs of ``model`` the estimate window is learned from (bounded)."""
        errors = self._errors.get(model)
        return len(errors) if errors is not None else 0

    def job_ended(self, timing: KeyTiming, now: float, ended_at: float | None = None) -> None:
        """Learn from a job seen ended at ``now`` (``ended_at``: the gateway's end time, if any).

        The true end lies between the previous ask and ``now``; the gateway's own end time
        narrows it when it falls there, else the middle is the best guess.
        """
        earliest = timing.last_ask if timing.last_ask is not None else timing.created_at
        if ended_at is not None and earliest <= ended_at <= now:
            end = ended_at
        else:
            end = (earliest + now) / 2
        error = None
        if timing.predicted_end is not None and timing.predicted_span and timing.estimate_live:
            error = (end - timing.predicted_end) / timing.predicted_span
            error = max(_ERROR_FLOOR, min(error, _ERROR_CEILING))  # an outlier, not a scale
        model = timing.model
        self._sample(self._durations, model).add(end - timing.created_at)
        if error is not None:
            before = self.window(model)
            self._sample(self._errors, model).add(error)
            self._windows.pop(model, None)
            if self.window(model)[0] < before[0] - 0.02:
                self.generation += 1

    @staticmethod
    def _sample(table: dict[str | None, _Quantiles], model: str | None) -> _Quantiles:
        found = table.get(model)
        if found is None:
            found = table[model] = _Quantiles()
        return found

    # --- scheduling ------------------------------------------------------------------------
    def first_ask(self, timing: KeyTiming) -> float:
        """Loop time of the first ask about a new key."""
        return timing.created_at + self._policy.first_poll_delay

    def report(
        self,
        timing: KeyTiming,
        now: float,
        *,
        expected_seconds: float | None,
        queue_position: int | None = None,
    ) -> float:
        """Record a running job's report at ``now``; returns the loop time of the next ask."""
        policy = self._policy
        if expected_seconds is not None and expected_seconds > 0 and timing.estimate_live:
            predicted = now + expected_seconds
            previous = timing.predicted_end
            if previous is None:
                timing.predicted_span = max(predicted - timing.created_at, policy.min_interval)
                spans = self._spans.get(timing.model)
                if spans is None:
                    spans = self._spans[timing.model] = deque(maxlen=_SPANS_KEPT)
                spans.append(timing.predicted_span)
            elif timing.last_ask is not None:
                # A live estimate keeps its predicted end as time passes; a placeholder moves it
                # forward by the time between reports.
                drift = abs(predicted - previous)
                if drift > _LIVE_DRIFT * (now - timing.last_ask) + policy.min_interval:
                    timing.estimate_live = False
            if timing.estimate_live:
                timing.predicted_end = predicted
                timing.live_reports += 1
            else:
                timing.predicted_end = None
        # "0 s left" while still running: it has overrun. The last prediction stays, so the
        # window still tells (dense asks until it closes, backing off after) and its end is
        # learned from.
        timing.last_ask = now
        return self.next_ask(timing, now, queue_position=queue_position)

    def next_ask(
        self, timing: KeyTiming, now: float, *, queue_position: int | None = None
    ) -> float:
        """Loop time of the next ask about a running job, from what is known at ``now``."""
        policy = self._policy
        if timing.predicted_end is not None and timing.predicted_span:
            opens, closes = self._window_at(timing)
            if now + policy.min_interval < opens:
                if self._learning(timing.model) and (
                    timing.live_reports < 2 or self._typical_figure(timing.model)
                ):
                    # Nothing learned yet. Before a long wait on an estimate, check once that
                    # it counts down (a placeholder is found out there). When every job gets
                    # the same estimate, it says nothing of which jobs end early: close in on
                    # the window in steps, so early ends are seen and teach the window.
                    step = max(2 * policy.min_interval, _CHECK_SHARE * (opens - now))
                    return min(opens, now + min(step, policy.max_estimate_wait))
                return min(opens, now + policy.max_estimate_wait)
            if now < closes:
                return now + policy.min_interval
            return now + self._backoff(now - timing.created_at)
        if queue_position is not None and queue_position > 0:
            wait = queue_position * policy.queue_position_seconds
            return now + min(max(wait, policy.min_interval), policy.max_interval)
        durations = self._durations.get(timing.model)
        if durations is not None and len(durations) >= _MIN_SAMPLES:
            earliest = timing.created_at + durations.quantile(_LOW_QUANTILE)
            if now + policy.min_interval < earliest:
                return min(earliest, now + policy.max_estimate_wait)
        return now + self._backoff(now - timing.created_at)

    def _learning(self, model: str | None) -> bool:
        errors = self._errors.get(model)
        return errors is None or len(errors) < _MIN_SAMPLES

    def _typical_figure(self, model: str | None) -> bool:
        """True when the model's last jobs were all predicted to last the same (a typical
        figure, not a per-job estimate)."""
        spans = self._spans.get(model)
        if spans is None or len(spans) < _SAME_SPANS_MIN:
            return False
        low, high = min(spans), max(spans)
        return high - low <= _SAME_SPAN_SHARE * high + self._policy.min_interval / 2

    def watch_start(self, timing: KeyTiming) -> float:
        """Loop time from which ``timing``'s job is asked about densely.

        ``inf`` for a job with no usable estimate: it has no window, so a widening of the
        learned window does not concern it (its asks follow its age).
        """
        if timing.predicted_end is None or not timing.predicted_span:
            return math.inf
        return self._window_at(timing)[0]

    def watch_starts(self) -> Callable[[KeyTiming], float]:
        """:meth:`watch_start` for a pass over every key: each model's window is read once.

        For one pass only, with nothing learned meanwhile (the windows are taken as they are).
        """
        # model -> (low, lowest offset, delay): as _window_at, read once per model.
        opening: dict[str | None, tuple[float, float, float]] = {}
        cap = _PRIOR_MAX_STEPS * self._policy.min_interval
        delay = _PRIOR_OPEN_DELAY * self._policy.min_interval

        def watch_start(timing: KeyTiming) -> float:
            end, span = timing.predicted_end, timing.predicted_span
            if end is None or not span:
                return math.inf
            found = opening.get(timing.model)
            if found is None:
                # As _window_at: while learning, the prior opens at most ``cap`` early.
                low = self.window(timing.model)[0]
                learning = self._learning(timing.model)
                found = opening[timing.model] = (
                    low,
                    -cap if learning else -math.inf,
                    delay if learning else 0.0,
                )
            low, lowest, shift = found
            return end + max(low * span, lowest) + shift

        return watch_start

    def _window_at(self, timing: KeyTiming) -> tuple[float, float]:
        """Loop times when ``timing``'s window opens and closes (it has a prediction)."""
        assert timing.predicted_end is not None and timing.predicted_span is not None
        low, high = self.window(timing.model)
        span = timing.predicted_span
        if self._learning(timing.model):
            # The prior is a guess: it must not make a long job's window long as well.
            cap = _PRIOR_MAX_STEPS * self._policy.min_interval
            delay = _PRIOR_OPEN_DELAY * self._policy.min_interval
            return timing.predicted_end + max(low * span, -cap) + delay, (
                timing.predicted_end + min(high * span, cap) + delay
            )
        return timing.predicted_end + low * span, timing.predicted_end + high * span

    def _backoff(self, age: float) -> float:
        policy = self._policy
        return min(max(policy.age_fraction * age, policy.min_interval), policy.max_interval)
