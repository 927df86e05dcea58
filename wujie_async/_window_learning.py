"""What a poll schedule learns from ended jobs: the window around a predicted end in which a
model's jobs end (``window``, ``window_shape``), and whether its estimates come in whole seconds
(``coarse``). ``PollSchedule`` (``_schedule``) plans asks by it; apart because learning runs per
ended job and planning per report, and each reads the other only through these methods.

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
estimates that run long are found out by the first end, not by the eighth.

The state is ``PollSchedule``'s, each field with its reason in ``PollSchedule.__init__``; the
slots this part reads and writes are declared here.
"""

from __future__ import annotations

import math

from ._config import PollPolicy
from ._end_error import bounded, end_error
from ._figure_checks import Checks
from ._key_timing import KeyTiming
from ._predicted_spans import PredictedSpans
from ._progress_bounds import ProgressBounds
from ._quantiles import Quantiles
from ._schedule_tuning import TUNING
from ._window_shape import WindowShape


class _WindowLearning:
    """The learning half of ``PollSchedule`` (its base class): what ended jobs teach."""

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
        "_planned_edges",
        "_policy",
        "_predicted",
        "_progress_score",
        "_scouts",
        "_shapes",
        "_stamp_offsets",
        "_stamped_near",
        "_stamps_at_their_word",
        "_windows",
        "generation",
    )

    _bands: dict[str | None, tuple[float, float]]
    _bounds: ProgressBounds
    _checks: dict[str | None, Checks]
    _durations: dict[str | None, Quantiles]
    _earliest: dict[str | None, float]
    _errors: dict[str | None, Quantiles]
    _excess_late: dict[str | None, Quantiles]
    _fractional: set[str | None]
    _integral: dict[str | None, int]
    _jobs_learned: int
    _learned: set[str | None]
    _lookouts: dict[str | None, KeyTiming]
    _narrow_gap: float
    _near: dict[str | None, Quantiles]
    _near_reach: float
    _planned_edges: dict[str | None, tuple[float, float]]
    _policy: PollPolicy
    _predicted: PredictedSpans
    _progress_score: dict[str | None, int]
    _scouts: dict[str | None, int]
    _shapes: dict[str | None, WindowShape]
    _stamp_offsets: Quantiles
    _stamped_near: set[str | None]
    _stamps_at_their_word: bool
    _windows: dict[str | None, tuple[float, float]]
    generation: int

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
