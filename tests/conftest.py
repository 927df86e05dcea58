from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from wujie_async import PollPolicy, RetryPolicy, WujieClient
from wujie_async.emulator import Emulator, EmulatorConfig

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
INSTANT_RETRY = RetryPolicy(initial_wait=0.0, max_wait=0.05, max_attempts=8)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-only


@pytest.fixture
def auth_vector() -> dict[str, Any]:
    vector: dict[str, Any] = json.loads(AUTH_VECTOR.read_text())
    return vector


EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulator]]


@pytest.fixture
def emulator() -> EmulatorFactory:
    """``async with emulator(time_scale=..., faults=...) as emu``, seeded, on loopback."""

    @asynccontextmanager
    async def start(**config: Any) -> AsyncIterator[Emulator]:
        config.setdefault("time_scale", 0.005)
        config.setdefault("seed", 7)
        async with Emulator(EmulatorConfig(**config)) as emu:
            yield emu

    return start


def make_client(emu: Emulator, **kwargs: Any) -> WujieClient:
    kwargs.setdefault("poll", FAST_POLL)
    kwargs.setdefault("retry", INSTANT_RETRY)
    kwargs.setdefault("base_url", emu.base_url)
    return WujieClient(emu.credentials, **kwargs)
