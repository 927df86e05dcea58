"""What a journal records of ``job.save()``: that a save was asked for, and that it ended.

A job's images are paid for once it has succeeded, and its image URLs expire: a process that
ends while ``job.save()`` runs (a SIGTERM, a crash, a closing client) left a row that read
``succeeded``, which ``resume()`` skipped, and the images were never saved. So the row records
the save: asked for before its download starts (committed, see
:meth:`Journal.record_save_asked`), ended once it has ended, and ``resume()`` returns the jobs
of rows asked and not ended (:meth:`Journal.saves_cut_off`). A fleet's journal in Redis
records the same (``RedisJournal``), so a member's save cut off is resumed by the member, or,
once it is dead, by the one member that claims its rows.

A save *ends* when every image is on disk, or with an error raised to its caller that trying
again cannot mend (an image that expired, a refused URL, the job failed: see :func:`cut_off`):
that caller was told, and the job is not returned by every ``resume()`` to come for a save
that cannot succeed. A save that was cut off does not end: cancelled, or ended by its client
closing (``ClientStateError``), or its wait for the job given up (``JobTimeoutError``) or
cancelled with the client (``JobCancelledError``), or failed on the network or the disk. Two
saves of one job at once (two folders): the row ends when the last one ends, and only if
none of them was cut off.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from ._errors import (
    ClientStateError,
    JobCancelledError,
    JobTimeoutError,
    ProtocolError,
    TransportError,
    shown_key,
)
from ._telemetry import RepeatedWarnings

logger = logging.getLogger("wujie_async")

# How long a save waits for its record to commit before it goes on without (a disk, or a
# fleet's Redis, that answers in milliseconds; as long as closing the journal waits for its
# last commit).
RECORD_WAIT_S = 2.0


class SaveJournal(Protocol):
    """What a save record needs of a journal: the SQLite ``Journal``, or a fleet's
    ``RedisJournal``."""

    async def record_save_asked(self, key: str) -> None:
        """A save of ``key``'s job begins: written and confirmed before its download starts;
        a write that cannot wait for its storage stays queued and lands before the save's
        end. Raises ClientStateError when the journal is closed or the write failed."""
        ...

    def record_save_ended(self, key: str) -> None:
        """A save of ``key``'s job ended (queued, not awaited)."""
        ...


@dataclass(slots=True)
class _Saves:
    """The saves of one job running in this process."""

    running: int = 0
    cut_off: bool = False  # one of them was cut off: the row must stay asked


def cut_off(error: BaseException | None) -> bool:
    """Whether a save that ended with ``error`` was cut off (left for ``resume()``) rather
    than ended (saved, or an error its caller was given for good).

    Only what trying again cannot mend ends a save: an image that expired or was refused
    (a 4xx but 429), bytes that are no image (or over the size cap), a refused name or
    address, the job itself failed. A save that failed on the network (its retries spent:
    a 5xx or 429 for a while, connections cut, too slow) or on the disk (full, read-only)
    may succeed later: it is left for ``resume()``, as a save the process ended is.
    """
    if error is None:
        return False
    if not isinstance(error, Exception):
        return True
    if isinstance(error, ClientStateError | JobTimeoutError | JobCancelledError):
        return True
    if isinstance(error, TransportError | OSError):
        return True
    status = error.http_status if isinstance(error, ProtocolError) else None
    return status is not None and (status >= 500 or status == 429)


class SaveRecord:
    """The save record of one client's journal, and the saves running in this process."""

    def __init__(self, journal: SaveJournal) -> None:
        self._journal = journal
        self._saves: dict[str, _Saves] = {}
        # One per job: a journal held by a lock or a backlog wrote one line per save.
        self._warnings = RepeatedWarnings(logger)

    def flush(self) -> None:
        """Write the warnings held back (the client closes)."""
        self._warnings.flush()

    def saving(self, key: str) -> bool:
        """Whether a save of ``key``'s job runs in this process (``resume()`` leaves it be)."""
        return key in self._saves

    async def asked(self, key: str) -> None:
        """A save of ``key``'s job begins; pair it with one :meth:`ended`, whatever happens.

        A record that cannot be written (the disk is full), or not within ``RECORD_WAIT_S``
        (the disk, or the fleet's Redis, stopped answering), is said at WARNING, and the save
        goes on: the images matter more than the record of them.
        """
        self._saves.setdefault(key, _Saves()).running += 1
        try:
            async with asyncio.timeout(RECORD_WAIT_S):
                await self._journal.record_save_asked(key)
        except TimeoutError:
            # A disk that takes no write (a frozen file system, a hung NFS mount), or a fleet's
            # Redis away, holds the write for as long as it stays so, and the save, paid for,
            # waited with it. The record stays queued (shielded): it lands, before the save's
            # end, once the disk (or Redis) answers.
            self._warnings.warning(
                "journal: the save of job %s is not recorded yet (the journal has not taken "
                "the write in %.0f s: its disk or the fleet's Redis not answering, a lock held "
                "by another connection, or a backlog of records): the save goes on; if this "
                "process ends before the record lands, resume() will not return the job",
                shown_key(key),
                RECORD_WAIT_S,
            )
        except ClientStateError as exc:
            self._warnings.warning(
                "journal: the save of job %s was not recorded (%s); if this process ends "
                "before it is done, resume() will not return the job",
                shown_key(key),
                exc,
            )

    def ended(self, key: str, error: BaseException | None) -> None:
        """A save of ``key``'s job ended, saved (``error`` None) or not."""
        saves = self._saves.get(key)
        if saves is None:
            return
        saves.running -= 1
        saves.cut_off = saves.cut_off or cut_off(error)
        if saves.running > 0:
            return
        del self._saves[key]
        if not saves.cut_off:
            self._journal.record_save_ended(key)
