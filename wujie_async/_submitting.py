"""Around one submit: when it may go out (admission) and how the journal records it.

The client's ``_submit`` reads as a sequence of these steps::

    admission.take_in_flight()          wait for room under Limits.max_in_flight
    async with SubmitRecord(...):       the journal protocol and the outcome classification
        async with admission.send_slot():   Limits.max_concurrent_submits and the pacer
            await record.intent()           intent written before anything is sent
            record.sending()                from here the request may leave the process
            POST
        await record.accepted(key)      key written before submit() returns
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from ._config import Limits
from ._errors import ClientStateError, SubmitUncertainError, TransportError, WujieError
from ._jobs import ImageJob
from ._journal import JournalEntry, SubmitJournal
from ._ratelimit import WINDOW_MARGIN_S, Pacer

logger = logging.getLogger("wujie_async")


class Admission:
    """When a submit may go out: the in-flight bound, the submit slots and the pacer.

    Args:
        limits: the client's limits.
        pace: waits for each submit's turn in place of the local pacer: a fleet's shared
            rate and its 429 pause (called whether or not ``max_submits_per_second`` is set).
    """

    def __init__(
        self, limits: Limits, *, pace: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._send_slots = asyncio.Semaphore(limits.max_concurrent_submits)
        self._in_flight = (
            asyncio.Semaphore(limits.max_in_flight) if limits.max_in_flight is not None else None
        )
        self._pace = pace
        if pace is None and limits.max_submits_per_second is not None:
            self._pace = Pacer(limits.max_submits_per_second, margin=WINDOW_MARGIN_S).wait

    async def take_in_flight(self) -> Callable[[], None] | None:
        """Wait for room under ``max_in_flight``; returns the release (held until the job ends).

        None when there is no bound.
        """
        slots = self._in_flight
        if slots is None:
            return None
        await slots.acquire()
        return slots.release

    def send_slot(self) -> _SendSlot:
        """Hold one of the ``max_concurrent_submits`` slots, paced, while the request is out."""
        return _SendSlot(self._send_slots, self._pace)


class _SendSlot:
    """``async with admission.send_slot():`` as a plain class: one small object per submit
    rather than the generator and wrapper of ``@asynccontextmanager`` (the submit hot path)."""

    __slots__ = ("_pace", "_slots")

    def __init__(
        self, slots: asyncio.Semaphore, pace: Callable[[], Awaitable[None]] | None
    ) -> None:
        self._slots = slots
        self._pace = pace

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        if self._pace is not None:
            try:
                await self._pace()
            except BaseException:
                self._slots.release()
                raise

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()


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

    ``intent`` is written before sending, the key before ``submit()`` returns. Leaving the
    ``async with`` block with an error records what that error means (see
    :func:`outcome_state`); if the key had come back, it is kept (``accepted``) whatever
    happened after. Without a journal it only tracks how far the submit got.

    Attributes:
        key: the accepted key, once the gateway gave one.
        job: the job made for the key (the client sets it).
        unjournaled: why the accepted key could not be written (disk full, say), or None.
    """

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
        self.key: str | None = None
        self.job: ImageJob | None = None
        self.unjournaled: str | None = None

    @property
    def may_have_left(self) -> bool:
        """True once the request may have left the process."""
        return self._sending

    async def __aenter__(self) -> Self:
        return self

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

    def sending(self) -> None:
        """From now on the request may leave the process."""
        self._sending = True

    async def accepted(self, key: str) -> None:
        """Keep the key the gateway gave; a journal that cannot write it does not lose it.

        If the write fails, ``unjournaled`` says why and the caller keeps the key in memory.
        """
        self.key = key
        if self._journal is None or self._row_id is None:
            return
        try:
            await self._journal.record_accepted(self._row_id, key)
        except ClientStateError as exc:
            self.unjournaled = str(exc)
        else:
            self._key_written = True

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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        journal, row_id = self._journal, self._row_id
        if exc is None or journal is None or row_id is None:
            return
        if self.key is not None:
            if not self._key_written:
                # Interrupted after the gateway gave the key: keep it, resume finds it.
                journal.record_accepted_later(row_id, self.key)
            return
        state = outcome_state(exc, sending=self._sending)
        journal.record_unsent(row_id, state, repr(exc)[:500])
