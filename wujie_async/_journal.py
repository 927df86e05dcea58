"""A durable record of every submit, so an accepted key is never lost and nothing is paid twice.

Each submit is written as an *intent* (its request) before it is sent, and its key is written
before ``submit()`` returns; job outcomes follow. SQLite in WAL mode with ``synchronous=FULL``:
once a write is acknowledged it survives the process being killed the next instant. The thread,
the group commit and the one-writer file lock are ``_journal_worker``'s; this module says what
the rows are. The journal file, its ``-wal``/``-shm`` companions and the lock file are created
``0600``: they hold prompts, edit images and tags.

Rows move through these states::

    intent ──► accepted ──► succeeded | failed | cancelled
       │
       ├────► rejected    (the gateway refused it: nothing charged)
       ├────► uncertain   (it may have reached the gateway, reply lost: it may have been
       │                   charged; never resent silently)
       └────► unsent      (the request never left the process: safe to send again)

An ``intent`` found when a journal is opened belongs to a process that died mid-request (only
the lock holder writes, and the lock is free): it becomes ``uncertain``.

Each row records the gateway its submit was sent to: the base URL as the client was given it
and the fingerprint of base URL and app id (``_gateway_identity``): a key means something to
that gateway and account only. Journals written before rows recorded it gain the two columns
(empty: no known gateway) when a writer opens them.

Each row also records its job's ``job.save()``: ``save_asked``, the time a save was last asked
for, and ``save_ended``, the time it ended (every image on disk, or an error raised to its
caller). A ``succeeded`` row asked and not ended is a save the process's end cut off: its
images were paid for and are not on disk, so ``resume()`` returns its job again
(:meth:`Journal.saves_cut_off`). Journals of before gain the two columns empty: their rows read
as no save asked, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from ._errors import ClientStateError
from ._gateway_identity import GatewayIdentity
from ._journal_worker import JournalWorker, Op
from ._slices import OFF_LOOP_CHARS, json_pieces, text_chars
from ._telemetry import RepeatedWarnings

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
    updated  REAL NOT NULL,
    base_url TEXT,
    gateway  TEXT,
    save_asked REAL,
    save_ended REAL
);
CREATE INDEX IF NOT EXISTS submits_state ON submits(state);
CREATE INDEX IF NOT EXISTS submits_key ON submits(job_key);
CREATE INDEX IF NOT EXISTS submits_tag ON submits(tag);
"""
_OUTCOME_STATES = ("succeeded", "failed", "cancelled")
_NOT_ACCEPTED_STATES = ("rejected", "uncertain", "unsent")
_FINAL_STATES = (*_OUTCOME_STATES, *_NOT_ACCEPTED_STATES)
ALL_STATES = ("intent", "accepted", *_FINAL_STATES)
# Columns added since the first schema (nullable: older rows have none), each added to an older
# file by ALTER TABLE when a writer opens it.
_ADDED_COLUMNS = (("base_url", "TEXT"), ("gateway", "TEXT"))
# The save record's (see the module's docstring); apart, so a file that has the gateway's
# columns and not these (read only) still lists its rows' gateways.
_SAVE_COLUMNS = (("save_asked", "REAL"), ("save_ended", "REAL"))
_SQL_VARIABLES_PER_STATEMENT = 500  # well under SQLite's lowest default limit (999)
_ERROR_CHARS = 2000


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
        base_url: the base URL of the gateway the submit was sent to (as its client was
            given it); None for rows written before journals recorded it.
        gateway_fingerprint: SHA-256 of that base URL and the client's app id (the app id
            itself is not stored): a key is known to that gateway and account only. None
            for rows written before journals recorded it.
    """

    id: int
    path: str
    request: dict[str, Any]
    state: str
    job_key: str | None
    tag: str | None
    error: str | None
    created: float
    base_url: str | None = None
    gateway_fingerprint: str | None = None


def read_stored_request(text: Any) -> tuple[dict[str, Any], str | None]:
    """A journal row's stored request, and None; or ``{}`` and what is wrong with it.

    Rows may be other processes' writes (or a damaged file): a request that cannot be read
    is listed as ``{}``, so its row, and its key, still come back.
    """
    try:
        request = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        return {}, f"not JSON ({type(exc).__name__})"
    if isinstance(request, dict):
        return request, None
    return {}, f"a JSON {type(request).__name__}, not an object"


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

    async def record_accepted(self, row_id: int, key: str) -> bool:
        """Write the key the gateway gave. False, writing nothing, when another row holds
        ``key`` already (an earlier job's: a gateway that hands out a key again)."""
        ...

    def record_accepted_later(self, row_id: int, key: str) -> None:
        """The same, not awaited."""
        ...

    def record_unsent(self, row_id: int, state: str, error: str) -> None:
        """A submit that got no key: ``rejected``, ``uncertain`` or ``unsent``."""
        ...

    async def record_found_key(self, row_id: int, key: str) -> bool:
        """An ``uncertain`` row's key, found since: the row becomes ``accepted``. False when
        the row is not uncertain, or a row already holds ``key``."""
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
    """The SQLite journal of one client. Open with :meth:`open`, close with :meth:`close`.

    ``gateway``: the gateway (and account) the client sends to, recorded on each new row;
    None for a journal opened without a client (it writes no new rows).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, gateway: GatewayIdentity | None = None
    ) -> None:
        self.path = Path(path)
        self.gateway = gateway
        # WARNINGs that can repeat per row or per record: one line a minute of each kind.
        self._warnings = RepeatedWarnings(logger)
        self._worker = JournalWorker(self.path, _prepare, warnings=self._warnings)
        self.lock_path = self._worker.lock_path

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    @property
    def commits(self) -> int:
        """Transactions committed so far (each holds many records)."""
        return self._worker.commits

    async def open(self) -> None:
        """Lock and open the file, turn dead processes' intents into ``uncertain``.

        Raises:
            JournalLockedError: another process (or client) has this journal open.
            ClientStateError: the file cannot be created or read.
        """
        await self._worker.open()
        if logger.isEnabledFor(logging.INFO):
            rows = await self._worker.query(
                "SELECT state, COUNT(*) FROM submits GROUP BY state", ()
            )
            counts = {str(state): int(count) for state, count in rows}
            logger.info(
                "journal %s opened: %d accepted job(s) not ended (resume() attaches them), "
                "%d uncertain submit(s), %d row(s) in all",
                self.path,
                counts.get("accepted", 0),
                counts.get("uncertain", 0),
                sum(counts.values()),
            )

    async def close(self) -> None:
        """Commit what is queued, stop the worker and release the lock.

        Waits at most ``CLOSE_DEADLINE_S`` (2 s): a disk that takes no write for that long
        (frozen, a hung mount) leaves the last records to the worker thread, with a WARNING
        naming the file and how many records were not committed; see :meth:`uncommitted_keys`.
        """
        try:
            await self._worker.close()
        finally:
            self._warnings.flush()

    def uncommitted_keys(self) -> list[str]:
        """The job keys held by records not committed yet, each once, oldest first: after a
        :meth:`close` that stopped waiting for its disk, the keys the file may lack."""
        return self._worker.uncommitted_keys()

    def _read_request(self, row_id: int, text: Any) -> dict[str, Any]:
        request, problem = read_stored_request(text)
        if problem is not None:
            self._warnings.warning(
                "journal row %d: its stored request is %s; listed with an empty request",
                row_id,
                problem,
            )
        return request

    # --- records ---------------------------------------------------------------------------------
    async def record_intent(
        self, path: str, request: dict[str, Any], tag: str | None = None
    ) -> int:
        """Write a submit's request before it is sent; returns its row id.

        Cancelling the wait does not leave an orphan ``intent`` (which would read as uncertain
        at the next open): the row is marked ``unsent`` as soon as it lands.
        """
        now = time.time()
        if text_chars(request) > OFF_LOOP_CHARS:
            # Megabytes of inline image: encoded a slice at a time on a worker thread, as the
            # request's own body is (one json.dumps held the loop 100 ms for a 20 MB edit).
            text = await anyio.to_thread.run_sync(_encoded_in_slices, request)
        else:
            text = json.dumps(request, ensure_ascii=False)
        gateway = self.gateway
        base_url, fingerprint = (gateway.base_url, gateway.fingerprint) if gateway else (None, None)
        future = self._worker.write_soon(
            [
                (
                    "INSERT INTO submits"
                    " (path, request, state, tag, created, updated, base_url, gateway)"
                    " VALUES (?, ?, 'intent', ?, ?, ?, ?, ?)",
                    (path, text, tag, now, now, base_url, fingerprint),
                )
            ]
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

    async def record_accepted(self, row_id: int, key: str) -> bool:
        """Write the key the gateway gave (before ``submit()`` returns).

        Returns False, writing nothing, when another row holds ``key`` already: an earlier
        job's key handed out again (a gateway whose key counter was reset). Written, two rows
        of one key would take one job's outcome (the earlier job's row closed with the new
        job's images, its own never collected), and ``resume()`` would follow only one.
        """
        _, changed = await self._worker.write(self._accepted(row_id, key), key)
        return changed == 1

    def record_accepted_later(self, row_id: int, key: str) -> None:
        """The same, not awaited: for a submit interrupted after its key came back."""
        self._worker.write_later(self._accepted(row_id, key), key)

    @staticmethod
    def _accepted(row_id: int, key: str) -> list[Op]:
        return [
            (
                "UPDATE submits SET state='accepted', job_key=?, updated=? WHERE id=? "
                "AND NOT EXISTS (SELECT 1 FROM submits WHERE job_key=? AND id<>?)",
                (key, time.time(), row_id, key, row_id),
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
        self._worker.write_later(
            [
                (
                    "UPDATE submits SET state=?, error=?, updated=? WHERE id=?",
                    (state, error[:_ERROR_CHARS], time.time(), row_id),
                )
            ]
        )

    async def record_found_key(self, row_id: int, key: str) -> bool:
        """Give an ``uncertain`` row the key its submit was accepted as, found since (in the
        platform's console, or a bulk run's manifest): the row becomes ``accepted``, and
        ``resume()`` collects its job. False when the row is not uncertain, or a row already
        holds ``key`` (a key is one submit's)."""
        _, changed = await self._worker.write(
            [
                (
                    "UPDATE submits SET state='accepted', job_key=?, error=NULL, updated=? "
                    "WHERE id=? AND state='uncertain' "
                    "AND NOT EXISTS (SELECT 1 FROM submits WHERE job_key=?)",
                    (key, time.time(), row_id, key),
                )
            ],
            key,
        )
        return changed == 1

    def record_outcome(self, key: str, state: str, error: str | None = None) -> None:
        """Note how a job ended (queued, not awaited: the key is already safe).

        A job recorded ``failed`` that is attached again and succeeds (it was accepted, then
        reported only unreadably or forgotten for a while) is recorded ``succeeded``: a row
        left ``failed`` would have it resent, and paid for twice, as a failed job.

        Raises:
            ValueError: ``state`` is not succeeded, failed or cancelled.
        """
        _check_state(state, _OUTCOME_STATES)
        ended = "('accepted', 'failed')" if state == "succeeded" else "('accepted')"
        mine, gateway = self._of_this_gateway()
        self._worker.write_later(
            [
                (
                    "UPDATE submits SET state=?, error=?, updated=? "
                    f"WHERE job_key=? AND state IN {ended}{mine}",
                    (state, error[:_ERROR_CHARS] if error else None, time.time(), key, *gateway),
                )
            ],
            key,
        )

    def _of_this_gateway(self) -> tuple[str, tuple[str, ...]]:
        """The condition (and its parameter) that a row's job is this journal's gateway's:
        a row of another gateway is changed by a client of that gateway only. A key attached
        by hand (found by ``find_submit`` after a move to another gateway) is unknown here,
        and its end, recorded on that row, made a paid job ``failed`` for good. A row that
        records no gateway (written before rows did) is anyone's, as ``resume()`` takes it."""
        if self.gateway is None:
            return "", ()
        return " AND (gateway IS NULL OR gateway=?)", (self.gateway.fingerprint,)

    async def record_save_asked(self, key: str) -> None:
        """A ``job.save()`` of ``key``'s job begins: committed before its download starts.

        Awaited, where outcomes are not: the job may have succeeded, and its row been
        committed ``succeeded``, before the save was asked for; a process ending mid-download
        with this record still queued would leave a row that reads as nothing left to do.
        Cancelling the wait leaves the write to land.

        Raises:
            ClientStateError: the journal is closed, or the write failed.
        """
        mine, gateway = self._of_this_gateway()
        await asyncio.shield(
            self._worker.write_soon(
                [
                    (
                        f"UPDATE submits SET save_asked=?, save_ended=NULL WHERE job_key=?{mine}",
                        (time.time(), key, *gateway),
                    )
                ],
                key,
            )
        )

    def record_save_ended(self, key: str) -> None:
        """A ``job.save()`` of ``key``'s job ended: every image on disk, or an error raised to
        its caller (queued, not awaited: lost, the next ``resume()`` returns the job once
        more, nothing worse)."""
        mine, gateway = self._of_this_gateway()
        self._worker.write_later(
            [
                (
                    f"UPDATE submits SET save_ended=? WHERE job_key=?{mine}",
                    (time.time(), key, *gateway),
                )
            ],
            key,
        )

    async def saves_cut_off(self) -> list[JournalEntry]:
        """``succeeded`` rows whose save was asked for and never ended: the process ended (or
        its client closed, or the save was cancelled) while it ran. Oldest first."""
        sql, params = entries_query(("succeeded",), None, save_cut_off=True)
        rows = await self._worker.query(sql, params)
        return [self.entry(row) for row in rows]

    async def forget(self, ids: Iterable[int]) -> int:
        """Delete the rows with these ids; returns how many were deleted.

        Raises:
            TypeError: an id is not an int.
        """
        wanted = list(dict.fromkeys(ids))
        for row_id in wanted:
            if not isinstance(row_id, int) or isinstance(row_id, bool):
                raise TypeError(f"journal row ids are ints, not {type(row_id).__name__}")
        ops: list[Op] = []
        step = _SQL_VARIABLES_PER_STATEMENT
        for start in range(0, len(wanted), step):
            chunk = tuple(wanted[start : start + step])
            ops.append((f"DELETE FROM submits WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        if not ops:
            return 0
        _, deleted = await self._worker.write(ops)
        return deleted

    async def entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Rows in the given states (every row if none), with ``tag`` if given; oldest first.

        A row whose stored request cannot be read is listed with ``request={}`` and a WARNING
        naming its id, so one bad row never hides the others.

        Raises:
            ValueError: a state that is not a journal state.
        """
        sql, params = entries_query(states, tag)
        rows = await self._worker.query(sql, params)
        return [self.entry(row) for row in rows]

    def entry(self, row: tuple[Any, ...]) -> JournalEntry:
        """One row of :func:`entries_query` as an entry (an unreadable request: a WARNING)."""
        return JournalEntry(
            id=row[0],
            path=row[1],
            request=self._read_request(row[0], row[2]),
            state=row[3],
            job_key=row[4],
            tag=row[5],
            error=row[6],
            created=row[7],
            base_url=row[8],
            gateway_fingerprint=row[9],
        )


def entries_query(
    states: tuple[str, ...],
    tag: str | None,
    *,
    with_gateway: bool = True,
    save_cut_off: bool = False,
) -> tuple[str, tuple[Any, ...]]:
    """The query of the rows in ``states`` (every row if none), with ``tag`` if given.
    ``with_gateway``: False for a file not migrated yet (read only), whose rows have none.
    ``save_cut_off``: only rows whose save was asked for and has not ended (a writer's file).

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
    if save_cut_off:
        clauses.append("save_asked IS NOT NULL AND save_ended IS NULL")
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    gateway = "base_url, gateway" if with_gateway else "NULL, NULL"
    sql = (
        f"SELECT id, path, request, state, job_key, tag, error, created, {gateway} FROM submits"
        f"{where} ORDER BY id"
    )
    return sql, params


def has_gateway_columns(columns: Iterable[str]) -> bool:
    """Whether a ``submits`` table of these columns records rows' gateways (else: a file
    written before they did, read only since)."""
    return {name for name, _ in _ADDED_COLUMNS} <= set(columns)


def _prepare(connection: sqlite3.Connection) -> None:
    """The schema (an older file's table given the columns added since), and the intents of
    a dead writer (we hold the lock) made ``uncertain``."""
    connection.executescript(_SCHEMA)
    present = {str(row[1]) for row in connection.execute("PRAGMA table_info(submits)")}
    for name, kind in (*_ADDED_COLUMNS, *_SAVE_COLUMNS):
        if name not in present:
            # Nullable, no default: SQLite adds it without rewriting the rows.
            connection.execute(f"ALTER TABLE submits ADD COLUMN {name} {kind}")
    connection.execute(
        "UPDATE submits SET state='uncertain', error=?, updated=? WHERE state='intent'",
        ("the process stopped before the gateway's reply was recorded", time.time()),
    )


def _encoded_in_slices(request: dict[str, Any]) -> str:
    return b"".join(json_pieces(request)).decode()
