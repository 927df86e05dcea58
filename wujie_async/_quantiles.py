"""The last samples of one kind, kept for their quantiles: what the schedule learns from."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque

from ._schedule_tuning import TUNING


class Quantiles(deque[float]):
    """The last ``TUNING.samples_kept`` samples in the order they came (a deque: its length
    is asked for often), kept sorted for O(log n) quantiles once a quantile is asked for:
    until then they are only kept (a model's durations and its first readings' bounds are
    asked for by few jobs, if any, and added to by every one)."""

    __slots__ = ("_sorted",)

    def __init__(self) -> None:
        super().__init__(maxlen=TUNING.samples_kept)
        self._sorted: list[float] | None = None  # None: not asked for yet

    def add(self, value: float) -> None:
        ordered = self._sorted
        if ordered is not None:
            if len(self) == TUNING.samples_kept:
                del ordered[bisect_left(ordered, self[0])]  # the oldest: append drops it
            insort(ordered, value)
        self.append(value)

    def _ordered(self) -> list[float]:
        ordered = self._sorted
        if ordered is None:
            ordered = self._sorted = sorted(self)
        return ordered

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (``0 <= q <= 1``) of the samples (there is one at least)."""
        data = self._sorted
        if data is None:
            data = self._ordered()
        return data[round(q * (len(data) - 1))]  # (within the list: no clamping to do)

    def quantiles(self, low: float, high: float) -> tuple[float, float]:
        """The ``low`` and ``high`` quantiles, as ``quantile`` gives each."""
        data = self._sorted
        if data is None:
            data = self._ordered()
        last = len(data) - 1
        return data[round(low * last)], data[round(high * last)]
