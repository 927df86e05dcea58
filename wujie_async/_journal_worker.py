"""The journal's worker thread and file lock: SQLite off the event loop, with group commit.

Writes run on one worker thread, never on the event loop. Whatever is queued when the worker
wakes goes into ONE transaction and one fsync (group commit), so a 10,000-job run pays for
a few hundred commits, not 20,000. Reads take their own path through the same worker, after
the writes queued before them are committed, outside any write transaction.

Why a thread of its own with asyncio futures rather than ``anyio.to_thread``: the worker lives
as long as the journal (it holds the SQLite connection and the lock), and each queued unit is
answered by ``loop.call_soon_threadsafe`` settling that unit's future; many waiters share one
commit. ``anyio.to_thread.run_sync`` runs one call per thread hop, which would forfeit the
group commit.

Closing is bounded (``CLOSE_DEADLINE_S``): a disk that stops answering (a frozen file system, a
hung NFS mount) holds a commit, and with it the worker, for as long as it stays so. After the
deadline :meth:`JournalWorker.close` stops waiting, logs a WARNING naming the file and the
records not yet committed, and returns; the worker (a daemon thread) still commits them, in
order, and releases the lock if the disk answers again before the process ends.

One writer per file: :meth:`JournalWorker.open` takes an exclusive ``flock`` on the sidecar
file ``<journal>.lock`` (which names the holder: pid and host) and keeps it until
:meth:`JournalWorker.close`. A second opener, in this process or another, gets
:class:`JournalLockedError` at once. The operating system drops the lock when its holder dies,
however it dies (``kill -9`` included). The database, its ``-wal``/``-shm`` companions and the
lock file are created ``0600``.

What the rows mean is ``_journal``'s business: this module runs SQL it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from . import _lock_file
from ._errors import ClientStateError, shown_key, some_and_more
from ._telemetry import RepeatedWarnings

logger = logging.getLogger("wujie_async")

# How long closing waits for the last commit. A disk that answers commits in milliseconds (one
# fsync, however many records are queued); a disk that has taken nothing for this long is held
# (frozen, a hung mount), and a close must not wait for it: shutdown has deadlines of its own
# (docker stop's 10 s after SIGTERM).
CLOSE_DEADLINE_S = 2.0
# How long a read-only reader waits on a lock SQLite takes for a moment (a writer recovering
# the write-ahead log after a crash, say) before it reports the journal unreadable.
READ_BUSY_S = 5.0


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


Op = tuple[str, tuple[Any, ...]]
"""One SQL statement and its parameters."""
_Done = Callable[[Any], None]


@dataclass(slots=True, eq=False)
class _Write:
    """Statements committed together; ``done`` gets ``(lastrowid, rows changed)`` or an error.
    ``key``: the job key the record is about, if any (named when it cannot be committed)."""

    ops: list[Op]
    done: _Done | None
    key: str | None = None


@dataclass(slots=True)
class _Read:
    """One query; ``done`` gets its rows or an error."""

    sql: str
    params: tuple[Any, ...]
    done: _Done


class JournalWorker:
    """One SQLite file, its lock and the thread that writes it.

    Args:
        path: the database file (created ``0600`` if new).
        prepare: run on the worker thread once the file is open and locked (schema, repairs);
            it may raise ``sqlite3.Error``/``OSError``, which fail :meth:`open`.
        warnings: the gate of WARNINGs that can repeat per record (a full disk fails every
            commit; a closed journal refuses every late record).
    """

    def __init__(
        self,
        path: Path,
        prepare: Callable[[sqlite3.Connection], None],
        *,
        warnings: RepeatedWarnings | None = None,
    ) -> None:
        self.path = path
        self._warnings = warnings if warnings is not None else RepeatedWarnings(logger)
        self.lock_path = path.with_name(path.name + ".lock")
        self._prepare = prepare
        self._queue: queue.SimpleQueue[_Write | _Read | None] = queue.SimpleQueue()
        # Guards ``_accepting`` and the put of the stop marker: once the marker is queued
        # nothing else can be, so no waiter is ever left behind the worker's exit.
        self._gate = threading.Lock()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        # Records queued and not yet committed (nor failed), in order; guarded by ``_gate``.
        self._uncommitted: dict[_Write, None] = {}
        # Settled (on the loop) when the worker has stopped, whyever it stopped.
        self._exited: asyncio.Future[None] | None = None
        self.commits = 0

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        """Lock and open the file, turn dead processes' intents into ``uncertain``.

        Raises:
            JournalLockedError: another process (or client) has this journal open.
            ClientStateError: the file cannot be created or read.
        """
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._exited = self._loop.create_future()
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

    async def close(self, timeout: float = CLOSE_DEADLINE_S) -> None:
        """Commit what is queued, stop the worker and release the lock; wait at most
        ``timeout`` seconds for that.

        A disk that takes no write for that long (frozen, a hung mount) holds the worker: the
        close then logs a WARNING naming the file and the records not yet committed, and
        returns. The worker, a daemon thread, still commits them in order (and releases the
        lock) if the disk answers again before the process ends; :meth:`uncommitted_keys`
        names the job keys they hold until then.
        """
        if self._thread is None:
            return
        exited = self._exited
        try:
            with anyio.move_on_after(timeout):
                with contextlib.suppress(ClientStateError):
                    await self.write([])  # a barrier: everything queued before it is committed
                self._stop()
                if exited is not None:
                    # shield: a deadline or a cancel stops this wait, not the worker's exit.
                    await asyncio.shield(exited)
        finally:
            self._stop()  # whatever stopped the wait: the worker exits once it is free
            self._thread = None
        if exited is not None and not exited.done():
            with self._gate:
                left = len(self._uncommitted)
            logger.warning(
                "journal %s: its disk took no write for %g s (a frozen file system or a hung "
                "mount?); stopped waiting with %d record(s) not committed (%s). They are "
                "committed, in order, if the disk answers before this process ends",
                self.path,
                timeout,
                left,
                _said_keys(self.uncommitted_keys()),
            )

    def uncommitted_keys(self) -> list[str]:
        """The job keys of the records queued and not committed yet (nor failed), in order,
        each once: after a close that stopped waiting, the keys the file may lack."""
        with self._gate:
            writes = list(self._uncommitted)
        return list(dict.fromkeys(write.key for write in writes if write.key is not None))

    def _stop(self) -> None:
        """Queue the stop marker (once): nothing can be queued after it."""
        with self._gate:
            if self._accepting:
                self._accepting = False
                self._queue.put(None)

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
            exited = self._exited
            if exited is not None:
                _call_soon(loop, lambda _: _settle(exited, None, None), None)

    def _connect(self) -> sqlite3.Connection:
        _create_private(self.path)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            # The write-ahead log is folded into the file every 100 pages (400 KB), not 1,000,
            # and cut back to 1 MB after: on a nearly full disk it grew to 2.8 MB for 120
            # submits (the file itself was 53 KB), past the room set aside for the run.
            connection.execute("PRAGMA wal_autocheckpoint=100")
            connection.execute("PRAGMA journal_size_limit=1048576")
            self._prepare(connection)  # we hold the lock: the file is ours alone
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
        _lock_file.release(fd)

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
            if isinstance(item, _Write):
                self._forget(item)
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
            self._forget(*writes)  # before the waiters hear of it (see below)
            unanswered = 0
            for write in writes:
                if write.done is not None:
                    _call_soon(loop, write.done, error)
                else:
                    unanswered += 1
            if unanswered:
                self._warnings.warning(
                    "%s; %d record(s) of job outcomes were not kept", error, unanswered
                )
        else:
            # Forgotten before the waiters hear: one that resumes at once and asks
            # uncommitted_keys() must not find its own record still listed (it was, on a
            # loaded machine, until this thread ran again).
            self._forget(*writes)
            for done, value in results:
                if done is not None:
                    _call_soon(loop, done, value)
        finally:
            self._forget(*writes)  # (already, unless something else than an Exception broke)

    def _forget(self, *writes: _Write) -> None:
        """These records were committed, or their failure reported: no longer uncommitted."""
        with self._gate:
            for write in writes:
                self._uncommitted.pop(write, None)

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
    def enqueue(self, make: Callable[[_Done], _Write | _Read]) -> asyncio.Future[Any]:
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
            self._put(make(done))
        return future

    def _put(self, item: _Write | _Read) -> None:
        """Queue ``item`` (``_gate`` held), counting a write with statements as uncommitted."""
        if isinstance(item, _Write) and item.ops:
            self._uncommitted[item] = None
        self._queue.put(item)

    def write_soon(
        self, ops: list[Op], key: str | None = None
    ) -> asyncio.Future[tuple[int | None, int]]:
        """Queue ``ops`` as one unit; the future gets ``(lastrowid, rows changed)``. ``key``:
        the job key the record is about, if any."""
        return self.enqueue(lambda done: _Write(ops, done, key))

    async def write(self, ops: list[Op], key: str | None = None) -> tuple[int | None, int]:
        """Queue ``ops`` as one unit and wait until committed: ``(lastrowid, rows changed)``."""
        result: tuple[int | None, int] = await self.enqueue(lambda done: _Write(ops, done, key))
        return result

    def write_later(self, ops: list[Op], key: str | None = None) -> None:
        """Queue ``ops`` without waiting (outcomes: losing one only means a re-poll on resume)."""
        with self._gate:
            if self._accepting:
                self._put(_Write(ops, None, key))
                return
        self._warnings.warning(
            "journal %s is closed; a record was not kept: %s", self.path, ops[0][0]
        )

    async def query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self.enqueue(lambda done: _Read(sql, params, done))
        return rows


def read_only_query(path: Path, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Run one query on ``path`` opened read-only, beside its writer if it has one (blocking:
    call it on a worker thread).

    Takes no lock: in WAL mode SQLite serves readers alongside the one writer, which they
    neither block nor slow (a checkpoint leaves the frames a reader still reads for later).
    The reader sees the last committed transaction; it writes nothing (rows a dead writer
    left ``intent`` stay so until a writer opens the file). It may create the ``-wal``/``-shm``
    companions, which SQLite gives the file's own mode; they are tightened as a writer's are.

    Raises:
        ClientStateError: the file cannot be opened or read as an SQLite database.
    """
    _restrict(path, follow_link=True)
    uri = path.absolute().as_uri() + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=READ_BUSY_S, check_same_thread=False)
        try:
            rows = connection.execute(sql, params).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise ClientStateError(f"cannot read journal {path}: {exc}") from None
    finally:
        for suffix in ("-wal", "-shm"):
            _restrict(path.with_name(path.name + suffix))
    return rows


def _create_private(path: Path) -> None:
    """Create ``path`` 0600 if it is new (SQLite gives ``-wal``/``-shm`` the same mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _restrict(path, follow_link=True)


def _restrict(path: Path, *, follow_link: bool = False) -> None:
    """Take group/other access away from an existing journal file of ours.

    ``-wal`` and ``-shm`` are named by us, not the user: a link planted where one goes is left
    alone, and so is the file it points at (chmod by path would follow it). The journal itself
    may be the user's own link (``follow_link``).
    """
    with contextlib.suppress(OSError):
        status = path.stat() if follow_link else path.lstat()
        mode = status.st_mode & 0o777
        if stat.S_ISREG(status.st_mode) and mode & 0o077:
            os.chmod(path, mode & 0o700)


def _take_lock(lock_path: Path, journal: Path) -> int:
    """Take the journal's exclusive lock; returns the open lock file (kept until close)."""
    try:
        return _lock_file.take(lock_path)
    except _lock_file.LockHeldError as held:
        raise JournalLockedError(journal, pid=held.pid, host=held.host) from None


def _said_keys(keys: list[str]) -> str:
    """The keys a WARNING names (the first 20)."""
    if not keys:
        return "no job key among them"
    return f"job key(s) {some_and_more([*map(shown_key, keys[:20]), *keys[20:]], 20)}"


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
