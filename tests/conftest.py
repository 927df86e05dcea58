from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import looptime
import pytest

from wujie_async import Credentials, Limits, PollPolicy, RetryPolicy, Timeouts, WujieClient
from wujie_async._auth import HeaderSigner
from wujie_async._transport import Transport
from wujie_async.emulator import Emulator, EmulatorConfig
from wujie_async.testing import INSTANT_RETRY as INSTANT_RETRY  # the plugin's, re-exported

# The signing vector of the wire contract, kept inside the repository so that a clone with
# nothing beside it passes; test_auth.py also compares it with ../shared when that exists.
AUTH_VECTOR = Path(__file__).resolve().parent / "data" / "auth.json"
SHARED_AUTH_VECTOR = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "auth.json"


pytest_plugins = ["tests.run_guard"]  # no run hangs, no run leaves processes behind


# Polling tuned to emulator jobs that take tens of milliseconds (time_scale 0.005).
FAST_POLL = PollPolicy(
    first_poll_delay=0.03,
    min_interval=0.03,
    max_interval=0.3,
    max_estimate_wait=0.3,
    batch_fill_horizon=0.03,
    unknown_key_grace=1.0,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fake_clock: run on a looptime event loop: when nothing is ready, its clock jumps to the "
        "next timer, so waits (Retry-After, poll intervals, deadlines, emulator jobs) take no "
        "real time. Only for a client and an in-process emulator on one loop: no subprocess, "
        "no journal (its worker thread is invisible to looptime, which would jump past it)",
    )


def fake_clock_loop() -> asyncio.AbstractEventLoop:
    """A new event loop on looptime's fast-forwarding clock, started at a realistic reading."""
    return looptime.new_event_loop(start=time.monotonic())


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    # aiohttp is asyncio-only. looptime's own pytest plugin needs pytest-asyncio, so the fake
    # clock comes in through anyio's loop_factory instead (disabled plugin: see pyproject).
    if request.node.get_closest_marker("fake_clock") is None:
        return "asyncio"
    return ("asyncio", {"loop_factory": fake_clock_loop})


@pytest.fixture
def auth_vector() -> dict[str, Any]:
    vector: dict[str, Any] = json.loads(AUTH_VECTOR.read_text())
    return vector


EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulator]]


@pytest.fixture
def emulator() -> EmulatorFactory:
    """``async with emulator(time_scale=..., faults=...) as emu``, seeded, on loopback
    (``clock=``: the emulator's clock, default the loop's; see ``helpers.SteppedClock``)."""

    @asynccontextmanager
    async def start(
        *, clock: Callable[[], float] | None = None, **config: Any
    ) -> AsyncIterator[Emulator]:
        config.setdefault("time_scale", 0.005)
        config.setdefault("seed", 7)
        async with Emulator(EmulatorConfig(**config), clock=clock) as emu:
            yield emu

    return start


@asynccontextmanager
async def open_transport(
    base_url: str,
    creds: Credentials,
    *,
    retry: RetryPolicy | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[Transport]:
    """A bare Transport to ``base_url`` (no client around it), opened and closed."""
    transport = Transport(
        base_url=base_url,
        signer=HeaderSigner(creds),
        limits=limits or Limits(max_response_bytes=1024 * 1024),
        timeouts=Timeouts(request=10),
        retry=retry or RetryPolicy(max_attempts=2, initial_wait=0),
    )
    await transport.open()
    try:
        yield transport
    finally:
        await transport.close()


def make_client(emu: Emulator, **kwargs: Any) -> WujieClient:
    kwargs.setdefault("poll", FAST_POLL)
    kwargs.setdefault("retry", INSTANT_RETRY)
    kwargs.setdefault("base_url", emu.base_url)
    return WujieClient(emu.credentials, **kwargs)
