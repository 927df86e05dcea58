"""The poller's record of one key (``KeyTiming``), and what a job's progress readings tell of
its end: the seconds left by the rate its progress grows at, and the latest it can end by a
single reading. Pure arithmetic on loop times; ``PollSchedule`` decides when to ask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._job_info import MAX_EXPECTED_SECONDS
from ._schedule_tuning import TUNING


@dataclass(slots=True)
class Progress:
    """What a job's progress has told (``KeyTiming.progress``): one object, made at the first
    reading while the job generates (a job never read so holds none: memory per key).

    Attributes:
        since: when it was first read (since it last went back)...
        was: ...and the percentage then.
        told_end: loop time it last told the job ends (None: not told yet).
        estimate: set once the job's figures come from its progress rather than from the
            gateway's estimate (``PollSchedule._progress_tells``): the job's model, where the
            estimate puts the end (None: a placeholder) and its span. The job's model is
            then learned apart (``progress_model``), as its figures are another gateway's,
            and its end teaches the estimate's model the estimate's error.
        bound: the latest its first reading says it ends (``latest_end``), when that lies
            well before its estimate's end (``ScheduleTuning.bound_margin``): it is asked
            there (1 job in 20 told 3x its length, generating from its submit, was seen up to
            40 s late), and an end by then is learned as on time. None once that is past.
    """

    since: float
    was: float
    told_end: float | None = None
    estimate: tuple[str | None, float | None, float] | None = None
    bound: float | None = None


def reading_resolution(percent: float, was: float, *, tenths: bool) -> float:
    """How far apart two readings of progress can be told (``tenths``: the job's model's
    progress has come with a fraction before): each is off by up to half of it. Two whole
    percents from a gateway that gives tenths happen (jobs of 25 s read at 4.0% and 12.0%);
    taken for whole percents, the rate they tell was thought ten times rougher than it is."""
    return 0.1 if tenths or percent % 1 != 0 or was % 1 != 0 else 1.0


def left_by_progress(
    timing: KeyTiming, seen: float, percent: float, *, tenths: bool
) -> float | None:
    """Seconds left for a generating job read at ``percent`` at ``seen``, by the rate its
    progress has grown at since its first reading; None until that figure is known within
    ``TUNING.progress_error``. A progress that goes back starts over from there. ``tenths``:
    see ``reading_resolution``."""
    progress = timing.progress
    if progress is None:
        timing.progress = Progress(seen, percent)
        return None
    if percent < progress.was:  # what it told before does not hold either (nor its bound)
        progress.since, progress.was, progress.told_end = seen, percent, None
        progress.bound = None
        return None
    rate = left_by_rate(progress, seen, percent, tenths=tenths)
    if rate is None or rate[1] > TUNING.progress_error:
        return None
    left = min(rate[0], MAX_EXPECTED_SECONDS)
    progress.told_end = seen + left
    return left


def left_by_rate(
    progress: Progress, seen: float, percent: float, *, tenths: bool
) -> tuple[float, float] | None:
    """Seconds left for a job read at ``percent`` at ``seen``, by the rate its progress has
    grown at since its first reading, and how far off that may be (each reading is off by up
    to half its resolution: the rate by up to resolution / growth; ``tenths``: see
    ``reading_resolution``); None when the progress tells no rate (done, stalled, no time
    between)."""
    grown = percent - progress.was
    if percent >= 100.0 or grown <= 0.0 or seen <= progress.since:
        return None
    left = (100.0 - percent) * (seen - progress.since) / grown
    return left, left * reading_resolution(percent, progress.was, tenths=tenths) / grown


def latest_end(timing: KeyTiming, now: float, percent: float) -> float | None:
    """The latest loop time a job first read generating at ``percent`` by ``now`` ends, were
    its progress to grow evenly: it began generating after it was last seen queued (or after
    its submit), so it has generated ``now - then`` at most, and has at most that times
    ``(100 - percent) / percent`` left: ``inf`` at 0%, None at 100% (or more).

    One reading is enough for it, where a rate (``left_by_progress``) needs two: a job told far
    too long among right ones is read once while generating, and was seen only when its
    estimate ran out (30 s late for 3x estimates of jobs of 10-30 s). For a right estimate it
    lies at or after the estimated end, and changes nothing."""
    if percent >= 100.0:
        return None
    if percent <= 0.0:
        return math.inf
    began = timing.last_ask if timing.queued and timing.last_ask is not None else timing.created_at
    return now + (100.0 - percent) * (now - began) / percent


def progress_model(model: str | None) -> str:
    """The name under which figures told by ``model``'s jobs' progress are learned."""
    return f"{model} (by progress)"


def gateway_model(timing: KeyTiming) -> str | None:
    """The model the gateway runs ``timing``'s job on (its figures may be learned apart)."""
    progress = timing.progress
    return progress.estimate[0] if progress is not None and progress.estimate else timing.model


def tell_by_progress(timing: KeyTiming, progress: Progress, estimated_end: float) -> None:
    """From now on ``timing``'s figures come from its ``progress``: its next is a first figure
    (a new span), learned under its own name; ``estimated_end``: where the gateway's estimate
    puts its end now (it still teaches the model's estimates when the job ends)."""
    span = timing.predicted_span or max(estimated_end - timing.created_at, 1.0)
    progress.estimate = (timing.model, estimated_end if timing.estimate_live else None, span)
    timing.model = progress_model(timing.model)
    timing.predicted_end = timing.predicted_span = timing.last_expected = None
    timing.expected_since = None
    timing.estimate_live = True
    # Its progress has been read growing (the figure needs that): as good as a check that the
    # figure counts down, which, asked a second or more later, came after many an end.
    timing.live_reports = 1
    timing.recheck = timing.scout = timing.lookout = timing.sentinel = False


@dataclass(slots=True)
class KeyTiming:
    """The poller's record of one key: what the schedule needs, nothing a user reads.

    Attributes:
        created_at: loop time of the submit (or attach).
        model: the request's model, when known; estimates and durations are learned per model.
        last_ask: loop time of the last answered ask about the key.
        predicted_end: loop time the gateway's last estimate says the job ends; None if no
            usable estimate.
        predicted_span: ``predicted_end - created_at`` as first predicted while generating (the
            error scale).
        estimate_live: False once the estimate failed to count down (a placeholder).
        live_reports: reports whose estimate was usable and kept counting down.
        queued: the last report said the job is queued (its estimate may not count down yet).
        last_expected: the last estimate the gateway gave, as it gave it (seconds left).
        expected_since: when that same figure was first given (while generating): a figure
            given unchanged for longer than a step is a placeholder, however small it is.
        predicted_queued: ``predicted_end`` comes from a figure given while queued.
        recheck: its estimate did not move as it left the queue: asked again soon, to tell a
            placeholder from a countdown.
        scout: one of the first jobs of its model while nothing is learned: asked every
            ``max_interval`` until its window opens (``ScheduleTuning.scouts``).
        lookout: the job of its model expected to end first, while none has ended: asked as a
            job with no estimate is (every ``min_interval``, then a share of its age) until its
            window opens, so that the first end is seen at once,
            however early the estimates run (1.5x to 3x long: the first ends were seen 5 to
            11 s late, p99, in a burst, when nothing asked before the windows).
        sentinel: one job in ``ScheduleTuning.sentinels``: its window opens early for
            whole-second estimates, learned or not.
        tentative: its next ask may tell nothing by the time it comes due (a check that its
            estimate counts down, or an ask at an unlearned window that reaches early); the
            poller asks ``PollSchedule.still_due`` first.
        progress: what its progress has told, once read while generating (``Progress``).
    """

    created_at: float
    model: str | None = None
    last_ask: float | None = None
    predicted_end: float | None = None
    predicted_span: float | None = None
    estimate_live: bool = True
    live_reports: int = 0
    queued: bool = False
    last_expected: float | None = None
    expected_since: float | None = None
    predicted_queued: bool = False
    recheck: bool = False
    scout: bool = False
    lookout: bool = False
    sentinel: bool = False
    tentative: bool = False
    progress: Progress | None = None
