"""When the poller next asks about a running key: the schedule and its latency promise.

The promise (docs, "Polling and its latency promise"):

* while a job runs inside the window the poller has learned its estimates fall in, it is asked
  about every ``min_interval``: a job that ends there is seen within ``min_interval``;
* a job that overran that window (or whose gateway gives no usable estimate) is asked about
  every ``max(min_interval, age_fraction x its age)``, capped at ``max_interval``;
* before the window opens, nothing is asked but a check that the estimate counts down, until
  the model's estimates are seen to (``Checks``): a job whose estimate is right costs two or
  three asks (the first, perhaps the check, one just after its predicted end).

The window is learned. Every ended job that had an estimate adds one sample of how far its end
fell from the predicted end, relative to the predicted duration; an end within a second of it
is learned in seconds apart (whole seconds' rounding, a gateway recording ends on a tick: a
second is a second whatever the job's length). Where the end fell is what the
asks prove. The gateway's own end stamp (``complete_time``) places it too: a stamp finer than a
second at its word, until one disagrees with the asks (a skewed clock: what stamps taught is
dropped); any stamp once stamps have been checked against ends two close asks pinned, and then
only by as much as it can prove. An end stamped early would teach that right estimates end
early. The window opens at the low quantile of those errors and closes at the high one: tight
when the gateway's estimates are good, wide when they are noisy, biased or a placeholder. Until
there are enough samples a mild prior holds, but for the earliest end seen (less what whole
seconds explain): it opens the window that early at once, and until a job of a model has ended,
the one expected to end first is asked as if it had no estimate (``KeyTiming.lookout``), so
estimates that run long are found out by the first end, not by the eighth. An estimate that
does not count down between two reports (a constant placeholder) is not an estimate: that job is
polled as if it had none. Until something is learned, that check comes within ``max_interval``
of the first ask, however far the figure: a placeholder far above the real durations must not
hold a job back.

Pure arithmetic on loop times; the poller owns the heap and the calls.
"""

from __future__ import annotations

import math

from ._config import PollPolicy
from ._end_error import bounded, end_error
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
from ._window_shape import WindowShape


class PollSchedule:
    """The schedule of one poller: next ask times, and what it learns from ended jobs."""

    __slots__ = (
        "_bands",
        "_bounds",
        "_checks",
        "_durations",
        "_earliest",
        "_errors",
        "_excess_late",
        "_fractional",
        "_integral",
        "_jobs_learned",
        "_learned",
        "_lookouts",
        "_narrow_gap",
        "_near",
        "_near_reach",
        "_percent_in_tenths",
        "_planned_edges",
        "_policy",
        "_predicted",
        "_progress_score",
        "_reported",
        "_scouts",
        "_shapes",
        "_stamp_offsets",
        "_stamped_near",
        "_stamps_at_their_word",
        "_windows",
        "generation",
    )

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

    @property
    def jobs_learned(self) -> int:
        """How many ended jobs this schedule has learned from (``job_ended`` calls; every one
        counts, whatever it taught). In a fleet each job counts once per process: a leader's
        shadow of its own member's job leaves the learning to the member's own record."""
        return self._jobs_learned

    # --- learning --------------------------------------------------------------------------
    def window(self, model: str | None) -> tuple[float, float]:
        """The learned (low, high) relative error of estimates for ``model``."""
        window = self._windows.get(model)
        if window is None:
            # Asked per report, changed per ended job: cached.
            window = self._windows[model] = self._learn_window(model)
        return window

    def _learn_window(self, model: str | None) -> tuple[float, float]:
        if model not in self._learned:
            # The prior, but an early end is evidence from the first one: a gateway whose
            # estimates run long has every other job's window open that early at once.
            early = self._earliest.get(model, 0.0)
            return (min(TUNING.prior_low, early), TUNING.prior_high)
        # Taken as symmetric until shown otherwise: ends seen later than predicted are
        # evidence that others end as much earlier. Overruns are seen first (at the
        # predicted end); early ends only once a job is asked, which this makes sooner.
        # Lateness an estimate in whole seconds explains (it is up to a second short)
        # is not mirrored: it says nothing of early ends. (Ends within a second of
        # the predicted end are not in these errors at all: see _near.)
        errors = self._errors[model]
        early, late = errors.quantiles(TUNING.low_quantile, TUNING.high_quantile)
        excess = self._excess_late.get(model)
        mirrored = excess.quantile(TUNING.high_quantile) if excess is not None else 0.0
        if len(errors) >= TUNING.mirror_trial and early > -TUNING.mirror_seen * mirrored:
            # Shown otherwise: windows opened that early, and no end came early by
            # even a share of it (one job in 20 told half its length opened every
            # job's window at its start: 12 asks per key in a trickle).
            mirrored = 0.0
        return (min(0.0, early, -mirrored), max(0.0, late, -early))

    def samples(self, model: str | None) -> int:
        """How many ended jobs of ``model`` the estimate window is learned from (bounded)."""
        errors = self._errors.get(model)
        return len(errors) if errors is not None else 0

    def job_ended(
        self, timing: KeyTiming, now: float, ended_at: float | None = None, *, fine: bool = True
    ) -> None:
        """Learn from a job seen ended at ``now`` (``ended_at``: the gateway's end time, if any).

        The true end lies between the previous ask and ``now``. Two asks close together place
        it (their middle), and teach how the gateway's end stamps sit against ours; the stamp,
        once so checked, places it between asks far apart, by as much as it can prove; else
        only what the asks prove (it ended early, or late, by at least so much), or nothing:
        a gateway that gives no end time, stamps whole seconds or runs on a skewed clock must
        not teach the schedule that right estimates are wrong.
        """
        self._jobs_learned += 1
        earliest = timing.last_ask if timing.last_ask is not None else timing.created_at
        error = None
        second = 0.0
        end: float | None = None
        stamped: float | None = None
        if now - earliest <= self._narrow_gap:
            end = (earliest + now) / 2
            if ended_at is not None:
                stamped = self._stamped_end(ended_at, earliest, now, fine=fine)
                self._stamp_offsets.add(ended_at - end)
                end = stamped if stamped is not None else end
        elif ended_at is not None:
            end = stamped = self._stamped_end(
                ended_at, earliest, now, timing.predicted_end, fine=fine
            )
        ended = (end, end) if end is not None else (earliest, now)
        duration = (end if end is not None else (earliest + now) / 2) - timing.created_at
        progress = timing.progress
        if progress is not None and progress.estimate is not None:
            # Told by its progress: the gateway's estimate still teaches its own model.
            model, predicted, span = progress.estimate
            if predicted is not None:
                error = end_error(predicted, span, ended)
                self._learn_end(model, duration, error, stamped is not None, 1.0 / span)
        elif progress is not None and progress.told_end is not None and progress.bound is None:
            # (A job asked at its bound was read for a rate because its estimate looked far
            # off: that its progress told its end better says nothing of the model's other
            # estimates. Counted, 3 jobs in 60 told 3x their length had every job of the
            # model go by its progress, relearned from scratch: 4.1 asks per key, not 2.6.)
            self._compare(timing, progress.told_end, ended)
        # A figure given while queued that is trusted as the earliest the job can end is not
        # an estimate of its end: it teaches nothing.
        bound = False
        if timing.predicted_queued:
            checks = self._checks.get(timing.model)
            bound = checks is not None and checks.queued_bounds()
        if (
            timing.predicted_end is not None
            and timing.predicted_span
            and timing.estimate_live
            and not bound
            and not (  # (told_far_longer, spelled out: this runs per ended job)
                (usual := self._predicted.usual_spans.get(timing.model)) is not None
                and timing.predicted_span > TUNING.long_told * usual
            )
        ):
            error = end_error(timing.predicted_end, timing.predicted_span, ended)
            second = 1.0 / timing.predicted_span
            if (
                error is not None
                and error < 0
                and progress is not None
                and progress.bound is not None
                and timing.model not in self._bounds.uneven_progress
            ):
                # It ended by the bound its progress set, as bounds say: early against its
                # estimate, it tells nothing of the other estimates (as its model's first
                # end, 1 job in 20 told 2x-3x its length opened every job's window at a
                # third of its span: 16 to 20 asks per key).
                error = 0.0
        self._learn_end(timing.model, duration, error, stamped is not None, second)

    def _progress_tells(self, model: str | None) -> bool:
        """Whether ``model``'s jobs go by what their progress tells rather than by the
        gateway's estimate: every job is told the same figure (it says nothing of any job's
        end), or the model's jobs ended closer to what their progress told."""
        return (
            self._predicted.typical_figure(model)
            or self._progress_score.get(model, 0) >= TUNING.progress_wins
        )

    def _compare(self, timing: KeyTiming, told_end: float, ended: tuple[float, float]) -> None:
        """Score which of ``timing``'s two figures its end (known to lie within ``ended``)
        came closer to: the end its progress told (``told_end``), or the gateway's estimate
        (none: a placeholder, or no estimate at all, is farther than any)."""
        low, high = ended

        def off(at: float | None) -> float:
            return math.inf if at is None else max(low - at, 0.0, at - high)

        closer = off(timing.predicted_end) - off(told_end)
        if abs(closer) <= TUNING.near:
            return  # both on time (whole seconds' rounding, a tick, as asks can tell)
        score = self._progress_score.get(timing.model, 0) + (1 if closer > 0 else -1)
        cap = 2 * TUNING.progress_wins
        self._progress_score[timing.model] = max(-cap, min(score, cap))

    def _stamped_end(
        self,
        stamp: float,
        earliest: float,
        now: float,
        predicted: float | None = None,
        *,
        fine: bool = True,
    ) -> float | None:
        """Where a gateway's end stamp places an end known to lie between ``earliest`` and
        ``now``: None until stamps have been checked against enough ends that asks pinned, or
        when it cannot place it.

        The stamp places the end within the spread of the offsets seen; of that stretch (within
        the asks), the point nearest ``predicted`` is taken, so a stamp shows a job ended early
        (or late) only by as much as it can prove. Without ``predicted`` (two close asks), the
        stamp corrected by the typical offset, within that stretch.
        """
        offsets = self._stamp_offsets
        if len(offsets) < TUNING.min_samples:
            if fine and self._stamps_at_their_word and not earliest <= stamp <= now:
                # A skewed clock: what its stamps taught is void, and learning starts afresh.
                self._stamps_at_their_word = False
                self._errors.clear()
                self._earliest.clear()
                self._near.clear()
                self._stamped_near.clear()
                self._bands.clear()
                self._excess_late.clear()
                self._windows.clear()
                self._shapes.clear()
                self._learned.clear()
                self._planned_edges.clear()
                self._scouts.clear()
                self.generation += 1
            return stamp if fine and self._stamps_at_their_word else None
        # (min and max spelled out here and below, as they pick: a call of either costs
        # more than the comparison, and the schedule's learning runs per ended job.)
        least, most = offsets.quantiles(TUNING.low_quantile, TUNING.high_quantile)
        low, high = stamp - most, stamp - least
        low = earliest if earliest > low else low
        high = now if now < high else high
        if low > high:
            return None  # the stamp disagrees with the asks: it teaches nothing
        target = stamp - offsets.quantile(0.5) if predicted is None else predicted
        target = low if low > target else target
        return high if high < target else target

    def _learn_end(
        self,
        model: str | None,
        duration: float,
        error: float | None,
        stamped: bool,
        second: float = 0.0,
    ) -> None:
        """Learn how long a job of ``model`` ran, and how far its end fell from the predicted
        end (``error``, relative to its span; None: not known); ``stamped``: its end was
        placed by the gateway's stamp, not by asks alone; ``second``: one second relative to
        the job's predicted span (an error in seconds is ``error / second``)."""
        durations = self._durations.get(model)
        if durations is None:
            durations = self._durations[model] = Quantiles()
        durations.add(duration)
        if error is None:
            return
        windows, bands = self._windows, self._bands
        window, band = windows.get(model), bands.get(model)
        if window is None:
            window = self.window(model)
        if band is None:
            band = self._near_band(model)
        before = window[0], band[0]  # (_edge)
        error = bounded(error)
        # Whole-second estimates are up to a second short or long (their resolution).
        coarse = (
            model not in self._fractional
            and self._integral.get(model, 0) >= TUNING.coarse_after  # (coarse(model))
        )
        resolution = second if coarse else 0.0
        earliest = error
        # The band (_learn_band) changes only with a near end, or as the window is learned.
        learning = band_changed = model not in self._learned
        if second > 0 and abs(error) <= second * self._near_reach:
            # An end within a second of its predicted end (give or take half a step: how
            # well asks place an end) is off by what does not grow with the job: whole
            # seconds' rounding, a gateway that records ends on a tick, the time between
            # the end and its record. Learned in seconds (_near); relative to each job's
            # span, a 10 s job's second opened a 30 s job's window 3 s early. Farther off,
            # the error is the estimate's own, relative to its span: split into a second
            # and the rest, the second taken off made short jobs' errors look smaller, and
            # long jobs' windows opened too late (estimates 1.3 times too long in whole
            # seconds: p99 0.99 s).
            near = self._near.get(model)
            if near is None:
                near = self._near[model] = Quantiles()
            near.add(error / second)
            if stamped:
                self._stamped_near.add(model)
            error = 0.0
            earliest += resolution  # what whole seconds explain is no early end
            band_changed = True
        errors = self._errors.get(model)
        if errors is None:
            errors = self._errors[model] = Quantiles()
            excess = self._excess_late[model] = Quantiles()  # (the two are kept alike)
        else:
            excess = self._excess_late[model]
        errors.add(error)
        if learning and len(errors) >= TUNING.min_samples:
            self._learned.add(model)
        late = error - resolution
        excess.add(late if late > 0.0 else 0.0)
        known = self._earliest.get(model, 0.0)
        self._earliest[model] = earliest if earliest < known else known
        lookout = self._lookouts.pop(model, None)  # an end is seen: no more lookouts
        if lookout is not None:
            lookout.lookout = False
        learned = window  # (what the shape was made of)
        window = windows[model] = self._learn_window(model)
        reshape = learning or window != learned
        if band_changed:
            learned = band
            band = bands[model] = self._learn_band(model)
            reshape = reshape or band != learned
        if reshape:  # (most ends move no quantile the window is made of: the shape stands)
            self._shapes.pop(model, None)
        # Against the latest edge keys may have been planned by since the last bump, not
        # only the one just before: a window that widens a little at a time (estimates off
        # by up to 20%) would otherwise never bring waiting keys in.
        planned = self._planned_edges.get(model, before)
        (planned_low, planned_reach), (low, reach) = planned, before
        edge = (
            low if low > planned_low else planned_low,
            reach if reach < planned_reach else planned_reach,
        )
        after = window[0], band[0]  # (_edge)
        if after[0] < edge[0] - 0.02 or after[1] > edge[1] + 0.02:
            self.generation += 1
            edge = after
        self._planned_edges[model] = edge

    def _edge(self, model: str | None) -> tuple[float, float]:
        """Where ``model``'s windows open: the relative low of the window, and the seconds
        they reach before the predicted end at least."""
        return self.window(model)[0], self._near_band(model)[0]

    def _near_band(self, model: str | None) -> tuple[float, float]:
        """Seconds a learned window reaches before and after the predicted end, at least:
        where the ends within a second of it fell (0, 0 until learned)."""
        band = self._bands.get(model)
        if band is None:
            band = self._bands[model] = self._learn_band(model)
        return band

    def _learn_band(self, model: str | None) -> tuple[float, float]:
        near = self._near.get(model)
        if near is None or model not in self._learned:
            return 0.0, 0.0
        low, high = near.quantiles(TUNING.low_quantile, TUNING.high_quantile)
        early, late = -low, high
        early = early if early > 0.0 else 0.0
        late = late if late > 0.0 else 0.0
        # Without end stamps an end is known from two asks, to half the gap between them:
        # the earliest ends seen came a quarter of it earlier on average, and the window
        # opens that much earlier (estimates rounded up, no stamps: seen up to 0.6 s late,
        # p99, in a burst of 200, without it). An early side within half a step is what asks
        # show of ends at the predicted end itself: nothing to widen.
        half_step = self._half_step()
        if model not in self._stamped_near and early >= half_step:
            early += half_step / 2
        reach = self._near_reach
        return (reach if reach < early else early), (reach if reach < late else late)

    def _half_step(self) -> float:
        """How far off an end placed between two close asks can be: half their gap."""
        return TUNING.narrow_gap * self._policy.min_interval / 2

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

    def _note_resolution(self, model: str | None, expected_seconds: float) -> bool:
        """Count ``expected_seconds`` as a figure of ``model``'s; returns ``coarse(model)``."""
        if model in self._fractional:
            return False
        if expected_seconds != int(expected_seconds):
            self._fractional.add(model)
            self._shapes.pop(model, None)  # (a window that reached early for whole seconds)
            return False
        seen = self._integral[model] = self._integral.get(model, 0) + 1
        if seen == TUNING.coarse_after:
            self._shapes.pop(model, None)
        return seen >= TUNING.coarse_after

    def coarse(self, model: str | None) -> bool:
        """True when ``model``'s estimates come in whole seconds (a few seen, none finer)."""
        return model not in self._fractional and self._integral.get(model, 0) >= TUNING.coarse_after

    def _learning(self, model: str | None) -> bool:
        return model not in self._learned

    def watch_start(self, timing: KeyTiming) -> float:
        """Loop time from which ``timing``'s job is asked about densely.

        ``inf`` for a job with no usable estimate: it has no window, so a widening of the
        learned window does not concern it (its asks follow its age).
        """
        if timing.predicted_end is None or not timing.predicted_span:
            return math.inf
        return self.watch_window(timing)[0]

    def watch_window(self, timing: KeyTiming) -> tuple[float, float]:
        """Loop times when ``timing``'s window opens and closes (it has a prediction)."""
        return self._window(timing, self.window_shape(timing.model))

    def _window(self, timing: KeyTiming, shape: WindowShape) -> tuple[float, float]:
        assert timing.predicted_end is not None and timing.predicted_span is not None
        opens, closes = shape.around(timing.predicted_end, timing.predicted_span)
        if timing.sentinel and not shape.reach and self.coarse(timing.model):
            opens -= TUNING.coarse_reach  # see TUNING.sentinels
        return opens, closes

    def window_shape(self, model: str | None) -> WindowShape:
        """How ``model``'s watch windows sit around predicted ends, as things stand now (a
        caller that walks many jobs takes it once per model)."""
        shape = self._shapes.get(model)
        if shape is None:
            shape = self._shapes[model] = self._shape(model)
        return shape

    def _shape(self, model: str | None) -> WindowShape:
        low, high = self.window(model)
        # After the end, and after it even when a call with room takes the key early.
        policy = self._policy
        delay = TUNING.open_delay * policy.min_interval + policy.batch_fill_horizon
        learning = self._learning(model)
        # The prior is a guess: it must not make a long job's window long as well.
        cap = TUNING.prior_max_steps * policy.min_interval if learning else math.inf
        reach = TUNING.coarse_reach if learning and self.coarse(model) else 0.0
        early, late = self._near_band(model)
        return WindowShape(low, high, delay, cap, reach, early, late)

    def _backoff(self, age: float) -> float:
        policy = self._policy
        return min(max(policy.age_fraction * age, policy.min_interval), policy.max_interval)
