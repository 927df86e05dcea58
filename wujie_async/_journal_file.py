"""JournalFile: a client's journal opened on its own, to list and forget its rows.

No gateway, no credentials: what ``wujie-async journal list|forget`` needs, and what a script
settling uncertain submits needs. It takes the journal's lock like a client does, so it cannot
race a live client writing to the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from ._errors import ClientStateError
from ._journal import Journal, JournalEntry


class JournalFile:
    """A journal file opened without a client: read its rows, forget the ones you settled.

    Use it as ``async with JournalFile("jobs.sqlite") as journal:``. The rows are those a
    ``WujieClient(journal=...)`` wrote (see :meth:`WujieClient.journal_entries`).

    Args:
        path: the journal file (as given to ``WujieClient(journal=...)``).

    Raises:
        FileNotFoundError: on entering, there is no file at ``path`` (none is created).
        JournalLockedError: on entering, a live client (or another opener) holds the journal.
        ClientStateError: on entering, the file cannot be read as a journal.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._journal = Journal(self.path)
        self._open = False

    def __repr__(self) -> str:
        return f"JournalFile({str(self.path)!r})"

    async def __aenter__(self) -> Self:
        if self._open:
            raise ClientStateError(f"{self!r} is already open")
        if not self.path.is_file():
            raise FileNotFoundError(f"no journal at {self.path}")
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
            ValueError: a state that is not one of those.
            ClientStateError: the file is not open (use ``async with``).
        """
        self._check_open()
        return await self._journal.entries(*states, tag=tag)

    async def forget(self, ids: Iterable[int]) -> int:
        """Delete these rows (by :attr:`JournalEntry.id`); returns how many were deleted.

        Raises:
            TypeError: an id is not an int.
            ClientStateError: the file is not open (use ``async with``).
        """
        self._check_open()
        return await self._journal.forget(ids)

    def _check_open(self) -> None:
        if not self._open:
            raise ClientStateError(f"{self!r} is not open: use `async with JournalFile(...)`")
