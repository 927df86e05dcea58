"""Manifest rows written on a thread of their own: the event loop never waits on the disk.

A disk that stops answering (a hung NFS mount, a frozen file system) holds a write for as
long as it stays so. Written on the event loop, one row held the signal handlers with it:
SIGTERM did nothing, the run's own 8 s grace never came, and the supervisor's SIGKILL left no
summary. Here the loop queues each row and goes on; the thread writes them in order, makes
room on a full disk (the run's reserve) and reports what the disk refused back to the loop.
Every wait for the rows is bounded by the disk's own progress: once it has taken nothing for
``ROWS_DEADLINE_S``, rows still unwritten are the run's to list (their keys in the summary);
the thread, a daemon, is left to its write. A disk that keeps taking rows is waited for: a
stop that ends 278,000 lines at once queues as many ``not_sent`` rows, and timing the oldest
row queued read that healthy backlog (and a loaded machine writing it) as a stalled disk.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

import anyio

from ._manifest import Manifest, ManifestGoneError

# How long the end of a run waits for the rows it queued (a disk that answers writes them in
# milliseconds): within docker stop's 10 s after a SIGTERM, the run's 8 s grace included.
ROWS_DEADLINE_S = 1.5
# How often past its deadline a wait looks again whether the disk took a row meanwhile.
_LOOK_S = 0.05

Refused = Callable[[dict[str, Any] | None, OSError], None]
"""Told (on the loop) of a row the disk refused: the row (None: written once room was made)
and why."""
Gone = Callable[[list[dict[str, Any]]], None]
"""Told (on the loop) that the manifest was deleted: every row this run wrote to it."""


class RowWriter:
    """One thread writing ``manifest``'s rows in the order they were queued.

    Args:
        manifest: the file (its handle is closed by :meth:`close`, on the thread).
        make_room: called once, at the first row the disk refuses, before writing it again.
        spare_room: called (with the row's size) for each later refused ``pending`` row (a
            job's key: it must be on disk at once), before writing it again.
        refused: see :data:`Refused`; ``gone``: see :data:`Gone`.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        make_room: Callable[[], None] | None,
        spare_room: Callable[[int], None] | None,
        refused: Refused,
        gone: Gone,
    ) -> None:
        self._manifest = manifest
        self._make_room = make_room
        self._spare_room = spare_room
        self._refused = refused
        self._gone = gone
        self._loop = asyncio.get_running_loop()
        self._queue: SimpleQueue[tuple[str, Any] | None] = SimpleQueue()
        self._lock = threading.Lock()
        # Rows queued (or being written), in the order the thread takes them, each with when
        # it was queued (monotonic clock).
        self._unwritten: collections.deque[tuple[float, dict[str, Any]]] = collections.deque()
        # When each item queued and not done yet (a row, a call, a mark) was queued, in order,
        # and when the thread last finished one: the disk's wait runs from the later of the
        # two (the thread's own progress, whatever the backlog or the loop's lag).
        self._items: collections.deque[float] = collections.deque()
        self._progress = time.monotonic()
        self._thread = threading.Thread(target=self._serve, name="wujie-async rows", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one row (never waits)."""
        with self._lock:
            self._unwritten.append((time.monotonic(), record))
        self._put("row", record)

    def _put(self, kind: str, value: Any) -> None:
        with self._lock:
            self._items.append(time.monotonic())
        self._queue.put((kind, value))

    def rewrite(self, records: list[dict[str, Any]], before: Callable[[], None]) -> None:
        """Call ``before`` (blocking: give room back), then write ``records`` again; what the
        disk still refuses is reported (``refused``) without making room."""
        self._put("call", before)
        now = time.monotonic()
        with self._lock:
            self._unwritten.extend((now, record) for record in records)
        for record in records:
            self._put("again", record)

    def waiting_for(self) -> float:
        """Seconds the disk has kept the rows waiting: since the thread last finished a row
        (or a call), or since the first one left was queued if later (0: nothing waits). A
        backlog written row after row never grows it, nor does a loop too busy to look."""
        with self._lock:
            if not self._items:
                return 0.0
            return time.monotonic() - max(self._items[0], self._progress)

    def unwritten(self) -> list[dict[str, Any]]:
        """Rows queued that the disk has not taken yet (nor refused)."""
        with self._lock:
            return [record for _, record in self._unwritten]

    async def drain(self, timeout: float = ROWS_DEADLINE_S) -> bool:
        """Wait until every row queued so far was written or refused, as long as the disk
        keeps taking them: False once it has taken none for ``timeout`` (``waiting_for``)."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._put("mark", done)
        while not done.done():
            with anyio.move_on_after(max(timeout - self.waiting_for(), 0.0) + _LOOK_S):
                await asyncio.shield(done)
            if self.waiting_for() > timeout:
                break
        return done.done()

    def close(self) -> None:
        """Close the file once the rows queued are written, and end the thread (never waits:
        a thread held by the disk closes nothing another thread could reuse)."""
        self._put("call", self._manifest.close)
        self._queue.put(None)

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, value = item
            if kind == "mark":
                self._tell(_settle, value)
            elif kind == "call":
                with contextlib.suppress(OSError):
                    value()
            else:
                self._write(value, make_room=kind == "row")
                with self._lock:
                    self._unwritten.popleft()  # this row: rows are taken in order
            with self._lock:
                self._items.popleft()
                self._progress = time.monotonic()

    def _write(self, record: dict[str, Any], *, make_room: bool) -> None:
        try:
            self._manifest.write(record)
        except ManifestGoneError:
            written = list(self._manifest.written)
            self._manifest.written.clear()
            self._tell(self._gone, written)
        except OSError as exc:
            kept = make_room and self._written_with_room_made(record)
            self._tell(self._refused, None if kept else record, exc)

    def _written_with_room_made(self, record: dict[str, Any]) -> bool:
        make_room, self._make_room = self._make_room, None
        if make_room is not None:
            make_room()
        elif self._spare_room is not None and record.get("status") == "pending":
            self._spare_room(len(json.dumps(record, ensure_ascii=False).encode()) + 1024)
        else:
            return False
        try:
            self._manifest.write(record)
        except OSError:
            return False
        return True

    def _tell(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(callback, *args)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
