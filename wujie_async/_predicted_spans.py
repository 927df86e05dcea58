"""What the predicted spans of a model's last jobs say: whether every job is told the same
(a typical figure, not a per-job estimate), how long its jobs usually are, and when a job told
far longer than that is asked once more (the probe)."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

from ._config import PollPolicy
from ._key_timing import KeyTiming
from ._schedule_tuning import TUNING


class PredictedSpans:
    """The predicted spans of each model's last jobs (``TUNING.spans_kept``), learned at each
    job's first report, and what they say."""

    __slots__ = ("_long_spans", "_ordered_spans", "_policy", "_spans", "_typical", "usual_spans")

    def __init__(self, policy: PollPolicy) -> None:
        self._policy = policy
        self._spans: dict[str | None, deque[float]] = {}
        self._ordered_spans: dict[str | None, list[float]] = {}  # ...the same, sorted
        self._typical: dict[str | None, bool] = {}  # typical_figure, kept as spans come
        # The median of the spans kept, once there are min_samples of them (probe).
        self.usual_spans: dict[str | None, float] = {}
        self._long_spans: dict[str | None, float] = {}  # ...and their long_quantile

    def learn_span(self, model: str | None, span: float) -> None:
        """Learn a job's predicted span (at its first report)."""
        spans = self._spans.get(model)
        if spans is None:
            spans = self._spans[model] = deque(maxlen=TUNING.spans_kept)
            ordered = self._ordered_spans[model] = []
        else:
            ordered = self._ordered_spans[model]
            if len(spans) == TUNING.spans_kept:  # the deque drops its oldest: so does this
                del ordered[bisect_left(ordered, spans[0])]
        spans.append(span)
        insort(ordered, span)
        low, high = ordered[0], ordered[-1]
        kept = len(ordered)
        if kept >= TUNING.min_samples:
            self.usual_spans[model] = ordered[kept // 2]
            self._long_spans[model] = ordered[int(TUNING.long_quantile * kept)]
        self._typical[model] = (
            kept >= TUNING.same_spans_min
            and high - low <= TUNING.same_span_share * high + self._policy.min_interval / 2
        )

    def typical_figure(self, model: str | None) -> bool:
        """True when the model's last jobs were all predicted to last the same (a typical
        figure, not a per-job estimate)."""
        return self._typical.get(model, False)

    def probe(self, timing: KeyTiming, now: float) -> float:
        """When a job never read generating is asked once more, as it may have been told far
        longer than it runs: one told far longer than its model's jobs usually are
        (``TUNING.long_told`` times the median span), when a usual job would end; one queued
        at its last ask and told longer than most (``TUNING.long_queued``), every
        ``max_interval`` as well. Its progress then tells the latest it ends
        (``latest_end``) and a rate: a job told three times its length among right ones was
        otherwise seen only when its estimate ran out (30 s late, p99, jobs of 10-30 s). A
        right estimate that long costs an ask or two more. ``inf``: no such ask."""
        span = timing.predicted_span
        if timing.progress is not None or timing.predicted_end is None or not span:
            return math.inf
        policy = self._policy
        usual = timing.created_at + self.usual_spans.get(timing.model, math.inf)
        at = usual if usual > now + policy.min_interval else math.inf
        longest = self._long_spans.get(timing.model)
        if timing.queued and longest is not None and span > TUNING.long_queued * longest:
            return min(at, now + policy.max_interval)
        # (Seen generating with no progress to read, it has nothing more to tell.)
        return at if self.told_far_longer(timing.model, span) else math.inf

    def told_far_longer(self, model: str | None, span: float) -> bool:
        """Whether a job of ``model`` predicted to last ``span`` was told far longer than the
        model's jobs usually are (``TUNING.long_told``). The probe watches such a job, not the
        window: its end teaches the window nothing (1 job in 20 told 3x its length opened
        every job's window at a third of its span: 11 asks per key)."""
        usual = self.usual_spans.get(model)
        return usual is not None and span > TUNING.long_told * usual
