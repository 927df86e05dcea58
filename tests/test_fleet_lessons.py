"""Shared schedule lessons: every member's poll schedule learns from every member's jobs."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async import PollPolicy
from wujie_async._schedule import KeyTiming, Lesson, PollSchedule
from wujie_async.fleet import RedisFleet

from .conftest import EmulatorFactory
from .fleet_support import any_redis, fleet_name, member

pytestmark = pytest.mark.anyio


async def add(stream: str, fields: dict[str, str], redis: Any) -> Any:
    return await redis.xadd(stream, fields)


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


def test_lessons_teach_another_schedule_what_the_first_learned() -> None:
    # Member A's schedule follows 40 jobs with biased estimates; member B's learns only A's
    # lessons. B then has A's window and A's view of the figure, without a job of its own.
    policy = PollPolicy()
    first, second = PollSchedule(policy), PollSchedule(policy)
    lessons: list[Lesson] = []
    first.on_lesson = lessons.append
    rng = random.Random(3)
    for _ in range(40):
        timing = KeyTiming(created_at=0.0, model="m")
        end, factor = rng.uniform(10, 30), rng.uniform(0.5, 1.5)
        first.report(timing, 1.0, expected_seconds=end * factor - 1.0)
        first.job_ended(timing, end + 0.2, end)
    assert len(lessons) == 80  # a span (first report) and an end per job
    generation = second.generation
    for lesson in lessons:
        second.learn(lesson)
    assert second.window("m") == first.window("m")
    assert second.samples("m") == first.samples("m") == 40
    assert second.generation > generation  # its poller pulls waiting keys in


def test_lessons_about_endless_models_keep_memory_bounded() -> None:
    # Lessons come from other processes: a flood of made-up model names is not all kept.
    schedule = PollSchedule(PollPolicy())
    models = [f"model-{i}" for i in range(10_000)]
    for model in models:
        schedule.learn(Lesson(model, duration=5.0, error=0.1))
    assert sum(schedule.samples(model) > 0 for model in models) == 64
    # Its own jobs still teach it, whatever model they are of.
    timing = KeyTiming(created_at=0.0, model="dall-e-3")
    schedule.report(timing, 1.0, expected_seconds=9.0)
    schedule.job_ended(timing, 10.5, 10.0)
    assert schedule.samples("dall-e-3") == 1


async def test_a_member_learns_the_others_lessons_and_skips_its_own(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        a, b = fleet.lessons("a"), fleet.lessons("b")
        assert await a.exchange([]) == []  # an empty stream
        assert await b.exchange([]) == []
        sent = [Lesson("gpt-image-1", span=18.0), Lesson("dall-e-2", duration=6.5, error=-0.2)]
        assert await a.exchange(sent) == []  # its own are not read back
        assert await b.exchange([]) == sent
        assert await b.exchange([]) == []  # read once
        # A member that joins later reads the recent history first.
        assert await fleet.lessons("c").exchange([]) == sent


async def test_malformed_lessons_are_skipped_not_fatal(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        stream = fleet.keys.lessons
        good = ["m", 18.0, None, None]
        bad_entries = [
            {"junk": "x"},
            {"m": "x", "l": "not json"},
            {"m": "x", "l": json.dumps({"not": "a list"})},
            {"m": "x", "l": "[" * 100_000},
            {"m": "x", "l": "x" * 300_000},
        ]
        bad_lessons = [
            [None, None, None, None],  # teaches nothing
            ["m", 18.0, None],  # short
            [7, 18.0, None, None],  # model not a string
            ["x" * 200, 18.0, None, None],  # model too long
            ["m", -1.0, None, None],  # negative span
            ["m", None, 1e12, None],  # a duration of centuries
            ["m", None, 5.0, 99.0],  # error out of range
            ["m", True, None, None],  # a bool is not a number
            ["m", "18", None, None],  # a string is not a number
        ]
        payload = json.dumps([*bad_lessons, good])
        nan = '[["m", NaN, null, null]]'
        for fields in [*bad_entries, {"m": "x", "l": payload}, {"m": "x", "l": nan}]:
            await fleet.call(functools.partial(add, stream, fields))
        assert await fleet.lessons("reader").exchange([]) == [Lesson("m", span=18.0)]


async def test_members_learn_from_each_others_jobs(url: str, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as a, member(emu, url, name) as b:
        jobs = [await a.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(10)]
        await asyncio.gather(*jobs)
        deadline = time.monotonic() + 10
        while b.stats.fleet_lessons_learned < 10:  # at least one per ended job of a's
            assert time.monotonic() < deadline, b.stats
            await asyncio.sleep(0.05)
        assert a.stats.fleet_lessons_learned == 0  # b has had no job to teach
        # A member that joins later starts out with what the fleet learned.
        async with member(emu, url, name) as late:
            deadline = time.monotonic() + 10
            while late.stats.fleet_lessons_learned < 10:
                assert time.monotonic() < deadline, late.stats
                await asyncio.sleep(0.05)
