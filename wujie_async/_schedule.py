"""When the poller next asks about a running key: the schedule and its latency promise.

The promise (docs, "Polling and its latency promise"):

* while a job runs inside the window the poller has learned its estimates fall in, it is asked
  about every ``min_interval``: a job that ends there is seen within ``min_interval``;
* a job that overran that window (or whose gateway gives no usable estimate) is asked about
  every ``max(min_interval, age_fraction x its age)``, capped at ``max_interval``;
* before the window opens, nothing is asked but a check that the estimate counts down, until
  the model's estimates are seen to (``Checks``): a job whose estimate is right costs two or
  three asks (the first, perhaps the check, one just after its predicted end).

The window is learned from ended jobs (``_window_learning``, the schedule's base class). An
estimate that does not count down between two reports (a constant placeholder) is not an
estimate: that job is polled as if it had none. Until something is learned, that check comes
within ``max_interval`` of the first ask, however far the figure: a placeholder far above the
real durations must not hold a job back.

Pure arithmetic on loop times; the poller owns the heap and the calls.
"""

from __future__ import annotations

import math

from ._config import PollPolicy
from ._figure_checks import Checks
from ._key_timing import (
    KeyTiming,
    gateway_model,
    latest_end,
    left_by_progress,
    tell_by_progress,
)
from ._predicted_spans import PredictedSpans
from ._progress_bounds import ProgressBounds
from ._quantiles import Quantiles
from ._schedule_tuning import TUNING
from ._window_learning import _WindowLearning
from ._window_shape import WindowShape


class PollSchedule(_WindowLearning):
    """The schedule of one poller: next ask times, and what it learns from ended jobs (its
    base, ``_WindowLearning``)."""

    __slots__ = ("_percent_in_tenths", "_reported")

    def __init__(self, policy: PollPolicy) -> None:
        self._policy = policy
        self._errors: dict[str | None, Quantiles] = {}
        # The earliest end seen so far (an end within a second of a whole-second figure
        # counts as on time: see _near).
        self._earliest: dict[str | None, float] = {}
        # Lateness beyond what the estimate's own resolution explains (whole seconds): what
        # the window mirrors to its early side.
        self._excess_late: dict[str | None, Quantiles] = {}
        # Ends within a second of their predicted end, in seconds (``_errors`` has them as 0),
        # and the models some of whose such ends were placed by end stamps (see _apply).
        self._near: dict[str | None, Quantiles] = {}
        self._stamped_near: set[str | None] = set()
        # How far from its predicted end (in seconds) an end counts as near, and how close
        # two asks place an end between them (TUNING.narrow_gap): constants.
        self._near_reach = TUNING.near + self._half_step()
        self._narrow_gap = TUNING.narrow_gap * policy.min_interval
        # Their band (_near_band), asked per report, changed per ended job: cached.
        self._bands: dict[str | None, tuple[float, float]] = {}
        self._durations: dict[str | None, Quantiles] = {}
        # Models whose gateway gave a fractional estimate, and counts of whole-second ones: a
        # model whose estimates all come in whole seconds has a second of resolution.
        self._fractional: set[str | None] = set()
        self._integral: dict[str | None, int] = {}
        # Models whose progress has come with a fraction (reading_resolution).
        self._percent_in_tenths: set[str | None] = set()
        self._windows: dict[str | None, tuple[float, float]] = {}
        # What window_shape makes of the above, asked per report and per key a widening walks,
        # changed per ended job (and as a model's estimates turn out to be whole seconds).
        self._shapes: dict[str | None, WindowShape] = {}
        # Models whose window is learned (min_samples errors): not _learning.
        self._learned: set[str | None] = set()
        # Per model, the latest low edge of the window since waiting keys were last brought in
        # (generation bumped): keys may be waiting for a window that opened that late.
        self._planned_edges: dict[str | None, tuple[float, float]] = {}
        # What the predicted spans of each model's last jobs say (a typical figure, the usual
        # span, the probe of a job told far longer).
        self._predicted = PredictedSpans(policy)
        # Per model: jobs that ended closer to their progress's figure than to the gateway's
        # estimate, less those that ended closer to the estimate (see _compare).
        self._progress_score: dict[str | None, int] = {}
        self._scouts: dict[str | None, int] = {}
        # The bounds first progress readings set on their jobs' ends (Progress.bound).
        self._bounds = ProgressBounds(policy, self._predicted, self._percent_in_tenths)
        # Per model, while none of its jobs has ended: the job expected to end first, asked
        # as if it had no estimate (KeyTiming.lookout).
        self._lookouts: dict[str | None, KeyTiming] = {}
        self._reported = 0  # first estimates seen: each TUNING.sentinels-th job is a sentinel
        self._checks: dict[str | None, Checks] = {}
        # How far the gateway's end stamps sit from ends two close asks pinned (its clock's
        # skew and resolution): one gateway, one clock, whatever the model.
        self._stamp_offsets = Quantiles()
        # Until then, stamps finer than a second are taken at their word, until one disagrees
        # with the asks (it says a job ended before an ask that saw it running, or after one
        # that saw it done): that clock is skewed.
        self._stamps_at_their_word = True
        # Bumped when the learned window widens: jobs already waiting for a later window start
        # should be looked at again (the poller reschedules them).
        self.generation = 0
        self._jobs_learned = 0

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
        queued: bool = False,
        asked_at: float | None = None,
        percent: float | None = None,
        learn: bool = True,
    ) -> float:
        """Record a running job's report at ``now``; returns the loop time of the next ask.

        ``asked_at``: when the call that brought the report went out (None: ``now``). The
        gateway read the job's state somewhere between the two: its estimate counts from the
        ask (the earliest it can mean), and the ask is when the job was last seen running.

        ``queued``: the job has not started generating. A gateway may give no estimate then,
        or one that leaves the queue out and does not count down until generation starts: a
        queued job's estimate is taken for what it says now, never judged a placeholder, and
        the first estimate while generating sets the error scale afresh.

        ``percent``: the job's progress (``complete_percent``), a second estimate: by how fast
        it grows it tells the seconds left. It stands in for a missing estimate, for the
        typical figure every job gets, and for estimates its model's jobs ended farther from
        (``_progress_tells``); that figure is judged as an estimate is (a progress that does
        not grow evenly with time fails the check that it counts down, and the job is asked
        about as one without an estimate).

        ``learn``: False when another record of the same job in this process learns from its
        reports (a fleet's leader's shadow of its own member's job): the job is planned as
        any other, but its figures teach the schedule nothing (no sample counted twice).
        """
        policy = self._policy
        seen = now if asked_at is None else asked_at
        told = sooner = latest = None
        if percent is not None and not queued:
            first_reading = timing.progress is None
            if percent % 1 != 0:
                self._percent_in_tenths.add(gateway_model(timing))
            tenths = (  # (ProgressBounds._in_tenths)
                gateway_model(timing) if timing.progress is not None else timing.model
            ) in self._percent_in_tenths
            told = left_by_progress(timing, seen, percent, tenths=tenths)
            if first_reading:
                latest = latest_end(timing, now, percent)
        progress = timing.progress
        estimate = progress.estimate if progress is not None else None
        if progress is not None and estimate is not None:
            # Told by its progress: the gateway's estimate is only learned from.
            if expected_seconds and estimate[1] is not None:
                progress.estimate = (estimate[0], seen + expected_seconds, estimate[2])
            expected_seconds = told
        elif expected_seconds is None:
            expected_seconds = told
        elif told is not None and progress is not None and self._progress_tells(timing.model):
            tell_by_progress(timing, progress, seen + expected_seconds)
            expected_seconds = told
        else:
            # Decided on the gateway's estimate; the progress may still tell an end sooner:
            # by its rate, or at its first reading by the latest it can end (a bound, asked
            # at by next_ask: Progress.bound).
            sooner = told
            if latest is not None and progress is not None:
                self._bounds.note_bound(
                    timing, progress, seen, latest, seen + expected_seconds, learn
                )
            elif (
                progress is not None
                and progress.bound is not None
                and seen <= progress.bound
                and not queued
            ):
                self._bounds.rate_bound(
                    timing, progress, seen, percent, told, seen + expected_seconds
                )
        if progress is not None and progress.bound is not None and latest is None and not queued:
            self._bounds.check_bound(timing, progress, seen, percent)
        if expected_seconds is not None and expected_seconds > 0 and timing.estimate_live:
            coarse = timing.model not in self._fractional and (
                self._note_resolution(timing.model, expected_seconds)
                if learn
                else self.coarse(timing.model)
            )
            predicted = seen + expected_seconds
            previous = timing.predicted_end
            if previous is None:
                timing.predicted_span = max(predicted - timing.created_at, policy.min_interval)
                if learn:
                    self._predicted.learn_span(timing.model, timing.predicted_span)
                self._reported += 1
                if timing.model not in self._errors:  # (no lookouts once an end is seen)
                    self._choose_lookout(timing, predicted, seen)
                timing.sentinel = self._reported % TUNING.sentinels == 0
                if timing.model not in self._learned:  # still _learning: see TUNING.scouts
                    taken = self._scouts.get(timing.model, 0)
                    if taken < TUNING.scouts:
                        self._scouts[timing.model] = taken + 1
                        timing.scout = True
            elif timing.last_ask is not None:
                gap = seen - timing.last_ask
                # A live estimate keeps its predicted end as time passes; a placeholder moves it
                # forward by the time between reports. Whole seconds move it by up to one.
                coarse_gap = 1.0 if coarse else 0.0
                drift = abs(predicted - previous) - coarse_gap
                tolerance = TUNING.live_drift * gap + policy.min_interval
                # Moves smaller than this (a step, plus the figure's resolution) tell nothing.
                step = policy.min_interval + coarse_gap
                timing.recheck = False
                check, was_queued = timing.live_reports == 1, timing.queued  # each job once
                last = timing.last_expected
                if not queued and expected_seconds == last:
                    since = timing.expected_since
                    if timing.queued:
                        timing.recheck = True  # it has just left the queue: ask again soon
                    elif gap > step or (since is not None and seen - since > step):
                        # The same figure while generating, across a step: from one ask to
                        # the next, or over several close ones (a small figure, the "1 s" a
                        # clamped estimate gives once a job overran, is asked about again
                        # within a step each time: it was never found out, and the job was
                        # asked about every step to its end, never backing off by its age).
                        timing.estimate_live = False
                elif drift > tolerance:
                    if timing.queued:
                        # It may have left the queue out: judge it from here, on a new scale.
                        # A figure lower than the queue's has counted down once already: no
                        # second check before the window (a job queued at its first ask would
                        # otherwise cost one ask more than the others).
                        timing.live_reports = (
                            1 if last is not None and expected_seconds < last else 0
                        )
                        timing.predicted_span = max(predicted - seen, policy.min_interval)
                    else:
                        timing.estimate_live = False
                if check and gap > step and learn:
                    self._note_check(
                        timing.model,
                        was_queued,
                        live=timing.estimate_live
                        and drift <= tolerance
                        and last is not None
                        and expected_seconds < last,
                        sooner=previous - predicted > step,
                        later=predicted - previous > step,
                        left=was_queued and not queued,
                    )
            if expected_seconds != timing.last_expected or queued or timing.queued:
                timing.expected_since = seen  # a new figure (or one given while queued)
            timing.last_expected = expected_seconds
            if timing.estimate_live:
                timing.predicted_end = predicted
                timing.predicted_queued = queued
                timing.live_reports += 1
            else:
                timing.predicted_end = None
        timing.queued = queued
        # "0 s left" while still running: it has overrun. The last prediction stays, so the
        # window still tells (dense asks until it closes, backing off after) and its end is
        # learned from.
        timing.last_ask = seen
        ask = self.next_ask(timing, now, queue_position=queue_position)
        if sooner is not None:
            # Decided on the gateway's estimate, while its progress tells an end sooner: asked
            # there as well (estimates ±50% off, before the model's first ends show which
            # figure to go by: the first ends seen up to 1.6 s late without it).
            at = seen + sooner + TUNING.open_delay * policy.min_interval
            soonest = now + policy.min_interval
            at = soonest if soonest > at else at  # (max: this runs per report)
            # (An ask at its bound comes no sooner than this one: the bound is where this
            # rate puts the end, ProgressBounds.rate_bound, and an ask the progress asks for
            # is not tentative.)
            if at + policy.min_interval < ask or (timing.tentative and at <= ask):
                timing.tentative = False
                ask = at
        return ask

    def next_ask(
        self, timing: KeyTiming, now: float, *, queue_position: int | None = None
    ) -> float:
        """Loop time of the next ask about a running job, from what is known at ``now``; marks
        ``timing.tentative`` when that ask may tell nothing by the time it comes due: a check
        that its estimate counts down, or an ask at a window that reaches early because it is
        unlearned (``TUNING.coarse_reach``)."""
        ask = self._planned_ask(timing, now, queue_position)
        progress = timing.progress
        if progress is None:  # (no bound to ask at: ProgressBounds.bound_ask)
            if timing.predicted_end is None or not timing.predicted_span:
                return ask  # (nothing to probe either: PredictedSpans.probe)
            probe = self._predicted.probe(timing, now)
            if probe + self._policy.min_interval < ask:
                timing.tentative = False
                return probe
            return ask
        if progress.bound is None:  # (and no probe: PredictedSpans.probe)
            return ask
        bound = self._bounds.bound_ask(timing, now)
        if bound + self._policy.min_interval < ask:
            # Tentative: a job of its model found far from done past its bound meanwhile
            # makes this ask one that tells nothing (its bound then bounds nothing).
            timing.tentative = True
            return bound
        return ask

    def _planned_ask(self, timing: KeyTiming, now: float, queue_position: int | None) -> float:
        """``next_ask`` but for a probe (``PredictedSpans.probe``)."""
        policy = self._policy
        timing.tentative = False
        end, span = timing.predicted_end, timing.predicted_span
        if end is not None and span:
            model = timing.model
            shape = self._shapes.get(model)
            if shape is None:
                shape = self.window_shape(model)
            # (shape.opens(end, span), spelled out: this runs per ask.)
            low, early = shape.low * span, -shape.early
            opens = end + (early if early < low else low) + shape.delay - shape.reach
            if timing.sentinel and not shape.reach and self.coarse(model):
                opens -= TUNING.coarse_reach  # see TUNING.sentinels (as _window)
            if now + policy.min_interval < opens:
                if timing.recheck:
                    # Long enough to tell even whole seconds apart: one second plus two asks.
                    return min(opens, now + 1.0 + 2 * policy.min_interval)
                learning = model not in self._learned  # (_learning)
                # (Only what is still learning asks whether its figure has been checked.)
                checked = learning and (
                    timing.live_reports >= 2 or self._trusted(model, queued=timing.queued)
                )
                timing.tentative = (learning and not checked) or shape.reach > 0  # still_due
                if timing.lookout:  # (the flag goes at the model's first end: _apply)
                    # Until a job of its model ends, nothing says how early estimates can be:
                    # the job expected to end first is watched as a job with no estimate is
                    # (every min_interval, then a share of its age), so the first end is seen
                    # at once (and with it, how early the others may end).
                    return min(opens, now + self._backoff(now - timing.created_at))
                if learning and (not checked or self._predicted.typical_figure(timing.model)):
                    # Nothing learned yet. Before a long wait on an estimate, check once that
                    # it counts down (a placeholder is found out there). When every job gets
                    # the same estimate, it says nothing of which jobs end early: close in on
                    # the window in steps, so early ends are seen and teach the window.
                    # (A checked job is here for a typical figure: no second look at that.)
                    if opens - now <= policy.max_interval and not (
                        checked or self._predicted.typical_figure(timing.model)
                    ):
                        # The window opens within max_interval, and its figure is the job's
                        # own: the ask there is the check (a placeholder is found out there as
                        # well), and one on the way would tell nothing (jobs of 2-5 s: 3.6
                        # asks per key in a burst, each checked just before its window).
                        return opens
                    step = max(2 * policy.min_interval, TUNING.check_share * (opens - now))
                    if timing.live_reports < 2:
                        # An estimate not yet seen counting down is no better than none: its
                        # check comes within max_interval, so a placeholder far above the real
                        # durations (100 s for jobs of 5) is found out in seconds, not in a
                        # quarter of its figure. The check is asked anyway: no ask more.
                        step = min(step, policy.max_interval)
                    return min(opens, now + min(step, policy.max_estimate_wait))
                if learning and timing.scout:
                    # Seen counting down, and nothing learned: were every estimate three times
                    # too long, only ends seen would say so. A scout sees its end within
                    # max_interval, and the first ends teach every other job's window.
                    return min(opens, now + policy.max_interval)
                return min(opens, now + policy.max_estimate_wait)
            if now < shape.closes(end, span):
                return now + policy.min_interval
            return now + self._backoff(now - timing.created_at)
        if queue_position is not None and queue_position > 0:
            wait = queue_position * policy.queue_position_seconds
            return now + min(max(wait, policy.min_interval), policy.max_interval)
        durations = self._durations.get(timing.model)
        if durations is not None and len(durations) >= TUNING.min_samples:
            earliest = timing.created_at + durations.quantile(TUNING.low_quantile)
            if now + policy.min_interval < earliest:
                return min(earliest, now + policy.max_estimate_wait)
        return now + self._backoff(now - timing.created_at)

    def still_due(self, timing: KeyTiming) -> float:
        """When a ``tentative`` key that has come due is asked: its next ask as the schedule
        stands now, from its last ask. Later than it came due when what it waited for tells
        nothing now (its model's first figures have been trusted since, or its window has been
        learned and opens later); the poller asks now otherwise."""
        last = timing.last_ask
        if last is None:
            return -math.inf
        return self.next_ask(timing, last)

    def _choose_lookout(self, timing: KeyTiming, predicted: float, seen: float) -> None:
        """While no job of its model has ended, make ``timing`` (first predicted to end at
        ``predicted``, reported at ``seen``) the model's lookout if it is expected to end
        before the lookout's job, or the lookout is not watched any more (its job ended
        without teaching anything, was cancelled, or lost its estimate)."""
        if timing.model in self._errors:  # (samples() > 0: a model's errors come with one)
            return
        lookout = self._lookouts.get(timing.model)
        if (
            lookout is None
            or lookout.predicted_end is None
            or predicted < lookout.predicted_end
            or lookout.last_ask is None
            or lookout.last_ask < seen - self._policy.max_interval
        ):
            if lookout is not None:
                lookout.lookout = False
            self._lookouts[timing.model] = timing
            timing.lookout = True

    def _note_check(
        self,
        model: str | None,
        queued: bool,
        *,
        live: bool,
        sooner: bool,
        later: bool,
        left: bool,
    ) -> None:
        """Record what a job's check showed of its first figure (given while ``queued``, or
        generating): it counted down (``live``); the end it gave came ``sooner``, or
        ``later``; the job has ``left`` the queue since."""
        checks = self._checks.get(model)
        if checks is None:
            checks = self._checks[model] = Checks()
        if queued:
            if sooner:
                checks.queued_odd = True
            else:
                checks.queued_never_sooner += 1
                checks.queued_left += left
                checks.queued_later = checks.queued_later or later
        elif live:
            checks.counting += 1
        else:
            checks.odd = True

    def _trusted(self, model: str | None, *, queued: bool) -> bool:
        """Whether a job's first figure (given while ``queued``, or generating) is trusted
        without a check (:class:`Checks`)."""
        checks = self._checks.get(model)
        return checks is not None and checks.trusted(queued=queued)

    def _backoff(self, age: float) -> float:
        policy = self._policy
        return min(max(policy.age_fraction * age, policy.min_interval), policy.max_interval)
