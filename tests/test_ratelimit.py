from __future__ import annotations

import pytest

from wujie_async._ratelimit import AdaptiveLimiter, Pacer

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_no_limit_until_a_429_then_cut_to_what_got_through() -> None:
    clock = FakeClock()
    brake = AdaptiveLimiter(clock=clock)
    sent = []
    for _ in range(100):  # 100 successes in the last second
        sent.append(await brake.acquire())
        brake.succeeded()
        clock.now += 0.01
    assert brake.rate is None
    brake.rate_limited(sent[-1])
    first_cut = brake.rate
    assert first_cut == pytest.approx(80)
    brake.rate_limited(sent[-2])  # sent before the cut: the same burst
    assert brake.rate == first_cut
    clock.now += 0.5
    brake.rate_limited(await brake.acquire())  # sent after the cut: cut again
    assert brake.rate is not None and brake.rate < first_cut


async def test_no_evidence_no_brake() -> None:
    clock = FakeClock()
    brake = AdaptiveLimiter(clock=clock)
    for _ in range(4):
        brake.succeeded()
    brake.rate_limited(await brake.acquire())  # a 429 storm at start-up: nothing to go on
    assert brake.rate is None


async def test_consecutive_429s_stop_at_the_floor() -> None:
    clock = FakeClock()
    brake = AdaptiveLimiter(clock=clock)
    for _ in range(100):
        brake.succeeded()
        clock.now += 0.01
    for _ in range(50):
        clock.now += 0.001
        brake.rate_limited(clock.now)  # each sent after the previous cut
    assert brake.rate is not None and 9 <= brake.rate <= 10  # a tenth of the first estimate


async def test_recovers_additively_then_lifts_the_limit() -> None:
    clock = FakeClock()
    brake = AdaptiveLimiter(clock=clock)
    for _ in range(100):
        brake.succeeded()
        clock.now += 0.01
    brake.rate_limited(await brake.acquire())  # ceiling 200, ramp 20/s, from 80
    assert brake.rate == pytest.approx(80)
    successes = 0
    while brake.rate is not None:
        brake.succeeded()
        successes += 1
        assert successes < 10_000
    # From 80 to 200 at +20/s is ~6 s of traffic: about sum(rate) successes.
    assert 500 < successes < 1500


async def test_pacer_spaces_callers_in_order() -> None:
    clock = FakeClock()
    pacer = Pacer(1000.0, clock=clock)
    await pacer.wait()
    assert pacer._next_slot == pytest.approx(clock.now + 0.001)
    pacer.rate = 10
    assert pacer.rate == pytest.approx(10)
