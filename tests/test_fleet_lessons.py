"""Shared schedule lessons: every member's poll schedule learns from every member's jobs."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from wujie_async import Limits, PollPolicy
from wujie_async._jobs import ImageJob, JobState
from wujie_async._poller import BatchPoller
from wujie_async._schedule import KeyTiming, Lesson, PollSchedule
from wujie_async.fleet import FleetUnavailableError, RedisFleet
from wujie_async.fleet._lessons import Exchange

from .conftest import EmulatorFactory
from .fleet_support import any_redis, fleet_name, member, own_redis
from .test_transport import open_transport

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
    # The client's known models are still learned from others, and its own jobs teach it
    # whatever their model.
    schedule.learn(Lesson("gpt-image-1", duration=5.0, error=0.1))
    assert schedule.samples("gpt-image-1") == 1
    timing = KeyTiming(created_at=0.0, model="a-model-of-our-own")
    schedule.report(timing, 1.0, expected_seconds=9.0)
    schedule.job_ended(timing, 10.5, 10.0)
    assert schedule.samples("a-model-of-our-own") == 1


def test_an_outlier_is_taught_within_the_bounds_others_accept() -> None:
    # A job that ran 19 times its estimate: learned here, and taught (clamped) to the others,
    # who would drop a lesson outside the bounds.
    schedule = PollSchedule(PollPolicy())
    lessons: list[Lesson] = []
    schedule.on_lesson = lessons.append
    timing = KeyTiming(created_at=0.0, model="m")
    schedule.report(timing, 1.0, expected_seconds=1.0)
    schedule.job_ended(timing, 40.0, 40.0)
    assert lessons[-1].error == 10.0
    assert lessons[-1].duration == 40.0


def read(exchange: Exchange) -> list[Lesson]:
    return [lesson for entry in exchange.entries for lesson in entry]


async def test_a_member_learns_the_others_lessons_and_skips_its_own(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        a, b = fleet.lessons("a"), fleet.lessons("b")
        assert read(await a.exchange([])) == []  # an empty stream
        assert read(await b.exchange([])) == []
        sent = [Lesson("gpt-image-1", span=18.0), Lesson("dall-e-2", duration=6.5, error=-0.2)]
        assert read(await a.exchange(sent)) == []  # its own are not read back
        assert read(await b.exchange([])) == sent
        assert read(await b.exchange([])) == []  # read once
        # A member that joins later reads the recent history first.
        assert read(await fleet.lessons("c").exchange([])) == sent
        # A big batch goes in entries of at most 200 lessons, and all of it arrives.
        many = [Lesson("dall-e-3", duration=float(i)) for i in range(1, 451)]
        await a.exchange(many)
        got = await b.exchange([])
        assert read(got) == many
        assert [len(entry) for entry in got.entries] == [200, 200, 50]


async def test_a_backlog_is_read_in_bounded_pieces(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        writer, reader = fleet.lessons("w"), fleet.lessons("r")
        await reader.exchange([])  # joined: reads from here on
        for i in range(120):
            await writer.exchange([Lesson("m", duration=float(i + 1))])
        pieces = []
        while True:
            got = await reader.exchange([])
            pieces.append(len(got.entries))
            if not got.more:
                break
        assert pieces == [50, 50, 20]


async def test_malformed_lessons_are_skipped_not_fatal(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        stream = fleet.keys.lessons
        good = ["m", 18.0, None, None]
        bad_entries = [
            {"junk": "x"},
            {"m": "x", "l": "not json"},
            {"m": "x", "l": json.dumps({"not": "a list"})},
            {"m": "x", "l": "[" * 60_000},  # nested deeper than json can follow
            {"m": "x", "l": json.dumps([good] * 4_000)},  # over the entry's byte limit
            {"m": "x", "l": "[[" + "1" * 400 + ", null, null, null]]"},  # int overflows a float
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
            ["m", int("9" * 400), None, None],  # too large for a float
        ]
        payload = json.dumps([*bad_lessons, good])
        nan = '[["m", NaN, null, null]]'
        too_many = json.dumps([["m", None, float(i + 1), None] for i in range(300)])
        for fields in [
            *bad_entries,
            {"m": "x", "l": payload},
            {"m": "x", "l": nan},
            {"m": "x", "l": too_many},
        ]:
            await fleet.call(functools.partial(add, stream, fields))
        got = read(await fleet.lessons("reader").exchange([]))
        assert got[0] == Lesson("m", span=18.0)
        assert len(got) == 1 + 200  # an entry's lessons beyond 200 are not read


async def test_a_lessons_key_of_the_wrong_type_is_not_taken_for_redis_away(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        stream = fleet.keys.lessons
        await fleet.call(lambda r: r.set(stream, "not a stream"))
        lessons = fleet.lessons("m")
        with caplog.at_level(logging.WARNING, "wujie_async.fleet"):
            assert read(await lessons.exchange([Lesson("m", span=3.0)])) == []
            assert read(await lessons.exchange([])) == []
        assert caplog.text.count("unusable") == 1


async def test_a_write_redis_refuses_is_redis_failing_not_a_wrong_type(tmp_path: Path) -> None:
    # Out of memory (or read-only after a failover) is Redis failing: the member keeps its
    # lessons to send again, rather than dropping them as for a key of the wrong type.
    async with own_redis(tmp_path) as server, RedisFleet(server.url, name=fleet_name()) as fleet:
        await fleet.call(lambda r: r.config_set("maxmemory", "1"))  # every write: OOM
        with pytest.raises(FleetUnavailableError):
            await fleet.lessons("m").exchange([Lesson("m", span=3.0)])


async def due_in(observer: RedisFleet, key: str) -> float | None:
    """Seconds until the fleet's registry says ``key`` is due (None: not registered)."""
    zset = observer.keys.due(observer.registry().shard_of(key))

    async def look(redis: Any) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zscore(zset, key)
            pipe.time()
            found: list[Any] = await pipe.execute()
            return found

    score, (seconds, micros) = await observer.call(look)
    return None if score is None else (score - (seconds * 1000 + micros / 1000)) / 1000


async def test_lessons_that_widen_the_window_bring_a_registered_key_forward(
    url: str, emulator: EmulatorFactory
) -> None:
    # One job of 4 s, told 4 s (a typical figure). Alone, the member waits for the predicted
    # end (after one check). Then lessons from elsewhere say jobs of this model end up to half
    # their estimate early: the key is due at about 2 s, here AND in the fleet's registry
    # (the leader asks when the registry says so).
    poll = PollPolicy(first_poll_delay=0.1, min_interval=0.05, batch_fill_horizon=0.01)
    name = fleet_name()
    async with (
        emulator(time_scale=1.0, job_seconds=(4.0, 4.0)) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name, poll=poll) as client,
    ):
        job = await client.images.submit(prompt="one", model="dall-e-2")
        submitted = time.monotonic()
        deadline = submitted + 3.0
        while (waiting := await due_in(observer, job.key)) is None or waiting < 2.0:
            assert time.monotonic() < deadline, waiting  # the check, then the predicted end
            await asyncio.sleep(0.02)
        teacher = observer.lessons("teacher")
        await teacher.exchange([Lesson("dall-e-2", duration=2.0, error=-0.5)] * 10)
        deadline = time.monotonic() + 1.5
        while (waiting := await due_in(observer, job.key)) is None or waiting > 1.0:
            assert time.monotonic() < deadline, waiting
            await asyncio.sleep(0.02)
        assert time.monotonic() - submitted < 3.0  # brought forward, not come due anyway
        assert client.stats.fleet_lessons_learned >= 10


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


class RecordingDelegate:
    """A PollDelegate that asks for every key it is given (reports are fed by the test)."""

    def __init__(self) -> None:
        self.taken: list[str] = []
        self.moved_keys: dict[str, float] = {}
        self.took = anyio.Event()

    def take(self, keys: list[str]) -> float | None:
        self.taken += keys
        self.took.set()
        return 30.0  # held: a report reschedules them

    def moved(self, due_times: dict[str, float]) -> None:
        self.moved_keys.update(due_times)


def running(key: str, expected_seconds: float) -> list[Any]:
    return [{"key": key, "status": 1, "expected_seconds": expected_seconds}]


async def test_a_widened_window_moves_only_keys_waiting_for_it(emulator: EmulatorFactory) -> None:
    # Three keys when other members' lessons widen the window: WAITING waits for its window
    # (it moves, and the delegate is told); DENSE is asked every min_interval already (asking
    # it again at once would be an ask for nothing); HELD is with the delegate, whose report
    # will reschedule it (moving it would have the leader ask it twice).
    loop = asyncio.get_running_loop()
    policy = PollPolicy(min_interval=0.5)
    async with emulator() as emu, open_transport(emu.base_url, emu.credentials) as transport:
        poller = BatchPoller(transport, policy, Limits())
        delegate = RecordingDelegate()
        poller.set_delegate(delegate)
        for key in ("WAITING", "DENSE", "HELD"):
            state = JobState(loop)
            job = ImageJob(key, state, deadline=loop.time() + 600, request={"model": "m"})
            poller.track(job, state, first_delay=30.0)
        poller.apply_report("WAITING", running("WAITING", 20.0))  # the first report: a check
        poller.apply_report("WAITING", running("WAITING", 19.9))  # counts down: wait for it
        poller.apply_report("DENSE", running("DENSE", 0.1))  # in its window: asked densely
        poller.apply_report("HELD", running("HELD", 20.0))
        poller.poll_soon()  # everything due now...
        poller.apply_report("WAITING", running("WAITING", 19.9))
        poller.apply_report("DENSE", running("DENSE", 0.1))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(poller.run)
            with anyio.fail_after(5):
                await delegate.took.wait()  # ...HELD goes to the delegate
            tasks.cancel_scope.cancel()
        assert "HELD" in delegate.taken
        waiting_due = poller.next_due("WAITING")
        assert waiting_due is not None and waiting_due > loop.time() + 10
        poller.learn([Lesson("m", duration=5.0, error=-0.8)] * 10)
        assert set(delegate.moved_keys) == {"WAITING"}
        assert delegate.moved_keys["WAITING"] < waiting_due - 10
