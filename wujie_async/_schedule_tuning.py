"""The poll schedule's tuning, in one place: every figure with its reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleTuning:
    """The schedule's tuning, in one place (every figure with its reason).

    Attributes:
        min_samples: ended jobs of a model before the learned window replaces the prior.
        samples_kept: the last this many samples are what the window is learned from.
        low_quantile: the window opens at this quantile of the errors...
        high_quantile: ...and closes at this one.
        prior_low: the prior: an estimate is taken to be right...
        prior_high: ...or up to this share of its duration short (the job may end later).
        open_delay: a window opens this share of ``min_interval`` after its start, so a right
            estimate is asked about once just after the end, not just before it.
        prior_max_steps: the prior never reaches more than this many ``min_interval`` from the
            predicted end (a guess must not make a long job's window long as well).
        live_drift: a later report may move the predicted end by this share of the time
            between the two reports (plus ``min_interval``) before the estimate counts as not
            counting down (a placeholder).
        check_share: while nothing is learned, a check (or each step) comes this share of the
            way to the window.
        spans_kept: the predicted durations of a model's last jobs kept: when they are all the
            same, the estimate is a typical figure, not this job's.
        same_span_share: predicted durations within this share of each other are "the same".
        same_spans_min: jobs alike before a typical figure is suspected. Two are enough: the
            error is cheap one way (a few extra steps until a differing estimate shows they are
            per job) and dear the other (an early end seen only at the predicted end).
        narrow_gap: a job whose end is known only to lie between two asks this many
            ``min_interval`` apart (or closer) teaches the middle of them; farther apart, only
            what the asks prove (it ended early, or late, by at least so much), or nothing.
        coarse_reach: seconds a window opens earlier, while it is unlearned, for estimates in
            whole seconds: the end lies anywhere in the second after the figure (rounded down),
            around it or before it (rounded up). Opened after the figure, a gateway that rounds
            up has every job seen up to 1.6 s late, and nothing learned from it (an ask after a
            long wait that finds the job done proves no early end); opened a second earlier,
            the first ends are seen close and teach the window. Such an ask is tentative: once
            the window is learned, a key it would find too early goes to its window instead.
        sentinels: one job in this many has its window open ``coarse_reach`` earlier even
            once its model's whole-second window is learned. The window is learned from the
            ends asks see, and an end that came before the window's first ask proves only
            that it came that early: learned from such ends alone, a window creeps later
            (estimates rounded to the nearest were seen up to 0.8 s late at 2,000 jobs, p99).
            A sentinel sees early ends close. About 0.1 ask per key more.
        coarse_after: whole-second estimates (and no finer one) seen before a model's
            estimates are taken to come in whole seconds.
        scouts: while a model's window is unlearned, its first this many jobs with an
            estimate are asked every ``max_interval`` until their window opens, not at their
            predicted end: estimates that run long (three times the job, counting down as a
            right one would) look right until jobs end, and the window is learned from the
            first ends seen. Twice ``min_samples``, so half of them ending teaches it: with 8
            (every scout must end) a burst whose estimates were 3x long was seen 11 s late
            (p50), with 12 to 32 about 1.5 s. The price: a few asks more for each, per model.
        near: seconds from its predicted end (give or take half a step) within which an end
            is learned in seconds, apart from the errors relative to each job's span: whole
            seconds' rounding, a gateway that records ends on a tick, the time between an end
            and its record do not grow with the job (learned relative to its span, a 10 s
            job's second opened a 30 s job's window 3 s early).
        countdowns_trusted: checks of a model's jobs that saw its first figures count down
            (given while queued: give an end that never came sooner) before such a figure is
            trusted without a check (``Checks``): a job whose first report comes after that,
            or whose check is still to come, goes straight to its window.
        progress_error: a job's progress tells its seconds left by how fast it grows, once
            that figure is known within this many seconds. Each reading is off by up to its
            resolution (0.1, or 1 for whole percents), so the growth must be many times that:
            a 20 s job read in tenths tells about 1.5 s after its first reading while
            generating, one read in whole percents about 9 s after. A burst of jobs of 10-30 s
            without estimates, read in tenths: within 0.25 s, 5.8 asks per key, p99 0.42 s
            late; 0.5 s, 4.9 asks, 0.45 s; 0.75 s, 4.7 asks, 0.53 s (an error the asks at the
            window do not make up for); by age alone, 29 asks. Estimates ±50% off that give
            way to the progress: within 0.5 s, 4.7 asks, p99 0.61 s; 0.25 s, 5.2 asks, 0.50 s.
        long_told: a job told more than this many times its model's median span (of the
            spans kept) is probed once, at that median (``PredictedSpans.probe``).
        long_queued: a job queued at its ask and told more than this many times the
            ``long_quantile`` of its model's spans kept is asked every ``max_interval`` until it
            is read generating (``PredictedSpans.probe``): told 2x-3x its length, it may not
            be ``long_told`` (a job told 43 s among jobs of 10-30 s, of which it was one of 14
            s, was seen 30 s late in a trickle). Against the median, a quarter more caught a
            fifth of right estimates among jobs of 10-30 s (0.15 ask per key more).
        long_quantile: see ``long_queued``.
        bound_margin: a job whose first reading while generating bounds its end (its progress
            grown evenly, ``_latest_end``) this share of its span (and at least a second and a
            step) before its estimate's end is asked at that bound (``_Progress.bound``).
        bound_rate_after: a job with a bound is read again this many seconds after its first
            reading (unless its bound comes first), so that its progress's rate tells its
            end: a job first read generating long after it was last seen queued has a loose
            bound (it may have begun anywhere between), and was seen up to 9 s late.
        bound_outlier: a job's bound is used, once its model's first readings are known, only
            when the time it leaves is under this share of what they leave against their
            estimates (``ProgressBounds.note_bound``) at ``bound_quantile``: a job told 2x its
            length leaves half, one told 3x a third.
        bound_quantile: ...the first readings' quantile. Low, since a reading after a queue
            it cannot see leaves too much: with every estimate 3x too long and queues, the
            tight readings (at the median) were taken for outliers (3.4 asks per key, not 3.2).
        bound_short: a job asked past its bound whose progress is this many points short of
            100 proves that its model's progress does not grow evenly (fast and then slowly):
            the model's bounds are not used any more.
        progress_wins: a model's jobs go by their progress (when it tells) once this many
            more of its jobs ended closer to what their progress told than to the gateway's
            estimate (by more than ``near``) than the other way round (``_compare``). Few,
            since every job decided on the estimate meanwhile waits on a window learned from
            that estimate's errors; a typical figure gives way at once.
    """

    min_samples: int = 8
    samples_kept: int = 256
    low_quantile: float = 0.02
    high_quantile: float = 0.98
    mirror_trial: int = 16
    mirror_seen: float = 0.25
    prior_low: float = 0.0
    prior_high: float = 0.05
    open_delay: float = 0.25
    prior_max_steps: float = 4.0
    live_drift: float = 0.5
    check_share: float = 0.25
    spans_kept: int = 32
    same_span_share: float = 0.02
    same_spans_min: int = 2
    narrow_gap: float = 1.0
    coarse_reach: float = 1.0
    sentinels: int = 16
    coarse_after: int = 3
    scouts: int = 16
    near: float = 1.0
    countdowns_trusted: int = 8
    progress_error: float = 0.25
    long_told: float = 2.0
    long_queued: float = 1.25
    long_quantile: float = 0.8
    bound_margin: float = 0.2
    bound_rate_after: float = 2.0
    bound_short: float = 5.0
    bound_outlier: float = 0.6
    bound_quantile: float = 0.25
    progress_wins: int = 3


TUNING = ScheduleTuning()
