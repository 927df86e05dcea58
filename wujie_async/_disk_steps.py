"""One image's file steps on worker threads, bounded by its save's deadline.

A step on a disk that stops answering (a frozen file system, a hung NFS mount) does not
return, and a thread cannot be stopped: waiting for it held the save, and its caller, past
``DownloadPolicy.deadline``, for as long as the disk stayed frozen. So at the deadline the
save gives up on the step and raises an ``OSError`` (``EIO``, like any other refusal of the
disk's); the step's thread, once the disk answers, removes the temporary file instead of
leaving it to the save, and a temporary file whose save gave up is never renamed into place.
Each image is still complete under its final name or not there at all.

A plain cancel (``task.cancel()``: an ``asyncio.timeout`` around ``job.save()``, a web
framework dropping its request) still waits for the step to end, so that the save's own
clean-up runs after it: a shielded anyio scope alone holds off only anyio's cancels, so the
step runs as a task of its own, waited for through every cancel. Only the deadline gives up
on it.
"""

from __future__ import annotations

import asyncio
import errno
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio

from . import _atomic_file

_T = TypeVar("_T")

# The least time a file step gets before its save gives up on it, even past the deadline.
STEP_GRACE_S = 1.0


class DiskSteps:
    """The temporary file of one image's save, written on worker threads until ``give_up_at``
    (the loop's clock, as ``anyio.current_time()``)."""

    def __init__(self, give_up_at: float, deadline: float | None) -> None:
        self._give_up_at = give_up_at
        self._deadline = deadline
        self._lock = threading.Lock()  # held only around flags: never around a disk call
        self._given_up = False
        # Whether the step on its thread has ended (its clean-up looked at _given_up): past
        # that, a give-up would leave its temporary file to nobody.
        self._step_ended = False
        self._renaming = False
        self._made: tuple[IO[bytes], Path] | None = None
        self.temp: Path | None = None  # the temporary file's name, once made

    async def open(self, folder: Path, stem: str) -> None:
        await self._run(lambda: self._opened(_atomic_file.open_temp(folder, stem)))

    async def write(self, data: bytes) -> None:
        handle, _ = self._file()
        await self._run(lambda: handle.write(data))

    async def commit(self, path: Path) -> None:
        handle, temp = self._file()

        def step() -> None:
            _atomic_file.commit(handle, temp, path, wanted=self._renames)
            with self._lock:
                if self._renaming:  # renamed: no temporary file is left to remove
                    self._made = None

        await self._run(step)

    async def discard(self) -> None:
        """Remove the temporary file (after a failure); nothing once the save gave up on a
        step: the step's own thread removes it when the disk answers, and a call here would
        wait behind that step (the file's lock) for as long as the disk stays frozen."""
        if self._given_up:
            return
        with self._lock:
            made, self._made = self._made, None
        if made is not None:
            await self._run(lambda: _atomic_file.discard(*made))

    # --- internals ------------------------------------------------------------------------------
    def _file(self) -> tuple[IO[bytes], Path]:
        if self._made is None:
            raise RuntimeError("no temporary file is open")
        return self._made

    def _opened(self, made: tuple[IO[bytes], Path]) -> None:
        with self._lock:
            self._made = made
            self.temp = made[1]

    def _renames(self) -> bool:
        """On the thread, just before the rename: False once the save gave up (the file is
        removed instead)."""
        with self._lock:
            self._renaming = not self._given_up
            return self._renaming

    def _on_thread(self, step: Callable[[], _T]) -> _T:
        try:
            return step()
        finally:
            with self._lock:
                self._step_ended = True
                left = self._made if self._given_up else None
                if left is not None:
                    self._made = None
            if left is not None:  # the save gave up on this step: nobody else will remove it
                _atomic_file.discard(*left)

    async def _run(self, step: Callable[[], _T]) -> _T:
        """``step()`` on a worker thread, waited for through every cancel (a cancel is
        raised once it has ended), given up on at the deadline (but never
        before it has had ``STEP_GRACE_S`` of its own: a deadline the network used up is not
        the disk's fault)."""
        self._step_ended = False  # (steps run one at a time: none is on a thread now)
        done = asyncio.ensure_future(anyio.to_thread.run_sync(self._on_thread, step))
        give_up_at = max(self._give_up_at, anyio.current_time() + STEP_GRACE_S)
        cancel: BaseException | None = None
        while not done.done():
            left = give_up_at - anyio.current_time()
            if left <= 0:
                held = self._give_up(done)
                if held is None:  # it ended meanwhile: its end is on its way to the loop
                    give_up_at = math.inf
                    continue
                # A cancel that came meanwhile (a caller's own timeout) is what the caller
                # waits for: swallowed, its asyncio.timeout would never say TimeoutError.
                raise held if cancel is None else cancel
            try:
                with anyio.CancelScope(shield=True):
                    # Returns when it ends, or at the deadline; never cancels it.
                    await asyncio.wait({done}, timeout=None if math.isinf(left) else left)
            except asyncio.CancelledError as exc:
                cancel = exc
        if cancel is not None:
            # The step's own error, if any, is answered by the cancel: retrieved here, never
            # logged by asyncio as "Task exception was never retrieved".
            if not done.cancelled():
                done.exception()
            raise cancel
        return done.result()

    def _give_up(self, done: asyncio.Future[Any]) -> OSError | None:
        """Leave the step to its thread (which removes the temporary file when it returns);
        the error that says so. None: the step has ended on its thread already (the loop has
        not heard yet), and is not given up on: its thread would no longer clean up."""
        with self._lock:
            if self._step_ended:
                return None
            self._given_up = True
            renaming = self._renaming
        # Its outcome is the thread's to clean up now: never "exception never retrieved".
        done.add_done_callback(lambda step: step.cancelled() or step.exception())
        after = (
            "it is renamed into place, complete, once the disk answers"
            if renaming
            else "its temporary file is removed once the disk answers"
        )
        return OSError(
            errno.EIO,
            f"the disk did not finish writing the image within {self._deadline:g} s "
            f"(DownloadPolicy.deadline): is it frozen, or a mount that stopped answering? "
            f"{after}",
        )
