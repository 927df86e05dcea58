"""Edits with large bodies: sent the way aiohttp wants them (no ResourceWarning, so they go
out under ``-W error`` too), a submit that failed before any of its body was written is never
"may have been charged", and megabytes of inline images are checked and encoded a slice at a
time on a worker thread (how long the event loop is held: benchmarks/edit_loop_lag.py)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
import struct
import warnings
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from wujie_async import InvalidRequestError, SubmitUncertainError, WujieClient
from wujie_async._slices import SLICE_CHARS, b64_ends, json_pieces

from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .hostile import throwaway_credentials

pytestmark = pytest.mark.anyio

EDITS = "/ai/wj/images/edits"
INFO = "/ai/wj/images/info"
KEY = "3E46BF62A51256A96EEFB73079BD55E2"


def padded_png(extra: int) -> bytes:
    """A whole 4x4 PNG carrying ``extra`` bytes of metadata (random: nothing compresses)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tEXt", b"c\0" + os.urandom(extra))
        + chunk(b"IDAT", zlib.compress(bytes(4 * 13)))
        + chunk(b"IEND", b"")
    )


def inline(data: bytes) -> str:
    return base64.b64encode(data).decode()


def journal_states(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [state for (state,) in db.execute("SELECT state FROM submits ORDER BY id")]


# --- the body over aiohttp's 1 MiB ----------------------------------------------------------------
async def test_a_large_inline_edit_is_sent_with_warnings_as_errors(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A 2 MB image (its body 2.7 MB, under gpt-image-1's 25 MB) made aiohttp warn "Sending a
    large body directly with raw bytes might lock the event loop": under -W error the submit
    raised that bare ResourceWarning, nothing was sent, and it was counted uncertain."""
    image = inline(padded_png(2_000_000))
    journal = tmp_path / "jobs.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            job = await client.images.submit_edit(
                prompt="a hat", model="gpt-image-1", image=[image]
            )
        await job  # the emulator read the whole body, checked its image, and made the job
        assert emu.stats()["requests"]["edits"] == 1
        assert client.stats.submits_uncertain == 0
        assert await client.uncertain_submits() == []
    assert journal_states(journal) == ["succeeded"]


# --- nothing of the body written: never "may have been charged" -----------------------------------
def failing_hooks(failing: dict[str, Callable[[], None]]) -> aiohttp.TraceConfig:
    """A trace config (a user's own session's, with a bug) whose hook named in ``failing``
    runs what ``failing`` maps it to."""
    config = aiohttp.TraceConfig()
    for hook in ("on_request_start", "on_request_headers_sent", "on_request_chunk_sent"):

        async def call(
            session: aiohttp.ClientSession, context: SimpleNamespace, params: Any, hook: str = hook
        ) -> None:
            action = failing.get(hook)
            if action is not None:
                action()

        getattr(config, hook).append(call)
    return config


def warn() -> None:
    warnings.warn("a warning turned into an error", ResourceWarning, stacklevel=1)


def fail() -> None:
    raise RuntimeError("a bug in a hook")


@pytest.mark.parametrize("hook", ["on_request_start", "on_request_headers_sent"])
async def test_only_a_submit_that_failed_before_its_body_was_written_is_unsent(
    emulator: EmulatorFactory, tmp_path: Path, hook: str
) -> None:
    """An error raised before any byte of the body was handed to the connection (here a
    warning under -W error, in a trace hook of the user's own session): the request never
    left, so the journal row is ``unsent`` (safe to send again) and the submit is not counted
    uncertain. It was ``uncertain``, "may have been charged": a bulk run never resent it.
    An error once the body's write began may come after some of it left: that submit stays
    uncertain (never resent)."""
    journal = tmp_path / "jobs.sqlite"
    failing: dict[str, Callable[[], None]] = {hook: warn}
    config = failing_hooks(failing)
    async with emulator() as emu, aiohttp.ClientSession(trace_configs=[config]) as session:
        async with make_client(emu, journal=journal, session=session) as client:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ResourceWarning):
                    await client.images.submit(prompt="a cat", model="dall-e-2")
            assert client.stats.submit_errors == 1
            assert client.stats.submits_uncertain == 0
            assert await client.uncertain_submits() == []
            assert emu.stats()["requests"] == {}

            failing.clear()
            failing["on_request_chunk_sent"] = fail
            with pytest.raises(SubmitUncertainError):
                await client.images.submit(prompt="a cat", model="dall-e-2")
            assert client.stats.submits_uncertain == 1
    assert journal_states(journal) == ["unsent", "uncertain"]


# --- a slice at a time, byte for byte the same ----------------------------------------------------
def test_a_body_encoded_in_slices_is_the_body_encoded_whole() -> None:
    """Long texts (escapes and non-ASCII across slice ends included) come out as the request
    encoder writes them."""
    long_text = ('é"\\\n\u2028' * SLICE_CHARS)[: 3 * SLICE_CHARS + 5]
    body: dict[str, Any] = {
        "prompt": long_text,
        "model": "gpt-image-1",
        "image": ["A" * (2 * SLICE_CHARS + 4), "https://example.com/a.png", 3],
        "n": 2,
        "extra": {"nested": [1, None, True, "x"]},
        "empty": [],
    }
    whole = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert b"".join(json_pieces(body)) == whole


def test_base64_decoded_in_slices_is_checked_as_it_is_whole() -> None:
    data = os.urandom(3 * SLICE_CHARS)
    for size in [0, 1, 2, 3, 100, SLICE_CHARS // 4 * 3, len(data)]:
        text = base64.b64encode(data[:size]).decode()
        assert b64_ends(text, 0, 64, 32) == (data[:size][:64], data[:size][-32:], size)
    good = base64.b64encode(data).decode()
    bad = [
        good[:-1],  # no whole number of quanta
        good[:SLICE_CHARS] + "!" + good[SLICE_CHARS + 1 :],  # outside the alphabet
        "QQ==" + good[4:],  # padding before the end
        good[: SLICE_CHARS - 4] + "QQ==" + good[SLICE_CHARS:],
        good[:76] + "\n" + good[77:],  # a line break
    ]
    for text in bad:
        assert b64_ends(text, 0, 64, 32) is None
        try:
            base64.b64decode(text, validate=True)
        except binascii.Error:
            continue
        raise AssertionError("whole, it decodes")


# --- megabytes of image checked, encoded and sent ------------------------------------------------
@asynccontextmanager
async def draining_gateway() -> AsyncIterator[str]:
    """A gateway that reads each edit's body a piece at a time (it parses nothing, so what
    stalls the loop is the client's doing) and accepts it."""

    async def edits(request: web.Request) -> web.Response:
        while await request.content.readany():
            pass
        return web.json_response({"code": "200", "message": "success", "data": {"key": KEY}})

    async def info(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"code": "200", "message": "success", "data": {"list": []}})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(EDITS, edits)
    app.router.add_post(INFO, info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_megabytes_of_inline_images_are_sent_and_cheap_rules_refuse_first() -> None:
    """A 32 MB inline edit is sent; one that a cheap rule refuses (n) is refused for that
    alone, before its image is decoded; one over the size cap is refused by its length. (How
    long each holds the event loop is measured in benchmarks/edit_loop_lag.py, not here.)"""
    image = inline(padded_png(24_000_000))  # 32 MB of base64, under gpt-image-1's 25 MB
    huge = "A" * 100_000_000  # 75 MB of image
    async with draining_gateway() as base_url:
        client = WujieClient(
            throwaway_credentials(), base_url=base_url, poll=FAST_POLL, retry=INSTANT_RETRY
        )
        async with client:
            job = await client.images.submit_edit(
                prompt="a hat", model="gpt-image-1", image=[image]
            )
            assert job.key == KEY
            job.cancel()
            with pytest.raises(InvalidRequestError) as refused:
                await client.images.submit_edit(
                    prompt="a hat", model="gpt-image-1", image=[image], n=11
                )
            assert [field for field, _ in refused.value.violations] == ["n"]
            with pytest.raises(InvalidRequestError) as too_large:
                await client.images.submit_edit(prompt="a hat", model="gpt-image-1", image=[huge])
            assert too_large.value.violations == [
                ("image[0]", "gpt-image-1 takes images smaller than 25 MB")
            ]
