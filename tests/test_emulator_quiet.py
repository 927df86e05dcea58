"""A client leaving mid-request is normal for the emulator: no ERROR, no traceback in its log.

Real sockets: a raw aiohttp client gives up while the emulator is still answering (a reply held
by the ``slow_reply`` fault, a body whose upload never finishes), and the test reads what the
emulator and aiohttp logged. A genuine failure inside a handler must still be an ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from wujie_async.emulator import Emulator, FaultConfig

from .conftest import EmulatorFactory
from .helpers import GENERATIONS, eventually, sign_header

pytestmark = pytest.mark.anyio

BODY = {"prompt": "a red fox", "model": "dall-e-2"}


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


def _headers(emu: Emulator) -> dict[str, str]:
    header = sign_header(emu.credentials.app_id, emu.credentials.private_key)
    return {"Authorization": header, "Content-Type": "application/json"}


async def _give_up(request: asyncio.Task[Any], session: aiohttp.ClientSession) -> None:
    """The client leaves: its request is cancelled and its connection closed."""
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await session.close()


async def _post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> bytes:
    async with session.post(url, **kwargs) as reply:
        return await reply.read()


async def _handled(emu: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    """Until the emulator has dealt with the leaving client: quietly, or with an ERROR."""
    await eventually(
        lambda: emu.stats(timelines=False).get("clients_gone") or _errors(caplog),
        timeout=10,
        what="the emulator handling the client's leaving",
    )


def _assert_quiet(emu: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    errors = _errors(caplog)
    assert not errors, [f"{r.name}: {r.getMessage()} {r.exc_info!r}" for r in errors]
    assert emu.stats(timelines=False)["clients_gone"] == 1
    gone = [r for r in caplog.records if r.name == "wujie_async.emulator"]
    assert [r.levelno for r in gone] == [logging.DEBUG] and gone[0].exc_info is None


async def test_a_client_leaving_a_slow_reply_is_not_an_error(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with emulator(faults=FaultConfig(slow_reply=1.0, slow_reply_s=0.5)) as emu:
        session = aiohttp.ClientSession()
        url = emu.base_url + GENERATIONS
        request = asyncio.create_task(_post(session, url, json=BODY, headers=_headers(emu)))
        # The handler is holding the reply (half a second: ample time to leave before it
        # ends, which the test needs): the client gives up now.
        await eventually(lambda: emu.stats(timelines=False)["faults"].get("slow_reply"))
        await _give_up(request, session)
        await _handled(emu, caplog)
        _assert_quiet(emu, caplog)
        assert emu.stats(timelines=False)["submits_accepted"] == 0  # its body never came


async def test_a_client_leaving_mid_upload_is_not_an_error(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    never = asyncio.Event()

    async def half_a_body() -> AsyncIterator[bytes]:
        yield b'{"prompt": "a red'
        await never.wait()  # the rest never comes

    async with emulator() as emu:
        session = aiohttp.ClientSession()
        url = emu.base_url + GENERATIONS
        headers = _headers(emu)
        request = asyncio.create_task(_post(session, url, data=half_a_body(), headers=headers))
        # The handler has started (and waits for the body): the client gives up now.
        await eventually(lambda: emu.stats(timelines=False)["requests"].get("generations"))
        await _give_up(request, session)
        await _handled(emu, caplog)
        _assert_quiet(emu, caplog)
