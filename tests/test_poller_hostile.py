"""The poller against hostile batch replies: one bad entry costs its own job, never the poller.

Each test runs a WujieClient against a scripted gateway on loopback (tests/hostile.py) whose
batch replies the test writes, entry by entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from wujie_async import (
    ImageJob,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    Limits,
    PollPolicy,
    ProtocolError,
    RetryPolicy,
    Timeouts,
    UnknownJobError,
    WujieClient,
    WujieError,
    _replies,
    snippet,
)
from wujie_async._job_info import EntryError, FailInfo, JobInfo

from .conftest import FAST_POLL, INSTANT_RETRY
from .helpers import eventually
from .hostile import ScriptedGateway, scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio

IMAGE = {"url": "https://cdn.example/x.png", "b64_json": None, "revised_prompt": None}


def done(key: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "status": 4, "complete_percent": 100, "images": [IMAGE], **extra}


def client_for(gateway: ScriptedGateway, **kwargs: Any) -> WujieClient:
    kwargs.setdefault("poll", FAST_POLL)
    kwargs.setdefault("retry", INSTANT_RETRY)
    return WujieClient(throwaway_credentials(), base_url=gateway.base_url, **kwargs)


async def submit(client: WujieClient, count: int, **kwargs: Any) -> list[ImageJob]:
    return [
        await client.images.submit(prompt=f"p{i}", model="dall-e-2", **kwargs) for i in range(count)
    ]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "wujie_async" and r.levelno >= logging.WARNING]


async def outcome(job: ImageJob) -> Any:
    try:
        return await job.result(timeout=10)
    except WujieError as exc:
        return exc


# --- item 4: one hostile entry never kills the poller ------------------------------------------
HOSTILE_FIRST_REPORT: dict[int, dict[str, Any]] = {
    # Running entries with hostile numbers: the job carries on and succeeds on the next ask.
    1: {"status": 1, "expected_seconds": math.nan, "complete_percent": math.inf},
    2: {"status": 1, "expected_seconds": math.inf, "complete_percent": -5},
    3: {"status": 1, "expected_seconds": -30, "complete_percent": 1e300},
    4: {"status": 1, "expected_seconds": 1e308, "queue_before_num": "many"},
    5: {"status": 0, "expected_seconds": "soon", "integral_cost": {"a": 1}},
}
HOSTILE_FINAL_REPORT: dict[int, dict[str, Any]] = {
    # Terminal failures with hostile fail codes: each fails its own job, with no code.
    6: {"status": 3, "fail_message": {"fail_code": "\u00b2", "fail_message": "superscript"}},
    7: {"status": 3, "fail_message": {"fail_code": "9" * 5000, "fail_message": "5,000 digits"}},
    8: {"status": 3, "fail_message": {"fail_code": [1], "fail_message": 42}},
    9: {"status": 5, "fail_message": ["not", "an", "object"]},
}
MALFORMED = 10  # its only entry has a status that means nothing: fails after the grace period
STATUS_ENDED = 11


@pytest.mark.long
async def test_hostile_entries_fail_only_their_own_job(caplog: pytest.LogCaptureFixture) -> None:
    asks: Counter[str] = Counter()

    def script(keys: list[str]) -> list[Any]:
        entries: list[Any] = [{"nokey": True}, "junk", None]  # unasked noise in every reply
        for key in keys:
            asks[key] += 1
            index = int(key[1:])
            if index in HOSTILE_FIRST_REPORT and asks[key] == 1:
                entries.append({"key": key, **HOSTILE_FIRST_REPORT[index]})
            elif index in HOSTILE_FINAL_REPORT:
                entries.append({"key": key, **HOSTILE_FINAL_REPORT[index]})
            elif index == MALFORMED:
                entries.append({"key": key, "status": "done"})
            elif index == STATUS_ENDED:
                entries.append({"key": key, "status": -1, "fail_message": None})
            else:
                entries.append(done(key))
        return entries

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        jobs = await submit(client, 12)
        results = [await outcome(job) for job in jobs]
        for index in (0, *HOSTILE_FIRST_REPORT):
            assert not isinstance(results[index], BaseException), (index, results[index])
            assert results[index].status == 4
            assert 0 <= jobs[index].progress <= 100
        for index in HOSTILE_FINAL_REPORT:
            error = results[index]
            assert isinstance(error, JobFailedError), (index, error)
            assert error.fail_code is None
        assert isinstance(results[MALFORMED], JobProtocolError)
        assert isinstance(results[MALFORMED], ProtocolError)
        assert "malformed" in str(results[MALFORMED])
        ended = results[STATUS_ENDED]
        assert type(ended) is JobFailedError and "without a result" in str(ended)
        assert jobs[STATUS_ENDED].status_name == "ended without a result"
        # The poller lives on: a new submit is polled and resolves.
        [late] = await submit(client, 1)
        assert (await late.result(timeout=10)).status == 4
    assert all("Traceback" not in r.getMessage() for r in warnings_of(caplog))


def test_read_drops_or_clamps_non_finite_and_absurd_numbers() -> None:
    raw = json.loads(
        '{"key":"K","status":1,"expected_seconds":NaN,"complete_percent":Infinity,'
        '"integral_cost":-Infinity,"queue_before_num":1e400,"start_gen_time":"\\u001b[2J",'
        '"complete_time":Infinity}'
    )
    entry = JobInfo.read(raw)
    assert entry.complete_time is None
    assert entry.expected_seconds is None and entry.complete_percent is None
    assert entry.integral_cost is None and entry.queue_before_num is None
    assert entry.start_gen_time is None
    clamped = JobInfo.read(
        {"key": "K", "status": 1, "expected_seconds": -4, "complete_percent": 250}
    )
    # A negative estimate is none at all (-1 is how gateways often say so), not "ending now".
    assert clamped.expected_seconds is None and clamped.complete_percent == 100
    for unknown in (-1, -1.0, "-1", -0.5, -(10**30)):
        assert (
            JobInfo.read({"key": "K", "status": 1, "expected_seconds": unknown}).expected_seconds
            is None
        )
    assert JobInfo.read({"key": "K", "status": 1, "expected_seconds": 0}).expected_seconds == 0
    # Numeric text reads as the whole numbers do: ASCII, no underscores.
    for text in ("\u0664\u0662", "1_0", "\uff11\uff12", "\u00b2"):
        entry = JobInfo.read(
            {"key": "K", "status": 1, "expected_seconds": text, "complete_percent": text}
        )
        assert entry.expected_seconds is None and entry.complete_percent is None, text
    entry = JobInfo.read(
        {"key": "K", "status": 1, "expected_seconds": " 12.5 ", "complete_percent": "4e1"}
    )
    assert entry.expected_seconds == 12.5 and entry.complete_percent == 40
    absurd = JobInfo.read({"key": "K", "status": 1, "expected_seconds": 1e300})
    assert absurd.expected_seconds == 86_400
    for status in ("done", 2**40, [1], None, True, False, 4.5, "4.5", "0x4"):  # true: no status
        with pytest.raises(EntryError, match=r"^status: "):
            JobInfo.read({"key": "K", "status": status})
    for status, read in ((4, 4), (4.0, 4), ("4", 4), (" -1 ", -1), ("4.0", 4), (2**31, 2**31)):
        assert JobInfo.read({"key": "K", "status": status}).status == read
    fields = ("complete_percent", "expected_seconds", "integral_cost", "queue_before_num")
    booleans = JobInfo.read({"key": "K", "status": 1, **dict.fromkeys(fields, True)})
    assert all(getattr(booleans, name) is None for name in fields)
    failed = JobInfo.read({"key": "K", "status": 3, "fail_message": {"fail_code": True}})
    assert isinstance(failed.fail_message, FailInfo) and failed.fail_message.fail_code is None


def test_an_image_field_that_is_not_text_is_dropped_not_the_entry() -> None:
    # A revised_prompt that is an object, or a b64_json that is a number beside a good url,
    # failed the whole entry: the job (paid) ended JobProtocolError and its image was lost.
    url = "https://files.example/a.png"
    images = [
        {"url": url, "revised_prompt": {"text": "a fox"}},
        {"url": url, "b64_json": 5, "revised_prompt": 7},
        {"url": ["x"], "b64_json": "aGk="},
    ]
    entry = JobInfo.read({"key": "K", "status": 4, "images": images})
    assert entry.images is not None
    assert [(i.url, i.b64_json, i.revised_prompt) for i in entry.images] == [
        (url, None, None), (url, None, None), (None, "aGk=", None),
    ]  # fmt: skip
    bad: object
    # Not a list of objects: the entry is unreadable.
    for bad in ("a.png", [1], ["a.png"], 0, {"url": url}):
        with pytest.raises(EntryError, match=r"^images(\[0\])?: "):
            JobInfo.read({"key": "K", "status": 4, "images": bad})
    # An empty object is an empty list as Lua's cjson writes one, and a null item an image
    # not made yet: neither costs a running job its status.
    for empty, read in (({}, ()), ([None], (None,))):
        entry = JobInfo.read({"key": "K", "status": 1, "images": empty})
        assert entry.images is not None
        assert tuple(image.url for image in entry.images) == read


def test_an_unreadable_entry_names_its_field_and_rule_never_its_value() -> None:
    # The reason reaches a WARNING line and a JobProtocolError: the entry is hostile input.
    hostile = "\x1b]0;PWNED\x07 sk-secret-token"
    cases = [
        ({"status": 1}, "key: required, as text"),
        ({"key": ["K"], "status": 1}, "key: required, as text"),
        ({"key": "K"}, "status: required"),
        ({"key": "K", "status": hostile}, "status: must be a whole number from -2**31 to 2**31"),
        ({"key": "K", "status": True}, "status: must be a number, not a boolean"),
        ({"key": "K", "status": 4, "images": hostile}, "images: must be a list of objects"),
        ({"key": "K", "status": 4, "images": [{}, hostile]}, "images[1]: must be an object"),
    ]
    for raw, said in cases:
        with pytest.raises(EntryError) as info:
            JobInfo.read(raw)
        assert str(info.value).startswith(said), (raw, str(info.value))
        assert "PWNED" not in str(info.value) and "secret" not in str(info.value)
        assert info.value.field == said.split(":")[0]
    for raw in (None, [], "K", 4):
        with pytest.raises(EntryError, match=r"^entry: must be an object"):
            JobInfo.read(raw)
    # The poller's reading of a reply says the same, and keeps the sound entries.
    listed = [{"key": "A", "status": hostile}, {"key": "B", "status": 1}]
    reading = _replies.read({"list": listed}, None)
    assert list(reading.entries) == ["B"] and reading.bad_entries == 1
    assert reading.malformed == {"A": reading.first_problem}
    assert reading.first_problem.startswith("status: must be a whole number")


def test_optional_fields_are_read_as_their_types_or_dropped() -> None:
    entry = JobInfo.read(
        {
            "key": "K", "status": 1, "complete_percent": 50, "expected_seconds": "12.5",
            "queue_before_num": 3.0, "integral_cost": 2, "start_gen_time": 1796000000,
            "complete_time": "2026-12-07 10:00:00", "fail_message": {"fail_code": " 12 "},
            "unknown": object(),
        }
    )  # fmt: skip
    assert (entry.complete_percent, entry.expected_seconds) == (50.0, 12.5)
    assert type(entry.complete_percent) is float and type(entry.integral_cost) is float
    assert entry.queue_before_num == 3 and type(entry.queue_before_num) is int
    assert entry.start_gen_time == 1796000000.0 and type(entry.start_gen_time) is float
    assert entry.complete_time == "2026-12-07 10:00:00"
    assert isinstance(entry.fail_message, FailInfo) and entry.fail_message.fail_code == 12
    # Text a terminal would act on, or too long to be a time, is dropped: an escape, a
    # right-to-left override, a line break.
    for text in ("\x1b[2J", "2026\u202e01", "10:00\n", "9" * 65):
        assert JobInfo.read({"key": "K", "status": 1, "complete_time": text}).complete_time is None
    for code in ("9" * 19, 10**18, 1.5, "0x1", True, [1]):
        failed = JobInfo.read({"key": "K", "status": 3, "fail_message": {"fail_code": code}})
        assert isinstance(failed.fail_message, FailInfo) and failed.fail_message.fail_code is None
    for fail in (["not", "an", "object"], 5, True):
        assert JobInfo.read({"key": "K", "status": 3, "fail_message": fail}).fail_message is None
    said = JobInfo.read({"key": "K", "status": 3, "fail_message": "out of credit"})
    assert said.fail_message == "out of credit"


def test_reading_a_reply_leaves_one_object_per_entry_for_the_garbage_collector() -> None:
    """Entries read from a reply are held until the reply is dispatched: each object they
    hold counts towards the collector's next young collection. A pydantic model left about
    four per entry (six or seven with images), one more per image."""
    listed: list[dict[str, Any]] = [
        {"key": f"K{i}", "status": 1, "complete_percent": 41.5, "expected_seconds": 6.2,
         "images": [], "fail_message": None, "start_gen_time": 1796000000.125}
        for i in range(50)
    ]  # fmt: skip
    done_ = [{"key": f"D{i}", "status": 4, "images": [IMAGE, IMAGE]} for i in range(50)]
    asked = frozenset(f"{e['key']}" for e in listed + done_)
    _replies.read({"list": listed + done_}, asked)  # warm: caches, interned names
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        reading = _replies.read({"list": listed}, asked)
        running = gc.get_count()[0] - before
        before = gc.get_count()[0]
        finished = _replies.read({"list": done_}, asked)
        ended = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(reading.entries) == len(finished.entries) == 50
    assert running <= 50 + 20, running  # the entries, and the reading's few containers
    assert ended <= 50 * 4 + 20, ended  # an entry, its tuple of images and two images


async def test_a_paid_image_beside_a_malformed_revised_prompt_is_delivered() -> None:
    image = {"url": "https://files.example/a.png", "revised_prompt": {"nested": True}}

    def script(keys: list[str]) -> list[dict[str, object]]:
        return [{"key": key, "status": 4, "images": [image], "integral_cost": 2} for key in keys]

    async with scripted_gateway(script) as gateway, client_for(gateway) as c:
        [job] = await submit(c, 1, job_timeout=20)
        result = await asyncio.wait_for(job, 10)
        assert [i.url for i in result.images] == [image["url"]]
        assert job.points_charged == 2


# --- item 10: a flood of junk entries is bounded work and one warning per reply ---------------
def _junk(count: int) -> bytes:
    # Keyless entries, entries for keys nobody asked about, and malformed ones with no key.
    parts = []
    for i in range(count):
        if i % 3 == 0:
            parts.append(b"{}")
        elif i % 3 == 1:
            parts.append(b'{"key":"Z%d","status":4}' % i)
        else:
            parts.append(b'{"status":"x"}')
    return b",".join(parts)


async def test_a_flood_of_junk_entries_does_not_stall_or_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    junk = _junk(200_000)

    def script(keys: list[str]) -> bytes:
        good = b",".join(json.dumps(done(key)).encode() for key in keys)
        return b"[" + junk + b"," + good + b"]"

    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        started = time.monotonic()
        jobs = await submit(client, 20)
        results = await asyncio.gather(*(job.result(timeout=20) for job in jobs))
        elapsed = time.monotonic() - started
        assert [r.status for r in results] == [4] * 20
        assert elapsed < 15, elapsed  # the old per-entry path took tens of seconds here
        calls = client.stats.batch_calls
    warnings = warnings_of(caplog)
    assert 0 < len(warnings) <= calls, (len(warnings), calls)  # one summary line per reply
    assert "200000 entries for keys not asked about" in warnings[0].getMessage()


@pytest.mark.long
async def test_repeated_entries_of_one_key_are_read_a_bounded_number_of_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def script(keys: list[str]) -> list[Any]:
        # 20,000 copies of each asked key's entry, half of them malformed.
        return [
            entry
            for key in keys
            for _ in range(10_000)
            for entry in ({"key": key, "status": "x"}, done(key))
        ]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        jobs = await submit(client, 2)
        started = time.monotonic()
        assert [(await job.result(timeout=20)).status for job in jobs] == [4, 4]
        assert time.monotonic() - started < 10
        calls = client.stats.batch_calls
    assert len(warnings_of(caplog)) <= calls  # not one line per malformed copy


def _generating(key: str, percent: float) -> dict[str, Any]:
    return {"key": key, "status": 1, "complete_percent": percent, "expected_seconds": 0.1}


@pytest.mark.parametrize("position", [0, 3, 4, 7, 9])
async def test_a_key_repeated_past_the_bound_still_ends_on_its_terminal_report(
    position: int, caplog: pytest.LogCaptureFixture
) -> None:
    # "list may ... repeat a key": ten copies of it, nine of them stale "generating" reports and
    # the one that ends the job at any position (before, the fifth copy on was never read).
    def script(keys: list[str]) -> list[Any]:
        copies = [_generating(key, 10) for key in keys for _ in range(9)]
        for i, key in enumerate(keys):
            copies.insert(i * 10 + position, done(key))
        return copies

    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        jobs = await submit(client, 3)
        results = await asyncio.gather(*(job.result(timeout=10) for job in jobs))
    assert [r.status for r in results] == [4, 4, 4]
    said = " ".join(r.getMessage() for r in warnings_of(caplog))
    assert "keys not asked about" not in said  # a repeat is not a stranger's key
    if position >= 4:
        assert "repeats of keys listed more than 4 times" in said


async def test_the_most_advanced_of_repeated_running_reports_stands_for_the_job() -> None:
    # The list's order says nothing of age: a stale "queued" copy listed first must not hide
    # that the job is generating (before, the first copy won and progress stayed at "queued").
    calls = 0

    def script(keys: list[str]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls < 3:
            return [
                entry
                for key in keys
                for entry in (
                    {"key": key, "status": 0, "queue_before_num": 3},
                    _generating(key, 40),
                    _generating(key, 20),
                )
            ]
        return [done(key) for key in keys]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        [job] = await submit(client, 1)
        seen = [(update.status, update.progress) async for update in job.updates()]
    assert (1, 40) in seen, seen
    assert not any(status == 0 for status, _ in seen), seen


@pytest.mark.parametrize(
    ("status", "fail_message", "expected"),
    [
        (3, "ABSENT", "failed: the gateway gave no reason"),
        (3, None, "failed: the gateway gave no reason"),
        (3, {}, "failed: the gateway gave no reason"),
        (3, {"fail_code": 12}, "failed (fail_code=12): the gateway gave no reason"),
        (5, None, "rejected by moderation: the gateway gave no reason"),
        (5, {"fail_code": 4, "fail_message": "nsfw"}, "rejected by moderation (fail_code=4): nsfw"),
        (-1, None, "failed: the gateway ended the job without a result (status -1)"),
    ],
)
async def test_a_failure_without_a_reason_is_worded_without_none(
    status: int, fail_message: Any, expected: str
) -> None:
    def script(keys: list[str]) -> list[Any]:
        entries = [{"key": key, "status": status, "fail_message": fail_message} for key in keys]
        if fail_message == "ABSENT":
            for entry in entries:
                del entry["fail_message"]
        return entries

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        [job] = await submit(client, 1)
        with pytest.raises(JobFailedError) as info:
            await job
    assert str(info.value) == f"job K00000: {expected}"
    assert "None" not in str(info.value)


# --- slow replies: estimates count from the ask; keys are chosen when a call slot is free ------
class _SlowGateway:
    """A gateway that reads each job's state when a call arrives (exact estimates for jobs of
    ``lengths`` seconds) and sends the reply ``latency`` seconds later: a slow network or a
    busy gateway. ``seen``: when each call arrived."""

    def __init__(self, lengths: dict[str, float], latency: float) -> None:
        self.lengths = lengths
        self.latency = latency
        self.created: dict[str, float] = {}
        self.seen: list[float] = []

    async def script(self, keys: list[str]) -> list[Any]:
        now = time.monotonic()
        self.seen.append(now)
        listed = []
        for key in keys:
            left = self.created[key] + self.lengths[key] - now
            listed.append(
                done(key) if left <= 0 else _generating(key, 50) | {"expected_seconds": left}
            )
        await asyncio.sleep(self.latency)
        return listed

    async def submit(self, client: WujieClient) -> ImageJob:
        """One job, its length counted from now."""
        [job] = await submit(client, 1)
        self.created[job.key] = time.monotonic()
        return job


@contextlib.asynccontextmanager
async def _slow_client(
    lengths: dict[str, float], latency: float
) -> AsyncIterator[tuple[_SlowGateway, ScriptedGateway, WujieClient]]:
    """A client at the default policy against a :class:`_SlowGateway`."""
    slow = _SlowGateway(lengths, latency)
    async with (
        scripted_gateway(slow.script) as gateway,
        client_for(gateway, poll=PollPolicy()) as client,
    ):
        yield slow, gateway, client


@pytest.mark.long
async def test_a_slow_reply_does_not_push_the_predicted_end_back_by_its_length() -> None:
    # The gateway reads the state when the call arrives and answers 3 s later. An estimate
    # counted from the reply's arrival put the end 3 s late, and the job was first asked
    # about 3.4 s after it ended (6.4 s before it resolved); counted from the ask, 0.6 s.
    async with _slow_client({"K00000": 8.0}, 3.0) as (slow, _, client):
        job = await slow.submit(client)
        await job.result(timeout=30)
    end = slow.created["K00000"] + 8.0
    first_after_end = min(t for t in slow.seen if t >= end)
    assert first_after_end - end < 1.5, [round(t - slow.created["K00000"], 2) for t in slow.seen]


@pytest.mark.long
async def test_keys_due_while_every_call_slot_is_taken_share_the_next_call() -> None:
    # Slow replies (2 s), jobs ending 0.3 s apart: every call slot is taken most of the time.
    # Keys chosen before waiting for a slot went out one per call (45 calls for 40 jobs, p50
    # 8.6 s late); chosen once a slot frees, those due meanwhile share a call.
    count = 30
    lengths = {f"K{i:05d}": 3 + 0.3 * i for i in range(count)}
    async with _slow_client(lengths, 2.0) as (slow, gateway, client):
        jobs = [await slow.submit(client) for _ in range(count)]
        await asyncio.gather(*(job.result(timeout=60) for job in jobs))
    assert len(gateway.asked) < 0.8 * count, [len(keys) for keys in gateway.asked]


# --- item 11: an over-cap reply is split; the ended-jobs cache keeps no image bytes -------------
INLINE = "A" * (2 * 1024 * 1024)  # a ~2 MB inline image per job: five of them pass the 8 MiB cap


@pytest.mark.long
async def test_an_over_cap_batch_is_split_down_to_one_key() -> None:
    too_big = 5  # the sixth job's entry alone is over the cap
    # Queued until a call asks about all six (on a loaded host the poller's first calls came
    # between the submits): that call is the full one, however they interleave.
    seen: set[str] = set()
    queued_calls = 0

    def script(keys: list[str]) -> list[Any]:
        nonlocal queued_calls
        seen.update(keys)
        if len(seen) < 6:
            queued_calls += 1
            return [{"key": key, "status": 0} for key in keys]
        entries = []
        for key in keys:
            image = {"url": None, "b64_json": INLINE, "revised_prompt": None}
            if int(key[1:]) == too_big:
                image["b64_json"] = INLINE * 5
            entries.append({"key": key, "status": 4, "images": [image]})
        return entries

    retry = RetryPolicy(initial_wait=0.0, max_wait=0.01, max_attempts=2)
    async with (
        scripted_gateway(script) as gateway,
        client_for(gateway, retry=retry, limits=Limits(max_response_bytes=8 * 1024 * 1024)) as c,
    ):
        jobs = await submit(c, 6, job_timeout=20)
        results = [await outcome(job) for job in jobs]
        for result in results[:too_big]:
            assert not isinstance(result, BaseException), result
            assert result.images[0].b64_json == INLINE
        error = results[too_big]
        assert isinstance(error, JobProtocolError), error
        assert "cap" in str(error) and "max_response_bytes" in str(error)
        # The full call came back too large (never retried as it is); then halves, down to one.
        sizes = [len(keys) for keys in gateway.asked][queued_calls:]
        assert sizes[0] == 6 and max(sizes[1:]) <= 3 and 1 in sizes, sizes

        # The ended-jobs cache keeps none of those bytes alive: once the caller lets go of a
        # job, it is freed, and attaching its key again gives its outcome without the bytes.
        key = jobs[0].key
        held = weakref.ref(jobs[0])
        del jobs, results, result
        gc.collect()
        assert held() is None
        again = c.images.attach(key)
        assert again.done() and again.status == 4
        assert (await again).images[0].b64_json is None


async def test_an_entry_no_json_reader_takes_costs_its_own_job_only() -> None:
    # A 5,000-digit integer (past Python's digit limit) or a field nested 100,000 deep made the
    # whole reply "not JSON": every job of the call waited out its deadline (up to 49 others
    # for 15 minutes). A huge integer now reads as infinite, a value no field takes; a reply
    # nested too deep is asked about in halves, down to the one job it concerns.
    digits = b"9" * 5000
    deep = b"[" * 100_000 + b"]" * 100_000
    image = b'[{"url": "https://files.example/a.png"}]'

    def script(keys: list[str]) -> bytes:
        entries = []
        for key in keys:
            fields = b'"status": 4, "images": ' + image
            if key == "K00001":
                fields = b'"status": ' + digits  # malformed: it fails after the grace period
            elif key == "K00002":
                fields += b', "integral_cost": ' + digits  # an optional field: dropped
            elif key == "K00003":
                fields += b', "extra": ' + deep
            entries.append(b'{"key": "' + key.encode() + b'", ' + fields + b"}")
        return b"[" + b", ".join(entries) + b"]"

    async with scripted_gateway(script) as gateway, client_for(gateway) as c:
        jobs = await submit(c, 5, job_timeout=20)
        results = [await outcome(job) for job in jobs]
        for index in (0, 2, 4):
            assert not isinstance(results[index], BaseException), results[index]
        assert isinstance(results[1], JobProtocolError), results[1]
        assert isinstance(results[3], JobProtocolError), results[3]
        assert "nested deeper" in str(results[3])
        assert jobs[2].points_charged is None  # the huge cost was dropped, not read


async def test_a_short_burst_of_unreadable_replies_fails_no_job() -> None:
    # A gateway that sends oversized or over-nested replies for a moment (a bomb, a bad
    # deploy): asked about alone, each job waits out the unknown-key grace before it fails,
    # as a job listed only in malformed entries does. All of them failed in half a second.
    deep = b"[" * 100_000 + b"]" * 100_000
    first: list[float] = []

    def script(keys: list[str]) -> bytes | list[Any]:
        now = time.monotonic()
        first.append(now)
        if now - first[0] < 0.4:
            return deep
        return [{"key": key, "status": 4, "images": [{"url": "https://f.example/a.png"}]}
                for key in keys]  # fmt: skip

    async with scripted_gateway(script) as gateway, client_for(gateway) as c:
        jobs = await submit(c, 6, job_timeout=20)
        results = [await outcome(job) for job in jobs]
        assert all(not isinstance(result, BaseException) for result in results), results
        assert 1 in [len(keys) for keys in gateway.asked]  # it was asked down to one key


async def test_one_unreadable_reply_about_a_job_asked_rarely_fails_nothing() -> None:
    # The grace counted from the job's last listing: a job asked rarely (a long estimate, here
    # a first ask later than the grace) met by one bomb failed at once.
    deep = b"[" * 100_000 + b"]" * 100_000
    calls: list[list[str]] = []

    def script(keys: list[str]) -> bytes | list[Any]:
        calls.append(keys)
        if len(calls) == 1:
            return deep
        return [{"key": key, "status": 4, "images": [{"url": "https://f.example/a.png"}]}
                for key in keys]  # fmt: skip

    poll = dataclasses.replace(FAST_POLL, first_poll_delay=1.5, unknown_key_grace=1.0)
    async with scripted_gateway(script) as gateway, client_for(gateway, poll=poll) as c:
        [job] = await submit(c, 1, job_timeout=20)
        result = await outcome(job)
        assert not isinstance(result, BaseException), result
        assert len(calls) == 2


async def test_a_gateway_refusing_even_one_key_per_call_is_not_flooded() -> None:
    # Every call refused as a bad parameter (20010001), one key or many: a body the gateway
    # never takes. Halves down to one key, and then each key every min_interval: 740 calls a
    # second for 200 jobs. A key refused alone waits max_interval before it is asked again.
    def script(keys: list[str]) -> web.Response:
        return web.json_response({"code": "20010001", "message": "param error", "data": None})

    async with scripted_gateway(script) as gateway, client_for(gateway) as c:
        jobs = await submit(c, 4, job_timeout=1.5)
        results = [await outcome(job) for job in jobs]
        assert all(isinstance(result, JobTimeoutError) for result in results), results
    calls = len(gateway.asked)
    # A round every max_interval, each a call of 4 keys split down to one (7 calls): about
    # 35 in all, not a round every min_interval (about 350).
    assert calls <= 7 * (1.5 / FAST_POLL.max_interval + 3), calls


async def test_attach_right_after_the_end_returns_the_same_job() -> None:
    async with (
        scripted_gateway(lambda keys: [done(key) for key in keys]) as gateway,
        client_for(gateway) as client,
    ):
        [job] = await submit(client, 1)
        await job
        assert client.images.attach(job.key) is job


# --- item 13: a deadline fires on time while its key is on the wire -----------------------------
def _held_then_done(seconds: float) -> tuple[list[ScriptedGateway], Any]:
    """A script that holds each reply for ``seconds`` (or until the gateway shuts down), then
    says the jobs finished; put the gateway in the returned list once it is up."""
    gateway_ref: list[ScriptedGateway] = []

    async def script(keys: list[str]) -> list[Any]:
        try:
            await asyncio.wait_for(gateway_ref[0].released.wait(), seconds)
        except TimeoutError:
            pass
        return [done(key) for key in keys]

    return gateway_ref, script


async def _a_job_times_out_on_time(client: WujieClient) -> None:
    """A job of ``job_timeout=1`` submitted now fails with JobTimeoutError within 1.8 s."""
    started = time.monotonic()
    [job] = await submit(client, 1, job_timeout=1)
    with pytest.raises(JobTimeoutError):
        await job.result(timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 1.8, elapsed


@pytest.mark.long
async def test_a_deadline_fires_while_the_poll_is_in_flight() -> None:
    gateway_ref, script = _held_then_done(5)
    async with scripted_gateway(script) as gateway:
        gateway_ref.append(gateway)
        async with client_for(gateway, timeouts=Timeouts(request=30)) as client:
            await _a_job_times_out_on_time(client)
            assert gateway.asked  # the key was on the wire when its deadline passed


async def test_a_deadline_fires_while_every_call_slot_is_taken() -> None:
    # One call slot, held by a call the gateway does not answer: a job submitted after it
    # waits for the slot outside any call, and its deadline still fires on time.
    gateway_ref, script = _held_then_done(8)
    async with scripted_gateway(script) as gateway:
        gateway_ref.append(gateway)
        limits = Limits(max_concurrent_polls=1)
        async with client_for(gateway, timeouts=Timeouts(request=30), limits=limits) as client:
            [first] = await submit(client, 1)
            await eventually(lambda: gateway.asked, timeout=5, interval=0.01, what="a call")
            await _a_job_times_out_on_time(client)
            assert gateway.asked == [[first.key]]  # it was never asked: no slot came free


# --- item 14: unknown statuses are remembered and logged within bounds -------------------------
@pytest.mark.long
async def test_ten_thousand_unknown_statuses_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    statuses = iter(range(100, 10_100))

    def script(keys: list[str]) -> list[Any]:
        return [
            {"key": key, "status": status}
            if (status := next(statuses, None)) is not None
            else done(key)
            for key in keys
        ]

    poll = PollPolicy(
        first_poll_delay=0.001, min_interval=0.001, max_interval=0.005, batch_fill_horizon=0.01
    )
    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with scripted_gateway(script) as gateway, client_for(gateway, poll=poll) as client:
        jobs = await submit(client, 200)
        results = await asyncio.gather(*(job.result(timeout=30) for job in jobs))
        assert {r.status for r in results} == {4}
        assert next(statuses, None) is None  # all 10,000 statuses were reported
    unknown = [r for r in warnings_of(caplog) if "unknown job status" in r.getMessage()]
    # The first, then through the repeated-warnings gate (64 lines, one per new status,
    # before), and the line that says no more are remembered.
    assert 0 < len(unknown) <= 3, [r.getMessage() for r in unknown]


# --- item 12: server text is cleaned; keys are matched exactly ---------------------------------
async def test_server_text_in_errors_is_one_short_line() -> None:
    message = "line one\nline two\r\n" + "x" * 5000

    def script(keys: list[str]) -> list[Any]:
        return [
            {"key": key, "status": 3, "fail_message": {"fail_code": 7, "fail_message": message}}
            for key in keys
        ]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        [job] = await submit(client, 1)
        with pytest.raises(JobFailedError) as info:
            await job
    text = str(info.value)
    assert "\n" not in text and "\r" not in text and len(text) < 500
    assert info.value.fail_code == 7 and info.value.fail_message == snippet(message)


@pytest.mark.skipif(
    "\x1b" in snippet("\x1b[2J"), reason="snippet() strips control characters on another branch"
)
async def test_escape_sequences_never_reach_error_messages() -> None:
    def script(keys: list[str]) -> list[Any]:
        evil = "\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mred\x9b"
        return [{"key": key, "status": 3, "fail_message": evil} for key in keys]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        [job] = await submit(client, 1)
        with pytest.raises(JobFailedError) as info:
            await job
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in str(info.value))


async def test_keys_with_control_characters_are_not_matched() -> None:
    def script(keys: list[str]) -> list[Any]:
        return [done(variant) for key in keys for variant in (key + "\n", " " + key, key + "\x00")]

    poll = PollPolicy(first_poll_delay=0.01, min_interval=0.02, unknown_key_grace=0.3)
    async with scripted_gateway(script) as gateway, client_for(gateway, poll=poll) as client:
        [job] = await submit(client, 1)
        with pytest.raises(UnknownJobError):
            await job.result(timeout=10)


# --- API.md: progress fields are read when present and ignored when unreadable -----------------
async def test_progress_fields_are_exposed_and_hostile_ones_ignored() -> None:
    def script(keys: list[str]) -> list[Any]:
        good, bad = keys[0], keys[1]
        return [
            done(
                good,
                queue_before_num=0,
                integral_cost=12.5,
                start_gen_time="2024-05-01 10:00:00",
                complete_time=1714557600000,
            ),
            done(
                bad,
                queue_before_num=-3,
                integral_cost="lots",
                start_gen_time={"at": 1},
                complete_time="\x1b[2J" + "x" * 500,
            ),
        ][: len(keys)]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        good, bad = await submit(client, 2)
        await good.result(timeout=10)
        await bad.result(timeout=10)
    assert good.queue_position == 0 and good.points_charged == 12.5
    assert good.gateway_start_time == "2024-05-01 10:00:00"
    assert good.gateway_complete_time == 1714557600000
    assert bad.queue_position is None and bad.points_charged is None
    assert bad.gateway_start_time is None and bad.gateway_complete_time is None


@pytest.mark.long
async def test_queue_position_is_kept_while_queued() -> None:
    seen: list[int | None] = []
    asks: Counter[str] = Counter()

    def script(keys: list[str]) -> list[Any]:
        entries = []
        for key in keys:
            asks[key] += 1
            if asks[key] < 3:
                entries.append({"key": key, "status": 0, "queue_before_num": 10 - asks[key]})
            else:
                entries.append(done(key))
        return entries

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        [job] = await submit(client, 1)
        while not job.done():
            seen.append(job.queue_position)
            await asyncio.sleep(0.005)
    assert 9 in seen and 8 in seen


class _RefusingGateway(_SlowGateway):
    """A :class:`_SlowGateway` (no latency) that refuses every other batch call with a 429."""

    def __init__(self, lengths: dict[str, float]) -> None:
        super().__init__(lengths, 0.0)
        self.refused = 0

    async def script(self, keys: list[str]) -> list[Any]:
        if len(self.seen) % 2:
            self.seen.append(time.monotonic())
            self.refused += 1
            raise web.HTTPTooManyRequests()
        return await super().script(keys)


@pytest.mark.long
async def test_keys_due_while_the_429_brake_holds_calls_back_share_the_next_call() -> None:
    # Every other batch call refused with 429: the poll brake cuts in (about 2 calls/s) while
    # keys come due 0.2 s apart. Keys chosen before the call waited for the brake's slot went
    # out two per call, each call queued behind the others (25 calls; p50 2.6 s and up to
    # 6.6 s after the job ended); chosen when the brake lets a call go, those due meanwhile
    # share it (17 calls; p50 0.8 s, at most 1.8 s).
    count = 30
    lengths = {f"K{i:05d}": 3 + 0.2 * i for i in range(count)}
    refusing = _RefusingGateway(lengths)
    async with (
        scripted_gateway(refusing.script) as gateway,
        client_for(gateway, poll=PollPolicy()) as client,
    ):
        jobs = [await refusing.submit(client) for _ in range(count)]
        resolved: dict[str, float] = {}

        async def resolve(job: ImageJob) -> None:
            await job.result(timeout=60)
            resolved[job.key] = time.monotonic()

        await asyncio.gather(*(resolve(job) for job in jobs))
        assert client.stats.poll_rate_limit is not None  # the brake was on
    late = sorted(at - refusing.created[key] - lengths[key] for key, at in resolved.items())
    sizes = [len(keys) for keys in gateway.asked]
    assert late[count // 2] < 1.6 and late[-1] < 4.0, (late, sizes)
    assert refusing.refused >= 5, sizes


# --- API.md: the envelope's data is null on errors; a batch reply so is not "none listed" ------
async def test_a_batch_reply_with_null_data_is_a_failed_call_not_every_key_absent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``{"code":"200","data":null}``: read as "no key listed", every job of the call failed
    as unknown once it lasted the grace (0.2 s here), though the gateway had said nothing of
    them (paid jobs, their results never seen). It is a malformed reply: counted, one
    WARNING, its keys asked again, later each time (min_interval doubling to max_interval),
    and the job ends as the gateway says once it answers."""
    null_until: list[float] = []
    nulls = 0

    def script(keys: list[str]) -> web.Response | list[Any]:
        nonlocal nulls
        now = asyncio.get_running_loop().time()
        if not null_until:
            null_until.append(now + 0.6)  # three times the grace
        if now < null_until[0]:
            nulls += 1
            return web.json_response({"code": "200", "message": "success", "data": None})
        return [done(key) for key in keys]

    poll = dataclasses.replace(FAST_POLL, unknown_key_grace=0.2)
    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with scripted_gateway(script) as gateway, client_for(gateway, poll=poll) as client:
        [job] = await submit(client, 1)
        result = await job.result(timeout=10)
        assert len(result.images) == 1
        assert client.stats.batch_errors == nulls
    # Asked again after 0.03, 0.06, 0.12, 0.24, then 0.3 s: 5 or so in 0.6 s, not 20.
    assert 2 <= nulls <= 8, nulls
    said = [r.getMessage() for r in warnings_of(caplog) if "data is null" in r.getMessage()]
    # One line as it began, one at the close counting the rest (the repeated-warnings gate).
    assert len(said) == 2 and "like this" in said[1], said


async def test_absence_counts_from_the_first_reply_after_an_outage_of_the_batch_calls() -> None:
    """The grace ran from the submit (or the last listing), whatever the calls said: after an
    outage of the batch endpoint longer than the grace, the first reply that left a key out
    (a gateway catching up) failed it at once as unknown, though no reply had said it was
    absent for more than a moment: a paid job (never listed: "failed", which the command line
    resends) lost. Absence counts from the first reply that leaves a key out."""
    phase = {"calls": 0, "outage_until": 0.0, "caught_up": False}
    grace = 0.2

    def script(keys: list[str]) -> web.Response | list[Any]:
        now = asyncio.get_running_loop().time()
        phase["calls"] += 1
        if phase["calls"] == 1:  # before the outage: the first job is listed, running
            phase["outage_until"] = now + 3 * grace
            return [{"key": key, "status": 1} for key in keys if key == "K00000"]
        if now < phase["outage_until"]:
            return web.json_response({"code": "503", "message": "down", "data": None}, status=503)
        if not phase["caught_up"]:  # the first reply after it lists neither
            phase["caught_up"] = True
            return []
        return [done(key) for key in keys]

    poll = dataclasses.replace(FAST_POLL, unknown_key_grace=grace)
    async with scripted_gateway(script) as gateway, client_for(gateway, poll=poll) as client:
        jobs = await submit(client, 2)
        results = [await outcome(job) for job in jobs]
    assert [len(result.images) for result in results] == [1, 1], results

    # A key no reply lists still fails as unknown: once the replies after the outage have
    # left it out for the grace.
    phase.update(calls=0, caught_up=True)

    def never(keys: list[str]) -> web.Response | list[Any]:
        script(keys)  # an outage from the first call on, as above
        if asyncio.get_running_loop().time() < phase["outage_until"]:
            return web.json_response({"code": "503", "message": "down", "data": None}, status=503)
        return []

    async with scripted_gateway(never) as gateway, client_for(gateway, poll=poll) as client:
        [job] = await submit(client, 1)
        with pytest.raises(UnknownJobError):
            await job.result(timeout=10)
        ended = asyncio.get_running_loop().time()
    assert ended - phase["outage_until"] >= grace


async def test_a_key_absent_from_slow_replies_still_fails_as_unknown() -> None:
    """Absence was counted afresh whenever two replies about a key came more than the grace
    apart, failed calls between them or not: against a gateway whose replies take longer than
    the grace (a slow one under load; ``status``'s grace is 3 s), or with more keys in flight
    than the calls can ask about within it, a key no reply listed never failed as unknown. It
    was polled until its job deadline (hours), and ``status`` said "no answer" for a key the
    gateway had plainly answered it does not know."""
    grace = 0.2

    async def slow(keys: list[str]) -> list[Any]:
        await asyncio.sleep(1.5 * grace)  # every reply comes back after longer than the grace
        return []

    poll = dataclasses.replace(FAST_POLL, unknown_key_grace=grace)
    async with scripted_gateway(slow) as gateway, client_for(gateway, poll=poll) as client:
        [job] = await submit(client, 1)
        with pytest.raises(UnknownJobError):
            await job.result(timeout=5)
        assert len(gateway.asked) <= 4, gateway.asked  # the grace, not the deadline


@pytest.mark.long
async def test_a_thousand_null_data_replies_in_a_row_keep_their_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wait after a reply with no list doubled from the count of such replies in a row:
    past 1,024 (2,500 keys are 50 calls a round) 2**count overflowed, every call then failed
    "unexpectedly" with a traceback, and the wait fell back to min_interval."""
    caplog.set_level(logging.WARNING, logger="wujie_async")

    def script(keys: list[str]) -> web.Response:
        return web.json_response({"code": "200", "message": "success", "data": None})

    poll = dataclasses.replace(FAST_POLL, min_interval=0.01, max_interval=0.05)
    async with scripted_gateway(script) as gateway, client_for(gateway, poll=poll) as client:
        jobs = [client.images.attach(f"K{i:05d}", job_timeout=600) for i in range(2500)]
        await eventually(lambda: len(gateway.asked) > 1100, timeout=60, what="1,100 calls")
        for job in jobs:
            job.cancel()
    assert not [r for r in caplog.records if "unexpectedly" in r.getMessage()]


@pytest.mark.fake_clock
async def test_a_batch_call_retried_is_dated_by_its_answered_attempt() -> None:
    """A batch call's first attempt held 20 s and answered 503, the retry answered at once:
    the reply was dated when the call first went out, so the job's 30 s estimate was counted
    from 20 s too early, and the poller looked out for its end (asks every ``min_interval``)
    20 s before it was due. It looks out where the estimate, counted from the attempt that
    was answered, puts the end."""
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    answered: list[float] = []

    async def script(keys: list[str]) -> Any:
        calls.append(loop.time())
        if len(calls) == 1:
            await asyncio.sleep(20)
            busy = {"code": "500", "message": "busy", "data": None}
            return web.json_response(busy, status=503)
        if not answered:
            answered.append(loop.time())
            return [{"key": keys[0], "status": 1, "expected_seconds": 30}]
        if loop.time() < answered[0] + 30:
            return [{"key": keys[0], "status": 1}]
        return [{"key": keys[0], "status": 4, "images": [{"url": "http://127.0.0.1:9/0.png"}]}]

    policy = PollPolicy()
    async with (
        scripted_gateway(script) as gateway,
        WujieClient(
            throwaway_credentials(), base_url=gateway.base_url, retry=INSTANT_RETRY, poll=policy
        ) as client,
    ):
        job = await client.images.submit(prompt="a fox", model="dall-e-2")
        await job.result(timeout=200)
    assert answered and answered[0] - calls[0] >= 20  # the retry
    later = [when for when in calls if when > answered[0]]
    gaps = [(b - a, a) for a, b in itertools.pairwise(later)]
    lookout = next(when for gap, when in gaps if gap <= policy.min_interval * 1.1)
    assert lookout >= answered[0] + 30 - 5, (lookout - answered[0], [w - calls[0] for w in calls])
