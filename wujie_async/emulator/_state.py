"""The emulator's settings, its latency model, and its jobs.

A job's whole life is drawn once, at creation (queue wait, then one duration per image); its
status at any moment is computed from the clock, so 100,000 jobs cost no timers and no tasks.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import _contract, _rules
from .._contract import JobStatus
from ._clock import GatewayClock

# Typical durations in seconds at time_scale 1, per model: (queue wait, one image). They shape
# the sampled truth AND the estimate sent as expected_seconds, as a real gateway's estimate
# comes from typical figures, not from the future.
TYPICAL_SECONDS: dict[str, tuple[float, float]] = {
    "gpt-image-1": (4.0, 14.0),
    "dall-e-2": (1.5, 5.0),
    "dall-e-3": (3.0, 11.0),
}
"""Typical seconds per model at ``time_scale`` 1: (queue wait, one image). They shape the
sampled durations and the estimates sent as ``expected_seconds``."""
_UNKNOWN_MODEL_SECONDS = (3.0, 10.0)
# Gamma shape of the sampled durations: spread like real queues, never negative.
_SHAPE = 4.0
# Points charged per image once a job succeeds (integral_cost); the emulator's own figures.
POINTS_PER_IMAGE: dict[str, int] = {"gpt-image-1": 8, "dall-e-2": 2, "dall-e-3": 6}
_UNKNOWN_MODEL_POINTS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultConfig:
    """Faults on demand; every knob is off by default.

    Probabilities apply per request to the API endpoints in ``endpoints`` (``generations``,
    ``edits``, ``info``); job-level knobs apply per job, drawn when the job is created (so a
    change affects the jobs created after it).

    The ``estimate_*`` knobs live here rather than in EmulatorConfig because a wrong estimate
    is the gateway misbehaving, and like every fault it can be switched while the emulator runs
    (``set_faults``, or ``POST /_emulator/faults`` for an emulator in its own process).

    Attributes:
        http_5xx: probability of an HTTP ``http_5xx_status`` reply with a JSON envelope.
        http_429: probability of a 429 with ``Retry-After: retry_after_s``.
        burst_429: the next N requests all get 429 (a burst), then the count runs out.
        drop_connection: probability of closing the socket without any reply, before handling.
        drop_after_accept: probability that a submit is accepted (a job exists) and then its
            reply is lost (the socket is closed): the ambiguous case.
        cut_reply: probability that a reply (of any status) is cut mid-body: its headers and
            the first half of its body sent, the whole length announced, then the connection
            reset. A submit so answered was handled (accepted, when it was): ambiguous too.
        slow_reply: probability of holding a reply for ``slow_reply_s`` seconds first.
        html_reply: probability of an HTML page (``html_status``) instead of JSON.
        business_error: probability that a submit is refused with ``business_error_code``.
        absent_jobs: probability that a new job is missing from batch replies for its first
            ``absent_s`` seconds (seconds of the emulator's clock, not scaled).
        duplicate_entries: probability that each listed entry appears twice.
        shuffle_entries: list entries in random order.
        unknown_status: probability that a running job is reported with status 2.
        fail_jobs: probability that a job fails (status 3) partway.
        end_without_result: probability that a job ends partway with status -1 ("ended
            without a result": terminal, no images, no fail_message).
        moderation_words: a prompt containing any of these ends in status 5.
        estimate_noise: each job's ``expected_seconds`` is its estimate times a factor drawn
            once per job, uniformly from ``[1 - x, 1 + x]`` (0.5: off by up to 50%).
        estimate_bias: multiplies every job's estimate (1.5: the gateway is 50% pessimistic).
        estimate_constant: when set, ``expected_seconds`` is always this many seconds, whatever
            the job and however long it has run (a placeholder estimate).
        estimate_absent: probability that a job's entries carry no ``expected_seconds``.
        estimate_outliers: probability that a job's estimate is ``estimate_outlier_factor``
            times what it would be (a few jobs told far too long or too short among right ones).
        estimate_outlier_factor: see ``estimate_outliers``.
        images_gone: probability (drawn by the job's key, so every listing of it agrees)
            that a job's image files answer 404 "expired", as the platform's once it has
            cleaned up old results.
        cost_unreported: probability (drawn by the job's key, so every listing of it agrees)
            that a job's entries never carry ``integral_cost``, as a gateway that reports the
            cost of some jobs only; the job is charged all the same (``points_charged``).
        cost_zero: probability (drawn by the job's key) that a job's entries carry
            ``integral_cost`` 0, however much it was charged (``points_charged``), as a
            gateway that reports 0 until the cost is settled; a job drawn for
            ``cost_unreported`` carries none.
        stale_duplicates: probability that each listed entry is joined by a stale copy of
            the same key, the job as it was at its submit (queued, no image, no estimate): a
            gateway whose replicas lag, in any order with the fresh one.
        numbers_as_text: probability that an entry's numbers (``status``,
            ``complete_percent``, ``expected_seconds``, ``queue_before_num``,
            ``integral_cost``) come as JSON strings of their values (``"4"``, ``"41.5"``), as
            the envelope's ``code`` does.
        entries_missing: probability that a reply leaves out a key it would list, at any
            point of the job's life (a replica that has not got it yet, or lost it for a
            moment): the next reply lists it again.
    """

    endpoints: frozenset[str] = frozenset({"generations", "edits", "info"})
    http_5xx: float = 0.0
    http_5xx_status: int = 503
    http_429: float = 0.0
    burst_429: int = 0
    retry_after_s: int = 1
    drop_connection: float = 0.0
    drop_after_accept: float = 0.0
    cut_reply: float = 0.0
    slow_reply: float = 0.0
    slow_reply_s: float = 2.0
    html_reply: float = 0.0
    html_status: int = 200
    business_error: float = 0.0
    business_error_code: str = _contract.CODE_LOCK_RACE
    absent_jobs: float = 0.0
    absent_s: float = 1.0
    duplicate_entries: float = 0.0
    shuffle_entries: bool = False
    unknown_status: float = 0.0
    fail_jobs: float = 0.0
    end_without_result: float = 0.0
    moderation_words: tuple[str, ...] = ()
    estimate_noise: float = 0.0
    estimate_bias: float = 1.0
    estimate_constant: float | None = None
    estimate_absent: float = 0.0
    estimate_outliers: float = 0.0
    estimate_outlier_factor: float = 3.0
    images_gone: float = 0.0
    cost_unreported: float = 0.0
    cost_zero: float = 0.0
    stale_duplicates: float = 0.0
    numbers_as_text: float = 0.0
    entries_missing: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorConfig:
    """How the emulated gateway behaves.

    Attributes:
        time_scale: multiplies every duration of the latency model (0.01 makes a 15 s job take
            150 ms; expected_seconds is scaled the same way).
        seed: seeds every random draw (durations, faults, keys), for repeatable runs.
        rate_limit_rps: requests per second allowed per app, answered with 429 above it;
            None is no limit.
        strict_regexps: apply the validators printed on the doc page (rejects dall-e values).
        faults: fault injection settings.
        retain_finished_s: finished jobs are forgotten (absent from replies) after this long;
            None keeps them for the emulator's lifetime.
        job_seconds: when set, ``(low, high)``: each job lasts a uniform draw from this range
            (times ``time_scale``) from submit to its end, ``queued_share`` of it queued,
            instead of the per-model latency model. Benchmarks use it for "jobs of 10-30 s".
        queued_share: with ``job_seconds``, ``(low, high)``: the share of each job spent
            queued is a uniform draw from this range (``(0.0, 0.0)``: every job generates from
            its submit on).
        estimate_basis: what ``expected_seconds`` is computed from before any ``estimate_*``
            fault: ``"typical"`` (default) from typical durations, as a real gateway's estimate
            comes from typical figures and not from the future; ``"actual"`` from the job's own
            drawn timeline, i.e. an estimate that is right.
        progress_fields: list the platform's optional progress fields: ``queue_before_num``
            (jobs ahead, while queued), ``start_gen_time`` and ``complete_time`` (unix seconds,
            once known) and ``integral_cost`` (points charged, once finished).
        estimate_rounding: how ``expected_seconds`` is rounded: ``"none"`` (to 10 ms),
            ``"floor"``, ``"ceil"`` or ``"round"`` to whole seconds (the platform's other
            endpoints give integers).
        estimate_while_queued: what ``expected_seconds`` says before generation starts:
            ``"countdown"`` (the time left, queue included, counting down from the submit),
            ``"generation"`` (the generation time alone, the same figure until generation
            starts: the countdown starts then), ``"absent"`` (no estimate while queued) or
            ``"zero"`` (0 while queued).
        images_progressive: list each image as it is done (True), or every image only once the
            job has ended (False).
        stamp_rounding: how ``start_gen_time`` and ``complete_time`` are given: ``"none"`` (to
            the millisecond) or ``"floor"`` (whole unix seconds).
        stamp_skew: seconds the gateway's stamps are off from the real clock (negative: its
            clock runs behind). Only the stamps: the signature check keeps the real clock.
        end_tick: when above 0, the gateway records a job's end only at its clock's next tick
            of this many seconds (times ``time_scale``), as a gateway whose workers report on
            a timer: every job ends up to a tick after its estimate says, whatever its
            length (the estimate counts down to the end it would have had).
        progress_percent: how ``complete_percent`` is given: ``"time"`` (the share of the
            generation time elapsed, to 0.1), ``"whole"`` (the same in whole percents, rounded
            down), ``"images"`` (the share of the job's images done: it moves in steps, and not
            at all for one image), ``"sqrt"`` or ``"squared"`` (the square root, or the square,
            of that share: a progress that grows fast and then slowly, or slowly and then fast,
            as a gateway's stages may make it; to 0.1), ``"offset"`` (10% as generation starts,
            then evenly to 100: a stage done before it; to 0.1) or ``"absent"`` (not given).
        finishing_s: seconds (times ``time_scale``) a successful job runs on after its last
            image is done (uploading, billing): its images are listed meanwhile, while its
            status says generating, and its cost only once it has ended.
        temporary_urls: images listed while the job runs are at temporary URLs, which stop
            serving (404) once the job has ended; reports from the end list the final URLs.
        done_unlisted_s: seconds (times ``time_scale``) a succeeded job's reports say done
            while listing no image, before they list its images.
        batch_cap: keys a batch detail call may ask about; more gets code 20010001 (the
            contract assumes 50; a gateway may take fewer).
        image_delivery: how a listed image is given: ``"url"`` (a URL of this emulator,
            ``b64_json`` null) or ``"b64_json"`` (the PNG inline, base64, ``url`` null: as
            OpenAI's API gives gpt-image-1's images).
        revised_prompts: dall-e-3 images carry a ``revised_prompt`` (the prompt as the model
            rewrote it, as OpenAI's dall-e-3 does); other models' stay null.
    """

    time_scale: float = 1.0
    seed: int | None = None
    rate_limit_rps: float | None = None
    strict_regexps: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    retain_finished_s: float | None = None
    job_seconds: tuple[float, float] | None = None
    queued_share: tuple[float, float] = (0.05, 0.25)
    estimate_basis: Literal["typical", "actual"] = "typical"
    progress_fields: bool = True
    estimate_rounding: Literal["none", "floor", "ceil", "round"] = "none"
    estimate_while_queued: Literal["countdown", "generation", "absent", "zero"] = "countdown"
    images_progressive: bool = True
    stamp_rounding: Literal["none", "floor"] = "none"
    stamp_skew: float = 0.0
    end_tick: float = 0.0
    progress_percent: Literal["time", "whole", "images", "sqrt", "squared", "offset", "absent"] = (
        "time"
    )
    finishing_s: float = 0.0
    temporary_urls: bool = False
    done_unlisted_s: float = 0.0
    batch_cap: int = _contract.MAX_KEYS_PER_BATCH
    image_delivery: Literal["url", "b64_json"] = "url"
    revised_prompts: bool = False


@dataclass(slots=True)
class EmulatedJob:
    """One job: its request and its whole timeline, drawn at creation.

    Every ``*_at`` time is a reading of the gateway's clock (``Gateway.clock``), not unix
    seconds: ``clock.unix(job.ends_at)`` is when it ends on the wall.
    """

    key: str
    app_id: str
    prompt: str
    model: str
    n: int
    size: tuple[int, int]
    created_at: float
    started_at: float
    image_done_at: list[float]
    outcome: JobStatus  # the terminal status it will reach: -1, 3, 4 or 5
    ends_at: float
    estimate_total: float | None  # seconds from creation to the end; None: not given
    absent_until: float
    estimate_constant: float | None = None  # a placeholder sent instead of any countdown
    first_listed_done: float | None = None

    def status_at(self, now: float) -> JobStatus:
        """The status the gateway reports at ``now``."""
        if now >= self.ends_at:
            return self.outcome
        if now >= self.started_at:
            return JobStatus.GENERATING
        return JobStatus.QUEUED

    def images_done_at(self, now: float) -> int:
        """How many images exist at ``now`` (none for a job that does not succeed)."""
        if self.outcome != JobStatus.SUCCEEDED:
            return 0
        return sum(1 for done in self.image_done_at if done <= now)

    def images_listed_at(self, now: float, *, progressive: bool) -> int:
        """How many images a batch reply lists at ``now``."""
        if not progressive and now < self.ends_at:
            return 0
        return self.images_done_at(now)

    def percent_at(self, now: float, shape: str = "time") -> float | None:
        """The progress reported at ``now``, as ``EmulatorConfig.progress_percent`` says it
        is given (None: not given)."""
        if shape == "absent":
            return None
        if now >= self.ends_at and self.outcome == JobStatus.SUCCEEDED:
            return 100.0
        if now <= self.started_at:
            return 0.0
        if shape == "images":
            done = sum(1 for at in self.image_done_at if at <= min(now, self.ends_at))
            return round(100.0 * done / len(self.image_done_at), 1)
        span = self.image_done_at[-1] - self.started_at
        share = min(100.0, 100.0 * (min(now, self.ends_at) - self.started_at) / span)
        if shape == "sqrt":
            share = 10.0 * math.sqrt(share)
        elif shape == "squared":
            share = share * share / 100.0
        elif shape == "offset":
            share = 10.0 + 0.9 * share
        return float(math.floor(share)) if shape == "whole" else round(share, 1)

    def expected_at(
        self, now: float, *, rounding: str = "none", while_queued: str = "countdown"
    ) -> float | None:
        """The gateway's ESTIMATE of seconds left (None when it gives none), as the
        ``EmulatorConfig.estimate_*`` settings say it is reported."""
        if self.estimate_total is None:
            return None
        if now >= self.ends_at:
            return 0.0
        if self.estimate_constant is not None:
            return self.estimate_constant
        left = max(0.0, self.estimate_total - (now - self.created_at))
        if now < self.started_at and while_queued != "countdown":
            if while_queued == "absent":
                return None
            if while_queued == "zero":
                return 0.0
            # "generation": the part after the queue, not counting down until it starts
            left = max(0.0, self.estimate_total - (self.started_at - self.created_at))
        if rounding == "floor":
            return float(math.floor(left))
        if rounding == "ceil":
            return float(math.ceil(left))
        if rounding == "round":
            return float(round(left))
        return round(left, 2)

    def cost(self) -> int:
        """Points charged once the job has ended: only images delivered are paid for."""
        if self.outcome != JobStatus.SUCCEEDED:
            return 0
        return self.n * POINTS_PER_IMAGE.get(self.model, _UNKNOWN_MODEL_POINTS)


class JobStore:
    """Creates jobs from requests and answers what they look like at a moment."""

    def __init__(
        self, config: EmulatorConfig, rng: random.Random, clock: GatewayClock | None = None
    ) -> None:
        self.config = config
        self.rng = rng
        self.clock = GatewayClock() if clock is None else clock
        self.jobs: dict[str, EmulatedJob] = {}
        # Every job's generation start, sorted: a queue position is two bisections.
        self._starts: list[float] = []

    def new_key(self) -> str:
        """A fresh 32-hex-digit key, as the gateway hands out."""
        while True:
            key = f"{self.rng.getrandbits(128):032X}"
            if key not in self.jobs:
                return key

    def create(self, app_id: str, body: dict[str, Any], now: float | None = None) -> EmulatedJob:
        """Draw a job's life for a validated request body."""
        now = self.clock.now() if now is None else now
        config, faults, rng = self.config, self.config.faults, self.rng
        model = str(body["model"])
        n = int(body.get("n") or 1)
        queue_typ, image_typ = TYPICAL_SECONDS.get(model, _UNKNOWN_MODEL_SECONDS)
        scale = config.time_scale
        done_at: list[float] = []
        if config.job_seconds is not None:
            low, high = config.job_seconds
            total = rng.uniform(low, high) * scale
            started = now + total * rng.uniform(*config.queued_share)
            done_at = [started + (now + total - started) * (i + 1) / n for i in range(n)]
            typical_total = (low + high) / 2 * scale
        else:
            started = now + rng.gammavariate(_SHAPE, queue_typ / _SHAPE) * scale
            clock = started
            for _ in range(n):
                clock += rng.gammavariate(_SHAPE, image_typ / _SHAPE) * scale
                done_at.append(clock)
            typical_total = (queue_typ + n * image_typ) * scale
        prompt = str(body.get("prompt", ""))
        if any(word.lower() in prompt.lower() for word in faults.moderation_words):
            outcome, ends = JobStatus.MODERATION_REJECTED, started
        elif faults.fail_jobs and rng.random() < faults.fail_jobs:
            outcome = JobStatus.FAILED
            ends = started + (done_at[-1] - started) * rng.uniform(0.1, 0.9)
        elif faults.end_without_result and rng.random() < faults.end_without_result:
            outcome = JobStatus.ENDED_WITHOUT_RESULT
            ends = started + (done_at[-1] - started) * rng.uniform(0.1, 0.9)
        else:
            outcome, ends = JobStatus.SUCCEEDED, done_at[-1] + config.finishing_s * scale
        absent = faults.absent_jobs and rng.random() < faults.absent_jobs
        basis = ends - now if config.estimate_basis == "actual" else typical_total
        if config.end_tick > 0:  # the estimate is of the end before the tick
            tick = config.end_tick * scale
            ends = math.ceil(ends / tick) * tick
            if outcome == JobStatus.SUCCEEDED and not config.finishing_s:
                done_at[-1] = ends
        off_by = faults.estimate_bias
        if faults.estimate_noise:
            noise = faults.estimate_noise
            off_by *= rng.uniform(1 - noise, 1 + noise)
        if faults.estimate_outliers and rng.random() < faults.estimate_outliers:
            off_by *= faults.estimate_outlier_factor
        estimate: float | None = basis * off_by
        if faults.estimate_absent and rng.random() < faults.estimate_absent:
            estimate = None
        job = EmulatedJob(
            key=self.new_key(),
            app_id=app_id,
            prompt=prompt,
            model=model,
            n=n,
            size=_rules.size_pixels(body.get("size")),
            created_at=now,
            started_at=started,
            image_done_at=done_at,
            outcome=outcome,
            ends_at=ends,
            estimate_total=estimate,
            estimate_constant=faults.estimate_constant,
            absent_until=now + faults.absent_s if absent else now,
        )
        bisect.insort(self._starts, started)
        self.jobs[job.key] = job
        return job

    def visible(self, key: str, app_id: str, now: float) -> EmulatedJob | None:
        """The job as a batch query may see it, or None when the gateway would not list it."""
        job = self.jobs.get(key)
        if job is None or job.app_id != app_id or now < job.absent_until:
            return None
        retain = self.config.retain_finished_s
        if retain is not None and now >= job.ends_at + retain:
            return None
        return job

    def queue_before(self, job: EmulatedJob, now: float) -> int:
        """Jobs ahead of ``job`` in the queue: still queued at ``now``, starting before it."""
        return max(
            0,
            bisect.bisect_left(self._starts, job.started_at)
            - bisect.bisect_right(self._starts, now),
        )

    def counts_by_state(self, now: float) -> dict[str, int]:
        """How many jobs are in each state at ``now`` (keyed by the status's label)."""
        counts = Counter(job.status_at(now) for job in self.jobs.values())
        return {_state_name(status): counts.get(status, 0) for status in JobStatus}


def _state_name(status: JobStatus) -> str:
    return status.label.replace(" ", "_")
