"""Edits with large bodies: sent the way aiohttp wants them (no ResourceWarning, so they go
out under ``-W error`` too), a submit that failed before any of its body was written is never
"may have been charged", and megabytes of inline images do not stall the event loop (checked
and encoded a slice at a time on a worker thread)."""

from __future__ import annotations

import base64
import os
import sqlite3
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from wujie_async import SubmitUncertainError

from .conftest import EmulatorFactory, make_client

pytestmark = pytest.mark.anyio


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
