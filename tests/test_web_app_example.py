"""examples/web_app.py: how it stops with event streams open, and what its events pass on
from a gateway that sends too much.

The long tests run it as ``python examples/web_app.py``, against a standalone emulator process
or a scripted hostile gateway served by the test; one quick test runs its app in this process,
on a real socket, against an embedded emulator. Events are read over real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from wujie_async import ClientStateError, WujieClient

from .cli_helpers import (
    CLEAN_ENV,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    served_emulator,
)
from .conftest import FAST_POLL, EmulatorFactory, make_client
from .fleet_support import free_port, listening
from .helpers import eventually
from .hostile import ESCAPES, scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio

# The example under test (a test run may point this at another copy of it).
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "web_app.py"

START_S = 30.0  # the example's imports and its client's start, on a loaded machine
READ_S = 15.0  # one event, or a reply
# From the signal to the process gone: "within a few seconds" (the example gives requests
# still open 3 s as a backstop; its streams end at once), with room for a loaded machine.
STOP_S = 8.0
KILL_GRACE_S = 5.0
MAX_EVENT_BYTES = 16 * 1024  # far above any event of the example's; far below a hostile one
READ_CAP_BYTES = 4 * 1024 * 1024  # the most a test reads from one stream


@dataclass
class App:
    process: asyncio.subprocess.Process
    base: str
    output: Path  # its stdout and stderr

    def log(self) -> str:
        return self.output.read_text(errors="replace")


@contextlib.asynccontextmanager
async def web_app(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[App]:
    """``python examples/web_app.py --port P`` with ``env``, listening; killed (bounded) if it
    still runs when the block ends."""
    port = free_port()
    output = tmp_path / "web_app.log"
    with output.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--port", str(port), "--lookup-seconds", "1",
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
        )  # fmt: skip
    app = App(proc, f"http://127.0.0.1:{port}", output)

    try:
        await eventually(
            functools.partial(listening, port), timeout=START_S, what="the web app listening",
            alive=lambda: proc.returncode is None,
        )  # fmt: skip
        yield app
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_GRACE_S)


@dataclass
class Event:
    kind: str
    data: dict[str, Any]
    retry: str | None
    size: int  # bytes on the wire


class EventReader:
    """Reads server-sent events off a reply one at a time, never more than READ_CAP_BYTES."""

    def __init__(self, reply: aiohttp.ClientResponse) -> None:
        self.reply = reply
        self.buffer = b""
        self.total = 0

    async def next(self) -> Event | None:
        """The next event, or None at the end of the stream."""
        while b"\n\n" not in self.buffer:
            chunk = await self.reply.content.readany()
            if not chunk:
                assert not self.buffer.strip(), f"the stream ended mid-event: {self.buffer[:200]!r}"
                return None
            self.total += len(chunk)
            assert self.total <= READ_CAP_BYTES, "a stream of megabytes"
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n\n", 1)
        fields: dict[str, str] = {}
        for line in raw.decode().split("\n"):
            name, _, value = line.partition(": ")
            fields[name] = value
        return Event(fields["event"], json.loads(fields["data"]), fields.get("retry"), len(raw))

    async def rest(self) -> list[Event]:
        """Every event left, up to the end of the stream."""
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events


async def submit(http: aiohttp.ClientSession, base: str, **body: Any) -> str:
    async with http.post(f"{base}/jobs", json=body) as reply:
        assert reply.status == 202, await reply.text()
        key: str = (await reply.json())["key"]
    return key


def load_example() -> ModuleType:
    """The example's module, loaded from EXAMPLE (its folder on sys.path for ``_connect``)."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        spec = importlib.util.spec_from_file_location("web_app_under_test", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return module


async def test_shutdown_ends_event_streams_before_waiting_for_requests(
    emulator: EmulatorFactory,
) -> None:
    """The app's own shutdown (what ``run_app`` does on a signal) with aiohttp's default 60 s
    for requests still open: its on_shutdown ends the streams, so that is not waited for."""
    example = load_example()
    clients: list[WujieClient] = []

    def client_factory() -> WujieClient:
        clients.append(make_client(emu))
        return clients[-1]

    async with emulator(time_scale=1.0, job_seconds=(600.0, 600.0)) as emu:
        runner = web.AppRunner(example.create_app(client_factory), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                key = await submit(http, base, prompt="slow", model="dall-e-2")
                async with http.get(f"{base}/jobs/{key}/events") as reply:
                    reader = EventReader(reply)
                    first = await asyncio.wait_for(reader.next(), READ_S)
                    assert first is not None and first.kind == "update"
                    try:
                        async with asyncio.timeout(STOP_S):
                            await runner.cleanup()
                            rest = await reader.rest()
                    except TimeoutError:
                        raise AssertionError(
                            f"the app's shutdown still waits after {STOP_S:.0f} s, with an event "
                            "stream open"
                        ) from None
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_GRACE_S):
                    await runner.cleanup()  # a no-op when it ran: bounded when it did not
    assert [event.kind for event in rest] == ["closing"]
    [client] = clients
    with pytest.raises(ClientStateError):  # the lifespan closed it
        await client.images.submit(prompt="after", model="dall-e-2")


@pytest.mark.long
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_stopping_ends_open_event_streams_at_once(tmp_path: Path, sig: int) -> None:
    """Streams of jobs that run for ten minutes, and a request waiting on one: the signal
    ends each stream with ``event: closing`` and the process within seconds."""
    async with (
        served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "600,600") as emu,
        web_app(tmp_path, emu.env) as app,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
    ):
        keys = [
            await submit(http, app.base, prompt=f"slow {i}", model="dall-e-2") for i in range(3)
        ]
        async with contextlib.AsyncExitStack() as streams:
            readers = []
            for key in keys:
                reply = await streams.enter_async_context(http.get(f"{app.base}/jobs/{key}/events"))
                assert reply.status == 200
                readers.append(EventReader(reply))
            for key, reader in zip(keys, readers, strict=True):
                first = await asyncio.wait_for(reader.next(), READ_S)
                assert first is not None and first.kind == "update"
                assert first.data["key"] == key and not first.data["done"]

            async def wait_for_images() -> tuple[int, dict[str, Any]]:
                body = {"prompt": "waited for", "model": "dall-e-2"}
                async with http.post(f"{app.base}/images", json=body) as reply:
                    return reply.status, await reply.json()

            async def submitted_four() -> bool:
                return int((await emu.stats())["submits_accepted"]) >= 4

            waiting = asyncio.create_task(wait_for_images())
            await eventually(submitted_four, timeout=READ_S, what="the fourth submit")

            app.process.send_signal(sig)
            try:
                code = await asyncio.wait_for(app.process.wait(), STOP_S)
            except TimeoutError:
                raise AssertionError(
                    f"the web app still runs {STOP_S:.0f} s after {signal.Signals(sig).name}, "
                    f"with event streams open:\n{app.log()}"
                ) from None
            assert code == 0, app.log()

            for key, reader in zip(keys, readers, strict=True):
                rest = await asyncio.wait_for(reader.rest(), READ_S)
                assert [event.kind for event in rest] == ["closing"], rest
                assert rest[0].data["key"] == key
                assert rest[0].retry is not None and int(rest[0].retry) > 0
            status, body = await asyncio.wait_for(waiting, READ_S)
            assert status == 503 and body["key"], body

        log = app.log()
        for sign in ("Traceback", "Error handling request", "Unclosed", "was destroyed"):
            assert sign not in log, log


LONG_URL = "https://cdn.example/" + "a" * 200_000 + ".png"
SHORT_URL = "https://cdn.example/fine.png"
HOSTILE_TEXT = ESCAPES + "\u202e" + "x" * 50_000


def _listing(keys: list[str]) -> list[dict[str, Any]]:
    """K00000, K00002, ... succeed with a 200 KB URL beside a fine one; K00001, K00003, ...
    fail with 50 KB of text full of terminal escapes."""
    entries: list[dict[str, Any]] = []
    for key in keys:
        if int(key[1:]) % 2 == 0:
            images = [
                {"url": LONG_URL, "b64_json": None, "revised_prompt": None},
                {"url": SHORT_URL, "b64_json": None, "revised_prompt": HOSTILE_TEXT},
            ]
            entries.append({"key": key, "status": 4, "complete_percent": 100, "images": images})
        else:
            failure = {"fail_code": "7", "fail_message": HOSTILE_TEXT}
            entries.append({"key": key, "status": 3, "fail_message": failure})
    return entries


@pytest.mark.long
async def test_events_bound_what_a_hostile_gateway_sends(tmp_path: Path) -> None:
    credentials = throwaway_credentials()
    async with scripted_gateway(_listing) as gateway:
        env = CLEAN_ENV | {
            "WUJIE_APP_ID": credentials.app_id,
            "WUJIE_PRIVATE_KEY": credentials.private_key,
            "WUJIE_BASE_URL": gateway.base_url,
        }
        async with (
            web_app(tmp_path, env) as app,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        ):
            succeeded = await submit(http, app.base, prompt="p", model="dall-e-2", n=2)
            failed = await submit(http, app.base, prompt="q", model="dall-e-2")
            assert (succeeded, failed) == ("K00000", "K00001")

            async def events_of(key: str) -> list[Event]:
                async with http.get(f"{app.base}/jobs/{key}/events") as reply:
                    assert reply.status == 200
                    return await asyncio.wait_for(EventReader(reply).rest(), READ_S)

            events = await events_of(succeeded)
            assert events and events[-1].kind == "done", events
            for event in events:
                assert event.size <= MAX_EVENT_BYTES, f"an event of {event.size:,} bytes"
            done = events[-1].data
            assert done["status"] == "succeeded"
            assert done["images"] == [None, SHORT_URL]
            assert len(done["notes"]) == 1 and "200,024 characters" in done["notes"][0]

            events = await events_of(failed)
            assert events and events[-1].kind == "done", events
            for event in events:
                assert event.size <= MAX_EVENT_BYTES, f"an event of {event.size:,} bytes"
            error = events[-1].data["error"]
            assert "x" in error and len(error) <= 1000
            assert error.isprintable() and "\u202e" not in error and "PWNED" not in error

            # The same bound on the job's status and on a request that waits for the images.
            async with http.get(f"{app.base}/jobs/{succeeded}") as reply:
                assert len(await reply.read()) <= MAX_EVENT_BYTES
                assert (await reply.json())["images"] == [None, SHORT_URL]
            body = {"prompt": "p", "model": "dall-e-2", "n": 2}
            async with http.post(f"{app.base}/images", json=body) as reply:
                assert reply.status == 200  # K00002
                assert len(await reply.read()) <= MAX_EVENT_BYTES
                assert (await reply.json())["images"] == [None, SHORT_URL]
            async with http.post(f"{app.base}/images", json=body) as reply:
                assert reply.status == 422  # K00003
                assert len(await reply.read()) <= MAX_EVENT_BYTES
                assert "PWNED" not in (await reply.json())["error"]


async def test_images_sent_inline_are_left_out_with_a_note(emulator: EmulatorFactory) -> None:
    """A gateway that sends images inline (b64_json, as OpenAI's API sends gpt-image-1's): the
    reply said ``"images": [null, null]`` with no note, a job of two paid images that looked
    like none; each is left out (no megabytes of base64 in a reply) with a note saying why."""
    example = load_example()
    async with emulator(time_scale=0.02, image_delivery="b64_json") as emu:
        runner = web.AppRunner(example.create_app(lambda: make_client(emu)), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
                http.post(
                    f"{base}/images", json={"prompt": "x", "model": "gpt-image-1", "n": 2}
                ) as reply,
            ):
                assert reply.status == 200, await reply.text()
                assert len(await reply.read()) <= MAX_EVENT_BYTES
                view = await reply.json()
        finally:
            async with asyncio.timeout(KILL_GRACE_S):
                await runner.cleanup()
    assert view["images"] == [None, None]
    assert [note.split(":")[0] for note in view["notes"]] == ["image 0", "image 1"]
    assert all("sent inline (b64_json)" in note for note in view["notes"]), view


async def test_a_failing_gateway_is_the_operators_to_read_not_the_browsers(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A submit that failed answered the browser with the error's whole text: the gateway's
    URL and what it said (here the app id it refused), meant for the operator. Now the
    browser gets a short message and the operator the log line; a refusal of the request
    itself (a sensitive prompt) is still the browser's to read."""
    from wujie_async.emulator import FaultConfig

    example = load_example()
    credentials = throwaway_credentials()  # an app id the gateway does not know
    async with emulator(time_scale=0.02) as emu:

        async def answers(client: WujieClient) -> tuple[int, dict[str, Any]]:
            runner = web.AppRunner(example.create_app(lambda: client), access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                base = f"http://127.0.0.1:{runner.addresses[0][1]}"
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
                    http.post(f"{base}/images", json={"prompt": "x"}) as reply,
                ):
                    return reply.status, await reply.json()
            finally:
                async with asyncio.timeout(KILL_GRACE_S):
                    await runner.cleanup()

        with caplog.at_level(logging.WARNING, logger="web_app"):
            status, body = await answers(WujieClient(credentials, base_url=emu.base_url))
        assert status == 502, body
        assert body == {
            "error": "the image service is unavailable; try again later",
            "type": "AuthenticationError",
        }
        assert credentials.app_id in caplog.text and "AuthenticationError" in caplog.text
        emu.set_faults(FaultConfig(cut_reply=1.0, endpoints=frozenset({"generations"})))
        status, body = await answers(make_client(emu))
        assert (status, body["type"]) == (502, "SubmitUncertainError")
        assert "may have been taken" in body["error"] and emu.base_url not in body["error"]
        sensitive = FaultConfig(business_error=1.0, business_error_code="20110001")
        emu.set_faults(sensitive)
        status, body = await answers(make_client(emu))
        assert (status, body["code"]) == (422, "20110001"), body


async def test_made_up_keys_are_looked_for_a_few_at_a_time(emulator: EmulatorFactory) -> None:
    """Each key nobody here submitted is asked about in the client's batch calls until its
    unknown_key_grace runs out: a browser sending made-up keys by the thousand had the client
    follow them all, in the calls that follow the app's paid jobs. At most ``max_lookups``
    are looked for at once; another is a 503, and the app's own keys are served still."""
    example = load_example()
    poll = dataclasses.replace(FAST_POLL, unknown_key_grace=30.0)  # made-up keys stay looked for
    clients: list[WujieClient] = []

    def client_factory() -> WujieClient:
        clients.append(make_client(emu, poll=poll))
        return clients[-1]

    async with emulator(time_scale=0.02) as emu:
        app = example.create_app(client_factory, lookup_seconds=0.1, max_lookups=3)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

                async def status_of(key: str) -> int:
                    async with http.get(f"{base}/jobs/{key}") as reply:
                        return reply.status

                made_up = [f"MADEUP{i:026d}" for i in range(10)]
                assert [await status_of(key) for key in made_up[:3]] == [404, 404, 404]
                assert [await status_of(key) for key in made_up[3:]] == [503] * 7
                assert await status_of(made_up[0]) == 404  # one already looked for, again
                key = await submit(http, base, prompt="mine", model="dall-e-2")
                assert await status_of(key) == 200
            [client] = clients
            assert len(client.jobs()) <= 4  # three made-up keys and the app's own job
        finally:
            async with asyncio.timeout(KILL_GRACE_S):
                await runner.cleanup()


async def test_a_key_listed_late_is_a_404_and_its_job_goes_on(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """A key this app paid for before a restart (journaled), which the gateway is slow to
    list: GET answers 404, and the job is not cancelled: a request already waiting on it gets
    its images, and its journal row ends ``succeeded``, not ``cancelled``."""
    from wujie_async import JournalFile
    from wujie_async.emulator import FaultConfig

    example = load_example()
    journal = tmp_path / "app.sqlite"
    clients: list[WujieClient] = []

    # The client gives a key the gateway does not list 10 s (the app's lookup: 0.2 s).
    poll = dataclasses.replace(FAST_POLL, unknown_key_grace=10.0)

    def client_factory() -> WujieClient:
        clients.append(make_client(emu, journal=journal, poll=poll))
        return clients[-1]

    late = FaultConfig(absent_jobs=1.0, absent_s=1.5)
    async with emulator(
        time_scale=1.0, job_seconds=(2.0, 2.0), queued_share=(0, 0), faults=late
    ) as emu:
        async with make_client(emu, journal=journal) as before_restart:
            key = (await before_restart.images.submit(prompt="paid", model="dall-e-2")).key
        runner = web.AppRunner(
            example.create_app(client_factory, lookup_seconds=0.2), access_log=None
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            [client] = clients
            waiting = asyncio.create_task(client.images.attach(key).result(timeout=READ_S))
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
                http.get(f"{base}/jobs/{key}") as reply,
            ):
                assert reply.status == 404, await reply.text()
            result = await asyncio.wait_for(waiting, READ_S)
            assert result.key == key and len(result.images) == 1
        finally:
            async with asyncio.timeout(KILL_GRACE_S):
                await runner.cleanup()
    async with JournalFile(journal) as rows:
        assert [(row.job_key, row.state) for row in await rows.entries()] == [(key, "succeeded")]
