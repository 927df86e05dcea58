"""The pacer and the 429 brake on a fake clock and a fake sleep: no real waiting."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from wujie_async._ratelimit import AdaptiveLimiter, Pacer


class FakeTime:
    """A clock that moves only when told, and a sleep that ends when the clock passes it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, wake))
        await wake

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [entry for entry in self._sleepers if entry[0] <= self.now + 1e-9]
        for entry in due:
            self._sleepers.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)
        await settle()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def traffic(
    brake: AdaptiveLimiter, clock: FakeTime, *, seconds: float, per_second: float, share: float
) -> None:
    """Replies at ``per_second`` for ``seconds``, a ``share`` of them 429s, spread evenly."""
    owed = 0.0
    for _ in range(round(seconds * per_second)):
        owed += share
        if owed >= 1.0:
            owed -= 1.0
            brake.rate_limited(clock.now)
        else:
            brake.succeeded()
        clock.now += 1.0 / per_second


def braked(clock: FakeTime) -> AdaptiveLimiter:
    """A brake that cut once: 100 successes in a second, then 429s only until the cut."""
    brake = AdaptiveLimiter(clock=clock, sleep=clock.sleep)
    traffic(brake, clock, seconds=1.0, per_second=100, share=0.0)
    while brake.rate is None:
        brake.rate_limited(clock.now)
        clock.now += 0.01
    return brake


@pytest.mark.anyio
async def test_an_isolated_429_does_not_lower_the_rate() -> None:
    clock = FakeTime()
    brake = AdaptiveLimiter(clock=clock, sleep=clock.sleep)
    traffic(brake, clock, seconds=2.0, per_second=100, share=0.0)
    brake.rate_limited(await brake.acquire())  # one 429: its own Retry-After handles it
    assert brake.rate is None
    # Nor with a limit in force: one 429 amid successes leaves the rate alone.
    brake = braked(clock)
    traffic(brake, clock, seconds=1.0, per_second=50, share=0.0)
    before = brake.rate
    brake.rate_limited(clock.now)
    assert brake.rate == before


@pytest.mark.anyio
async def test_sparse_random_429s_never_brake() -> None:
    clock = FakeTime()
    brake = AdaptiveLimiter(clock=clock, sleep=clock.sleep)
    traffic(brake, clock, seconds=30.0, per_second=300, share=0.03)  # the 3%
    assert brake.rate is None
    traffic(brake, clock, seconds=30.0, per_second=20, share=0.03)  # and at a low rate
    assert brake.rate is None


@pytest.mark.anyio
async def test_a_sustained_429_share_cuts_to_what_got_through() -> None:
    clock = FakeTime()
    brake = AdaptiveLimiter(clock=clock, sleep=clock.sleep)
    traffic(brake, clock, seconds=1.0, per_second=100, share=0.0)
    traffic(brake, clock, seconds=0.1, per_second=100, share=0.3)
    assert brake.rate is None  # three 429s so far: not yet evidence
    for _ in range(100):  # 0.1 s steps until the share is sustained enough to cut
        traffic(brake, clock, seconds=0.1, per_second=100, share=0.3)
        if brake.rate is not None:
            break
    # 100 then 70 successes per second got through; the cut is to 0.8 of what the window saw.
    assert brake.rate is not None and 56 <= brake.rate <= 80
    first_cut = brake.rate
    traffic(brake, clock, seconds=1.0, per_second=100, share=0.3)  # still 30%: cut again
    assert brake.rate is not None and brake.rate < first_cut


def test_a_burst_let_through_at_once_is_not_taken_for_the_rate() -> None:
    clock = FakeTime()
    brake = AdaptiveLimiter(clock=clock, sleep=clock.sleep)
    traffic(brake, clock, seconds=0.1, per_second=1000, share=0.0)  # a bucket's 100 at once
    for _ in range(20):
        brake.rate_limited(clock.now)
        clock.now += 0.001
    assert brake.rate is not None and brake.rate <= 100  # not 1000/s


@pytest.mark.anyio
async def test_429s_of_requests_sent_before_a_cut_do_not_cut_again() -> None:
    clock = FakeTime()
    brake = braked(clock)
    first_cut = brake.rate
    for back in range(1, 50):
        brake.rate_limited(clock.now - back * 0.001)  # in flight when the cut came
    assert brake.rate == first_cut


@pytest.mark.anyio
async def test_no_evidence_no_brake() -> None:
    clock = FakeTime()
    brake = AdaptiveLimiter(clock=clock, sleep=clock.sleep)
    for _ in range(4):
        brake.succeeded()
    for _ in range(50):  # a 429 storm at start-up: nothing to estimate a rate from
        brake.rate_limited(await brake.acquire())
        clock.now += 0.01
    assert brake.rate is None


@pytest.mark.anyio
async def test_sustained_429s_stop_at_the_floor() -> None:
    clock = FakeTime()
    brake = braked(clock)
    assert brake.rate is not None
    floor = brake.rate / 0.8 / 10  # a tenth of the first estimate
    for _ in range(1000):
        clock.now += 0.01
        brake.rate_limited(clock.now)
    assert brake.rate == pytest.approx(floor)


@pytest.mark.anyio
async def test_recovers_additively_then_lifts_the_limit() -> None:
    clock = FakeTime()
    brake = braked(clock)  # first estimate ~89/s: rate ~71, ceiling ~178, ramp ~18/s
    successes = 0
    while brake.rate is not None:
        brake.succeeded()
        successes += 1
        assert successes < 10_000
    # From ~71 to ~178 at +18/s is ~6 s of traffic: about sum(rate) successes.
    assert 400 < successes < 1500


@pytest.mark.anyio
async def test_pacer_spaces_callers_in_order() -> None:
    clock = FakeTime()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)
    done: list[tuple[int, float]] = []

    async def caller(index: int) -> None:
        await pacer.wait()
        done.append((index, clock.now))

    tasks = [asyncio.create_task(caller(i)) for i in range(4)]
    await settle()
    assert done == [(0, 1000.0)]
    for _ in range(3):
        await clock.advance(0.1)
    assert [index for index, _ in done] == list(range(4))
    assert [at for _, at in done] == pytest.approx([1000.0 + i * 0.1 for i in range(4)])
    await asyncio.gather(*tasks)


@pytest.mark.anyio
async def test_the_slot_after_an_idle_pacers_first_comes_a_margin_later() -> None:
    # The first send after a lull is the likeliest to leave late (a new connection, cold
    # code): the slot after it keeps a margin more, so a late first send cannot bunch with it.
    clock = FakeTime()
    pacer = Pacer(10.0, margin=0.05, clock=clock, sleep=clock.sleep)  # slots 0.105 s apart
    done: list[float] = []

    async def caller() -> None:
        await pacer.wait()
        done.append(clock.now)

    for _ in range(2):  # a burst, a lull, a burst
        start = clock.now
        tasks = [asyncio.create_task(caller()) for _ in range(3)]
        await settle()
        while not all(task.done() for task in tasks):
            await clock.advance(0.005)
        assert done[-3:] == pytest.approx([start, start + 0.155, start + 0.26], abs=0.006)
        await clock.advance(5.0)


@pytest.mark.anyio
async def test_a_slow_ready_is_awaited_before_the_slot_and_sends_stay_a_period_apart() -> None:
    # ``ready`` (the journal's intent) takes uneven time: awaited after the slot, it would
    # put sends 0.04 s apart here; awaited just before it, the next slot counts from its end.
    clock = FakeTime()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)  # slots 0.1 s apart
    readies: list[float] = []
    sends: list[float] = []

    async def caller(ready_takes: float) -> None:
        async def ready() -> None:
            readies.append(clock.now)
            await clock.sleep(ready_takes)

        await pacer.wait(ready)
        sends.append(clock.now)

    tasks = [asyncio.create_task(caller(takes)) for takes in (0.06, 0.0, 0.16, 0.0)]
    await settle()
    while not all(task.done() for task in tasks):
        await clock.advance(0.01)
    # Each ready ran once, READY_AHEAD_S (0.05 s) before its slot as known then (the second
    # slot moved on when the first ready ended), and each slot counts from the end of the
    # ready before it.
    assert readies == pytest.approx([1000.0, 1000.05, 1000.21, 1000.42], abs=0.006)
    assert sends == pytest.approx([1000.06, 1000.16, 1000.37, 1000.47], abs=0.006)
    assert all(b - a >= 0.1 - 1e-6 for a, b in itertools.pairwise(sends))


@pytest.mark.anyio
async def test_a_cancelled_waiter_gives_back_its_slot() -> None:
    clock = FakeTime()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)
    await pacer.wait()  # takes the slot at 1000.0; the next is at 1000.1
    head = asyncio.create_task(pacer.wait())  # sleeps until 1000.1
    middle = asyncio.create_task(pacer.wait())
    last = asyncio.create_task(pacer.wait())
    await settle()
    head.cancel()
    await settle()
    await clock.advance(0.1)
    assert middle.done() and not last.done()  # the cancelled caller's slot went to the next
    behind = asyncio.create_task(pacer.wait())
    await settle()
    behind.cancel()  # cancelled behind another: leaves without taking a slot either
    await settle()
    await clock.advance(0.1)
    assert last.done()
    assert head.cancelled()
    await clock.advance(0.1)
    waited = asyncio.create_task(pacer.wait())
    await settle()
    assert waited.done()  # nobody is owed a slot: no gap left behind by the cancelled ones


def test_the_default_clock_is_the_event_loops() -> None:
    class ShiftedLoop(asyncio.SelectorEventLoop):
        """A loop whose clock is far from time.monotonic, as uvloop's may be."""

        def time(self) -> float:
            return super().time() + 1e6

    async def two_slots(pacer: Pacer) -> float:
        await pacer.wait()
        started = time.monotonic()
        await pacer.wait()
        return time.monotonic() - started

    loop = ShiftedLoop()
    try:
        sent_at = loop.run_until_complete(AdaptiveLimiter().acquire())
        assert sent_at > time.monotonic() + 1e5
        assert 0.005 < loop.run_until_complete(two_slots(Pacer(100.0))) < 0.5
    finally:
        loop.close()


@pytest.mark.anyio
async def test_a_timer_that_wakes_a_hair_early_still_gives_the_slot() -> None:
    # asyncio runs a timer up to its clock resolution early, and a slot read back is off by a
    # float's last bit. On a clock that moves only when the loop idles (looptime's, in tests)
    # the pacer used to sleep the last 1e-9 s again and again, never taking its slot.
    now = 1000.0
    sleeps: list[float] = []

    async def early_sleep(delay: float) -> None:
        nonlocal now
        sleeps.append(delay)
        assert len(sleeps) < 5, f"the pacer keeps sleeping: {sleeps}"
        now += max(0.0, delay - 1e-9)
        await asyncio.sleep(0)

    pacer = Pacer(3.0, clock=lambda: now, sleep=early_sleep)
    await pacer.wait()  # the first slot at once
    await pacer.wait()
    assert len(sleeps) == 1 and sleeps[0] == pytest.approx(1 / 3)
