"""Submits in progress (``_submitting``): aclose() racing submits, a stopped poller, and submit
replies whose key cannot be used (duplicate, malformed), against the emulator or a small fake
gateway."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wujie_async import (
    BusinessError,
    ClientStateError,
    Credentials,
    ImageJob,
    InvalidRequestError,
    JobCancelledError,
    Limits,
    ProtocolError,
    SubmitUncertainError,
    WujieClient,
)
from wujie_async._admission import _Slots
from wujie_async._keys import is_job_key
from wujie_async.emulator import FaultConfig

from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .helpers import stray_tasks
from .hostile import REPLIES, throwaway_credentials

pytestmark = pytest.mark.anyio

GENERATIONS = "/ai/wj/images/generations"
INFO = "/ai/wj/images/info"


# --- aclose() racing submits ---------------------------------------------------------------------
@pytest.mark.parametrize("with_journal", [False, True], ids=["no-journal", "journal"])
async def test_aclose_ends_every_pending_submit_promptly(
    emulator: EmulatorFactory, tmp_path: Path, with_journal: bool
) -> None:
    """Issue 9 item 1: 100 submits, 4 at a time, aclose() as the first ones come back."""
    journal = tmp_path / "jobs.sqlite" if with_journal else None
    # Each submit reply takes 20 ms, so at 50 ms a few submits are back, 4 are on the wire and
    # the rest wait for a slot.
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.02, endpoints=frozenset({"generations"}))
    before = asyncio.all_tasks()
    async with emulator(faults=faults, time_scale=0.05) as emu:
        client = make_client(emu, limits=Limits(max_concurrent_submits=4), journal=journal)
        await client.open()
        tasks = [
            asyncio.create_task(client.images.submit(prompt=f"p{i}", model="dall-e-2", tag=f"{i}"))
            for i in range(100)
        ]
        # Close once the first submits are back (about 50 ms; later on a loaded machine), so
        # the close always finds some done, some on the wire and most still waiting.
        await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait_for(client.aclose(), 5)
        _, pending = await asyncio.wait(tasks, timeout=2)
        assert not pending, f"{len(pending)} submit(s) still pending after aclose()"

        jobs: list[ImageJob] = []
        unsent: list[ClientStateError] = []
        uncertain: list[SubmitUncertainError] = []
        for task in tasks:
            assert not task.cancelled()
            error = task.exception()
            if error is None:
                jobs.append(task.result())
            elif isinstance(error, SubmitUncertainError):
                uncertain.append(error)
            elif isinstance(error, ClientStateError):
                unsent.append(error)
            else:
                raise AssertionError(f"unexpected submit error: {error!r}")
        assert all(job.done() for job in jobs), "a job was returned that will never settle"
        assert jobs and unsent, (len(jobs), len(uncertain), len(unsent))
        with pytest.raises(ClientStateError):
            await client.images.submit(prompt="late", model="dall-e-2")
        assert stray_tasks(before) == set()
        accepted = set(emu.gateway.store.jobs)

    # Nothing lost: every key the gateway accepted was returned, or its submit said uncertain.
    returned = {job.key for job in jobs}
    assert returned <= accepted
    assert len(accepted - returned) <= len(uncertain)
    if journal is None:
        return
    with sqlite3.connect(journal) as db:
        rows = db.execute("SELECT state, job_key, tag FROM submits").fetchall()
    states = [state for state, _, _ in rows]
    assert "intent" not in states  # every row classified, none left to become uncertain
    assert states.count("uncertain") == len(uncertain)
    journaled = {key for state, key, _ in rows if state in ("accepted", "succeeded")}
    assert returned <= journaled  # kept for resume()
    # What the client said was not sent is never recorded as possibly charged.
    unsent_tags = {tag for state, _, tag in rows if state == "unsent"}
    assert len(unsent_tags) + states.count("uncertain") + len(journaled) == len(rows)


async def test_stop_submitting_sends_nothing_more_and_keeps_what_was_sent(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A graceful stop: submits waiting for room end unsent at once (before the journal saw
    them), later ones are refused, and the job already accepted is still polled to its end."""
    journal = tmp_path / "jobs.sqlite"
    async with emulator(time_scale=0.05) as emu:
        limits = Limits(max_in_flight=1)
        async with make_client(emu, limits=limits, journal=journal) as client:
            first = await client.images.submit(prompt="first", model="dall-e-2", tag="1")
            waiting = [
                asyncio.create_task(
                    client.images.submit(prompt=f"p{i}", model="dall-e-2", tag=f"w{i}")
                )
                for i in range(3)
            ]
            await asyncio.sleep(0)  # each has started and waits for room (max_in_flight)
            client.stop_submitting()
            done, _ = await asyncio.wait(waiting, timeout=5)
            assert len(done) == 3, "a waiting submit was not ended at once"
            for task in waiting:
                error = task.exception()
                assert isinstance(error, ClientStateError), error
                assert "nothing was sent" in str(error) and "stop_submitting" in str(error)
            with pytest.raises(ClientStateError, match="nothing was sent"):
                await client.images.submit(prompt="late", model="dall-e-2")
            result = await first  # still polled to its end
            assert result.images
            assert len(emu.gateway.store.jobs) == 1  # only the first was ever sent
    with sqlite3.connect(journal) as db:
        rows = dict(db.execute("SELECT tag, state FROM submits").fetchall())
    assert rows == {"1": "succeeded"}  # the others never reached the journal: nothing to resend


async def test_drain_lets_submits_in_progress_finish(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.05, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults, time_scale=0.01) as emu:
        client = make_client(emu)
        await client.open()
        tasks = [
            asyncio.create_task(client.images.submit(prompt=f"{i}", model="dall-e-2"))
            for i in range(5)
        ]
        await asyncio.sleep(0.01)  # all five are on the wire
        await asyncio.wait_for(client.aclose(drain=True, timeout=10), 15)
        jobs = [task.result() for task in tasks]
        assert all(job.done() and job.exception() is None for job in jobs)


async def test_a_second_aclose_waits_for_the_first(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=1.0) as emu:
        client = make_client(emu)
        await client.open()
        job = await client.images.submit(prompt="x", model="dall-e-2")
        first = asyncio.create_task(client.aclose())
        await asyncio.sleep(0)
        await asyncio.wait_for(client.aclose(), 5)
        assert job.done()  # the second call returned only once the client was shut
        await first


@pytest.mark.long
async def test_a_cancel_by_the_caller_is_not_swallowed_during_close(
    emulator: EmulatorFactory,
) -> None:
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.5, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu:
        client = make_client(emu)
        await client.open()
        task = asyncio.create_task(client.images.submit(prompt="x", model="dall-e-2"))
        await asyncio.sleep(0.05)
        task.cancel()  # the caller's own cancel, then the client closes
        await asyncio.wait_for(client.aclose(), 5)
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_submit_ended_by_the_client_leaves_its_task_free_to_go_on(
    emulator: EmulatorFactory,
) -> None:
    """The client ends a submit by cancelling its task and takes that cancel back: the task
    that called submit() (a worker that goes on to other work) is not left with a cancel
    request, whether the submit waited for room (stop_submitting) or was on the wire (aclose);
    a caller's own cancel at the same moment still goes on."""
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.3, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults, time_scale=0.05) as emu:
        client = make_client(emu, limits=Limits(max_concurrent_submits=1))
        await client.open()
        on_wire = asyncio.Event()

        async def worker(prompt: str, *, first: bool = False) -> tuple[str, int]:
            try:
                if first:
                    on_wire.set()
                await client.images.submit(prompt=prompt, model="dall-e-2")
                outcome = "returned"
            except (ClientStateError, SubmitUncertainError) as exc:
                outcome = type(exc).__name__
            task = asyncio.current_task()
            assert task is not None
            await asyncio.sleep(0)  # goes on: no cancel is left for it
            return outcome, task.cancelling()

        sending = asyncio.create_task(worker("on the wire", first=True))
        await on_wire.wait()
        waiting = asyncio.create_task(worker("waiting for a slot"))
        both = asyncio.create_task(client.images.submit(prompt="both", model="dall-e-2"))
        await asyncio.sleep(0.05)  # the first is on the wire, the others wait for its slot
        both.cancel()  # the caller's own cancel, in the same moment as the stop's
        client.stop_submitting()
        assert await asyncio.wait_for(waiting, 5) == ("ClientStateError", 0)
        with pytest.raises(asyncio.CancelledError):
            await both
        await asyncio.wait_for(client.aclose(), 5)  # ends the one on the wire
        assert await asyncio.wait_for(sending, 5) == ("SubmitUncertainError", 0)


# --- a stopped poller ----------------------------------------------------------------------------
def _poller_task() -> asyncio.Task[Any]:
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "wujie-async poller"]
    return task


async def test_a_stopped_poller_settles_every_job_and_refuses_new_work(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """The poller stopping while the client is open (here: cancelled from outside, through
    asyncio's public task list) must not leave a single await hanging."""
    async with emulator(time_scale=1.0) as emu:
        client = make_client(emu, journal=tmp_path / "jobs.sqlite")
        async with client:
            jobs = [await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
            _poller_task().cancel()
            for job in jobs:
                with pytest.raises(JobCancelledError, match="poller stopped"):
                    await asyncio.wait_for(job.result(), 5)
            with pytest.raises(ClientStateError, match="poller has stopped"):
                await client.images.submit(prompt="x", model="dall-e-2")
            with pytest.raises(ClientStateError, match="poller has stopped"):
                client.images.attach(jobs[0].key)
        # The jobs were not ended by the user: their keys stay resumable.
        async with make_client(emu, journal=tmp_path / "jobs.sqlite") as again:
            resumed = await again.resume()
            assert sorted(job.key for job in resumed) == sorted(job.key for job in jobs)
            for job in resumed:
                job.cancel()


# --- submit replies whose key cannot be used --------------------------------------------------
class FakeGateway:
    """Answers submits with the keys queued in ``keys`` (the last one repeats), and lists
    every key asked about as finished, with one image, once ``finish`` is set."""

    def __init__(self, keys: list[Any], *, status: int = 200) -> None:
        self.keys = keys
        self.status = status  # the HTTP status of submit replies
        self.submits = 0
        self.finish = asyncio.Event()

    async def submit(self, request: web.Request) -> web.Response:
        self.submits += 1
        key = self.keys.pop(0) if len(self.keys) > 1 else self.keys[0]
        if isinstance(key, bytes):  # a raw reply body
            return web.Response(body=key, status=self.status, content_type="application/json")
        reply = {"code": "200", "message": "ok", "data": {"key": key}}
        return web.json_response(reply, status=self.status)

    async def info(self, request: web.Request) -> web.Response:
        keys = await request.json()
        status = 4 if self.finish.is_set() else 1
        entries = [
            {"key": key, "status": status, "images": [{"url": "https://example.com/a.png"}]}
            for key in keys
        ]
        return web.json_response({"code": "200", "message": "ok", "data": {"list": entries}})

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post(GENERATIONS, self.submit)
        app.router.add_post(INFO, self.info)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


@pytest.fixture(scope="module")
def credentials() -> Credentials:
    return throwaway_credentials()  # the fake gateways here check no signature


def fake_client(base_url: str, credentials: Credentials, **kwargs: Any) -> WujieClient:
    return WujieClient(
        credentials, base_url=base_url, poll=FAST_POLL, retry=INSTANT_RETRY, **kwargs
    )


async def test_a_duplicate_key_is_uncertain_and_the_first_job_still_settles(
    credentials: Credentials, tmp_path: Path
) -> None:
    """Issue 9 item 6: the gateway hands the same key to two submits."""
    gateway = FakeGateway(["DUPKEY0001"])
    journal = tmp_path / "jobs.sqlite"
    async with gateway.serve() as base:
        async with fake_client(base, credentials, journal=journal) as client:
            first = await client.images.submit(prompt="first", model="dall-e-2")
            with pytest.raises(SubmitUncertainError, match="already in use") as info:
                await client.images.submit(prompt="second", model="dall-e-2")
            assert isinstance(info.value.__cause__, ProtocolError)
            assert info.value.request["prompt"] == "second"
            assert client.jobs() == [first]  # still tracked, not overwritten
            gateway.finish.set()
            result = await asyncio.wait_for(first.result(), 5)
            assert result.key == "DUPKEY0001"
            # Ended lately counts too: a third submit given that key is a duplicate as well.
            with pytest.raises(SubmitUncertainError, match="already in use"):
                await client.images.submit(prompt="third", model="dall-e-2")
            [second, third] = await client.uncertain_submits()
            assert second.request["prompt"] == "second" and "already in use" in (second.error or "")
            assert third.request["prompt"] == "third"
            assert client.stats.jobs_outstanding == 0


async def test_concurrent_submits_given_one_key_never_share_a_job(
    credentials: Credentials,
) -> None:
    gateway = FakeGateway(["SAMEKEY"])
    async with gateway.serve() as base, fake_client(base, credentials) as client:
        outcomes = await asyncio.gather(
            *(client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(8)),
            return_exceptions=True,
        )
        jobs = [o for o in outcomes if isinstance(o, ImageJob)]
        assert len(jobs) == 1
        assert all(isinstance(o, SubmitUncertainError) for o in outcomes if o not in jobs)
        gateway.finish.set()
        await asyncio.wait_for(jobs[0].result(), 5)


@pytest.mark.parametrize(
    "code",
    ['"0"', "0", '"success"', '"20010001"', '"200.0"'],
    ids=["0", "int-0", "word", "refusal", "200.0"],
)
async def test_a_refusal_code_whose_data_holds_a_key_is_uncertain_not_rejected(
    credentials: Credentials, tmp_path: Path, code: str
) -> None:
    """A reply with another code than "200" was a BusinessError (refused: nothing charged)
    even when its data held a job key: a gateway whose success code is not the contract's
    had every paid submit read as rejected, and a retry of failed lines paid for each again.
    A refusal that names a job contradicts itself: the submit may have been accepted."""
    reply = b'{"code":' + code.encode() + b',"message":"success","data":{"key":"K0001"}}'
    gateway = FakeGateway([reply])
    async with gateway.serve() as base:
        async with fake_client(base, credentials, journal=tmp_path / "j.sqlite") as client:
            with pytest.raises(SubmitUncertainError, match="may have been accepted") as info:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert isinstance(info.value.__cause__, ProtocolError)
            [row] = await client.uncertain_submits()
            assert row.request["prompt"] == "x"
    assert gateway.submits == 1  # never resent


@pytest.mark.parametrize("status", [401, 403, 429])
async def test_a_refusal_status_whose_data_holds_a_key_is_uncertain_not_refused(
    credentials: Credentials, tmp_path: Path, status: int
) -> None:
    """The same contradiction under a status the client reads before the envelope: a 429
    (a proxy's stamp on a reply whose success code is not the contract's) was a rate limit,
    resent by the client's retries (each resend paid again); a 401 or 403 was a refusal
    ("nothing was accepted"), its line not_sent and sent again by a re-run."""
    reply = b'{"code":"0","message":"success","data":{"key":"K0001"}}'
    gateway = FakeGateway([reply], status=status)
    async with gateway.serve() as base:
        async with fake_client(base, credentials, journal=tmp_path / "j.sqlite") as client:
            with pytest.raises(SubmitUncertainError, match="may have been accepted") as info:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert isinstance(info.value.__cause__, ProtocolError)
    assert gateway.submits == 1  # never resent


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (REPLIES["empty-key"][1], "whitespace"),  # the hostile server's unused "empty-key"
        (b'{"code":"200","message":"ok","data":{}}', "no key"),
        (b'{"code":"200","message":"ok","data":null}', "no key"),
        (b'{"code":"200","message":"ok","data":{"key":12}}', "int"),
        (b'{"code":"200","message":"ok","data":{"key":""}}', "empty"),
        (json.dumps({"code": "200", "data": {"key": "OKKEY\n"}}).encode(), "whitespace"),
        (json.dumps({"code": "200", "data": {"key": "a b"}}).encode(), "whitespace"),
        (json.dumps({"code": "200", "data": {"key": "\x1b]0;PWNED"}}).encode(), "control"),
        (json.dumps({"code": "200", "data": {"key": "K\x85"}}).encode(), "control"),
        (json.dumps({"code": "200", "data": {"key": "K" * 129}}).encode(), "129 characters"),
        (json.dumps({"code": "200", "data": {"key": "INVOICE\u202egnp.EXE"}}).encode(), "format"),
        (json.dumps({"code": "200", "data": {"key": "K\u200bK"}}).encode(), "format"),
        (json.dumps({"code": "200", "data": {"key": "\ufeffK"}}).encode(), "format"),
    ],
    ids=[
        "empty-key",
        "missing",
        "null-data",
        "int",
        "empty",
        "newline",
        "space",
        "esc",
        "c1",
        "long",
        "bidi",
        "zero-width",
        "bom",
    ],
)
async def test_a_reply_without_a_usable_key_is_uncertain(
    credentials: Credentials, tmp_path: Path, reply: bytes, problem: str
) -> None:
    """Issue 9 item 12 (keys) and issue 11: a 200 reply whose key cannot be used."""
    gateway = FakeGateway([reply])
    async with gateway.serve() as base:
        async with fake_client(base, credentials, journal=tmp_path / "j.sqlite") as client:
            with pytest.raises(SubmitUncertainError, match=problem) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert isinstance(info.value.__cause__, ProtocolError)
            assert "\x1b" not in str(info.value) and "\n" not in str(info.value)
            [row] = await client.uncertain_submits()
            assert row.request["prompt"] == "x" and row.job_key is None
            assert client.jobs() == []
    assert gateway.submits == 1  # charged maybe, but never resent


@pytest.mark.parametrize(
    "key", ["3E46BF62A51256A96EEFB73079BD55E2", "a1b2-c3d4_e5+f6/g7==", "キー123", "ключ"]
)
def test_printable_keys_are_usable_and_invisible_characters_are_not(key: str) -> None:
    assert is_job_key(key)
    for hidden in ("\u202e", "\u200e", "\u061c", "\u2066", "\ufeff", "\u00a0", "\ue000"):
        assert not is_job_key(key + hidden), repr(hidden)


@pytest.mark.parametrize("status", [201, 202, 429, 503])
async def test_a_success_envelope_under_another_status_is_accepted(
    credentials: Credentials, tmp_path: Path, status: int
) -> None:
    """The contract names HTTP 200; a gateway (or a proxy) answering 201 or 202 with a
    success envelope has accepted the submit: its key is kept, the job followed. So has one
    whose success envelope with a key a proxy stamped 429 or 503: sent again, it would be paid
    for again."""
    gateway = FakeGateway(["KEY201"], status=status)
    async with gateway.serve() as base:
        async with fake_client(base, credentials, journal=tmp_path / "j.sqlite") as client:
            job = await client.images.submit(prompt="x", model="dall-e-2")
            assert job.key == "KEY201" and await client.uncertain_submits() == []
            gateway.finish.set()
            assert len((await asyncio.wait_for(job.result(), 10)).images) == 1
    assert gateway.submits == 1


async def test_a_business_error_under_a_201_is_a_business_error(credentials: Credentials) -> None:
    refused = {"code": "20110001", "message": "sensitive words", "data": None}
    gateway = FakeGateway([json.dumps(refused).encode()], status=201)
    async with gateway.serve() as base, fake_client(base, credentials) as client:
        with pytest.raises(BusinessError, match="sensitive"):
            await client.images.submit(prompt="x", model="dall-e-2")


async def test_the_longest_key_is_accepted(credentials: Credentials) -> None:
    gateway = FakeGateway(["K" * 128])
    async with gateway.serve() as base, fake_client(base, credentials) as client:
        job = await client.images.submit(prompt="x", model="dall-e-2")
        assert job.key == "K" * 128
        job.cancel()


# --- attach ---------------------------------------------------------------------------------------
@pytest.mark.long
async def test_attach_keeps_the_request_and_checks_its_arguments(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(time_scale=0.02) as emu, make_client(emu) as client:
        submitted = await client.images.submit(prompt="x", model="gpt-image-1", n=2)
        submitted.cancel()
        request = {"prompt": "x", "model": "gpt-image-1", "n": 2}
        job = client.images.attach(submitted.key, n=2, request=request)
        assert job is not submitted and job.request == request
        assert len((await job.result(timeout=10)).images) == 2
        for bad in ("", "a b", "K\n", "K" * 129):
            with pytest.raises(InvalidRequestError) as info:
                client.images.attach(bad)
            assert info.value.field == "key"
        with pytest.raises(InvalidRequestError) as info:
            client.images.attach("KEY", n=0)
        assert info.value.field == "n"


async def test_a_free_submit_slot_is_taken_in_a_plain_call_never_ahead_of_a_waiter() -> None:
    """The submit's hot path takes a free slot without awaiting ``acquire()``: only when
    ``acquire()`` would take it at once (a slot free, no one waiting), so a waiting submit
    is never overtaken, and a slot it gave back is counted."""
    slots = _Slots(1)
    assert slots.take_free()
    assert not slots.take_free()  # none free
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)  # the waiter runs until it waits for the slot
    assert slots._waiters
    slots.release()  # handed to the waiter, which has not run yet
    assert not slots.take_free()
    assert await asyncio.wait_for(waiter, 5)
    assert not slots.take_free()
    slots.release()
    assert slots.take_free()
    slots.release()
    assert not slots.locked()
