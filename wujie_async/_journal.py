"""A durable record of every submit, so an accepted key is never lost and nothing is paid twice.

Each submit is written as an *intent* (its request) before it is sent, and its key is written
before ``submit()`` returns; job outcomes follow. SQLite in WAL mode with ``synchronous=FULL``:
once a write is acknowledged it survives the process being killed the next instant.

Writes run on one worker thread, never on the event loop. Whatever is queued when the worker
wakes goes into ONE transaction and one fsync (group commit), so a 10,000-job run pays for
a few hundred commits, not 20,000. Reads take their own path through the same worker, after
the writes queued before them are committed, outside any write transaction.

Why a thread of its own with asyncio futures rather than ``anyio.to_thread``: the worker lives
as long as the journal (it holds the SQLite connection and the lock), and each queued record
is answered by ``loop.call_soon_threadsafe`` settling that record's future; many waiters share
one commit. ``anyio.to_thread.run_sync`` runs one call per thread hop, which would forfeit the
group commit. Closing waits for the worker with ``anyio.to_thread``.

A journal has one writer: :meth:`Journal.open` takes an exclusive ``flock`` on the sidecar file
``<journal>.lock`` (which names the holder: pid and host) and keeps it until :meth:`close`. A
second opener, in this process or another, gets :class:`JournalLockedError` at once. The
operating system drops the lock when its holder dies, however it dies (``kill -9`` included).
The journal file, its ``-wal``/``-shm`` companions and the lock file are created ``0600``: they
hold prompts, edit images and tags.

Rows move through these states::

    intent ──► accepted ──► succeeded | failed | cancelled
       │
       ├────► rejected    (the gateway refused it: nothing charged)
       ├────► uncertain   (it may have reached the gateway, reply lost: it may have been
       │                   charged; never resent silently)
       └────► unsent      (the request never left the process: safe to send again)

An ``intent`` found when a journal is opened belongs to a process that died mid-request (only
the lock holder writes, and the lock is free): it becomes ``uncertain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from ._errors import ClientStateError

logger = logging.getLogger("wujie_async")

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
_OUTCOME_STATES = ("succeeded", "failed", "cancelled")
_NOT_ACCEPTED_STATES = ("rejected", "uncertain", "unsent")
_FINAL_STATES = (*_OUTCOME_STATES, *_NOT_ACCEPTED_STATES)
ALL_STATES = ("intent", "accepted", *_FINAL_STATES)
_SQL_VARIABLES_PER_STATEMENT = 500  # well under SQLite's lowest default limit (999)
_ERROR_CHARS = 2000


class JournalLockedError(ClientStateError):
    """Another live process (or another client in this one) has the journal open.

    Two writers on one journal could each send the same request, paying twice, so a journal
    has one writer at a time. Wait for the other process to end, or give this run its own
    journal file.

    Attributes:
        path: the journal file.
        pid: the holder's process id, if it could be read.
        host: the holder's host name, if it could be read.
    """

    def __init__(self, path: Path, *, pid: int | None, host: str | None) -> None:
        self.path = path
        self.pid = pid
        self.host = host
        holder = f"process {pid} on host {host}" if pid is not None else "another process (unknown)"
        super().__init__(
            f"journal {path} is in use by {holder}: one journal has one writer at a time. "
            "Wait for that process to end (or stop it), or use another journal file."
        )


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One submit as the journal remembers it.

    Attributes:
        id: the journal's row id.
        path: the endpoint it was sent to.
        request: the body that was (or was about to be) sent; ``{}`` when the stored text
            cannot be read (a WARNING names the row).
        state: intent, accepted, succeeded, failed, cancelled, rejected, uncertain or unsent.
        job_key: the gateway's key, once known.
        tag: the caller's own id for the submit (e.g. a queue message id), if given.
        error: what went wrong, for rejected/uncertain/unsent/failed rows.
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
_Done = Callable[[Any], None]


@dataclass(slots=True)
class _Write:
    """Statements committed together; ``done`` gets ``(lastrowid, rows changed)`` or an error."""

    ops: list[_Op]
    done: _Done | None


@dataclass(slots=True)
class _Read:
    """One query; ``done`` gets its rows or an error."""

    sql: str
    params: tuple[Any, ...]
    done: _Done


def _check_state(state: str, allowed: tuple[str, ...]) -> None:
    # A real check, not an assert: `python -O` must not let a bad state into the file.
    if state not in allowed:
        raise ValueError(f"journal state {state!r} is not one of {', '.join(allowed)}")


class SubmitJournal(Protocol):
    """What the client needs of a journal: the SQLite :class:`Journal`, or a fleet's in Redis.

    Same protocol for both: intent before sending, key before ``submit()`` returns, outcomes
    queued (not awaited), ``uncertain`` for a request whose reply was lost.
    """

    @property
    def commits(self) -> int:
        """Writes committed so far (for ``client.stats``)."""
        ...

    async def open(self) -> None:
        """Make it ready for records."""
        ...

    async def close(self) -> None:
        """Write what is queued and stop."""
        ...

    async def record_intent(
        self, path: str, request: dict[str, Any], tag: str | None = None
    ) -> int:
        """Write a submit's request before it is sent; returns its row id."""
        ...

    async def record_accepted(self, row_id: int, key: str) -> None:
        """Write the key the gateway gave."""
        ...

    def record_accepted_later(self, row_id: int, key: str) -> None:
        """The same, not awaited."""
        ...

    def record_unsent(self, row_id: int, state: str, error: str) -> None:
        """A submit that got no key: ``rejected``, ``uncertain`` or ``unsent``."""
        ...

    def record_outcome(self, key: str, state: str, error: str | None = None) -> None:
        """Note how a job ended."""
        ...

    async def forget(self, ids: Iterable[int]) -> int:
        """Delete rows; how many were deleted."""
        ...

    async def entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Rows in ``states`` (every row if none), with ``tag`` if given; oldest first."""
        ...


class Journal:
    """The SQLite journal of one client. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._queue: queue.SimpleQueue[_Write | _Read | None] = queue.SimpleQueue()
        # Guards ``_accepting`` and the put of the stop marker: once the marker is queued
        # nothing else can be, so no waiter is ever left behind the worker's exit.
        self._gate = threading.Lock()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self.commits = 0

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        """Lock and open the file, turn dead processes' intents into ``uncertain``.

        Raises:
            JournalLockedError: another process (or client) has this journal open.
            ClientStateError: the file cannot be created or read.
        """
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._accepting = True
        self._thread = threading.Thread(
            target=self._worker, args=(ready,), name="wujie-async journal", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            # Failed (the worker has stopped) or cancelled (tell it to stop once it is up).
            with self._gate:
                self._accepting = False
                self._queue.put(None)
            self._thread = None
            raise

    async def close(self) -> None:
        """Commit what is queued, stop the worker and release the lock."""
        if self._thread is None:
            return
        with contextlib.suppress(ClientStateError):
            await self._write([])  # a barrier: everything queued before it is committed
        with self._gate:
            self._accepting = False
            self._queue.put(None)
        # abandon_on_cancel: cancelling close() stops the wait at once, as before; the worker
        # still finishes its last commit and exits on its own.
        await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
        self._thread = None

    def _worker(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        if loop is None:  # open() sets it before starting this thread
            raise RuntimeError("journal worker started without a loop")
        try:
            self._lock_fd = _take_lock(self.lock_path, self.path)
            try:
                connection = self._connect()
            except BaseException:
                self._release_lock()
                raise
        except JournalLockedError as exc:
            self._accepting = False
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        except (sqlite3.Error, OSError) as exc:
            self._accepting = False
            error = ClientStateError(f"cannot open journal {self.path}: {exc}")
            loop.call_soon_threadsafe(_settle, ready, None, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            self._serve(connection, loop)
        finally:
            connection.close()
            self._release_lock()
            self._fail_leftovers(loop)

    def _connect(self) -> sqlite3.Connection:
        _create_private(self.path)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            # Safe only because we hold the lock: an intent now is a dead writer's.
            connection.execute(
                "UPDATE submits SET state='uncertain', error=?, updated=? WHERE state='intent'",
                ("the process stopped before the gateway's reply was recorded", time.time()),
            )
            for suffix in ("-wal", "-shm"):  # SQLite copies the file's mode; older files may not
                _restrict(self.path.with_name(self.path.name + suffix))
        except BaseException:
            connection.close()
            raise
        return connection

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # still ours while we truncate: nobody else's name is erased
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _fail_leftovers(self, loop: asyncio.AbstractEventLoop) -> None:
        """If the worker stops for any reason, nothing queued may wait for ever."""
        with self._gate:
            self._accepting = False
        error = ClientStateError(f"journal {self.path} is closed")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.done is not None:
                _call_soon(loop, item.done, error)

    def _serve(self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # group commit: take everything already waiting
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            writes: list[_Write] = []
            stop = False
            for item in items:
                if item is None:
                    stop = True  # nothing can be queued after the marker (see _gate)
                elif isinstance(item, _Write):
                    writes.append(item)
                else:
                    self._commit(connection, loop, writes)  # a read sees what came before it
                    writes = []
                    self._read(connection, loop, item)
            self._commit(connection, loop, writes)
            if stop:
                return

    def _commit(
        self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop, writes: list[_Write]
    ) -> None:
        if not writes:
            return
        results: list[tuple[_Done | None, tuple[int | None, int]]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for write in writes:
                last_row: int | None = None
                changed = 0
                for sql, params in write.ops:
                    cursor = connection.execute(sql, params)
                    last_row = cursor.lastrowid
                    changed += max(cursor.rowcount, 0)
                results.append((write.done, (last_row, changed)))
            connection.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # any failure must reach the waiters, or they would hang
            with contextlib.suppress(sqlite3.Error):
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            error = ClientStateError(f"journal write failed ({self.path}): {exc}")
            unanswered = 0
            for write in writes:
                if write.done is not None:
                    _call_soon(loop, write.done, error)
                else:
                    unanswered += 1
            if unanswered:
                logger.warning("%s; %d record(s) of job outcomes were not kept", error, unanswered)
        else:
            for done, value in results:
                if done is not None:
                    _call_soon(loop, done, value)

    def _read(
        self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop, read: _Read
    ) -> None:
        try:
            rows = connection.execute(read.sql, read.params).fetchall()
        except Exception as exc:
            _call_soon(loop, read.done, ClientStateError(f"journal read failed: {exc}"))
        else:
            _call_soon(loop, read.done, rows)

    # --- queueing -------------------------------------------------------------------------------
    def _enqueue(self, make: Callable[[_Done], _Write | _Read]) -> asyncio.Future[Any]:
        """Queue one unit of work; its future settles when the worker has done it."""
        if self._loop is None:
            raise ClientStateError("the journal is not open")
        future: asyncio.Future[Any] = self._loop.create_future()

        def done(value: Any) -> None:
            if isinstance(value, BaseException):
                _settle(future, None, value)
            else:
                _settle(future, value, None)

        with self._gate:
            if not self._accepting:
                raise ClientStateError(f"journal {self.path} is closed")
            self._queue.put(make(done))
        return future

    async def _write(self, ops: list[_Op]) -> tuple[int | None, int]:
        """Queue ``ops`` as one unit and wait until committed: ``(lastrowid, rows changed)``."""
        result: tuple[int | None, int] = await self._enqueue(lambda done: _Write(ops, done))
        return result

    def _write_later(self, ops: list[_Op]) -> None:
        """Queue ``ops`` without waiting (outcomes: losing one only means a re-poll on resume)."""
        with self._gate:
            if self._accepting:
                self._queue.put(_Write(ops, None))
                return
        logger.warning("journal %s is closed; a record was not kept: %s", self.path, ops[0][0])

    async def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._enqueue(lambda done: _Read(sql, params, done))
        return rows

    # --- records ---------------------------------------------------------------------------------
    async def record_intent(
        self, path: str, request: dict[str, Any], tag: str | None = None
    ) -> int:
        """Write a submit's request before it is sent; returns its row id.

        Cancelling the wait does not leave an orphan ``intent`` (which would read as uncertain
        at the next open): the row is marked ``unsent`` as soon as it lands.
        """
        now = time.time()
        text = json.dumps(request, ensure_ascii=False)
        future = self._enqueue(
            lambda done: _Write(
                [
                    (
                        "INSERT INTO submits (path, request, state, tag, created, updated)"
                        " VALUES (?, ?, 'intent', ?, ?, ?)",
                        (path, text, tag, now, now),
                    )
                ],
                done,
            )
        )
        try:
            # asyncio.shield, not CancelScope(shield=True): the caller's cancel must take
            # effect at once (a closing client ends its submits promptly) while the write goes
            # on; a shielded scope would hold the caller until the commit.
            result: tuple[int | None, int] = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._unsend_cancelled_intent)
            raise
        row_id = result[0]
        if row_id is None:
            raise ClientStateError("the journal did not return the intent's row id")
        return row_id

    def _unsend_cancelled_intent(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        row_id, _ = future.result()
        self.record_unsent(row_id, "unsent", "cancelled before it was sent")

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
        """A submit that got no key: ``rejected``, ``uncertain`` or ``unsent``.

        Not awaited (it may run while a cancel unwinds); if it never lands, the row stays an
        intent and becomes ``uncertain`` at the next open, the safe reading.

        Raises:
            ValueError: ``state`` is not one of those three.
        """
        _check_state(state, _NOT_ACCEPTED_STATES)
        self._write_later(
            [
                (
                    "UPDATE submits SET state=?, error=?, updated=? WHERE id=?",
                    (state, error[:_ERROR_CHARS], time.time(), row_id),
                )
            ]
        )

    def record_outcome(self, key: str, state: str, error: str | None = None) -> None:
        """Note how a job ended (queued, not awaited: the key is already safe).

        Raises:
            ValueError: ``state`` is not succeeded, failed or cancelled.
        """
        _check_state(state, _OUTCOME_STATES)
        self._write_later(
            [
                (
                    "UPDATE submits SET state=?, error=?, updated=? "
                    "WHERE job_key=? AND state='accepted'",
                    (state, error[:_ERROR_CHARS] if error else None, time.time(), key),
                )
            ]
        )

    async def forget(self, ids: Iterable[int]) -> int:
        """Delete the rows with these ids; returns how many were deleted.

        Raises:
            TypeError: an id is not an int.
        """
        wanted = list(dict.fromkeys(ids))
        for row_id in wanted:
            if not isinstance(row_id, int) or isinstance(row_id, bool):
                raise TypeError(f"journal row ids are ints, not {type(row_id).__name__}")
        ops: list[_Op] = []
        step = _SQL_VARIABLES_PER_STATEMENT
        for start in range(0, len(wanted), step):
            chunk = tuple(wanted[start : start + step])
            ops.append((f"DELETE FROM submits WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        if not ops:
            return 0
        _, deleted = await self._write(ops)
        return deleted

    async def entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Rows in the given states (every row if none), with ``tag`` if given; oldest first.

        A row whose stored request cannot be read is listed with ``request={}`` and a WARNING
        naming its id, so one bad row never hides the others.

        Raises:
            ValueError: a state that is not a journal state.
        """
        for state in states:
            _check_state(state, ALL_STATES)
        clauses: list[str] = []
        params: tuple[Any, ...] = ()
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            params += tuple(states)
        if tag is not None:
            clauses.append("tag = ?")
            params += (tag,)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._query(
            "SELECT id, path, request, state, job_key, tag, error, created FROM submits"
            f"{where} ORDER BY id",
            params,
        )
        return [
            JournalEntry(
                id=row[0],
                path=row[1],
                request=_read_request(row[0], row[2]),
                state=row[3],
                job_key=row[4],
                tag=row[5],
                error=row[6],
                created=row[7],
            )
            for row in rows
        ]


def _read_request(row_id: int, text: Any) -> dict[str, Any]:
    try:
        request = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = f"not JSON ({type(exc).__name__})"
    else:
        if isinstance(request, dict):
            return request
        problem = f"a JSON {type(request).__name__}, not an object"
    logger.warning(
        "journal row %d: its stored request is %s; listed with an empty request", row_id, problem
    )
    return {}


def _create_private(path: Path) -> None:
    """Create ``path`` 0600 if it is new (SQLite gives ``-wal``/``-shm`` the same mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _restrict(path)


def _restrict(path: Path) -> None:
    """Take group/other access away from an existing journal file of ours."""
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)


def _take_lock(lock_path: Path, journal: Path) -> int:
    """Take the journal's exclusive lock; returns the open lock file (kept until close)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise JournalLockedError(journal, pid=holder[0], host=holder[1]) from None
        raise
    try:
        _restrict(lock_path)
        os.ftruncate(fd, 0)
        holder_text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        os.pwrite(fd, holder_text.encode(), 0)
    except OSError:
        pass  # the lock is what matters; the name in it is only for the error message
    return fd


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host = holder.get("pid"), holder.get("host")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (
        pid if isinstance(pid, int) else None,
        host if isinstance(host, str) else None,
    )


def _call_soon(loop: asyncio.AbstractEventLoop, done: _Done, value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(done, value)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
