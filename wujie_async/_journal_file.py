"""JournalFile: a client's journal opened on its own, to list and forget its rows.

No gateway, no credentials: what ``wujie-async journal list|forget`` needs, and what a script
settling uncertain submits needs. Opened to forget rows, it takes the journal's lock like a
client does, so it cannot race a live client writing to the same file; opened ``read_only``, it
takes no lock and reads beside a live writer (``journal list`` during a run).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio

from ._errors import ClientStateError, InvalidRequestError
from ._journal import Journal, JournalEntry, entries_query, has_gateway_columns
from ._journal_args import check_states, check_tag
from ._journal_worker import read_only_query


class JournalFile:
    """A journal file opened without a client: read its rows, forget the ones you settled.

    Use it as ``async with JournalFile("jobs.sqlite") as journal:``. The rows are those a
    ``WujieClient(journal=...)`` wrote (see :meth:`WujieClient.journal_entries`).

    Args:
        path: the journal file (as given to ``WujieClient(journal=...)``).
        read_only: read only, beside a live writer: no lock is taken, so a client (a bulk run)
            using the journal goes on undisturbed, and :meth:`forget` is refused. Each
            :meth:`entries` reads the last committed rows. Nothing is written: an ``intent``
            row is a submit on the wire now, or one a killed process left (it reads
            ``uncertain`` once a writer opens the journal).

    Raises:
        InvalidRequestError: ``path`` is not a str or path, or ``read_only`` is not True or
            False (nothing is opened).
        FileNotFoundError: on entering, there is no file at ``path`` (none is created).
        JournalLockedError: on entering, a live client (or another opener) holds the journal
            (not when ``read_only``).
        ClientStateError: on entering, the file cannot be read as a journal.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        found: list[tuple[str, str]] = []
        if not isinstance(path, str | os.PathLike) or isinstance(os.fspath(path), bytes):
            found.append(("path", "must be a str or os.PathLike naming the journal file"))
        # Any other value was read as its truth: read_only="no" opened the journal read-only.
        if not isinstance(read_only, bool):
            found.append(("read_only", "must be True or False"))
        if found:
            raise InvalidRequestError(found)
        self.path = Path(path)
        self.read_only = read_only
        self._journal = Journal(self.path)
        self._open = False
        # Read only, a file written before rows recorded their gateway is read as it is
        # (a writer adds the columns): its rows are listed with no gateway.
        self._with_gateway = True

    def __repr__(self) -> str:
        if not hasattr(self, "_journal"):
            # Half made (its constructor refused an argument): an error reporter that records
            # locals shows the frame's self, and a repr that raised broke its whole report.
            return "JournalFile(state='not constructed')"
        shown = ", read_only=True" if self.read_only else ""
        return f"JournalFile({str(self.path)!r}{shown})"

    async def __aenter__(self) -> Self:
        if self._open:
            raise ClientStateError(f"{self!r} is already open")
        if not self.path.is_file():
            raise FileNotFoundError(f"no journal at {self.path}")
        if self.read_only:
            # A file that is no journal is said now, as a writer's open says it.
            await anyio.to_thread.run_sync(
                read_only_query, self.path, "SELECT id FROM submits LIMIT 0", ()
            )
            columns = await anyio.to_thread.run_sync(
                read_only_query, self.path, "PRAGMA table_info(submits)", ()
            )
            self._with_gateway = has_gateway_columns(str(row[1]) for row in columns)
        else:
            await self._journal.open()
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self._journal.close()

    async def entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Rows in ``states`` (every row if none), with ``tag`` if given; oldest first.

        States: intent, accepted, succeeded, failed, cancelled, rejected, uncertain, unsent.

        Raises:
            InvalidRequestError: a state that is not one of those, or a ``tag`` that is not a
                str (nor None).
            ClientStateError: the file is not open (use ``async with``).
        """
        check_states(states)
        check_tag(tag, optional=True)
        self._check_open()
        if not self.read_only:
            return await self._journal.entries(*states, tag=tag)
        sql, params = entries_query(states, tag, with_gateway=self._with_gateway)
        rows = await anyio.to_thread.run_sync(read_only_query, self.path, sql, params)
        return [self._journal.entry(row) for row in rows]

    async def saves_cut_off(self) -> list[JournalEntry]:
        """``succeeded`` rows whose ``job.save()`` was asked for and never ended (cut off by
        its process's end, its client closing, or a cancel): paid images not on disk, which
        ``WujieClient.resume()`` returns to be saved. Oldest first.

        Raises:
            ClientStateError: the file is not open (use ``async with``), or was opened
                ``read_only`` (a file not opened by a writer since may lack the record).
        """
        self._check_open()
        if self.read_only:
            raise ClientStateError(f"{self!r} is read-only: open it without read_only")
        return await self._journal.saves_cut_off()

    async def forget(self, ids: Iterable[int]) -> int:
        """Delete these rows (by :attr:`JournalEntry.id`); returns how many were deleted.

        Raises:
            TypeError: an id is not an int.
            ClientStateError: the file is not open (use ``async with``), or was opened
                ``read_only``.
        """
        self._check_open()
        if self.read_only:
            raise ClientStateError(f"{self!r} is read-only: open it without read_only to forget")
        return await self._journal.forget(ids)

    def _check_open(self) -> None:
        if not self._open:
            raise ClientStateError(f"{self!r} is not open: use `async with JournalFile(...)`")
