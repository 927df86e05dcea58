"""A durable record of every submit, so an accepted key is never lost and nothing is paid twice.

Each submit is written as an *intent* (its request) before it is sent, and its key is written
before ``submit()`` returns; job outcomes follow. SQLite in WAL mode with ``synchronous=FULL``:
once a write is acknowledged it survives the process being killed the next instant.

Writes run on one worker thread, never on the event loop. Whatever is queued when the worker
wakes goes into ONE transaction and one fsync (group commit), so a 10,000-job run pays for
a few hundred commits, not 20,000.

Rows move through these states::

    intent ──► accepted ──► succeeded | failed | cancelled
       │
       ├────► rejected    (the gateway refused it: nothing charged)
       └────► uncertain   (sent, reply lost: it may have been charged; never resent silently)

An ``intent`` found when a journal is opened belongs to a process that died mid-request: it
becomes ``uncertain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ClientStateError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS submits (
    id       INTEGER PRIMARY KEY,
    path     TEXT NOT NULL,
    request  TEXT NOT NULL,
    state    TEXT NOT NULL,
    job_key  TEXT,
    tag      TEXT,
    error    TEXT,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submits_state ON submits(state);
CREATE INDEX IF NOT EXISTS submits_key ON submits(job_key);
CREATE INDEX IF NOT EXISTS submits_tag ON submits(tag);
"""
_FINAL_STATES = ("succeeded", "failed", "cancelled", "rejected", "uncertain")
ALL_STATES = ("intent", "accepted", *_FINAL_STATES)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One submit as the journal remembers it.

    Attributes:
        id: the journal's row id.
        path: the endpoint it was sent to.
        request: the body that was (or was about to be) sent.
        state: intent, accepted, succeeded, failed, cancelled, rejected or uncertain.
        job_key: the gateway's key, once known.
        tag: the caller's own id for the submit (e.g. a queue message id), if given.
        error: what went wrong, for rejected/uncertain/failed rows.
        created: unix time of the intent.
    """

    id: int
    path: str
    request: dict[str, Any]
    state: str
    job_key: str | None
    tag: str | None
    error: str | None
    created: float


_Op = tuple[str, tuple[Any, ...]]
_Work = tuple[list[_Op], Callable[[Any], None] | None]


class Journal:
    """The SQLite journal of one client. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        """Create or open the file, turn dead processes' intents into ``uncertain``."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._worker, args=(ready,), name="wujie-async journal", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None  # the worker has stopped: nothing to close
            raise

    async def close(self) -> None:
        """Flush what is queued and stop the worker."""
        if self._thread is None:
            return
        await self._write([])  # a barrier: everything queued before it is committed
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _worker(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            connection.execute(
                "UPDATE submits SET state='uncertain', error=?, updated=? WHERE state='intent'",
                ("the process stopped before the gateway's reply was recorded", time.time()),
            )
        except sqlite3.Error as exc:
            error = ClientStateError(f"cannot open journal {self.path}: {exc}")
            loop.call_soon_threadsafe(_settle, ready, None, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            self._serve(connection, loop)
        finally:
            connection.close()

    def _serve(self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while True:  # group commit: take everything already waiting
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            results: list[tuple[Callable[[Any], None] | None, Any]] = []
            try:
                connection.execute("BEGIN IMMEDIATE")
                for ops, done in batch:
                    last: Any = None
                    for sql, params in ops:
                        cursor = connection.execute(sql, params)
                        last = cursor.lastrowid if sql.startswith("INSERT") else cursor.fetchall()
                    results.append((done, last))
                connection.execute("COMMIT")
                self.commits += 1
            except Exception as exc:  # any failure must reach the waiters, or they would hang
                with contextlib.suppress(sqlite3.Error):
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                error = ClientStateError(f"journal write failed: {exc}")
                for _, done in batch:
                    if done is not None:
                        loop.call_soon_threadsafe(done, error)
            else:
                for done, value in results:
                    if done is not None:
                        loop.call_soon_threadsafe(done, value)
            if stop:
                return

    async def _write(self, ops: list[_Op]) -> Any:
        """Queue ``ops`` as one unit and wait until they are committed; the last op's result."""
        if self._thread is None or self._loop is None:
            raise ClientStateError("the journal is not open")
        future: asyncio.Future[Any] = self._loop.create_future()

        def done(value: Any) -> None:
            if isinstance(value, BaseException):
                _settle(future, None, value)
            else:
                _settle(future, value, None)

        self._queue.put((ops, done))
        return await future

    def _write_later(self, ops: list[_Op]) -> None:
        """Queue ``ops`` without waiting (outcomes: losing one only means a re-poll on resume)."""
        if self._thread is not None:
            self._queue.put((ops, None))

    # --- records ---------------------------------------------------------------------------------
    async def record_intent(
        self, path: str, request: dict[str, Any], tag: str | None = None
    ) -> int:
        """Write a submit's request before it is sent; returns its row id."""
        now = time.time()
        row_id: int = await self._write(
            [
                (
                    "INSERT INTO submits (path, request, state, tag, created, updated)"
                    " VALUES (?, ?, 'intent', ?, ?, ?)",
                    (path, json.dumps(request, ensure_ascii=False), tag, now, now),
                )
            ]
        )
        return row_id

    async def record_accepted(self, row_id: int, key: str) -> None:
        """Write the key the gateway gave (before ``submit()`` returns)."""
        await self._write(self._accepted(row_id, key))

    def record_accepted_later(self, row_id: int, key: str) -> None:
        """The same, not awaited: for a submit interrupted after its key came back."""
        self._write_later(self._accepted(row_id, key))

    @staticmethod
    def _accepted(row_id: int, key: str) -> list[_Op]:
        return [
            (
                "UPDATE submits SET state='accepted', job_key=?, updated=? WHERE id=?",
                (key, time.time(), row_id),
            )
        ]

    def record_unsent(self, row_id: int, state: str, error: str) -> None:
        """A submit that got no key: ``rejected`` (refused) or ``uncertain`` (reply lost).

        Not awaited (it may run while a cancel unwinds); if it never lands, the row stays an
        intent and becomes ``uncertain`` at the next open, the safe reading.
        """
        assert state in ("rejected", "uncertain")
        self._write_later(
            [
                (
                    "UPDATE submits SET state=?, error=?, updated=? WHERE id=?",
                    (state, error[:2000], time.time(), row_id),
                )
            ]
        )

    def record_outcome(self, key: str, state: str, error: str | None = None) -> None:
        """Note how a job ended (queued, not awaited: the key is already safe)."""
        assert state in _FINAL_STATES
        self._write_later(
            [
                (
                    "UPDATE submits SET state=?, error=?, updated=? "
                    "WHERE job_key=? AND state='accepted'",
                    (state, error[:2000] if error else None, time.time(), key),
                )
            ]
        )

    async def forget(self, ids: Iterable[int]) -> int:
        """Delete the rows with these ids; returns how many existed."""
        wanted = sorted({int(row_id) for row_id in ids})
        if not wanted:
            return 0
        marks = ",".join("?" * len(wanted))
        found = await self._write(
            [
                (f"SELECT COUNT(*) FROM submits WHERE id IN ({marks})", tuple(wanted)),
            ]
        )
        await self._write([(f"DELETE FROM submits WHERE id IN ({marks})", tuple(wanted))])
        return int(found[0][0])

    async def entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Rows in the given states (and with ``tag``, if given), oldest first."""
        where = f"state IN ({','.join('?' * len(states))})"
        params: tuple[Any, ...] = tuple(states)
        if tag is not None:
            where += " AND tag = ?"
            params += (tag,)
        rows = await self._write(
            [
                (
                    "SELECT id, path, request, state, job_key, tag, error, created FROM submits"
                    f" WHERE {where} ORDER BY id",
                    params,
                )
            ]
        )
        return [
            JournalEntry(
                id=row[0],
                path=row[1],
                request=json.loads(row[2]),
                state=row[3],
                job_key=row[4],
                tag=row[5],
                error=row[6],
                created=row[7],
            )
            for row in rows
        ]


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
