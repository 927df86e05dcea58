"""Admission: when a submit may go out. ``Limits.max_in_flight`` (room for one more job not
ended), ``Limits.max_concurrent_submits`` (a send slot) and the pacer of
``Limits.max_submits_per_second``, whose turn is taken while the journal's intent is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ._config import Limits
from ._ratelimit import WINDOW_MARGIN_S, Pacer, Ready


class _Slots(asyncio.Semaphore):
    """asyncio's semaphore, whose free slot can be taken in a plain call (:meth:`take_free`)."""

    def take_free(self) -> bool:
        """Take a slot if one is free and no one waits for one, as ``acquire()`` then takes
        it at once, but with no coroutine and no scan of the waiters (about 4,000 fewer
        instructions per submit). False: nothing was taken; await ``acquire()``."""
        if _SEMAPHORE_FIELDS and self._value > 0 and not self._waiters:
            self._value -= 1
            return True
        return False

    def release(self) -> None:
        """Give a slot back: in a plain step while no one waits for one (as asyncio's own
        does then, with one call less), else through asyncio's, which wakes the next."""
        if _SEMAPHORE_FIELDS and not self._waiters:
            self._value += 1
        else:
            super().release()


# take_free reads two private fields of asyncio.Semaphore (3.11 to 3.14 have both): on a Python
# without them, every slot is taken by acquire() instead of failing.
_SEMAPHORE_FIELDS = all(hasattr(asyncio.Semaphore(1), name) for name in ("_value", "_waiters"))


class Admission:
    """When a submit may go out: the in-flight bound, the submit slots and the pacer.

    Attributes:
        send_slots: the ``max_concurrent_submits`` slots (see :meth:`take_send_slot`).
        unpaced: no pace to wait for (no ``max_submits_per_second``, no fleet).
        bounds_in_flight: ``max_in_flight`` is set (else :meth:`take_in_flight` need not be
            awaited: it would return None at once).

    Args:
        limits: the client's limits.
        pace: waits for each submit's turn in place of the local pacer: a fleet's shared
            rate and its 429 pause (called whether or not ``max_submits_per_second`` is set).
            It awaits the ``ready`` it is given (the journal's intent) shortly before the
            turn comes, not between the turn and the send.
    """

    def __init__(
        self, limits: Limits, *, pace: Callable[[Ready], Awaitable[None]] | None = None
    ) -> None:
        # asyncio's own semaphores (the submit hot path): a free slot is taken without a trip
        # through the event loop, in half the time of anyio's (which looks up the task's
        # cancel scopes first); a submit is ended by cancelling its task, which these obey.
        self.send_slots = _Slots(limits.max_concurrent_submits)
        self._in_flight = (
            asyncio.Semaphore(limits.max_in_flight) if limits.max_in_flight is not None else None
        )
        self._pace = pace
        if pace is None and limits.max_submits_per_second is not None:
            self._pace = Pacer(limits.max_submits_per_second, margin=WINDOW_MARGIN_S).wait
        # No pace (and, with no journal, nothing to write): the hot path waits for a slot only.
        self.unpaced = self._pace is None
        self.bounds_in_flight = self._in_flight is not None

    async def take_in_flight(self) -> Callable[[], None] | None:
        """Wait for room under ``max_in_flight``; returns the release (held until the job ends).

        None when there is no bound.
        """
        slots = self._in_flight
        if slots is None:
            return None
        await slots.acquire()
        return slots.release

    async def pace_again(self) -> None:
        """A fresh turn of the submit rate for a resend (a submit refused with 429)."""
        if self._pace is not None:
            await self._pace(_nothing_to_do)

    async def take_send_slot(self, ready: Ready | None) -> None:
        """Take one of the ``max_concurrent_submits`` slots (``send_slots``), paced;
        ``ready`` (the journal's intent) is awaited once, as late as the pacing allows (None:
        nothing to write). The caller releases the slot once the request is done.

        A submit with neither a pace nor a journal takes ``send_slots.acquire()`` directly
        (the submit hot path: no coroutine of this one's).
        """
        await self.send_slots.acquire()
        try:
            if self._pace is not None:
                # Written while the pace waits: a slow or uneven write (the fleet's Redis, a
                # busy disk) would otherwise lie between the slot and the send, and bunch sends.
                await self._pace(ready or _nothing_to_do)
            elif ready is not None:
                await ready()
        except BaseException:
            self.send_slots.release()
            raise


async def _nothing_to_do() -> None:
    """A resend's ``ready``: its intent is written already."""
