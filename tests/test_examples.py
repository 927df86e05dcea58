"""The examples, run as written: real processes, real HTTP, a real redis-server."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from wujie_async import WujieClient

from .conftest import FAST_POLL, EmulatorFactory
from .fleet_support import any_redis, free_port, listening
from .helpers import eventually, png_size

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NO_CREDENTIALS = {
    name: value
    for name, value in os.environ.items()
    if name not in {"WUJIE_APP_ID", "WUJIE_PRIVATE_KEY", "WUJIE_BASE_URL"}
} | {"PYTHONUNBUFFERED": "1"}


async def run_example(*args: str, timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=NO_CREDENTIALS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.slow
async def test_bulk_script_runs_a_thousand_prompts(tmp_path: Path) -> None:
    code, output = await run_example(str(EXAMPLES / "bulk_script.py"), "--out", str(tmp_path))
    assert code == 0, output
    assert "1000 of 1000 jobs done" in output
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 1000
    assert png_size(files[0].read_bytes()) == (32, 32)  # 256x256, downscaled by the emulator


@contextlib.asynccontextmanager
async def process(*args: str, ready: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=NO_CREDENTIALS,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await eventually(ready, what="the example ready", alive=lambda: proc.returncode is None)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.long
async def test_web_app_serves_real_requests() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    async with (
        process(
            str(EXAMPLES / "web_app.py"),
            "--port",
            str(port),
            "--lookup-seconds",
            "1",
            ready=functools.partial(listening, port),
        ),  # fmt: skip
        aiohttp.ClientSession() as http,
    ):
        body = {"prompt": "a fox", "model": "dall-e-2", "n": 2}
        async with http.post(f"{base}/images", json=body) as reply:
            assert reply.status == 200
            done = await reply.json()
        assert len(done["images"]) == 2 and done["images"][0].startswith("http://127.0.0.1")

        async with http.post(f"{base}/jobs", json={"prompt": "a crow", "model": "dall-e-3"}) as r:
            assert r.status == 202
            key = (await r.json())["key"]
        deadline = time.monotonic() + 60
        while True:
            async with http.get(f"{base}/jobs/{key}") as reply:
                status = await reply.json()
            if status["status"] == "succeeded":
                break
            assert status["status"] in {"pending", "queued", "generating"}, status
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert len(status["images"]) == 1

        # The same job's server-sent events, over real HTTP, as a browser reads them.
        async with http.post(f"{base}/jobs", json={"prompt": "an owl", "model": "dall-e-2"}) as r:
            key = (await r.json())["key"]
        events: list[tuple[str, dict[str, Any]]] = []
        async with http.get(f"{base}/jobs/{key}/events") as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/event-stream")
            kind = ""
            async for raw in reply.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
        assert events[-1][0] == "done" and [kind for kind, _ in events].count("done") == 1
        assert events[-1][1]["status"] == "succeeded" and len(events[-1][1]["images"]) == 1
        assert all(data["key"] == key for _, data in events)

        for path in ("/jobs/0123456789ABCDEF0123456789ABCDEF", "/jobs/NOT%0AKEY/events"):
            async with http.get(base + path) as reply:
                assert reply.status == 404, path

        bad = {"prompt": "x", "model": "dall-e-3", "n": 3}
        async with http.post(f"{base}/images", json=bad) as reply:
            assert reply.status == 400
            assert (await reply.json())["field"] == "n"


async def _results(redis: Any) -> list[dict[str, Any]]:
    entries = await redis.xrange("wujie:results")
    return [json.loads(fields[b"result"]) for _, fields in entries]


@pytest.mark.long
async def test_queue_consumer_with_a_real_redis(tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    async with any_redis(tmp_path, db=1) as url:
        redis = aioredis.from_url(url)
        try:
            await redis.delete("wujie:requests", "wujie:results")
            for i in range(20):
                request = {"prompt": f"queued {i}", "model": "dall-e-2", "n": 1 + i % 2}
                await redis.xadd("wujie:requests", {"request": json.dumps(request)})
            await redis.xadd(
                "wujie:requests",
                {"request": json.dumps({"prompt": "x", "model": "dall-e-3", "n": 5})},
            )

            async def finished() -> bool:
                states = [r["state"] for r in await _results(redis)]
                return states.count("succeeded") == 20 and "invalid" in states

            script = str(EXAMPLES / "queue_consumer.py")
            journal = str(tmp_path / "worker.sqlite")
            async with process(
                script, "--redis", url, "--journal", journal, ready=finished
            ) as proc:
                pass
            assert proc.returncode == 0
            results = await _results(redis)
            assert {r["state"] for r in results} == {"submitted", "succeeded", "invalid"}
            assert sum(len(r.get("images", [])) for r in results) == 30
            pending = await redis.xpending("wujie:requests", "wujie-workers")
            assert pending["pending"] == 0  # every message acknowledged
        finally:
            await redis.aclose()


@pytest.mark.long
async def test_queue_consumer_never_pays_twice_for_a_redelivered_message(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    import redis.asyncio as aioredis

    sys.path.insert(0, str(EXAMPLES))
    try:
        from queue_consumer import GROUP, REQUESTS, Worker  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))

    journal = tmp_path / "worker.sqlite"
    async with any_redis(tmp_path, db=2) as url, emulator(time_scale=0.01) as emu:
        redis = aioredis.from_url(url)
        try:
            await redis.delete(REQUESTS, "wujie:results")
            await redis.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
            request = {"prompt": "only once", "model": "dall-e-2"}
            await redis.xadd(REQUESTS, {"request": json.dumps(request)})
            # A first worker takes the message, journals its key, and dies before acknowledging.
            read: Any = await redis.xreadgroup(GROUP, "worker-1", {REQUESTS: ">"})
            [[_, [(message_id, _)]]] = read
            async with WujieClient(emu.credentials, base_url=emu.base_url, journal=journal) as c:
                await c.images.submit(
                    prompt=request["prompt"], model="dall-e-2", tag=message_id.decode()
                )
            assert emu.stats()["submits_accepted"] == 1

            async with WujieClient(
                emu.credentials, base_url=emu.base_url, journal=journal, poll=FAST_POLL
            ) as client:
                stop = asyncio.Event()
                worker = asyncio.create_task(Worker(redis, client, "worker-1").run(stop))

                async def succeeded() -> bool:
                    return any(r["state"] == "succeeded" for r in await _results(redis))

                await eventually(succeeded, what="a succeeded result")
                stop.set()
                await worker
            assert emu.stats()["submits_accepted"] == 1  # attached, not resubmitted
            states = [r["state"] for r in await _results(redis)]
            assert states.count("succeeded") == 1
            assert (await redis.xpending(REQUESTS, GROUP))["pending"] == 0
        finally:
            await redis.aclose()


def _readme_block(section: str, language: str, containing: str = "") -> str:
    text = (EXAMPLES.parent / "README.md").read_text().split(f"## {section}", 1)[1]
    for block in text.split(f"```{language}\n")[1:]:
        code = block.split("```", 1)[0]
        if containing in code:
            return code
    raise AssertionError(f"README: no {language} block with {containing!r} in {section}")


@pytest.mark.long
async def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """The ten lines and the three shell lines that run them, as a user would, in a clone.

    The only change: the emulator's port 8080 becomes a free one. ``.venv`` is this test
    run's environment (the README's first command made it).
    """
    venv = Path(sys.prefix)
    if not (venv / "bin" / "wujie-async").exists():
        pytest.skip(f"wujie-async is not installed in {venv}")
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "ten_lines.py").write_text(_readme_block("Ten lines", "python"))
    shell = _readme_block("Ten lines", "sh", containing="ten_lines.py")
    assert "--credentials-out" not in shell
    shell = shell.replace("8080", str(free_port()))
    # If a line fails, the emulator must not outlive the test.
    script = "trap 'kill \"$WUJIE_EMULATOR_PID\" 2>/dev/null' EXIT\nset -e\n" + shell
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=tmp_path, env=NO_CREDENTIALS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, out.decode()
    key, first_url, *_ = out.decode().split()
    assert len(key) == 32 and first_url.startswith("http://127.0.0.1")
    assert out.decode().count("/files/") == 5  # image 0, then all four


def test_the_readme_links_nothing_outside_the_repository() -> None:
    import re

    root = EXAMPLES.parent
    readme = (root / "README.md").read_text()
    assert "../" not in readme
    for target in re.findall(r"\]\(([^)#]+)", readme):
        if not re.match(r"[a-z]+://", target):
            assert (root / target).resolve().is_relative_to(root.resolve()), target
            assert (root / target).exists(), target


@pytest.mark.long
async def test_fleet_queue_worker_without_a_shared_gateway_refuses_to_start(
    tmp_path: Path,
) -> None:
    """In fleet mode with no gateway configured, a worker would run on an emulator of its
    own, which no other member's leader asks: it says what to set instead, and exits."""
    from .fleet_support import fleet_name

    async with any_redis(tmp_path) as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / "queue_consumer.py"), "--redis", url,
            "--fleet", fleet_name(), env=NO_CREDENTIALS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 1, out.decode()
    assert "WUJIE_BASE_URL" in out.decode()
    assert "--print-env" in out.decode()


@pytest.mark.slow
async def test_fleet_queue_worker_killed_mid_job_is_taken_over(tmp_path: Path) -> None:
    """Two workers in one fleet; the one holding a message dies mid-job (SIGKILL)."""
    import redis.asyncio as aioredis

    from .fleet_support import emulator_process, emulator_stats, fleet_name, own_redis

    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=0.3) as emu,
    ):
        redis = aioredis.from_url(server.url)
        env = {
            **NO_CREDENTIALS,
            "WUJIE_APP_ID": emu["app_id"],
            "WUJIE_PRIVATE_KEY": emu["private_key"],
            "WUJIE_BASE_URL": emu["base_url"],
        }
        name = fleet_name()
        script = str(EXAMPLES / "queue_consumer.py")
        args = ("--redis", server.url, "--fleet", name, "--member-timeout", "1.5")
        workers: list[asyncio.subprocess.Process] = []

        async def start(consumer: str) -> asyncio.subprocess.Process:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, script, *args, "--name", consumer, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            workers.append(proc)
            return proc

        async def results_until(state: str, timeout: float = 30) -> list[dict[str, Any]]:
            async def found() -> list[dict[str, Any]]:
                results = await _results(redis)
                return results if any(r["state"] == state for r in results) else []

            found_results: list[dict[str, Any]] = await eventually(
                found, timeout=timeout, what=f"a {state!r} result"
            )
            return found_results

        try:
            request = {"prompt": "paid for once", "model": "dall-e-2"}
            await redis.xadd("wujie:requests", {"request": json.dumps(request)})
            doomed = await start("worker-a")
            [submitted] = await results_until("submitted")
            doomed.send_signal(signal.SIGKILL)  # mid-job: the message is not acknowledged
            await asyncio.wait_for(doomed.wait(), 15)
            await start("worker-b")
            await results_until("succeeded")

            async def acknowledged() -> bool:
                return not (await redis.xpending("wujie:requests", "wujie-workers"))["pending"]

            # Once nothing is pending, no delivery is outstanding: count what was delivered.
            await eventually(acknowledged, timeout=10, what="the message acknowledged")
            results = await _results(redis)
            assert [r["state"] for r in results].count("succeeded") == 1
            [done] = [r for r in results if r["state"] == "succeeded"]
            assert done["message_id"] == submitted["message_id"]
            assert done["key"] == submitted["key"]
            assert len(done["images"]) == 1
            assert (await emulator_stats(emu))["submits_accepted"] == 1  # never resubmitted
        finally:
            for proc in workers:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        await asyncio.wait_for(proc.wait(), 15)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
            await redis.aclose()


# --- examples/queue_consumer.py: one message handled once, results never lost ---------------


def _queue_consumer() -> Any:
    """The example's module (its folder on sys.path for ``_connect``)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module("queue_consumer")
    finally:
        sys.path.remove(str(EXAMPLES))


async def _pending_for(redis: Any, consumer: str, count: int) -> list[str]:
    """``count`` requests, handed to ``consumer`` and not acknowledged (as a worker that died
    right after reading them leaves them)."""
    qc = _queue_consumer()
    await redis.delete(qc.REQUESTS, qc.RESULTS)
    await redis.xgroup_create(qc.REQUESTS, qc.GROUP, id="0", mkstream=True)
    for i in range(count):
        request = {"prompt": f"pending {i}", "model": "dall-e-2"}
        await redis.xadd(qc.REQUESTS, {"request": json.dumps(request)})
    read: Any = await redis.xreadgroup(qc.GROUP, consumer, {qc.REQUESTS: ">"}, count=count)
    return [message_id.decode() for message_id, _ in read[0][1]]


async def _each_succeeded(redis: Any, message_ids: list[str]) -> bool:
    """Every message has a ``succeeded`` result, and none is pending."""
    done = {r["message_id"] for r in await _results(redis) if r["state"] == "succeeded"}
    pending = await redis.xpending("wujie:requests", "wujie-workers")
    return done >= set(message_ids) and not pending["pending"]


@contextlib.asynccontextmanager
async def _workers(*workers: Any) -> AsyncIterator[None]:
    """The workers running; on leaving, stopped and waited for (their jobs included)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def _journaled_worker(
    qc: Any, redis: Any, emu: Any, tmp_path: Path
) -> AsyncIterator[WujieClient]:
    """One example Worker ("worker-x") on a journaled client of ``emu``, running."""
    async with (
        WujieClient(
            emu.credentials, base_url=emu.base_url, journal=tmp_path / "w.sqlite", poll=FAST_POLL
        ) as client,
        _workers(qc.Worker(redis, client, "worker-x")),
    ):
        yield client


@pytest.mark.long
async def test_queue_consumer_handles_a_message_handed_twice_at_once_once(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """Two workers of one process (one client, one journal) read the same pending list at
    once: each message is submitted once and has one result."""
    import redis.asyncio as aioredis

    qc = _queue_consumer()
    async with any_redis(tmp_path, db=3) as url, emulator(time_scale=0.01) as emu:
        redis = aioredis.from_url(url)
        try:
            message_ids = await _pending_for(redis, "worker-x", 10)
            async with (
                WujieClient(
                    emu.credentials, base_url=emu.base_url, journal=tmp_path / "w.sqlite",
                    poll=FAST_POLL,
                ) as client,
                _workers(*(qc.Worker(redis, client, "worker-x") for _ in range(2))),
            ):  # fmt: skip
                await eventually(
                    functools.partial(_each_succeeded, redis, message_ids),
                    what="every message succeeded",
                )
            # Both workers have stopped and waited for every job they took on.
            assert emu.stats()["submits_accepted"] == 10
            results = await _results(redis)
            for message_id in message_ids:
                states = [r["state"] for r in results if r["message_id"] == message_id]
                assert sorted(states) == ["submitted", "succeeded"], (message_id, states)
        finally:
            await redis.aclose()


@pytest.mark.long
async def test_queue_consumer_reads_its_whole_pending_list_at_start(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """More pending messages than one read takes (64): all are handled, without a restart."""
    import redis.asyncio as aioredis

    qc = _queue_consumer()
    async with any_redis(tmp_path, db=4) as url, emulator(time_scale=0.01) as emu:
        redis = aioredis.from_url(url)
        try:
            message_ids = await _pending_for(redis, "worker-x", 150)
            async with _journaled_worker(qc, redis, emu, tmp_path):
                await eventually(
                    functools.partial(_each_succeeded, redis, message_ids),
                    what="every pending message succeeded",
                )
            assert emu.stats()["submits_accepted"] == 150
        finally:
            await redis.aclose()


@pytest.mark.long
async def test_queue_consumer_retries_refused_submits_while_it_runs(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """The gateway refuses every submit (points ran out), then recovers: the same worker
    submits the messages it had left pending, with no restart."""
    import redis.asyncio as aioredis

    from wujie_async.emulator import FaultConfig

    qc = _queue_consumer()
    refusing = FaultConfig(business_error=1.0, business_error_code="20110010")
    async with (
        any_redis(tmp_path, db=5) as url,
        emulator(time_scale=0.01, faults=refusing) as emu,
    ):
        redis = aioredis.from_url(url)
        try:
            await redis.delete(qc.REQUESTS, qc.RESULTS)
            async with _journaled_worker(qc, redis, emu, tmp_path) as client:
                message_ids = []
                for i in range(5):
                    request = {"prompt": f"refused {i}", "model": "dall-e-2"}
                    added: Any = await redis.xadd(qc.REQUESTS, {"request": json.dumps(request)})
                    message_ids.append(added.decode())

                async def all_refused() -> bool:
                    rows = await client.journal_entries("rejected")
                    return len({row.tag for row in rows}) == 5

                await eventually(all_refused, what="every submit refused")
                emu.set_faults(FaultConfig())
                await eventually(
                    functools.partial(_each_succeeded, redis, message_ids),
                    what="every message succeeded once the gateway recovered",
                )
            assert emu.stats()["submits_accepted"] == 5
        finally:
            await redis.aclose()


@pytest.mark.long
async def test_queue_consumer_publishes_a_result_redis_refused_at_first(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """Redis refuses the worker's publishes (an ACL change standing in for a blip) while its
    job ends: the message stays pending, and once Redis takes writes again the same worker
    publishes the result (a poll of the journaled key, never a second charge)."""
    import redis.asyncio as aioredis

    from .fleet_support import own_redis

    qc = _queue_consumer()
    async with (
        own_redis(tmp_path) as server,
        emulator(time_scale=1.0, job_seconds=(2.0, 2.0), queued_share=(0, 0)) as emu,
    ):
        admin = aioredis.from_url(server.url)
        await admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["*"],
                                channels=["*"], commands=["+@all"])  # fmt: skip
        redis = aioredis.from_url(f"redis://worker:pw@127.0.0.1:{server.port}/0")
        try:
            async with _journaled_worker(qc, redis, emu, tmp_path):
                request = {"prompt": "paid for once", "model": "dall-e-2"}
                added: Any = await admin.xadd(qc.REQUESTS, {"request": json.dumps(request)})

                async def submitted() -> bool:
                    return any(r["state"] == "submitted" for r in await _results(admin))

                await eventually(submitted, what="the submitted result")
                await admin.acl_setuser("worker", enabled=True, commands=["-xadd"])

                async def refused() -> bool:
                    return any(entry["object"] == "xadd" for entry in await admin.acl_log())

                # The job ended and its result's publish was refused.
                await eventually(refused, what="a publish refused")
                await admin.acl_setuser("worker", enabled=True, commands=["+xadd"])
                await eventually(
                    functools.partial(_each_succeeded, admin, [added.decode()]),
                    what="the result published once Redis took writes again",
                )
            assert emu.stats()["submits_accepted"] == 1
            states = [r["state"] for r in await _results(admin)]
            assert states.count("succeeded") == 1
        finally:
            await redis.aclose()
            await admin.aclose()


@pytest.mark.long
async def test_queue_consumer_carries_on_through_a_redis_restart(
    tmp_path: Path, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue's Redis restarts (AOF on) under a running worker: its blocking read fails
    for a while. The worker says so and carries on; a request added once Redis is back is
    handled by the same worker, with no restart of the worker."""
    import redis.asyncio as aioredis

    from .fleet_support import own_redis

    qc = _queue_consumer()
    port = free_port()
    redis = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
    stop = asyncio.Event()

    async def request(prompt: str) -> str:
        added: Any = await redis.xadd(
            qc.REQUESTS, {"request": json.dumps({"prompt": prompt, "model": "dall-e-2"})}
        )
        return str(added.decode())

    async with (
        emulator(time_scale=0.01) as emu,
        WujieClient(
            emu.credentials, base_url=emu.base_url, journal=tmp_path / "w.sqlite", poll=FAST_POLL
        ) as client,
    ):
        task: asyncio.Task[None] | None = None
        try:
            async with own_redis(tmp_path, appendonly=True, port=port):
                task = asyncio.create_task(qc.Worker(redis, client, "worker-x").run(stop))
                first = await request("before the restart")
                await eventually(
                    functools.partial(_each_succeeded, redis, [first]), what="the first result"
                )
            running = task

            def failed_over() -> bool:
                return running.done() or "Redis unavailable" in caplog.text

            await eventually(failed_over, what="the worker meeting a Redis that is away")
            async with own_redis(tmp_path, appendonly=True, port=port):
                second = await request("after the restart")
                await eventually(
                    functools.partial(_each_succeeded, redis, [first, second]),
                    what="the second result, by the same worker",
                    alive=lambda: not running.done(),
                )
                stop.set()
                await asyncio.wait_for(running, 30)
            assert emu.stats()["submits_accepted"] == 2
        finally:
            stop.set()
            if task is not None and not task.done():
                task.cancel()
            await redis.aclose()


@pytest.mark.long
async def test_queue_consumer_names_its_consumer_after_its_journal(tmp_path: Path) -> None:
    """Two processes with their own journals are two consumers (neither reads the other's
    pending list); a restart with the same journal takes its own pending messages."""
    import redis.asyncio as aioredis

    script = str(EXAMPLES / "queue_consumer.py")
    async with any_redis(tmp_path, db=6) as url:
        redis = aioredis.from_url(url)
        try:
            await redis.delete("wujie:requests", "wujie:results")
            await redis.xgroup_create("wujie:requests", "wujie-workers", id="0", mkstream=True)

            async def consumers(count: int) -> list[str]:
                found = await redis.xinfo_consumers("wujie:requests", "wujie-workers")
                names = [consumer["name"].decode() for consumer in found]
                return names if len(names) >= count else []

            journal_a, journal_b = str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")
            async with process(script, "--redis", url, "--journal", journal_a,
                               ready=functools.partial(consumers, 1)):  # fmt: skip
                [name_a] = await consumers(1)
                async with process(script, "--redis", url, "--journal", journal_b,
                                   ready=functools.partial(consumers, 2)):  # fmt: skip
                    pass
            names = await consumers(2)
            assert len(set(names)) == 2, names

            # A's process died after reading a message: a restart with A's journal finishes it.
            request = {"prompt": "left by a", "model": "dall-e-2"}
            added: Any = await redis.xadd("wujie:requests", {"request": json.dumps(request)})
            await redis.xreadgroup("wujie-workers", name_a, {"wujie:requests": ">"})
            async with process(
                script, "--redis", url, "--journal", journal_a,
                ready=functools.partial(_each_succeeded, redis, [added.decode()]),
            ):  # fmt: skip
                pass
        finally:
            await redis.aclose()


@pytest.mark.long
@pytest.mark.parametrize("name", ["bulk_script.py", "web_app.py", "queue_consumer.py"])
async def test_an_example_help_shows_its_commands_as_written(name: str) -> None:
    """`--help` prints the module's docstring: its command lines stay lines a user can copy,
    not words reflowed into the paragraph around them."""
    module = ast.parse((EXAMPLES / name).read_text())
    commands = [
        line.strip()
        for line in (ast.get_docstring(module) or "").splitlines()
        if line.strip().startswith(".venv/bin/python examples/")
    ]
    assert commands, name
    code, output = await run_example(str(EXAMPLES / name), "--help", timeout=30)
    assert code == 0, output
    shown = {line.strip() for line in output.splitlines()}
    assert not [command for command in commands if command not in shown], output
