"""SubmitRecord: one submit's journal protocol (the intent written before the request leaves,
the key before ``submit()`` returns) and how its end is recorded (``outcome_state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from ._errors import (
    ClientStateError,
    SubmitUncertainError,
    TransportError,
    WujieError,
)
from ._jobs import ImageJob
from ._journal import JournalEntry, SubmitJournal


def outcome_state(error: BaseException, *, sending: bool) -> str:
    """The journal state of a submit that ended with ``error`` before a key was accepted.

    Only a request that may have reached the wire is ``uncertain``; a definite refusal cost
    nothing (``rejected``); a request that provably never reached the gateway, or never left
    the process, is ``unsent`` (safe to send again).
    """
    if not sending:
        return "unsent"
    if isinstance(error, SubmitUncertainError):
        return "uncertain"
    if isinstance(error, TransportError) and not error.reached_server:
        return "unsent"
    if isinstance(error, WujieError):
        return "rejected"
    return "uncertain"  # a cancel or a bug while the request was out: it may have gone through


class SubmitRecord:
    """The journal protocol of one submit, and the one place its outcome is classified.

    ``intent`` is written before sending, the key before ``submit()`` returns. A submit that
    ends with an error calls :meth:`ended`, which records what that error means (see
    :func:`outcome_state`); if the key had come back, it is kept (``accepted``) whatever
    happened after. Without a journal it only tracks how far the submit got.

    Attributes:
        key: the accepted key, once the gateway gave one.
        job: the job made for the key (the client sets it).
        unjournaled: why the accepted key could not be written (disk full, say), or None.
    """

    __slots__ = (
        "_body",
        "_journal",
        "_key_written",
        "_path",
        "_row_id",
        "_sending",
        "_tag",
        "job",
        "key",
        "stopping",
        "task",
        "unjournaled",
    )

    def __init__(
        self, journal: SubmitJournal | None, path: str, body: dict[str, Any], tag: str | None
    ) -> None:
        self._journal = journal
        self._path = path
        self._body = body
        self._tag = tag
        self._row_id: int | None = None
        self._sending = False
        self._key_written = False
        # The task running the submit, and whether stop() or stop_sending() cancelled it (a
        # request its submit takes back: Task.uncancel).
        self.task: asyncio.Task[Any] | None = None
        self.stopping = False
        self.key: str | None = None
        self.job: ImageJob | None = None
        self.unjournaled: str | None = None

    @property
    def row_id(self) -> int | None:
        """The journal row of this submit, once its intent is written (None: no journal)."""
        return self._row_id

    @property
    def may_have_left(self) -> bool:
        """True once the request may have left the process."""
        return self._sending

    async def intent(self) -> None:
        """Write the intent (before anything is sent).

        Raises:
            ClientStateError: the journal cannot write it; nothing was sent.
        """
        if self._journal is None:
            return
        try:
            self._row_id = await self._journal.record_intent(self._path, self._body, self._tag)
        except ClientStateError as exc:
            if type(exc) is not ClientStateError:
                raise  # a subclass (the fleet's Redis is away, say) already says what it is
            raise ClientStateError(f"the submit was not sent: {exc}") from None

    def on_wire(self, may_leave: bool) -> None:
        """The transport says whether the request may now leave the process (``True`` just
        before each try) or has nothing on the wire (``False``: a try was refused outright and
        the next one waits)."""
        self._sending = may_leave

    async def accepted(self, key: str) -> bool:
        """Keep the key the gateway gave; a journal that cannot write it does not lose it.

        If the write fails, ``unjournaled`` says why and the caller keeps the key in memory;
        the write is queued once more, so a journal that recovers (Redis back, room on the
        disk again) gets the key after all.

        Returns False, keeping nothing, when the journal holds ``key`` on an earlier row
        already (an earlier job's key handed out again): the submit is to end uncertain.
        """
        if self._journal is None or self._row_id is None:
            self.key = key
            return True
        try:
            written = await self._journal.record_accepted(self._row_id, key)
        except ClientStateError as exc:
            self.key = key
            self.unjournaled = str(exc)
            with contextlib.suppress(ClientStateError):  # a journal already closed
                self._journal.record_accepted_later(self._row_id, key)
            return True
        except BaseException:
            self.key = key  # interrupted: kept, written later (see __aexit__)
            raise
        if not written:
            return False
        self.key = key
        self._key_written = True
        return True

    def unjournaled_entry(self) -> JournalEntry:
        """What ``uncertain_submits()`` lists for a key the journal could not keep."""
        return JournalEntry(
            id=self._row_id if self._row_id is not None else -1,
            path=self._path,
            request=self._body,
            state="uncertain",
            job_key=self.key,
            tag=self._tag,
            error=f"accepted as {self.key}, but the key could not be journaled: {self.unjournaled}",
            created=time.time(),
        )

    def ended(self, exc: BaseException) -> None:
        """The submit ended with ``exc``: record what that means (a plain call, not an
        ``async with``: nothing here awaits, and the submit hot path saves two coroutines)."""
        journal, row_id = self._journal, self._row_id
        if journal is None or row_id is None:
            return
        if self.key is not None:
            if not self._key_written:
                # Interrupted after the gateway gave the key: keep it, resume finds it.
                journal.record_accepted_later(row_id, self.key)
            return
        state = outcome_state(exc, sending=self._sending)
        journal.record_unsent(row_id, state, repr(exc)[:500])
