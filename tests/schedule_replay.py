"""A poller's life, replayed on simulated time against one ``PollSchedule``: every call the
poller makes of it (first asks, reports, ends, checks of tentative keys, window walks when the
learned window widens), with every answer and every field of every key's timing after it.

Two schedules that give the same record made the same decisions, to the last bit of every
float: ``tests/test_schedule_replay.py`` holds the record's digest for a few seeded runs, so a
change meant only to make the schedule cheaper shows there if it changes a decision. (Only
arithmetic that IEEE 754 rounds exactly goes into a run: no log or exp, whose last bit may
differ between platforms.)

    .venv/bin/python -m tests.schedule_replay   # the digests, after a change meant to be seen
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wujie_async import PollPolicy
from wujie_async._key_timing import KeyTiming
from wujie_async._schedule import PollSchedule
from wujie_async._window_shape import WindowShape

# How a model's gateway gives its estimate: (job, seen, queued, rng) -> seconds left or None.
Figure = Callable[["_Job", float, bool, random.Random], float | None]

_TIMING_FIELDS = tuple(f.name for f in dataclasses.fields(KeyTiming) if f.name != "progress")


@dataclass(slots=True)
class _Job:
    timing: KeyTiming
    profile: _Profile
    starts: float  # leaves the queue
    ends: float
    factor: float  # how far off its estimate is (1.0: right)
    due: float = math.inf
    done: bool = False


@dataclass(frozen=True, slots=True)
class _Profile:
    """One model's gateway: its figures, progress and end stamps."""

    name: str
    low: float  # generation seconds, uniform in [low, high]
    high: float
    figure: str
    progress: str  # none, whole, tenths, uneven, offset
    stamps: str  # none, fine, whole, skewed
    queue_share: float  # share of jobs that queue first
    queued_figure: str  # while queued: same, none, generation, constant


def _figure(job: _Job, seen: float, queued: bool, rng: random.Random) -> float | None:
    kind = job.profile.figure
    if queued:
        how = job.profile.queued_figure
        if how == "none":
            return None
        if how == "generation":
            return (job.ends - job.starts) * job.factor
        if how == "constant":
            return 45.0
    left = job.starts + (job.ends - job.starts) * job.factor - seen
    if kind == "missing":
        return None
    if kind == "placeholder":
        return 30.0
    if kind == "typical":
        return 20.0 - (seen - job.timing.created_at)
    if kind == "clamped":
        return max(1.0, left)
    if left <= 0:
        return 0.0
    if kind == "whole_down":
        return float(math.floor(left))
    if kind == "whole_up":
        return float(math.ceil(left))
    if kind == "whole_near":
        return float(round(left))
    return round(left, 2)


def _percent(job: _Job, seen: float) -> float | None:
    how = job.profile.progress
    if how == "none" or seen < job.starts:
        return None
    share = min(1.0, (seen - job.starts) / (job.ends - job.starts))
    if how == "uneven":
        share = math.sqrt(share)
    elif how == "offset":
        share = 0.1 + 0.9 * share
    value = 100.0 * share
    return float(math.floor(value)) if how == "whole" else round(value, 1)


def _profiles(rng: random.Random, count: int) -> list[_Profile]:
    figures = [
        "right",
        "right",
        "whole_down",
        "whole_up",
        "whole_near",
        "noisy",
        "long",
        "outliers",
        "placeholder",
        "typical",
        "missing",
        "clamped",
    ]
    result = []
    for n in range(count):
        low = rng.choice([1.0, 2.0, 5.0, 10.0])
        result.append(
            _Profile(
                name=f"model-{n}",
                low=low,
                high=low * rng.choice([1.5, 3.0]),
                figure=rng.choice(figures),
                progress=rng.choice(["none", "none", "whole", "tenths", "uneven", "offset"]),
                stamps=rng.choice(["none", "fine", "fine", "whole", "skewed"]),
                queue_share=rng.choice([0.0, 0.0, 0.3, 1.0]),
                queued_figure=rng.choice(["same", "none", "generation", "constant"]),
            )
        )
    return result


def _factor(profile: _Profile, rng: random.Random) -> float:
    if profile.figure == "noisy":
        return rng.uniform(0.5, 1.5)
    if profile.figure == "long":
        return 3.0
    if profile.figure == "outliers" and rng.random() < 0.05:
        return rng.choice([0.5, 3.0])
    return 1.0


@dataclass
class Replay:
    """What a replay recorded: one line per call of the schedule (``record``), and the time
    spent inside the schedule's calls."""

    record: list[str] = field(default_factory=list)
    seconds: float = 0.0
    asks: int = 0
    jobs: int = 0


def replay(seed: int, jobs: int, *, record: bool = True) -> Replay:
    """Run ``jobs`` jobs of a few seeded random models through one schedule, as a poller
    would; every call, its answer and the key's timing after it go to ``record``."""
    rng = random.Random(seed)
    policy = rng.choice(
        [PollPolicy(), PollPolicy(min_interval=0.25, max_interval=3.0, batch_fill_horizon=0.1)]
    )
    schedule = PollSchedule(policy)
    profiles = _profiles(rng, rng.choice([1, 2, 3]))
    burst = rng.random() < 0.5
    out = Replay(jobs=jobs)
    lines = out.record
    clock = time.perf_counter
    heap: list[tuple[float, int, _Job]] = []
    order = 0
    generation = schedule.generation
    waiting: dict[int, _Job] = {}

    def note(what: str, answer: object, job: _Job) -> None:
        timing = job.timing
        progress = timing.progress
        lines.append(
            f"{what} {answer!r} g{schedule.generation} "
            f"{[getattr(timing, name) for name in _TIMING_FIELDS]!r} "
            f"{None if progress is None else dataclasses.astuple(progress)!r}"
        )

    def plan(job: _Job, when: float) -> None:
        nonlocal order
        job.due = when
        order += 1
        heapq.heappush(heap, (when, order, job))

    created = 0.0
    for n in range(jobs):
        created = rng.uniform(0.0, 2.0) if burst else created + rng.uniform(0.0, 0.5)
        profile = rng.choice(profiles)
        queue = rng.uniform(0.5, 8.0) if rng.random() < profile.queue_share else 0.0
        starts = created + queue
        ends = starts + rng.uniform(profile.low, profile.high)
        timing = KeyTiming(created_at=created, model=profile.name)
        job = _Job(timing, profile, starts, ends, _factor(profile, rng))
        waiting[n] = job
        started = clock()
        first = schedule.first_ask(timing)
        out.seconds += clock() - started
        plan(job, first)
        if record:
            note("first", first, job)

    now = 0.0
    while heap:
        due, _, job = heapq.heappop(heap)
        if job.done or due != job.due:
            continue
        now = max(now, due)
        timing = job.timing
        if timing.tentative:
            started = clock()
            later = schedule.still_due(timing)
            out.seconds += clock() - started
            if record:
                note("still_due", later, job)
            if later > now:
                plan(job, later)
                continue
        # One batch call: every key due within the horizon rides along.
        batch = [job]
        job.due = math.inf  # on the wire
        while heap and heap[0][0] <= now + policy.batch_fill_horizon and len(batch) < 50:
            more_due, _, more = heapq.heappop(heap)
            if not more.done and more_due == more.due:
                more.due = math.inf
                batch.append(more)
        asked = now
        now += rng.uniform(0.02, 0.3)
        for job in batch:
            out.asks += 1
            timing = job.timing
            if asked >= job.ends:
                stamps = job.profile.stamps
                started = clock()
                if stamps == "none":
                    schedule.job_ended(timing, now)
                elif stamps == "fine":
                    schedule.job_ended(timing, now, job.ends)
                elif stamps == "whole":
                    schedule.job_ended(timing, now, float(math.floor(job.ends)), fine=False)
                else:
                    schedule.job_ended(timing, now, job.ends + 2.0)
                out.seconds += clock() - started
                job.done = True
                if record:
                    note("ended", None, job)
                continue
            queued = asked < job.starts
            figure = _figure(job, asked, queued, rng)
            percent = None if queued else _percent(job, asked)
            position = rng.choice([None, 0, 3, 12]) if queued else None
            started = clock()
            ask = schedule.report(
                timing,
                now,
                expected_seconds=figure,
                queue_position=position,
                queued=queued,
                asked_at=asked if rng.random() < 0.9 else None,
                percent=percent,
            )
            out.seconds += clock() - started
            plan(job, ask)
            if record:
                note(f"report {schedule.watch_start(timing)!r}", ask, job)
        if schedule.generation != generation:
            # The learned window widened: keys waiting for a later window come in sooner.
            generation = schedule.generation
            shapes: dict[str | None, WindowShape] = {}
            started = clock()
            for waiting_job in waiting.values():
                timing = waiting_job.timing
                end, span = timing.predicted_end, timing.predicted_span
                if waiting_job.done or end is None or not span:
                    continue
                shape = shapes.get(timing.model)
                if shape is None:
                    shape = shapes[timing.model] = schedule.window_shape(timing.model)
                last = timing.last_ask
                when = max(now, shape.opens(end, span), -math.inf if last is None else last + 0.5)
                if when < waiting_job.due:
                    plan(waiting_job, when)
                    if record:
                        note("pulled", when, waiting_job)
            out.seconds += clock() - started
            if record:
                lines.append(f"shapes {sorted(shapes.items())!r}")
    if record:
        for profile in profiles:
            lines.append(
                f"learned {profile.name} {schedule.window(profile.name)!r} "
                f"{schedule.samples(profile.name)} {schedule.coarse(profile.name)} "
                f"{schedule.window_shape(profile.name)!r}"
            )
    return out


def digest(seed: int, jobs: int) -> tuple[int, int, str]:
    """Asks, generation bumps and the SHA-256 of the record of ``replay(seed, jobs)``."""
    run = replay(seed, jobs)
    bumps = sum(1 for line in run.record if line.startswith("shapes "))
    text = "\n".join(run.record).encode()
    return run.asks, bumps, hashlib.sha256(text).hexdigest()


# The runs tests/test_schedule_replay.py pins.
SEEDS = range(12)
JOBS = 300

if __name__ == "__main__":
    for seed in SEEDS:
        sys.stdout.write(f"    {seed}: {digest(seed, JOBS)!r},\n")
