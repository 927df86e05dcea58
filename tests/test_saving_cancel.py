"""A save cancelled (a plain ``task.cancel()``) while its file steps run on a worker thread:
each image is either complete under its final name or not there at all, and no temporary file
(nor an open one) is left behind.

The window is held open with an audit hook (``sys.addaudithook``, Python's public hook on
``os.rename``/``os.replace`` and ``open``), which parks the worker thread inside the step until
the test has cancelled the task: no private function of ours is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from wujie_async import WujieError

from .conftest import EmulatorFactory, make_client

pytestmark = pytest.mark.anyio


class _Gate:
    """Parks the first worker thread that raises ``event`` on a path containing ``marker``."""

    def __init__(self) -> None:
        self.event = ""
        self.marker = ""
        self.entered = threading.Event()
        self.release = threading.Event()

    def arm(self, event: str, marker: str) -> None:
        self.event, self.marker = event, marker
        self.entered.clear()
        self.release.clear()

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != self.event or self.entered.is_set() or not args:
            return
        if self.marker not in str(args[0]) or threading.current_thread() is threading.main_thread():
            return
        self.entered.set()
        self.release.wait(20)  # bounded: a broken test never hangs the worker for good

    def disarm(self) -> None:
        self.event = ""
        self.release.set()


_GATE = _Gate()
sys.addaudithook(_GATE.hook)  # hooks cannot be removed: disarmed, it costs a comparison


async def _entered() -> None:
    assert await asyncio.to_thread(_GATE.entered.wait, 20), "no worker thread reached the step"


@pytest.mark.parametrize(
    ("event", "step"),
    [("os.rename", "the rename to the final name"), ("open", "the temporary file's creation")],
)
async def test_a_save_cancelled_during_a_file_step_leaves_no_stray_file(
    emulator: EmulatorFactory, tmp_path: Path, event: str, step: str
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2")
        await job
        _GATE.arm(event, str(folder))
        try:
            saving = asyncio.create_task(job.save(folder))
            await _entered()
            saving.cancel()
            await asyncio.sleep(0)
            _GATE.release.set()
            try:
                saved = await saving
            except asyncio.CancelledError:
                saved = None
        finally:
            _GATE.disarm()
        whole = {s.path.name: s.sha256 for s in await job.save(tmp_path / "whole")}
    left = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert not [name for name in left if name.startswith(".")], (step, left)  # no temp file
    assert saved is None, f"the cancel during {step} was not raised"
    assert left.items() <= whole.items(), (step, left)  # complete under its name, or absent
    if step == "the rename to the final name":
        assert left == whole  # the step ran to its end: the image is saved


async def test_a_close_that_leaves_a_save_writing_says_so(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A save whose file step does not return (a frozen disk, a hung NFS mount) outlives the
    close's bounded wait: the close goes on, and a WARNING names what it left writing."""
    folder = tmp_path / "out"
    folder.mkdir()
    async with emulator() as emu:
        client = make_client(emu)
        async with client:
            job = await client.images.submit(prompt="a cat", model="dall-e-2")
            await job
            _GATE.arm("open", str(folder))
            try:
                saving = asyncio.create_task(job.save(folder))
                await _entered()
                with caplog.at_level("WARNING", logger="wujie_async"):
                    await client.aclose()  # the disk still does not answer
            finally:
                _GATE.disarm()
            with contextlib.suppress(asyncio.CancelledError, WujieError):
                await saving
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "1 image save(s) still writing" in line and str(folder) in line for line in warned
    ), warned
