"""The poll schedule's promise, checked on simulated time (the schedule is pure arithmetic).

The end-to-end figures (resolution latency against per-key polling, asks per key, calls per
job) are measured by ``benchmarks/run.py``; these tests pin the behaviour each figure rests on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from wujie_async import PollPolicy
from wujie_async._key_timing import KeyTiming
from wujie_async._schedule import PollSchedule
from wujie_async._schedule_tuning import TUNING

POLICY = PollPolicy()

# expected_seconds as a gateway would report it: (job's true end, ask time) -> seconds or None.
Estimate = Callable[[float, float], float | None]


def exact(end: float, now: float) -> float | None:
    return end - now


def placeholder(end: float, now: float) -> float | None:
    return 30.0


def absent(end: float, now: float) -> float | None:
    return None


def told_20s(end: float, now: float) -> float | None:
    return 20.0 - now  # a typical figure: every job is told it lasts 20 s


def follow(schedule: PollSchedule, end: float, estimate: Estimate) -> tuple[int, float]:
    """Ask about one job created at 0 that ends at ``end``; (asks, lateness of the last ask)."""
    return follow_gateway(schedule, end, estimate=lambda end, now, _queued: estimate(end, now))


def test_a_right_estimate_costs_at_most_three_asks_and_min_interval_of_lateness() -> None:
    schedule = PollSchedule(POLICY)
    rng = random.Random(1)
    results = [follow(schedule, rng.uniform(10, 30), exact) for _ in range(200)]
    learned = results[20:]  # after the first ended jobs taught the window
    assert max(asks for asks, _ in learned) <= 3
    assert max(late for _, late in results) <= POLICY.min_interval


def after_a_lookout() -> PollSchedule:
    """A schedule that has seen one other job's first report, a job expected to end before
    any other: the model's lookout (``KeyTiming.lookout``), asked every min_interval until a
    job ends. The jobs followed after it are not."""
    schedule = PollSchedule(POLICY)
    lookout = KeyTiming(created_at=0.0, model="m")
    schedule.report(lookout, 1.0, expected_seconds=0.5)
    assert lookout.lookout
    return schedule


def past_the_scouts(told: float = 9.0) -> PollSchedule:
    """A schedule that has nothing learned and no scout left to send: ``TUNING.scouts`` other
    jobs reported a first estimate each (all different: per-job estimates, from ``told`` s
    up), after a lookout."""
    schedule = after_a_lookout()
    for more in range(TUNING.scouts):
        timing = KeyTiming(created_at=0.0, model="m")
        schedule.report(timing, 1.0, expected_seconds=told + more)
    return schedule


def test_a_right_estimate_costs_at_most_three_asks_before_anything_is_learned() -> None:
    # Issue 12's behaviour: the first ask, one check that the estimate counts down, one just
    # after the predicted end; seen done within min_interval. Nothing learned beforehand (the
    # model's scouts, its first jobs, are asked more: the test after this one).
    # Ends off whole seconds: exact estimates that come out whole at every ask are taken for
    # whole-second ones, whose unlearned window reaches a second earlier by design.
    for end in (8.3, 20.3, 45.3, 200.3):
        # (Among jobs told about as long: one told far longer is probed once: PredictedSpans.)
        asks, late = follow(past_the_scouts(told=end / 2), end, exact)
        # A job longer than max_estimate_wait is also asked about once per that wait.
        assert asks <= 3 + int(end // POLICY.max_estimate_wait), (end, asks)
        assert late <= POLICY.min_interval


def test_a_job_whose_window_opens_soon_is_not_checked_just_before_it() -> None:
    # Its check would come half a second before its window: the ask there tells as much (a
    # placeholder is found out there too). The first ask, then one just after its end.
    for end in (2.3, 2.8, 3.3):
        asks, late = follow(past_the_scouts(), end, exact)
        assert asks <= 2, (end, asks)
        assert late <= POLICY.min_interval
    # A placeholder told 3 s while the job takes 10 is found out at that ask, and the job is
    # seen as one without an estimate would be.
    asks, late = follow(past_the_scouts(), 10.3, lambda end, now: 3.0)
    assert late <= POLICY.min_interval, (asks, late)


def test_a_scout_sees_an_estimate_that_runs_long_end_within_max_interval() -> None:
    # A model's first jobs, nothing learned: an estimate three times the job's length that
    # counts down looks right until the job ends. Trusted, a 10 s job told 30 s is seen at
    # 30 s; a scout is asked every max_interval until its window, at one ask each.
    for end in (8.3, 10.3, 20.3, 45.3):
        three_times = follow(after_a_lookout(), end, lambda end, now: 3 * end - now)
        assert three_times[1] <= POLICY.max_interval, (end, three_times)
        right = follow(after_a_lookout(), end, exact)
        assert right[1] <= POLICY.min_interval, (end, right)
        assert right[0] <= 3 + math.ceil(end / POLICY.max_interval), (end, right)
    # Only the first TUNING.scouts jobs of a model are scouts.
    assert follow(past_the_scouts(), 10.3, lambda end, now: 3 * end - now)[1] > 15


def test_a_placeholder_far_above_the_real_durations_is_found_out_within_max_interval() -> None:
    # Every job told 100 s while it takes 3-8 s, and nothing learned yet (a burst): the check
    # that the estimate counts down comes within max_interval, not a quarter of the way to
    # the 100 s, so no job is seen more than max_interval late (it was 20 s and more).
    for end in (3.3, 5.3, 8.3):
        asks, late = follow(PollSchedule(POLICY), end, lambda end, now: 100.0)
        assert late <= POLICY.max_interval, (end, late)
        # Found out, it is asked about as a job without an estimate is (one ask more at most).
        assert asks <= follow(PollSchedule(POLICY), end, absent)[0] + 1, (end, asks)


def test_a_typical_figure_estimate_is_closed_in_on_in_steps() -> None:
    # Every job is told the same figure (20 s); one ends at 12 s. Trusting it would see that
    # job 8 s late; stepping towards the window sees it within a step.
    schedule = PollSchedule(POLICY)
    for _ in range(10):
        timing = KeyTiming(created_at=0.0, model="m")
        schedule.report(timing, 1.0, expected_seconds=19.0)

    asks, late = follow(schedule, 12.0, told_20s)
    assert late < 3.0, (asks, late)


def after_one_other_job(*, told: float) -> PollSchedule:
    """A schedule that has seen one other job's first report: ``told`` seconds left at 1 s."""
    schedule = PollSchedule(POLICY)
    schedule.report(KeyTiming(created_at=0.0, model="m"), 1.0, expected_seconds=told)
    return schedule


def test_two_jobs_told_the_same_figure_are_enough_to_close_in_in_steps() -> None:
    # A fleet member learns from its own trickle of jobs: it must not wait for eight of them
    # before it distrusts a figure every job gets. Here one other job was told the same 20 s;
    # this one ends at 11 s. Trusting the figure after the check would see it 9 s late.
    asks, late = follow(after_one_other_job(told=19.0), 11.0, told_20s)
    assert late < 3.0, (asks, late)


def test_estimates_that_differ_are_trusted_from_the_second_job() -> None:
    # One other job was told a different figure: these are per-job estimates, so a right one
    # is not closed in on in steps (about ten asks here): it costs a scout's asks, one per
    # max_interval (it is among the model's first jobs), and three asks past the scouts.
    schedule = after_a_lookout()
    schedule.report(KeyTiming(created_at=0.0, model="m"), 1.0, expected_seconds=9.0)
    asks, late = follow(schedule, 20.0, exact)
    assert asks <= 3 + math.ceil(20.0 / POLICY.max_interval), asks
    assert late <= POLICY.min_interval
    schedule = past_the_scouts()
    schedule.report(KeyTiming(created_at=0.0, model="m"), 1.0, expected_seconds=9.0)
    asks, late = follow(schedule, 20.0, exact)
    assert asks <= 3, asks
    assert late <= POLICY.min_interval


def test_a_placeholder_estimate_is_found_out_and_the_job_is_still_seen_promptly() -> None:
    schedule = PollSchedule(POLICY)
    for end in (10.0, 14.0, 19.0):
        _, late = follow(schedule, end, placeholder)
        assert late <= max(POLICY.min_interval, POLICY.age_fraction * end) + 1e-9


def test_with_no_estimate_lateness_stays_within_the_age_promise() -> None:
    schedule = PollSchedule(POLICY)
    for end in (3.0, 12.0, 45.0, 200.0):
        _, late = follow(schedule, end, absent)
        bound = min(max(POLICY.min_interval, POLICY.age_fraction * end), POLICY.max_interval)
        assert late <= bound + 1e-9


def test_noisy_estimates_widen_the_window_and_say_so() -> None:
    schedule = PollSchedule(POLICY)
    rng = random.Random(2)
    generation = schedule.generation
    low_before, _ = schedule.window("m")
    for _ in range(40):
        factor = rng.uniform(0.5, 1.5)

        def biased(end: float, now: float, f: float = factor) -> float | None:
            return end * f - now  # a biased estimate of the whole job: it ends at end * f

        follow(schedule, rng.uniform(10, 30), biased)
    low_after, high_after = schedule.window("m")
    assert low_after < low_before - 0.1
    assert high_after > 0.1
    assert schedule.generation > generation  # the poller reschedules waiting keys


def test_a_window_that_widens_a_little_at_a_time_still_brings_waiting_keys_in() -> None:
    # Each job ends a little further before its estimate's end than the one before: the
    # window's low edge moves by under 0.02 per job, by over 0.1 in all. Keys waiting for the
    # window as it stood are brought in (generation) once it has moved 0.02 since they last
    # were, not only when one job moves it that far (estimates off by up to 20%, in whole
    # seconds, with the unlearned window reaching a second early: p99 1.9 s late at 600 jobs
    # before).
    schedule = PollSchedule(POLICY)
    for end in range(10, 20):
        follow(schedule, float(end), exact)
    generation = schedule.generation
    low_before, _ = schedule.window("m")
    for k in range(1, 31):

        def long_by(end: float, now: float, f: float = 1 + 0.004 * k) -> float | None:
            return end * f - now

        follow(schedule, 20.0, long_by)
    low_after, _ = schedule.window("m")
    assert low_after < low_before - 0.1
    assert schedule.generation - generation >= 4, schedule.generation - generation


def test_right_estimates_keep_the_window_tight() -> None:
    schedule = PollSchedule(POLICY)
    for end in range(10, 60):
        follow(schedule, float(end), exact)
    low, high = schedule.window("m")
    assert -0.05 <= low <= 0.0 <= high <= 0.05


def test_an_overrunning_job_backs_off_with_its_age() -> None:
    schedule = PollSchedule(POLICY)
    timing = KeyTiming(created_at=0.0)
    schedule.report(timing, 1.0, expected_seconds=5.0)
    gap_late = schedule.report(timing, 100.0, expected_seconds=0.0) - 100.0
    assert gap_late == pytest.approx(min(POLICY.age_fraction * 100.0, POLICY.max_interval))


def test_a_queue_position_spaces_asks_when_there_is_no_estimate() -> None:
    schedule = PollSchedule(POLICY)
    timing = KeyTiming(created_at=0.0)
    far = schedule.report(timing, 1.0, expected_seconds=None, queue_position=50) - 1.0
    near = schedule.report(timing, 2.0, expected_seconds=None, queue_position=1) - 2.0
    assert far == POLICY.max_interval
    assert near == POLICY.queue_position_seconds


def test_learned_durations_stand_in_for_a_missing_estimate() -> None:
    schedule = PollSchedule(POLICY)
    for end in range(20, 40):
        follow(schedule, float(end), absent)
    timing = KeyTiming(created_at=0.0, model="m")
    first = schedule.report(timing, 1.0, expected_seconds=None)
    assert first >= 19.0  # nothing asked before the shortest job seen could end


def progress_of_20s(at: float, *, whole: bool = False) -> float:
    """complete_percent of a job generating evenly from 0.06 s to 20.06 s."""
    share = 5.0 * at - 0.3
    return float(math.floor(share)) if whole else round(share, 1)


def test_a_job_without_an_estimate_is_told_its_end_by_its_progress() -> None:
    # No expected_seconds, but complete_percent growing evenly over 20 s of generation: the
    # readings tell the end once the rate is known within TUNING.progress_error, and later
    # readings keep telling the same end (the figure passes the check that it counts down).
    schedule = PollSchedule(POLICY)
    timing = KeyTiming(created_at=0.0, model="m")
    for at in (1.0, 2.0):  # one reading tells no rate; two a second apart, not well enough
        schedule.report(timing, at, expected_seconds=None, percent=progress_of_20s(at))
        assert timing.predicted_end is None, at
    schedule.report(timing, 3.0, expected_seconds=None, percent=progress_of_20s(3.0))
    assert timing.predicted_end == pytest.approx(20.06, abs=0.01)
    schedule.report(timing, 6.0, expected_seconds=None, percent=progress_of_20s(6.0))
    assert timing.estimate_live and timing.predicted_end == pytest.approx(20.06, abs=0.01)

    # In whole percents (a model whose progress never came with a fraction) a reading is off
    # by up to 1: the rate is known well enough only about half way through (10 s here), not
    # after two seconds.
    whole = KeyTiming(created_at=0.0, model="w")
    for at in (1.0, 3.0, 6.0, 9.0):
        schedule.report(whole, at, expected_seconds=None, percent=progress_of_20s(at, whole=True))
        assert whole.predicted_end is None, at
    schedule.report(whole, 10.0, expected_seconds=None, percent=progress_of_20s(10.0, whole=True))
    assert whole.predicted_end == pytest.approx(20.0, abs=0.25)


def test_progress_that_tells_no_rate_leaves_a_job_without_an_estimate() -> None:
    schedule = PollSchedule(POLICY)
    # A progress that stands still (one image, listed only at the end), or goes back (the
    # gateway restarted the job): no figure from it, and asks follow the job's age.
    still = KeyTiming(created_at=0.0, model="m")
    for at in (1.0, 2.0, 4.0, 8.0):
        schedule.report(still, at, expected_seconds=None, percent=0.0)
    assert still.predicted_end is None
    back = KeyTiming(created_at=0.0, model="m")
    schedule.report(back, 1.0, expected_seconds=None, percent=40.0)
    schedule.report(back, 2.0, expected_seconds=None, percent=10.0)
    assert back.predicted_end is None and back.progress is not None
    assert (back.progress.since, back.progress.was) == (2.0, 10.0)
    # Queued: the progress is not read.
    queued = KeyTiming(created_at=0.0, model="m")
    schedule.report(queued, 1.0, expected_seconds=None, percent=10.0, queued=True)
    assert queued.progress is None


def test_a_hostile_progress_never_breaks_the_schedule() -> None:
    # complete_percent is a gateway's word: readings that jump, go back, stand still, hit 0
    # or 100 while the job runs, with or without an estimate. Every report gives a next ask
    # that is finite and not in the past, and whatever is told is a positive figure.
    rng = random.Random(7)
    schedule = PollSchedule(POLICY)
    choices = [0.0, 100.0, 99.9, 0.1, 50.0]
    for _ in range(300):
        timing = KeyTiming(created_at=0.0, model=rng.choice(["m", None]))
        now = 0.0
        for _ in range(rng.randint(1, 12)):
            now += rng.uniform(0.01, 8.0)
            percent = rng.choice([rng.uniform(0, 100), rng.choice(choices), None])
            estimate = rng.choice([None, rng.uniform(0, 60), 30.0])
            due = schedule.report(
                timing, now, expected_seconds=estimate, percent=percent, queued=rng.random() < 0.2
            )
            assert math.isfinite(due) and due >= now
            if timing.progress is not None and timing.progress.told_end is not None:
                assert timing.progress.told_end >= timing.progress.since
        schedule.job_ended(timing, now + rng.uniform(0.01, 5.0))


def estimate_and_progress(
    schedule: PollSchedule, estimated_end: float, *, model: str = "m"
) -> KeyTiming:
    """A job of 20.06 s told ``estimated_end`` by the gateway, read at 1 s and 4 s."""
    timing = KeyTiming(created_at=0.0, model=model)
    for at in (1.0, 4.0):
        left = estimated_end - at
        schedule.report(timing, at, expected_seconds=left, percent=progress_of_20s(at))
    return timing


def end_at_20(schedule: PollSchedule, timing: KeyTiming) -> None:
    """Two asks close together see the job end at 20.06 s (its estimate has run out)."""
    schedule.report(timing, 19.9, expected_seconds=0.0, percent=progress_of_20s(19.9))
    schedule.job_ended(timing, 20.2)


def test_a_models_jobs_go_by_their_progress_once_it_told_their_ends_better() -> None:
    # Estimates 5 s short, progress right: after TUNING.progress_wins ends came closer to what
    # the progress told, a job's figures come from its progress as soon as it tells, learned
    # under a name of their own; its end still teaches the estimate's error to its model.
    schedule = PollSchedule(POLICY)
    for index in range(TUNING.progress_wins):
        # (Told different figures: one figure for every job is a typical one, the next test.)
        timing = estimate_and_progress(schedule, 14.0 + index)
        assert timing.progress is not None and timing.progress.estimate is None
        assert timing.model == "m"
        end_at_20(schedule, timing)
    told = estimate_and_progress(schedule, 15.5)
    estimate = told.progress.estimate if told.progress is not None else None
    assert estimate is not None
    assert estimate[:2] == ("m", 15.5) and estimate[2] == pytest.approx(15.5)
    assert told.model != "m" and told.predicted_end == pytest.approx(20.06, abs=0.01)
    learned = schedule.samples("m")
    end_at_20(schedule, told)
    assert schedule.samples("m") == learned + 1 and schedule.samples(told.model) == 1

    # Estimates right (an end within TUNING.near of both figures): they keep the estimate.
    right = PollSchedule(POLICY)
    for index in range(2 * TUNING.progress_wins):
        timing = estimate_and_progress(right, 19.5 + index % 3 / 2)
        end_at_20(right, timing)
    kept = estimate_and_progress(right, 20.5)
    assert kept.progress is not None and kept.progress.estimate is None
    assert kept.predicted_end == pytest.approx(20.5)


def test_a_job_on_its_estimate_is_asked_where_its_progress_puts_the_end() -> None:
    # Told 30 s by the gateway, while its progress puts the end at 20.06 s: it still goes by
    # the estimate (the model's ended jobs were on time: nothing says otherwise), and is asked
    # at the progress's end as well, not only at the estimate's window.
    schedule = PollSchedule(POLICY)
    rng = random.Random(3)
    for _ in range(20):
        follow(schedule, rng.uniform(10, 30), exact)
    timing = KeyTiming(created_at=0.0, model="m")
    due = 0.0
    for at in (1.0, 4.0):
        due = schedule.report(timing, at, expected_seconds=30.0 - at, percent=progress_of_20s(at))
    assert timing.progress is not None and timing.progress.estimate is None
    assert timing.predicted_end == pytest.approx(30.0)
    assert due == pytest.approx(20.06 + TUNING.open_delay * POLICY.min_interval, abs=0.01)
    assert not timing.tentative  # asked when due, not looked at again and pushed to 30 s

    # A progress that puts the end later than the estimate changes nothing.
    later = KeyTiming(created_at=0.0, model="m")
    alone = KeyTiming(created_at=0.0, model="m")
    for at in (1.0, 4.0):
        with_progress = schedule.report(
            later, at, expected_seconds=12.0 - at, percent=progress_of_20s(at)
        )
        without = schedule.report(alone, at, expected_seconds=12.0 - at)
    assert with_progress == without


def test_a_typical_figure_gives_way_to_the_progress_at_once() -> None:
    # Every job told the same 20 s: the figure says nothing of this job (a 30 s one here),
    # and its progress, once it tells, does; no end needed first.
    schedule = PollSchedule(POLICY)
    for _ in range(TUNING.same_spans_min):
        schedule.report(KeyTiming(created_at=0.0, model="m"), 1.0, expected_seconds=19.0)
    timing = KeyTiming(created_at=0.0, model="m")
    for at in (1.0, 5.0):
        schedule.report(timing, at, expected_seconds=20.0 - at, percent=at * 100 / 30)
    assert timing.progress is not None and timing.progress.estimate is not None
    assert timing.predicted_end == pytest.approx(30.0, abs=0.1)


def test_the_gateways_end_time_narrows_what_is_learned() -> None:
    schedule = PollSchedule(POLICY)
    for _ in range(20):
        timing = KeyTiming(created_at=0.0, model="m")
        schedule.report(timing, 1.0, expected_seconds=19.0)  # predicts an end at 20
        schedule.job_ended(timing, 30.0, ended_at=20.0)  # seen late, but it says when
    low, high = schedule.window("m")
    assert low == pytest.approx(0.0, abs=1e-9)
    assert high == pytest.approx(0.0, abs=1e-9)


def test_memory_per_model_is_bounded() -> None:
    schedule = PollSchedule(POLICY)
    for end in range(10, 2000):
        follow(schedule, float(end % 50 + 10), exact)
    assert schedule.samples("m") <= 256


def test_a_job_without_an_estimate_is_not_pulled_in_when_the_window_widens() -> None:
    # The poller pulls in keys whose window now opens before their due time; a job with no
    # usable estimate has no window, and its asks follow its age whatever is learned.
    schedule = PollSchedule(POLICY)
    no_estimate = KeyTiming(created_at=0.0, model="m")
    schedule.report(no_estimate, 1.0, expected_seconds=None)
    assert schedule.watch_start(no_estimate) == math.inf


# --- gateways that report estimates their own way --------------------------------------------
def follow_gateway(
    schedule: PollSchedule,
    end: float,
    *,
    queued_until: float = 0.0,
    estimate: Callable[[float, float, bool], float | None],
    end_time_known: bool = True,
) -> tuple[int, float]:
    """As ``follow``, for a job queued until ``queued_until``; ``estimate(end, now, queued)``;
    without ``end_time_known`` the gateway gives no end time (or one the client cannot use)."""
    timing = KeyTiming(created_at=0.0, model="m")
    due = schedule.first_ask(timing)
    asks = 0
    while True:
        asks += 1
        if due >= end:
            schedule.job_ended(timing, due, end if end_time_known else None)
            return asks, due - end
        queued = due < queued_until
        due = schedule.report(
            timing, due, expected_seconds=estimate(end, due, queued), queued=queued
        )


def exact_countdown(end: float, now: float, queued: bool) -> float | None:
    return round(end - now, 2)


def whole_seconds(end: float, now: float, queued: bool) -> float | None:
    return float(math.floor(end - now))  # rounded down, as the platform's other endpoints


def mean_asks(results: list[tuple[int, float]]) -> float:
    return sum(asks for asks, _ in results) / len(results)


@pytest.mark.parametrize("end_time_known", [True, False])
def test_right_estimates_cost_three_asks_whether_or_not_the_end_time_is_given(
    end_time_known: bool,
) -> None:
    """A gateway that gives no end time (``complete_time`` is optional) or one on a skewed
    clock must not teach the schedule that right estimates are wrong: the end is then only
    known to lie between two asks, and the middle of two far-apart asks is not a measurement."""
    schedule = PollSchedule(POLICY)
    rng = random.Random(2)
    results = [
        follow_gateway(
            schedule,
            rng.uniform(10, 30),
            estimate=exact_countdown,
            end_time_known=end_time_known,
        )
        for _ in range(300)
    ]
    assert mean_asks(results[20:]) <= 3.0
    assert max(late for _, late in results) <= POLICY.min_interval


def test_whole_second_estimates_cost_at_most_four_asks() -> None:
    schedule = PollSchedule(POLICY)
    rng = random.Random(3)
    results = [
        follow_gateway(schedule, rng.uniform(10, 30), estimate=whole_seconds, end_time_known=False)
        for _ in range(300)
    ]
    assert mean_asks(results[20:]) <= 4.0
    assert max(late for _, late in results) <= 1.0 + POLICY.min_interval


def rounded(how: Callable[[float], float], bias: float = 1.0) -> Callable[..., float | None]:
    """Whole-second estimates rounded by ``how``, of an end ``bias`` times the job's."""
    return lambda end, now, queued: float(how(bias * end - now))


def ticked(end: float, now: float, queued: bool) -> float | None:
    """An estimate that counts down to 0.7 s before the job's end, as a gateway that records
    ends on a 1 s tick gives (each job ends up to a second after its estimate)."""
    return round(end - 0.7 - now, 2)


@pytest.mark.parametrize("end_time_known", [True, False])
@pytest.mark.parametrize("gateway", ["rounded up", "ticked"])
def test_an_end_within_a_second_of_its_prediction_is_learned_in_seconds(
    gateway: str, end_time_known: bool
) -> None:
    # Rounded up, a job ends up to a second before its figure; recorded on a tick, up to a
    # second after its estimate: whatever its length. Learned relative to each job's length,
    # a second on 10 s jobs (10% of them) opened a 30 s job's window about 3 s early: 5 asks
    # per key in a burst of 200 jobs of 10-30 s rounded up, 9 on a 1 s tick.
    estimate = rounded(math.ceil) if gateway == "rounded up" else ticked
    schedule = PollSchedule(POLICY)
    rng = random.Random(4)
    for _ in range(40):
        follow_gateway(
            schedule, rng.uniform(10, 11), estimate=estimate, end_time_known=end_time_known
        )
    long_job = KeyTiming(created_at=0.0, model="m")
    predicted = 1.0 + (estimate(30.6, 1.0, False) or 0.0)
    schedule.report(long_job, 1.0, expected_seconds=predicted - 1.0)
    opens, _ = schedule.watch_window(long_job)
    assert opens >= predicted - 1.5, (opens, predicted)  # not 3 s early
    for end in (30.3, 30.6, 30.9):
        asks, late = follow_gateway(schedule, end, estimate=estimate)
        # One ask more than a usual job: told three times as long as its model's jobs, it is
        # probed once when they end (PredictedSpans.probe).
        assert asks <= 3 + 1 and late <= POLICY.min_interval, (end, asks, late)


@pytest.mark.parametrize("end_time_known", [True, False])
def test_an_estimate_off_by_more_than_a_second_is_learned_relative_to_the_job(
    end_time_known: bool,
) -> None:
    # Told 1.3 times the job, rounded to the nearest, a 30 s job learned from 10 s ones is
    # seen within min_interval: the estimate's own error, relative to its span, rounding and
    # all. (Split into a second of rounding and the rest, the second taken off made the 10 s
    # jobs' errors look smaller, and 30 s jobs were seen a second late.)
    schedule = PollSchedule(POLICY)
    rng = random.Random(4)
    for _ in range(40):
        follow_gateway(
            schedule,
            rng.uniform(10, 11),
            estimate=rounded(round, bias=1.3),
            end_time_known=end_time_known,
        )
    for end in (28.1, 29.4, 30.6):
        asks, late = follow_gateway(schedule, end, estimate=rounded(round, bias=1.3))
        assert late <= POLICY.min_interval, (end, asks, late)


def test_an_estimate_that_starts_counting_with_generation_is_not_a_placeholder() -> None:
    """While queued the gateway tells the generation time alone, the same figure until the
    job starts: that is not a placeholder, and the job is not polled by its age."""
    schedule = PollSchedule(POLICY)
    rng = random.Random(4)
    results = []
    for _ in range(300):
        end = rng.uniform(10, 30)
        starts = end * rng.uniform(0.05, 0.25)

        def generation_only(end: float, now: float, queued: bool, starts: float = starts) -> float:
            return round(end - (starts if queued else now), 2)

        results.append(follow_gateway(schedule, end, queued_until=starts, estimate=generation_only))
    assert mean_asks(results[20:]) <= 3.5
    assert max(late for _, late in results) <= POLICY.min_interval


def test_a_job_queued_at_its_first_ask_costs_three_asks_before_anything_is_learned() -> None:
    """A burst: every job still queued at its first ask, the estimate leaving the queue out,
    nothing learned yet. Its first figure after the queue is lower than the queue's (it has
    counted down once): one check already, so no second one before the window."""
    for end, starts in ((12.0, 3.0), (16.0, 3.2), (20.0, 4.0), (28.0, 5.3), (30.0, 1.5)):

        def generation_only(end: float, now: float, queued: bool, starts: float = starts) -> float:
            return round(end - (starts if queued else now), 2)

        asks, late = follow_gateway(
            past_the_scouts(), end, queued_until=starts, estimate=generation_only
        )
        assert asks <= 3, (end, starts, asks)
        assert late <= POLICY.min_interval


def test_a_placeholder_that_survives_the_queue_is_still_found_out() -> None:
    # The same 30 s figure while queued and while generating: dropped soon after the job
    # leaves the queue, so a 10 s job is seen about when it ends, not at 30 s.
    schedule = PollSchedule(POLICY)
    asks, late = follow_gateway(
        schedule, 10.0, queued_until=2.0, estimate=lambda end, now, queued: 30.0
    )
    assert late <= 1.0, (asks, late)


def test_a_whole_second_stamp_before_the_last_ask_does_not_reset_what_was_learned() -> None:
    """Whole-second stamps are never taken at their word, so one that falls before an ask
    (rounded down) says nothing of the gateway's clock: what was learned stays."""
    schedule = PollSchedule(POLICY)
    rng = random.Random(4)
    for _ in range(40):
        follow_gateway(schedule, rng.uniform(10, 30), estimate=exact_countdown)
    learned = schedule.samples("m")
    timing = KeyTiming(created_at=0.0, model="m")
    schedule.report(timing, 1.0, expected_seconds=9.0)
    schedule.report(timing, 10.2, expected_seconds=0.1)
    schedule.job_ended(timing, 10.5, ended_at=10.0, fine=False)  # 10.3 on a floored stamp
    assert schedule.samples("m") == learned + 1


# --- a model's first figures, once its jobs' checks have seen them count down ----------------
Burst = list[tuple[KeyTiming, float, float]]  # each job's timing, next ask, true end


def a_burst(
    schedule: PollSchedule, ends: list[float], *, at: float = 1.0, queued: bool = False
) -> Burst:
    """Jobs created at 0, each first reported at ``at`` with an exact figure (``queued``, or
    generating), before any check. The first ``TUNING.scouts`` are scouts (asked every
    max_interval): look past them."""
    burst = []
    for end in ends:
        timing = KeyTiming(created_at=0.0, model="m")
        due = schedule.report(timing, at, expected_seconds=end - at, queued=queued)
        burst.append((timing, due, end))
    return burst


def check(schedule: PollSchedule, jobs: Burst, *, held: bool = False, queued: bool = False) -> None:
    """Each job's check at its next ask: the figure counts down (or ``held``: it does not)."""
    for timing, due, end in jobs:
        schedule.report(timing, due, expected_seconds=end - (1.0 if held else due), queued=queued)


def test_once_a_models_figures_are_seen_counting_down_the_checks_still_to_come_are_dropped() -> (
    None
):
    # Each job's next ask is its check (a placeholder would be found out there). Once
    # countdowns_trusted checks saw the figures count down, the checks still to come tell
    # nothing: when one comes due, its job goes to its window instead (two asks each, not
    # three), and so does every job reported from then on.
    schedule = PollSchedule(POLICY)
    burst = a_burst(schedule, [10.3 + 0.5 * i for i in range(40)])
    assert all(due < end - 2.0 for _, due, end in burst)
    assert all(timing.tentative for timing, _, _ in burst)
    # (The first job is the lookout, asked every min_interval: its asks are no check.)
    check(schedule, burst[1 : 1 + TUNING.countdowns_trusted])
    for timing, due, end in burst[TUNING.scouts :]:  # each as the poller takes it, when due
        assert due < end < schedule.still_due(timing) <= end + POLICY.min_interval
    later = KeyTiming(created_at=2.0, model="m")
    assert 18.0 < schedule.report(later, 3.0, expected_seconds=15.0) <= 18.0 + POLICY.min_interval


def test_one_figure_seen_not_counting_down_keeps_every_job_checked() -> None:
    # The same, but one check saw its figure hold while generating (a placeholder): whatever
    # the others showed, each job keeps its check.
    schedule = PollSchedule(POLICY)
    burst = a_burst(schedule, [10.3 + 0.5 * i for i in range(40)])
    check(schedule, burst[1:2], held=True)  # (the first job is the lookout)
    check(schedule, burst[2:20])
    for timing, due, _ in burst[20:]:
        assert timing.tentative
        assert schedule.still_due(timing) <= due
    later = KeyTiming(created_at=2.0, model="m")
    assert schedule.report(later, 3.0, expected_seconds=15.0) < 10.0


def queued_checks(schedule: PollSchedule, *, leave: bool) -> None:
    """``countdowns_trusted`` jobs told 12 s at 1 s while queued, the generation time alone,
    and the same at their check while still queued; or (``leave``) a second after they left
    the queue, then counting down."""
    for _ in range(TUNING.countdowns_trusted):
        timing = KeyTiming(created_at=0.0, model="m")
        due = schedule.report(timing, 1.0, expected_seconds=12.0, queued=True)
        assert due < 13.0 - 2.0
        if leave:
            schedule.report(timing, due, expected_seconds=11.0)
        else:
            schedule.report(timing, due, expected_seconds=12.0, queued=True)


def test_a_queued_figure_that_leaves_the_queue_out_is_waited_on_as_the_earliest_end() -> None:
    # The gateway tells a queued job its generation time alone, the same figure until the job
    # starts. Once checks saw figures given while generating count down, and figures given
    # while queued never give an end that came sooner (also from jobs that left the queue),
    # a queued job goes to the end its figure gives (the earliest it can end: it is
    # generating by then), not to a check first.
    schedule = PollSchedule(POLICY)
    check(schedule, a_burst(schedule, [10.3 + 0.5 * i for i in range(TUNING.scouts + 8)]))
    queued_checks(schedule, leave=True)
    fresh = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(fresh, 1.0, expected_seconds=12.0, queued=True)
    assert 13.0 < due <= 13.0 + POLICY.min_interval


def test_a_queued_figure_never_seen_as_a_job_leaves_the_queue_keeps_its_check() -> None:
    # The same, but every check came while the job was still queued: the figure held, as a
    # placeholder's would (too high, say, until the job starts). Nothing says it is the
    # earliest end: a queued job keeps its check.
    schedule = PollSchedule(POLICY)
    check(schedule, a_burst(schedule, [10.3 + 0.5 * i for i in range(TUNING.scouts + 8)]))
    queued_checks(schedule, leave=False)
    fresh = KeyTiming(created_at=0.0, model="m")
    assert schedule.report(fresh, 1.0, expected_seconds=12.0, queued=True) < 13.0 - 2.0


def test_a_queued_figure_that_counts_the_queue_in_is_trusted_without_figures_from_generation() -> (
    None
):
    # Every job of the burst still queued at its first ask (an early first_poll_delay), its
    # figure counting the queue in: no check ever sees a figure given while generating, and
    # none is needed. Once countdowns_trusted checks saw the end stay put, the checks still
    # to come are dropped.
    schedule = PollSchedule(POLICY)
    burst = a_burst(schedule, [10.3 + 0.5 * i for i in range(40)], at=0.5, queued=True)
    check(schedule, burst[1 : 1 + TUNING.countdowns_trusted], queued=True)  # past the lookout
    for timing, _, end in burst[TUNING.scouts :]:
        assert end < schedule.still_due(timing) <= end + POLICY.min_interval


# --- the lookout: until a job of the model has ended, the one expected to end first ----------
def test_estimates_that_run_long_are_found_out_by_the_first_end() -> None:
    # A burst told three times its jobs' lengths, counting down as right estimates would.
    # Nothing before a job ends can tell such estimates from right ones: the job expected to
    # end first is asked every min_interval, and its end, seen at once, opens every other
    # job's window at its own end (they waited for their predicted ends, or for eight ends).
    schedule = PollSchedule(POLICY)
    burst = [
        (timing, schedule.report(timing, 1.0, expected_seconds=3 * end - 1.0), end)
        for timing, end in (
            (KeyTiming(created_at=0.0, model="m"), 10.3 + 0.5 * i) for i in range(40)
        )
    ]
    lookout, due, end = burst[0]
    assert lookout.lookout and not any(timing.lookout for timing, _, _ in burst[1:])
    assert all(3 * end - 2.0 < schedule.watch_start(timing) for timing, _, end in burst[1:])
    asks = 0
    while due < end:
        assert due <= 1.0 + POLICY.min_interval * (asks + 1) + 1e-9
        asks += 1
        due = schedule.report(lookout, due, expected_seconds=3 * end - due)
    generation = schedule.generation
    schedule.job_ended(lookout, due, end)
    assert due - end <= POLICY.min_interval
    assert schedule.generation > generation  # the poller brings waiting keys in
    assert not lookout.lookout
    for timing, _, end in burst[1:]:
        assert end <= schedule.watch_start(timing) <= end + POLICY.min_interval
    # Once a job has ended, no job is a lookout any more.
    later = KeyTiming(created_at=2.0, model="m")
    schedule.report(later, 3.0, expected_seconds=3.0)
    assert not later.lookout


def test_a_lookout_whose_job_is_gone_is_replaced() -> None:
    # The lookout's job was cancelled (or lost its estimate) before it ended: the next job
    # reported takes its place, rather than nobody watching until a window opens.
    schedule = PollSchedule(POLICY)
    gone = KeyTiming(created_at=0.0, model="m")
    schedule.report(gone, 1.0, expected_seconds=9.0)
    assert gone.lookout
    later = KeyTiming(created_at=10.0, model="m")
    schedule.report(later, 11.0, expected_seconds=20.0)
    assert later.lookout and not gone.lookout
    other_model = KeyTiming(created_at=10.0, model="n")
    schedule.report(other_model, 11.0, expected_seconds=20.0)
    assert other_model.lookout and later.lookout  # one per model


def test_a_long_jobs_lookout_is_asked_as_a_job_without_an_estimate() -> None:
    # A lookout told 300 s: every min_interval while young, then a share of its age (at most
    # max_interval), as the promise for a job without an estimate goes, not 600 asks at 0.5 s.
    schedule = PollSchedule(POLICY)
    lookout = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(lookout, 1.0, expected_seconds=300.0)
    assert lookout.lookout
    asks = 1
    while due < 200.0:
        gap = schedule.report(lookout, due, expected_seconds=301.0 - due) - due
        expected = min(max(POLICY.age_fraction * due, POLICY.min_interval), POLICY.max_interval)
        assert gap == pytest.approx(expected), (due, gap)
        due += gap
        asks += 1
    assert asks < 200 / POLICY.min_interval / 2, asks


def test_a_job_told_far_longer_than_its_models_jobs_is_probed_and_seen_by_its_progress() -> None:
    # Right estimates for jobs of 10-30 s, and one job told 75 s that lasts 25 s (queued
    # until 3 s, then generating evenly): without a probe it was seen at 75 s, 50 s late.
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    window = schedule.window("m")
    timing = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(timing, 1.0, expected_seconds=74.0, queued=True)
    # Asked again within max_interval while it is queued (at the latest when a usual job of
    # its model would end), not at 75 s.
    assert due == pytest.approx(1.0 + POLICY.max_interval)
    assert schedule.report(timing, due, expected_seconds=75.0 - due, queued=True) <= 15.0
    due = 11.0
    # Generating there: 25 s job, generation 3-25 s; the reading can only say it began after
    # the ask that saw it queued, so it ends by due + (100 - p) / p * (due - 6) at most.
    percent = round((due - 3.0) / 22.0 * 100, 1)
    latest = due + (100 - percent) / percent * (due - 6.0)
    assert latest < 75.0
    after = schedule.report(timing, due, expected_seconds=75.0 - due, percent=percent)
    assert latest > due + TUNING.bound_rate_after
    # Read again once its progress can tell a rate (the bound is loose: it may have begun
    # anywhere after 1 s), which puts its end at 25 s.
    assert after == pytest.approx(due + TUNING.bound_rate_after)
    percent = round((after - 3.0) / 22.0 * 100, 1)
    after = schedule.report(timing, after, expected_seconds=75.0 - after, percent=percent)
    assert after == pytest.approx(25.0 + TUNING.open_delay * POLICY.min_interval, abs=0.5)
    assert after >= 25.0  # not before it can have ended: no ask wasted on the way
    # Its end, far before its estimate, does not open every other job's window early.
    schedule.job_ended(timing, after, 25.0)
    assert schedule.window("m") == window


def test_a_job_told_about_as_long_as_its_models_jobs_is_not_probed() -> None:
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    timing = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(timing, 1.0, expected_seconds=27.0, queued=True)
    assert due > 25.0  # waits on its (right) estimate: no ask more
    # Told 37 s (a quarter longer than 4 in 5 of its model's jobs, under twice their median),
    # queued: asked every max_interval until it is read generating (TUNING.long_queued), as
    # it may be a job told three times its length (in a trickle with one job in 20 told 2x,
    # such jobs were seen up to 18 s late, p99 13 s).
    queued = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(queued, 1.0, expected_seconds=36.0, queued=True)
    assert due == pytest.approx(1.0 + POLICY.max_interval)
    # Generating, told about right by its progress: no ask more on the way.
    due = schedule.report(queued, due, expected_seconds=32.0, percent=round(100 * 4 / 37, 1))
    assert due > 30.0


def test_a_job_told_three_times_its_length_is_asked_where_its_first_reading_bounds_its_end() -> (
    None
):
    # Right estimates for jobs of 10-30 s, and one job of 12 s told 36 s, generating evenly
    # from its submit (no queue): not far longer than its model's jobs (the probe's rule),
    # it was seen when its estimate ran out, 24 s late. Its first reading bounds its end.
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    timing = KeyTiming(created_at=0.0, model="m")
    percent = round(100 * 1.0 / 12.0, 1)
    due = schedule.report(timing, 1.0, expected_seconds=35.0, percent=percent)
    # Its bound is 12.0 s (no earlier ask saw it queued); read again once its progress can
    # tell a rate, which says the same.
    assert due == pytest.approx(1.0 + TUNING.bound_rate_after)
    due = schedule.report(timing, due, expected_seconds=36.0 - due, percent=round(100 * due / 12))
    assert 12.0 <= due <= 12.5
    # Its end, two thirds before its estimate's, does not open every other job's window
    # early (it ended by its bound, as a bound says: that tells nothing of the estimates).
    window = schedule.window("m")
    schedule.job_ended(timing, due, 12.0)
    assert schedule.window("m") == window
    # A job told right is not asked at a bound: its bound lies at or after its end.
    right = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(right, 1.0, expected_seconds=11.0, percent=round(100 / 12.0, 1))
    assert due >= 12.0


def test_a_progress_found_to_grow_fast_then_slowly_bounds_no_end_any_more() -> None:
    # Right estimates, and a progress that grows as the square root of the time: a first
    # reading's bound lies far before every job's end. The first job asked at its bound is
    # far from done there: no job of the model is asked at its bound after that.
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)

    def sqrt_percent(end: float, now: float) -> float:
        return round(100 * math.sqrt(now / end), 1)

    first = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(first, 1.0, expected_seconds=24.0, percent=sqrt_percent(25.0, 1.0))
    assert first.progress is not None and first.progress.bound == pytest.approx(5.0)
    while first.progress.bound is not None:  # read for a rate, then past its bound
        assert due < 20.0
        due = schedule.report(
            first, due, expected_seconds=25.0 - due, percent=sqrt_percent(25.0, due)
        )
    second = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(second, 1.0, expected_seconds=24.0, percent=sqrt_percent(25.0, 1.0))
    assert due > 20.0


def test_a_job_that_ended_by_its_bound_as_its_models_first_end_opens_no_window_early() -> None:
    # Jobs of 10-30 s generating from their submits, right estimates, and one job of 10 s told
    # 30 s: asked at the end its first reading allows, it is the model's first end. A first
    # end two thirds before its estimate's opened every job's window at a third of its span
    # (16 asks per key on an independent gateway): it ended by its bound, as bounds say.
    schedule = PollSchedule(POLICY)
    rng = random.Random(3)
    for _ in range(20):
        timing = KeyTiming(created_at=0.0, model="m")
        end = rng.uniform(12, 30)
        schedule.report(timing, 1.0, expected_seconds=end - 1.0, percent=round(100 / end, 1))
    outlier = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(outlier, 1.0, expected_seconds=29.0, percent=10.0)
    while due < 10.0:  # a scout, say: asked every max_interval while nothing is learned
        due = schedule.report(outlier, due, expected_seconds=30.0 - due, percent=10.0 * due)
    assert due <= 10.5
    schedule.job_ended(outlier, due, 10.0)
    low, _high = schedule.window("m")
    assert low > -0.1, low


def test_a_loose_bound_is_narrowed_by_a_second_reading_of_progress() -> None:
    # A 10 s job told 30 s, seen queued at 1 s, first read generating at 6 s at 30% (it
    # began at 3 s): all its reading can say is that it began after 1 s, so it ends by
    # 17.7 s. Read again 2 s later, its progress's rate puts its end at 13 s (it was seen up
    # to 9 s late at its bound).
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    timing = KeyTiming(created_at=0.0, model="m")
    schedule.report(timing, 1.0, expected_seconds=29.0, queued=True)
    due = schedule.report(timing, 6.0, expected_seconds=24.0, percent=30.0)
    assert due == pytest.approx(6.0 + TUNING.bound_rate_after)
    due = schedule.report(timing, due, expected_seconds=22.0, percent=50.0)
    assert due == pytest.approx(13.0 + TUNING.open_delay * POLICY.min_interval, abs=0.01)


def test_a_job_whose_progress_went_back_does_not_judge_its_models_progress() -> None:
    # A 12 s job told 36 s, restarted at 2 s (its progress back to 0), read at 86% past the
    # bound its first reading set: the bound no longer held, and one restart turned bounds
    # off for its model for good (a later job told 3x its length waited on its estimate).
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    restarted = KeyTiming(created_at=0.0, model="m")
    schedule.report(restarted, 1.0, expected_seconds=35.0, percent=8.3)
    assert restarted.progress is not None and restarted.progress.bound is not None
    schedule.report(restarted, 2.5, expected_seconds=33.5, percent=4.0)  # it started over
    assert restarted.progress.bound is None
    schedule.report(restarted, 12.3, expected_seconds=23.7, percent=86.0)
    later = KeyTiming(created_at=20.0, model="m")
    due = schedule.report(later, 21.0, expected_seconds=35.0, percent=8.3)
    assert due < 25.0  # read again for its rate, on the way to its bound (32 s)


def test_jobs_asked_at_their_bounds_do_not_turn_their_model_to_its_progress() -> None:
    # Three jobs told 3x their length, read for a rate and seen at their ends: that their
    # progress told their ends better than their estimates says nothing of the others'. They
    # turned the model to going by progress (relearned from scratch: 4.1 asks per key in a
    # trickle with 1 job in 20 so told, 2.6 without them).
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    for _ in range(4):
        outlier = KeyTiming(created_at=0.0, model="m")
        due = schedule.report(outlier, 1.0, expected_seconds=35.0, percent=8.3)
        asks = 1
        while due < 12.0:
            due = schedule.report(
                outlier, due, expected_seconds=36.0 - due, percent=round(100 * due / 12, 1)
            )
            asks += 1
        schedule.job_ended(outlier, due, 12.0)
        assert asks <= 3  # by progress, the fourth was asked every min_interval: 19 asks
    right = KeyTiming(created_at=0.0, model="m")
    schedule.report(right, 1.0, expected_seconds=19.0, percent=round(100 / 20, 1))
    schedule.report(right, 3.0, expected_seconds=17.0, percent=round(300 / 20, 1))
    assert right.model == "m"  # still by its estimate


def offset_percent(end: float, now: float) -> float:
    """complete_percent of a job generating evenly from 0 to ``end`` that reports 10% as it
    starts (a progress with an offset)."""
    return round(10.0 + 90.0 * min(now / end, 1.0), 1)


def follow_offset(schedule: PollSchedule, end: float, told: float) -> tuple[int, float]:
    """Ask about a job created at 0 that ends at ``end``, told ``told`` s, reporting
    ``offset_percent``, until an ask finds it done: (asks, lateness)."""
    timing = KeyTiming(created_at=0.0, model="m")
    due, asks = schedule.first_ask(timing), 0
    while due < end:
        asks += 1
        left = max(told - due, 0.0)
        due = schedule.report(timing, due, expected_seconds=left, percent=offset_percent(end, due))
    schedule.job_ended(timing, due, end)
    return asks + 1, due - end


def test_a_progress_that_starts_above_zero_still_finds_a_job_told_three_times_its_length() -> None:
    # A progress at 10% as generation starts bounds every first reading's end far too early:
    # each job was asked at its bound far from done, bounds were turned off for the model,
    # and one job in 20 told 3x its length was seen when its estimate ran out (p99 37 s in a
    # burst of jobs of 10-30 s). The rate read two seconds later says where the end is.
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    # The model's first readings bound every end: each is read for a rate, one ask more.
    right = [follow_offset(schedule, end, end) for end in (rng.uniform(10, 30) for _ in range(8))]
    assert max(asks for asks, _late in right) <= 3 + 1, right
    assert max(late for _asks, late in right) <= POLICY.min_interval, right
    # Every estimate leaves about as much as the first readings do: no ask on the way now.
    later = [follow_offset(schedule, end, end) for end in (rng.uniform(10, 30) for _ in range(20))]
    assert max(asks for asks, _late in later) <= 3, later
    # A job of 12 s told 36 s: read for its rate, and seen at its end, not 24 s late.
    asks, late = follow_offset(schedule, 12.0, 36.0)
    assert late <= POLICY.min_interval and asks <= 4, (asks, late)


def test_a_rate_that_bears_out_the_estimate_voids_the_first_readings_bound() -> None:
    # A 20 s job told right, 10% as it starts: its first reading (at 1 s,
    # 14.5%) bounds its end at 6.9 s. Read again for its rate, that puts the end at 20 s:
    # the bound goes, the job is not asked at it, and its model's bounds stay in use.
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    timing = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(timing, 1.0, expected_seconds=19.0, percent=offset_percent(20.0, 1.0))
    assert timing.progress is not None and timing.progress.bound is not None
    assert due == pytest.approx(1.0 + TUNING.bound_rate_after)
    due = schedule.report(timing, due, expected_seconds=20.0 - due, percent=offset_percent(20, due))
    assert timing.progress.bound is None
    assert due > 10.0
    outlier = KeyTiming(created_at=0.0, model="m")
    schedule.report(outlier, 1.0, expected_seconds=59.0, percent=offset_percent(20.0, 1.0))
    assert outlier.progress is not None and outlier.progress.bound is not None


def test_whole_percents_from_a_model_that_gives_tenths_tell_a_rate_as_tenths_do() -> None:
    # A gateway that gives tenths read a 25 s job at 4.0% and 16.0%: taken for whole percents,
    # the rate was thought ten times rougher than it is, and told nothing yet (a job told
    # 3x its length among right ones was asked 2.75 s after its end).
    schedule = PollSchedule(POLICY)
    whole = KeyTiming(created_at=0.0, model="m")
    schedule.report(whole, 1.0, expected_seconds=None, percent=4.0)
    schedule.report(whole, 4.0, expected_seconds=None, percent=16.0)
    assert whole.predicted_end is None
    first = KeyTiming(created_at=0.0, model="m")
    schedule.report(first, 1.0, expected_seconds=None, percent=4.3)
    timing = KeyTiming(created_at=0.0, model="m")
    schedule.report(timing, 1.0, expected_seconds=None, percent=4.0)
    schedule.report(timing, 4.0, expected_seconds=None, percent=16.0)
    assert timing.predicted_end == pytest.approx(25.0)


def test_a_job_told_far_longer_than_usual_read_at_zero_percent_is_read_again_for_a_rate() -> None:
    # Told 75 s among jobs of 10-30 s, first read generating at 0% (it has just begun): that
    # bounds nothing, and it was seen when its estimate ran out (40 s late).
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)
    for _ in range(40):
        follow(schedule, rng.uniform(10, 30), exact)
    timing = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(timing, 1.0, expected_seconds=74.0, percent=0.0)
    assert due == pytest.approx(1.0 + TUNING.bound_rate_after)
    # 20 s of generation from 1 s: 10% at 3 s puts its end at 21 s, give or take 1.8 s (two
    # whole percents): asked by then, not at 75 s.
    due = schedule.report(timing, due, expected_seconds=75.0 - due, percent=10.0)
    assert 21.0 <= due <= 21.0 + 1.8 + POLICY.min_interval


def test_a_few_jobs_told_half_their_length_do_not_open_every_window_at_its_start() -> None:
    # Lateness is mirrored to the early side (estimates taken as symmetric until shown
    # otherwise): one job in 20 told half its length opened every job's window at its start,
    # 12 asks per key in a trickle. Windows opened that early, and no job ended early: the
    # early side closes again, while the late side still covers the overruns.
    schedule = PollSchedule(POLICY)
    rng = random.Random(5)

    def told_half(end: float, now: float) -> float | None:
        return max(end / 2 - now, 0.0)

    for i in range(60):
        follow(schedule, rng.uniform(10, 30), told_half if i % 20 == 7 else exact)
    low, high = schedule.window("m")
    assert low > -0.1 and high >= 0.9, (low, high)
    asks, late = follow(schedule, 20.0, exact)
    assert asks <= 3 and late <= POLICY.min_interval, (asks, late)
    asks, late = follow(schedule, 20.0, told_half)  # an overrun is still seen at once
    assert late <= POLICY.min_interval, (asks, late)


def learn_off_by(schedule: PollSchedule, share: float) -> None:
    """60 jobs of 10-30 s whose estimates are off by up to ``share`` of their length, either way."""
    rng = random.Random(5)
    for _ in range(60):
        factor = rng.uniform(1 - share, 1 + share)

        def off(end: float, now: float, factor: float = factor) -> float | None:
            return end * factor - now

        follow(schedule, rng.uniform(10, 30), off)


def test_estimates_off_both_ways_keep_windows_open_early() -> None:
    # ±30% around the true length: ends come early as well as late, and the window keeps an
    # early side as wide as the lateness (an early end is seen when it comes).
    schedule = PollSchedule(POLICY)
    learn_off_by(schedule, 0.3)
    low, _high = schedule.window("m")
    assert low < -0.2, low


def test_a_queued_job_whose_estimate_leaves_the_queue_out_is_judged_on_its_own_scale() -> None:
    # Estimates ±20% off, learned; a job queued 90 s whose figure (20 s) leaves the queue out.
    # Each queued report moved its end on; judged relative to the time since its submit, its
    # window grew with the queue (±25% of 80 s), and it was asked every min_interval for the
    # last minute of its queue (46 asks, 21 per key in a burst behind a 100-slot queue).
    schedule = PollSchedule(POLICY)
    learn_off_by(schedule, 0.2)
    timing = KeyTiming(created_at=0.0, model="m")
    due = schedule.report(timing, 1.0, expected_seconds=20.0, queued=True)
    asks = 1
    while due < 90.0:
        due = schedule.report(timing, due, expected_seconds=20.0, queued=True)
        asks += 1
    assert asks <= 90 / POLICY.max_interval, asks
    assert timing.predicted_span == pytest.approx(20.0)


# --- right estimates read through replies that take their time ---------------------------------
JITTERED: dict[str, Callable[[float], float]] = {
    "fractional": lambda left: round(left, 2),
    "tenths": lambda left: round(left, 1),
    "whole, rounded down": lambda left: float(math.floor(left)),
    "whole, rounded up": lambda left: float(math.ceil(left)),
}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gateway", list(JITTERED))
def test_a_right_estimate_read_with_reply_latency_jitter_is_never_taken_for_a_placeholder(
    gateway: str, seed: int
) -> None:
    # Batch calls as the poller makes them (every key due within batch_fill_horizon rides
    # along), each reply taking 0.1-0.5 s, the gateway reading its state anywhere between the
    # ask and the reply: a figure that counts down rightly, however rounded, keeps its job on
    # its estimate. The same figure given more than a step apart is a placeholder (a figure
    # held for the whole job): a whole second, read at the start of one call and the end of
    # the next, must not be taken for one. (A model's first whole figures, before its
    # resolution is known, may be: those jobs are left out.)
    figure = JITTERED[gateway]
    schedule = PollSchedule(POLICY)
    rng = random.Random(seed)
    jobs: list[tuple[KeyTiming, float]] = []
    due: dict[int, float] = {}
    for index in range(60):
        created = rng.uniform(0.0, 20.0)
        timing = KeyTiming(created_at=created, model="m")
        jobs.append((timing, created + rng.uniform(10.0, 40.0)))
        due[index] = schedule.first_ask(timing)
    judged: list[tuple[int, float]] = []
    while due:
        call = min(due.values())
        latency = rng.uniform(0.1, 0.5)
        read = call + rng.uniform(0.0, latency)
        for index in [i for i, at in due.items() if at <= call + POLICY.batch_fill_horizon]:
            timing, end = jobs[index]
            if read >= end:
                schedule.job_ended(timing, call + latency, end)
                del due[index]
                continue
            live, known = timing.estimate_live, schedule.coarse("m") or gateway == "fractional"
            due[index] = schedule.report(
                timing, call + latency, expected_seconds=figure(end - read), asked_at=call
            )
            if live and not timing.estimate_live and known:
                judged.append((index, call))
    assert not judged, judged
