"""Shared by the examples: a client for the real gateway, or for an embedded emulator.

With WUJIE_APP_ID and WUJIE_PRIVATE_KEY set, the examples talk to the gateway (WUJIE_BASE_URL,
default production). Without them they start the emulator on loopback, so they run as written;
except in fleet mode, whose members must share one gateway (a standalone emulator will do).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from wujie_async import WujieClient
from wujie_async.emulator import Emulator, EmulatorConfig


@contextlib.asynccontextmanager
async def connect(*, time_scale: float = 0.05, **client_options: Any) -> AsyncIterator[WujieClient]:
    """``async with connect() as client``: the real gateway if configured, else an emulator."""
    if os.environ.get("WUJIE_APP_ID") and os.environ.get("WUJIE_PRIVATE_KEY"):
        async with WujieClient(**client_options) as client:
            yield client
        return
    if client_options.get("fleet") is not None:
        # Each process's own emulator knows only its own jobs: a fleet's leader would ask one
        # emulator about every member's keys, and the others' jobs would fail as unknown.
        raise SystemExit(
            "fleet mode needs one gateway for every member, and an emulator of this process is"
            " not: set WUJIE_APP_ID, WUJIE_PRIVATE_KEY and WUJIE_BASE_URL (to try it, start one"
            ' emulator: eval "$(wujie-async emulator --background --print-env)")'
        )
    async with Emulator(EmulatorConfig(time_scale=time_scale)) as emulator:
        print(f"(no WUJIE_APP_ID/WUJIE_PRIVATE_KEY: using an emulator at {emulator.base_url})")
        async with WujieClient(
            emulator.credentials, base_url=emulator.base_url, **client_options
        ) as client:
            yield client
