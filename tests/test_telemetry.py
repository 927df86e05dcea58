"""The logging story (DEBUG/INFO lines, WUJIE_LOG, --verbose), repeated warnings gated to one
line a minute, and the package working with opentelemetry absent."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from wujie_async import (
    JobProtocolError,
    JobTimeoutError,
    Limits,
    RetryPolicy,
    SubmitUncertainError,
    WujieError,
)
from wujie_async._telemetry import RepeatedWarnings
from wujie_async.emulator import FaultConfig

from .cli_helpers import CLEAN_ENV, FAST, cli, cli_zygote  # noqa: F401  # see cli_helpers
from .conftest import EmulatorFactory, make_client
from .hostile import scripted_gateway
from .test_poller_hostile import client_for, submit

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("wujie_async") and r.levelno == level
    ]


# --- repeated warnings --------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_warning_is_one_line_a_minute_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    warnings = RepeatedWarnings(logging.getLogger("wujie_async"), every=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="wujie_async"):
        for call in range(1000):  # a thousand failures in 10 s
            warnings.warning("batch query of %d keys failed: %s", 50, f"problem {call}")
            clock.now += 0.01
        warnings.warning("another kind: %s", "once")  # kinds are gated apart
        clock.now += 55  # now 65 s after the first line
        warnings.warning("batch query of %d keys failed: %s", 50, "problem 1000")
        warnings.warning("batch query of %d keys failed: %s", 50, "problem 1001")
        warnings.warning("batch query of %d keys failed: %s", 50, "problem 1002")
        clock.now += 3
        warnings.flush()
        warnings.flush()  # nothing left to say
    assert lines(caplog, logging.WARNING) == [
        "batch query of 50 keys failed: problem 0",
        "another kind: once",
        "batch query of 50 keys failed: problem 1000 (999 more like this in the last 65 s were "
        "not logged)",
        "batch query of 50 keys failed: problem 1001 (the first of 2 like this in the last 3 s "
        "that were not logged)",
    ]


def test_a_new_cause_of_a_repeated_warning_is_written_not_counted_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A storm of 503s, then the credentials are revoked: the 401 must show."""
    clock = FakeClock()
    warnings = RepeatedWarnings(logging.getLogger("wujie_async"), every=60, clock=clock)
    msg = "batch query of %d keys failed: %s"
    with caplog.at_level(logging.WARNING, logger="wujie_async"):
        for _ in range(20):
            warnings.warning(msg, 50, "internal server error | HTTP 503", cause="ServerError")
            clock.now += 0.1
        for _ in range(20):
            warnings.warning(msg, 50, "check WUJIE_APP_ID | HTTP 401", cause="AuthenticationError")
            clock.now += 0.1
        warnings.flush()
    assert lines(caplog, logging.WARNING) == [
        "batch query of 50 keys failed: internal server error | HTTP 503",
        "batch query of 50 keys failed: check WUJIE_APP_ID | HTTP 401",
        "batch query of 50 keys failed: internal server error | HTTP 503 (the first of 19 like "
        "this in the last 4 s that were not logged)",
        "batch query of 50 keys failed: check WUJIE_APP_ID | HTTP 401 (the first of 19 like "
        "this in the last 2 s that were not logged)",
    ]


def status_of(value: Any) -> Any:
    def script(keys: list[str]) -> list[dict[str, Any]]:
        return [{"key": key, "status": value} for key in keys]

    return script


@pytest.mark.long
async def test_a_reply_of_malformed_entries_is_one_warning_and_jobs_end_on_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 17: every entry with a status of 2**40 wrote one WARNING per batch call.

    The entries are malformed from the first call that asks about all five jobs (before it,
    queued): the first WARNING counts the five of one reply however the submits and the
    poller's first calls interleave (a slow host's first call asked about three)."""
    caplog.set_level(logging.WARNING, logger="wujie_async")
    asked: set[str] = set()
    queued_replies = 0

    def script(keys: list[str]) -> list[dict[str, Any]]:
        nonlocal queued_replies
        asked.update(keys)
        if len(asked) < 5:
            queued_replies += 1
            return [{"key": key, "status": 0} for key in keys]
        return status_of(2**40)(keys)  # type: ignore[no-any-return]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        jobs = await submit(client, 5, job_timeout=30)
        started = asyncio.get_running_loop().time()
        for job in jobs:
            with pytest.raises(JobProtocolError, match="malformed"):
                await job.result(timeout=20)
        assert asyncio.get_running_loop().time() - started < 10  # the 1 s grace, not 30 s
        calls = client.stats.batch_calls - queued_replies  # those of malformed entries
        assert calls >= 10
        during = lines(caplog, logging.WARNING)
    assert len(during) == 1, during
    assert "ignored 5 malformed entries" in during[0] and "first problem: status" in during[0]
    [held] = lines(caplog, logging.WARNING)[1:]  # written at close, with the count
    assert f"the first of {calls - 1} like this" in held


@pytest.mark.long
async def test_a_batch_query_failing_every_call_is_one_warning(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wujie_async")
    faults = FaultConfig(http_5xx=1.0, endpoints=frozenset({"info"}))
    retry = RetryPolicy(initial_wait=0.0, max_wait=0.01, max_attempts=2)
    async with emulator(faults=faults) as emu, make_client(emu, retry=retry) as client:
        job = await client.images.submit(prompt="p", model="dall-e-2", job_timeout=1.0)
        with pytest.raises(JobTimeoutError):
            await job
        assert client.stats.batch_errors >= 5
        assert len(lines(caplog, logging.WARNING)) == 1


async def test_a_journal_of_unreadable_rows_is_one_warning_and_a_count(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with emulator(time_scale=1.0) as emu:
        async with make_client(emu, journal=journal) as client:
            for i in range(30):
                await client.images.submit(prompt=f"{i}", model="dall-e-2")
        with sqlite3.connect(journal) as db:
            db.execute("UPDATE submits SET request='{not json'")
        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with make_client(emu, journal=journal) as client:
            resumed = await client.resume()
            assert len(resumed) == 30
            for job in resumed:
                job.cancel()
    first, held = lines(caplog, logging.WARNING)
    assert first.startswith("journal row 1: its stored request is not JSON")
    assert held.startswith("journal row 2: ") and "(the first of 29 like this" in held


# --- the story at DEBUG and INFO ------------------------------------------------------------------
async def test_the_debug_and_info_story_of_a_run(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="wujie_async")
    journal = tmp_path / "jobs.sqlite"
    async with emulator(time_scale=0.03) as emu:  # jobs long enough to be seen generating
        async with make_client(emu, journal=journal, limits=Limits(max_in_flight=7)) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2")
            await job
            key = job.key
            left = await client.images.submit(prompt="q", model="dall-e-2")
        async with make_client(emu, journal=journal) as client:
            [resumed] = await client.resume()
            assert resumed.key == left.key
            await resumed
    debug, info = lines(caplog, logging.DEBUG), lines(caplog, logging.INFO)
    assert "POST /ai/wj/images/generations -> 200 in " in debug[0] and "(try 1)" in debug[0]
    assert any(
        line.startswith("POST /ai/wj/images/info -> 200 in ") and ", 1 key(s) (try 1)" in line
        for line in debug
    )
    story = [line for line in debug if line.startswith(f"job {key}: ")]
    assert story[0].startswith(f"job {key}: pending (submitted, first ask in ")
    assert any(" -> succeeded after " in line for line in story)
    assert any(" -> generating after " in line and " ask(s) (" in line for line in story)
    assert info[0].startswith(f"journal {journal} opened: 0 accepted job(s) not ended")
    assert "client opened: " in info[1] and "max_in_flight=7" in info[1]
    assert info[2].startswith(
        "client closed: 2 submit(s) accepted, 0 raised (not accepted); 1 job(s) succeeded, 0 failed"
    )
    # The job left running is paid for and was not collected: the close line says so.
    assert info[2].endswith(
        "; 1 job(s) still running were not collected (the journal keeps their keys: resume() "
        "collects them; aclose(drain=True) waits for jobs)"
    )
    assert "not collected" not in info[-1]  # the second client collected everything
    assert info[3].startswith(f"journal {journal} opened: 1 accepted job(s) not ended")
    assert "resumed 1 job(s) from the journal" in info
    assert not lines(caplog, logging.WARNING)


async def test_without_a_journal_the_close_line_names_the_jobs_left_running(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Paid for, not collected, and no journal: the close line is the one record of their
    keys (attach(key) collects them later), the first 20 of them and a count of the rest."""
    caplog.set_level(logging.INFO, logger="wujie_async")
    async with emulator(job_seconds=(600, 600)) as emu:
        async with make_client(emu) as client:
            jobs = [await client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(22)]
        [closed] = [line for line in lines(caplog, logging.INFO) if "client closed" in line]
        shown = ", ".join(job.key for job in jobs[:20])
        assert closed.endswith(
            f"; 22 job(s) still running were not collected (no journal, their keys: {shown} "
            "and 2 more; images.attach(key) collects each; aclose(drain=True) waits for jobs)"
        ), closed


async def test_the_close_line_tells_uncertain_submits_apart_from_refused_ones(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A submit whose reply was lost may have been accepted and charged: the close line (and
    ``client.stats``) tell it apart, not among the submits "not accepted"."""
    caplog.set_level(logging.INFO, logger="wujie_async")
    async with emulator() as emu, make_client(emu) as client:
        emu.set_faults(FaultConfig(drop_after_accept=1.0, endpoints=frozenset({"generations"})))
        for _ in range(2):
            with pytest.raises(SubmitUncertainError):
                await client.images.submit(prompt="p", model="dall-e-2")
        emu.set_faults(FaultConfig(business_error=1.0, business_error_code="20010001"))
        with pytest.raises(WujieError) as refused:
            await client.images.submit(prompt="p", model="dall-e-2")
        assert not isinstance(refused.value, SubmitUncertainError)
        emu.set_faults(FaultConfig())
        await client.images.generate(prompt="p", model="dall-e-2")
        stats = client.stats
    assert (stats.submits, stats.submit_errors, stats.submits_uncertain) == (1, 3, 2)
    assert emu.stats()["submits_accepted"] == 3  # the two lost replies were accepted
    [closed] = [line for line in lines(caplog, logging.INFO) if "client closed" in line]
    assert closed.startswith(
        "client closed: 1 submit(s) accepted, 3 raised (1 not accepted, 2 uncertain: sent "
        "without a reply, they may have been accepted and charged); 1 job(s) succeeded"
    ), closed


@pytest.mark.fake_clock  # the brake's pacing and recovery pass on the loop's clock
async def test_the_429_brake_engaging_and_releasing_is_told_at_info(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wujie_async")
    refusing = FaultConfig(http_429=0.5, retry_after_s=0, endpoints=frozenset({"generations"}))
    retry = RetryPolicy(initial_wait=0.01, max_wait=0.05, max_attempts=50)
    async with emulator(faults=refusing) as emu, make_client(emu, retry=retry) as client:

        async def submit_until(done: Any) -> None:
            while not done():
                await client.images.submit(prompt="p", model="dall-e-2")

        await asyncio.gather(*(submit_until(lambda: client.stats.submit_rate_limit) for _ in "ab"))
        emu.set_faults(FaultConfig())
        await submit_until(lambda: client.stats.submit_rate_limit is None)
    info = lines(caplog, logging.INFO)
    assert any(line.startswith("429 brake engaged for submit calls: ") for line in info), info
    assert "429 brake released for submit calls" in info


# --- where the log goes: WUJIE_LOG and --verbose -----------------------------------------------
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    if "--block-otel" in sys.argv:  # as if opentelemetry were not installed at all
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"{name} is blocked")
        sys.meta_path.insert(0, Blocker())
    from wujie_async import PollPolicy, WujieClient
    from wujie_async.emulator import Emulator, EmulatorConfig
    if "--basic-config" in sys.argv:  # the app configures logging after importing us
        import logging
        logging.basicConfig(level=logging.INFO, format="APP %(name)s: %(message)s")

    async def main():
        poll = PollPolicy(first_poll_delay=0.02, min_interval=0.02)
        async with Emulator(EmulatorConfig(time_scale=0.005, seed=1)) as emu:
            async with WujieClient(emu.credentials, base_url=emu.base_url, poll=poll) as client:
                job = await client.images.submit(prompt="p", model="dall-e-2")
                result = await job
                await job.save(Path(sys.argv[1]))
        print("ok", result.status, "opentelemetry" in sys.modules)

    asyncio.run(main())
    """
)


def run_child(tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), *flags],
        env={**CLEAN_ENV, **env},
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )


@pytest.mark.long
def test_without_opentelemetry_the_package_imports_and_runs(tmp_path: Path) -> None:
    done = run_child(tmp_path, "--block-otel", WUJIE_LOG="debug")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "4", "False"]
    assert "POST /ai/wj/images/generations -> 200" in done.stderr  # the log works without it
    assert "OpenTelemetry traces off, metrics off" in done.stderr


@pytest.mark.long
def test_wujie_log_shows_the_log_from_its_level_on_stderr(tmp_path: Path) -> None:
    debug = run_child(tmp_path, WUJIE_LOG="debug")
    assert debug.returncode == 0, debug.stderr
    assert "DEBUG wujie_async: POST /ai/wj/images/generations -> 200" in debug.stderr
    assert "DEBUG wujie_async: job " in debug.stderr
    assert "DEBUG wujie_async.download: image " in debug.stderr
    assert "INFO wujie_async: client opened: " in debug.stderr
    info = run_child(tmp_path, WUJIE_LOG="INFO")
    assert "INFO wujie_async: client opened: " in info.stderr
    assert "DEBUG" not in info.stderr
    quiet = run_child(tmp_path)
    assert quiet.stderr == ""
    configured = run_child(tmp_path, "--basic-config", WUJIE_LOG="info")
    assert configured.stderr.count("client opened") == 1, configured.stderr  # once, the app's
    assert "APP wujie_async: client opened: " in configured.stderr
    wrong = run_child(tmp_path, WUJIE_LOG="loud")
    assert "WUJIE_LOG='loud' is not one of debug, info, warning: ignored" in wrong.stderr
    assert "client opened" not in wrong.stderr


@pytest.mark.long
async def test_the_clis_verbose_shows_the_debug_story(tmp_path: Path) -> None:
    code, _, err = await cli(
        "generate", "a fox", "--model", "dall-e-2", "--emulator", *FAST,
        "--out", str(tmp_path), "--verbose", process=True,
    )  # fmt: skip
    assert code == 0, err
    assert "DEBUG wujie_async: POST /ai/wj/images/generations -> 200" in err
    assert " -> succeeded after " in err
    assert "INFO wujie_async: client opened: " in err
    assert "asyncio" not in err  # the DEBUG story is ours, not every library's


@pytest.mark.long
async def test_wujie_log_applies_to_the_cli_too(tmp_path: Path) -> None:
    env = {**CLEAN_ENV, "WUJIE_LOG": "info"}
    code, _, err = await cli(
        "generate", "a fox", "--model", "dall-e-2", "--emulator", *FAST, "--out", str(tmp_path),
        env=env, process=True,  # WUJIE_LOG is read when the package is imported
    )  # fmt: skip
    assert code == 0, err
    assert "INFO wujie_async: client opened: " in err
    assert "DEBUG" not in err


@pytest.mark.long
def test_no_opentelemetry_is_imported_by_the_package_itself() -> None:
    code = "import sys, wujie_async; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=CLEAN_ENV, capture_output=True, text=True, timeout=50
    )
    assert done.stdout.strip() == "False", done.stderr


def test_the_repeated_warnings_gate_is_quiet_when_warnings_are_off() -> None:
    log = logging.getLogger("wujie_async.test-off")
    log.setLevel(logging.ERROR)
    clock = FakeClock()
    warnings = RepeatedWarnings(log, clock=clock)
    warnings.warning("x %s", 1)
    log.setLevel(logging.WARNING)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log.addHandler(Keep())
    try:
        warnings.warning("x %s", 2)  # the one while off was not counted as written
        assert [r.getMessage() for r in records] == ["x 2"]
    finally:
        log.handlers.clear()
        log.setLevel(logging.NOTSET)


_ = (os, WujieError)  # imported for readers of the failure output


async def test_a_key_holding_markup_reaches_log_lines_and_reprs_cleaned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway chooses the keys, and ``<img/src=x/onerror=alert(1)>`` passes as one (no
    whitespace or control character). Errors showed it cleaned, but the DEBUG story, the close
    line's uncollected keys and a job's repr showed it as sent."""
    tag = "<img/src=x/onerror=alert(1)>"

    def listed(keys: list[str]) -> list[dict[str, Any]]:
        image = {"url": "http://127.0.0.1:9/a.png"}
        return [
            {"key": key, "status": 4, "images": [image, image]}
            if key.endswith("K00000")
            else {"key": key, "status": 1}
            for key in keys
        ]

    with caplog.at_level(logging.DEBUG, logger="wujie_async"):
        async with scripted_gateway(listed, submit_data=lambda k: {"key": tag + k}) as gateway:
            async with client_for(gateway) as client:
                done, running = await submit(client, 2)
                await done
                shown = [repr(done), repr(running)]
    said = [r.getMessage() for r in caplog.records if r.name.startswith("wujie_async")]
    assert any("pending -> succeeded" in line for line in said), said
    assert any("were not collected" in line for line in said), said  # the running job
    assert any("more images than a job asked for" in line for line in said), said
    for text in said + shown:
        assert "<img" not in text and "onerror" not in text, text
    assert any("K00001" in line for line in said if "not collected" in line)
