"""Submits in progress: when one may go out (admission), how the journal records it, the key
it gets, and how every submit still running ends when the client closes.

:meth:`Submits.submit` reads as a sequence of these steps::

    admission.take_in_flight()          wait for room under Limits.max_in_flight
    SubmitRecord(...), .ended(error)    the journal protocol and the outcome classification
        admission.take_send_slot(intent)    Limits.max_concurrent_submits and the pacer,
                                            the intent written while the pace waits (no
                                            pace, no journal: send_slots.take_free(), or
                                            its acquire() alone)
            POST(on_wire=record.on_wire)    the transport says when a try may leave the
                                            process, and when a refused one waits to retry
                                            (then takes a fresh turn of the pacer)
        send_slots.release()
        claim the key                   usable, and not another job's
        await record.accepted(key)      key written before submit() returns
    make_job(key)                       the client's one job factory

Admission lives in ``_admission``, the journal protocol of one submit in ``_submit_record``.

Closing the client ends each submit at once by cancelling its task (``Task.cancel``); that
cancel is told apart from the caller's own cancellation, which always goes on (the submit
takes back only its own request, ``Task.uncancel``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._admission import Admission
from ._budget import Budget, RequestBody, Reservation
from ._errors import (
    ClientStateError,
    IncompleteJobError,
    JobCancelledError,
    JobProtocolError,
    JobTimeoutError,
    ProtocolError,
    SubmitUncertainError,
    UnknownJobError,
)
from ._jobs import ImageJob
from ._journal import JournalEntry, SubmitJournal
from ._keys import usable_key
from ._submit_record import SubmitRecord, outcome_state

if TYPE_CHECKING:
    from ._otel import JobTrace
    from ._transport import Transport

logger = logging.getLogger("wujie_async")


_NOT_SENT_STOPPED = (
    "submits were stopped (stop_submitting()) before this one was sent (nothing was sent)"
)


class MakeJob(Protocol):
    """The client's one job factory (build, hook up, track)."""

    def __call__(
        self,
        key: str,
        *,
        deadline_s: float,
        request: dict[str, Any] | None,
        n: int | None,
        ended: Callable[[ImageJob], None] | None = None,
        trace: JobTrace | None = None,
    ) -> ImageJob: ...


# Job ends that do not say the job cost nothing (see Reservation.settle).
_MAYBE_CHARGED = (
    JobTimeoutError,
    JobCancelledError,
    UnknownJobError,
    JobProtocolError,
    IncompleteJobError,
)


def _on_end(
    release: Callable[[], None] | None,
    held: Reservation | None,
    budget: Budget | None = None,
) -> Callable[[ImageJob], None] | None:
    """What a job gives back when it ends: its in-flight slot, and its points reservation
    turned into what the gateway charged (None: nothing to give back, no callback);
    ``budget`` remembers a job whose end kept its reservation as spent (for an attach of it)."""
    if held is None:
        return None if release is None else (lambda _job: release())

    def ended(job: ImageJob) -> None:
        if release is not None:
            release()
        error = job.exception()
        # Only the wait ended (the job may run on, and be charged), or the end says nothing
        # of a charge (a job the gateway lost or garbled, or done short).
        maybe = isinstance(error, _MAYBE_CHARGED)
        held.settle(job.points_charged, succeeded=job.done() and error is None, maybe_charged=maybe)
        if maybe and budget is not None:
            budget.maybe_charged(job.key, held)

    return ended


class Submits:
    """Every submit in progress of one client, from admission to its job, and their end.

    Args:
        transport: sends the request.
        journal: records it (None: no journal).
        make_job: the client's job factory, called once per accepted key.
        in_use: True for a key a job of the client already has.
        budget: the points budget (None: no budget).

    Attributes:
        accepted: submits the gateway accepted (each gave a key, and got its job: one
            whose caller cancelled it as its key was being journaled included).
        errors: submits that raised with no job made.
        uncertain: of ``errors``, those that may have been accepted (and charged): their
            request may have reached the gateway and no key came back.
        unjournaled: accepted submits whose key the journal could not write (listed by
            ``uncertain_submits()`` for the life of the client).
    """

    def __init__(
        self,
        *,
        transport: Transport,
        journal: SubmitJournal | None,
        make_job: MakeJob,
        in_use: Callable[[str], bool],
        budget: Budget | None = None,
    ) -> None:
        self._transport = transport
        self._budget = budget
        self._telemetry = transport.telemetry
        self._journal = journal
        self._make_job = make_job
        self._in_use = in_use
        self._admission: Admission | None = None
        # Every submit in progress, by its record (how far it got, and its task), so stop()
        # and stop_sending() can end each of them promptly (a dict: an ordered set).
        self._running: dict[SubmitRecord, None] = {}
        self._refusing = False  # stop_sending() was called: no submit leaves from now on
        # Set once no submit runs; made by the first wait_idle() while submits run (None: no
        # one waits), not by every submit that finds none running (a lone submit at a time, as a
        # web handler sends, made and set an Event each: two microseconds).
        self._idle: anyio.Event | None = None
        # Keys a submit got but has not yet tracked: a second submit given one is a duplicate.
        self._claimed_keys: set[str] = set()
        # Keys of earlier jobs (refuse_keys): a submit given one cannot be told from them.
        self._refused_keys: set[str] = set()
        self.accepted = 0
        self.errors = 0
        self.uncertain = 0
        self.unjournaled: list[JournalEntry] = []

    def open(self, admission: Admission) -> None:
        """Start taking submits, admitted by ``admission``."""
        self._admission = admission

    def charge_attached(
        self, key: str, request: Mapping[str, Any], n: int
    ) -> Callable[[ImageJob], None] | None:
        """Hold an attached job's expected cost on the budget, counted once
        (``Budget.hold_attached``); the callback its job calls when it ends turns that into
        what it cost (None: no budget, nothing to hold)."""
        budget = self._budget
        if budget is None:
            return None
        return _on_end(None, budget.hold_attached(key, request, n), budget)

    def key_found(self, row_id: int, key: str) -> None:
        """The journal row ``row_id`` (a submit whose reply was lost) was accepted as ``key``."""
        if self._budget is not None:
            self._budget.key_found(row_id, key)

    async def submit(
        self, path: str, body: dict[str, Any], n: int, deadline_s: float, tag: str | None
    ) -> ImageJob:
        """Send one checked body; returns its job once the gateway gave a key.

        Raises:
            ClientStateError: the client closed before the request was sent (nothing was).
            SubmitUncertainError: the client closed while it was on the wire, or the reply
                was lost or unusable; the gateway may have accepted (and charged) it.
        """
        if self._refusing:
            raise ClientStateError(_NOT_SENT_STOPPED)
        if self._budget is not None:
            # A lost reply's request names its job for an attach counted once, held weakly
            # by the budget (an edit's request carries its images).
            body = RequestBody(body)
        record = SubmitRecord(self._journal, path, body, tag)
        # The submit's own task: stop() cancels it. A plain Task.cancel rather than an anyio
        # CancelScope (whose enter and exit cost each submit more than the rest of its
        # bookkeeping): the cancel is thrown where the task waits, inside _send.
        task = record.task = asyncio.current_task()
        otel = self._telemetry.otel
        trace = otel.job_started("submit", body.get("model"), n) if otel is not None else None
        # Registered before the first await: stop() cannot miss a submit in progress.
        self._running[record] = None
        try:
            try:
                job = await self._send(record, path, body, n, deadline_s, trace)
            except asyncio.CancelledError:
                if not record.stopping:
                    raise  # the caller's own cancellation
                record.stopping = False  # taken back just below
                assert task is not None  # stopping is only set on a submit with a task
                if task.uncancel() > 0:
                    raise  # the caller cancelled it too: its cancellation goes on
            else:
                if trace is not None:
                    self._submit_ended(trace, record, None)
                return job
            # Only reached when stop() or stop_sending() cancelled this submit: the caller's
            # own cancellation is never swallowed by it (it goes on as CancelledError).
            if record.job is not None:
                if trace is not None:
                    self._submit_ended(trace, record, None)
                return record.job  # the key came back: its job, settled as cancelled
            if record.may_have_left:
                raise SubmitUncertainError(
                    "the client was closed while this submit was on the wire: the gateway may "
                    "have accepted (and charged) it",
                    request=body,
                )
            raise ClientStateError(
                _NOT_SENT_STOPPED
                if self._refusing
                else "the client was closed before this submit was sent (nothing was sent)"
            )
        except BaseException as exc:
            if record.job is None:
                # (A submit cancelled by its caller once its key came back is accepted: its
                # job is tracked, its key journaled; counted with the accepted ones.)
                self.errors += 1
                if outcome_state(exc, sending=record.may_have_left) == "uncertain":
                    self.uncertain += 1
            if trace is not None:
                self._submit_ended(trace, record, exc)
            if (
                isinstance(exc, asyncio.CancelledError)
                and record.may_have_left
                and record.job is None
            ):
                # The caller gave up (a request handler whose client went away): no one is
                # left to hear that this one may have been paid for.
                self._telemetry.warnings.warning(
                    "a submit was cancelled by its caller while on the wire: the gateway may "
                    "have accepted (and charged) it, and its key is unknown%s",
                    "; the journal lists it as uncertain" if self._journal is not None else "",
                )
            raise
        finally:
            if record.stopping and task is not None:
                # Our cancel never came out as CancelledError (code under _send turned it into
                # another error): taken back all the same, or the caller's next await would be
                # cancelled by a request no one made of it.
                task.uncancel()
            del self._running[record]
            if not self._running and self._idle is not None:
                self._idle.set()
                self._idle = None  # whoever waits now is woken; a later wait makes its own

    def _submit_ended(
        self, trace: JobTrace, record: SubmitRecord, error: BaseException | None
    ) -> None:
        """Telemetry of a submit's end; once a key came back, its job carries the span on."""
        otel = self._telemetry.otel
        if otel is None:
            return
        if record.key is not None:
            otel.submit_ended(trace, "accepted", None)
        else:
            assert error is not None  # no key and no error: _send returned a job without one
            otel.submit_ended(trace, outcome_state(error, sending=record.may_have_left), error)

    async def wait_idle(self) -> None:
        """Return once no submit is in progress."""
        if self._running:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def stop_sending(self) -> None:
        """Send nothing more: every submit whose request has not left yet (waiting for
        admission, the budget or the journal) ends with ClientStateError, and so does every
        later one. Submits already on the wire carry on and get their keys."""
        self._refusing = True
        for record in self._running:
            if not record.may_have_left:
                _cancel(record, "submits were stopped")

    async def stop(self, timeout: float) -> None:
        """End every submit in progress (see ``WujieClient.aclose``); wait for them to unwind.

        Unwinding awaits nothing slow of ours (journal records are queued, not awaited), but a
        submit on the wire also unwinds through the aiohttp session, whose trace hooks (the
        caller's own session) may await anything: bounded by ``timeout``, and a WARNING says
        how many were left still unwinding.
        """
        for record in self._running:
            _cancel(record, "the client is closing")
        if self._running:
            with anyio.move_on_after(timeout):
                await self.wait_idle()
        left = len(self._running)
        if left:
            logger.warning(
                "closing: %d submit(s) still unwinding after %g s (Timeouts.close), left "
                "behind (something a cancelled request awaits does not answer: a trace hook "
                "of your aiohttp session?); each ends with its own error when it unwinds",
                left,
                timeout,
            )

    async def _send(
        self,
        record: SubmitRecord,
        path: str,
        body: dict[str, Any],
        n: int,
        deadline_s: float,
        trace: JobTrace | None,
    ) -> ImageJob:
        """Admission, the journal record, the request and the job, in that order."""
        admission = self._admission
        if admission is None:
            raise ClientStateError("the client is not open")
        # The budget first: a submit it refuses waits for nothing and is never journaled.
        held = await self._budget.reserve(body, n) if self._budget is not None else None
        release: Callable[[], None] | None = None
        if admission.bounds_in_flight:
            try:
                release = await admission.take_in_flight()
            except BaseException:
                if held is not None:
                    held.release()
                raise
        lost_reply = True
        try:
            slots = admission.send_slots
            if self._journal is None and admission.unpaced:
                # The hot path: nothing to write, no pace; a free slot taken in a plain call.
                if not slots.take_free():
                    await slots.acquire()
            else:
                await admission.take_send_slot(record.intent if self._journal is not None else None)
            try:  # (entered with no await since the slot was taken)
                data = await self._transport.post(
                    path,
                    body,
                    kind="submit",
                    parent=trace,
                    on_wire=record.on_wire,
                    before_retry=admission.pace_again,
                )
            finally:
                slots.release()
            try:
                key = usable_key(data, body)
            finally:
                # Only the key is kept: the reply may quote the request's signature, and
                # an error raised below keeps this frame (its locals) in its traceback.
                # (No usable key: its key may still be found, so lost_reply stands.)
                data = None
            try:
                self._claim_key(key, body)
            except SubmitUncertainError:
                lost_reply = False  # a reply came, with another job's key
                raise
            if trace is not None and (otel := self._telemetry.otel) is not None:
                otel.job_accepted(trace, key)
            earlier = False  # the journal holds the key on an earlier row
            try:
                if self._journal is None:
                    record.key = key  # all that accepted() does without a journal
                else:
                    earlier = not await record.accepted(key)
            finally:
                # Whatever happens now, the key gets its job (tracked, or settled at once
                # if the client is closing): an accepted key is never dropped.
                if not earlier:
                    record.job = self._make_job(
                        key,
                        deadline_s=deadline_s,
                        request=body,
                        n=n,
                        ended=(
                            None
                            if release is None and held is None
                            else _on_end(release, held, self._budget)
                        ),
                        trace=trace,
                    )
                    release = held = None  # the job gives them back when it ends
                    self.accepted += 1  # even if its caller's cancel comes now
                self._claimed_keys.discard(key)
            if earlier:
                lost_reply = False  # a reply came, with another job's key
                raise _reused_key(key, "the key of an earlier job in the journal", body)
        except BaseException as exc:
            record.ended(exc)
            if held is not None:
                if outcome_state(exc, sending=record.may_have_left) == "uncertain":
                    # It may have been charged: the points stay spent, and a first job of its
                    # kind leaves the kind without a price (each lost reply letting the next
                    # probe go spent without limit).
                    held.settle(None, maybe_charged=True)
                    # Its key may be found (the console): an attach() of it is this job.
                    budget = self._budget
                    assert budget is not None  # a reservation is held on it
                    if lost_reply and isinstance(exc, SubmitUncertainError):
                        budget.lost_reply(exc, held)
                    if record.row_id is not None:
                        budget.maybe_charged(("row", record.row_id), held)
                else:
                    held.release()  # refused or never sent: nothing was charged
            raise
        finally:
            if release is not None:
                release()
        if record.unjournaled is not None:
            self.unjournaled.append(record.unjournaled_entry())
            self._telemetry.warnings.warning(
                "the gateway accepted a submit as %s but the journal could not record the "
                "key (%s); the job is tracked, and uncertain_submits() lists it",
                key,
                record.unjournaled,
            )
        assert record.job is not None  # made above, or the submit raised
        return record.job

    def receiving(self, key: str) -> bool:
        """True while a submit of this client holds ``key`` from its reply and has not made
        its job yet (its journal write on the way): that submit returns the key's job."""
        return key in self._claimed_keys

    def refuse_keys(self, keys: Iterable[str]) -> None:
        """Keys of earlier jobs that a submit's reply must not bring (see
        ``WujieClient.refuse_keys``)."""
        self._refused_keys.update(keys)

    def _claim_key(self, key: str, body: dict[str, Any]) -> None:
        """Claim the reply's ``key`` for this submit, unless another job of this client uses
        it or it is refused as an earlier job's (``refuse_keys``)."""
        if key in self._refused_keys:
            whose, what = "the key of an earlier job", "be told from that one"
        elif key in self._claimed_keys or self._in_use(key):
            whose, what = "a key already in use", "be followed"
        else:
            self._claimed_keys.add(key)
            return
        raise _reused_key(key, whose, body, what)


def _cancel(record: SubmitRecord, why: str) -> None:
    """Cancel the task of a submit in progress, once (see ``Submits.submit``).

    Not when that task is the one calling (a hook run inside its own submit): its cancel would
    only be thrown at its next wait, which may come after the submit returned, in the caller's
    code; it carries on to its end instead.
    """
    task = record.task
    if record.stopping or task is None or task is asyncio.current_task():
        return
    record.stopping = True
    task.cancel(why)


def _reused_key(
    key: str, whose: str, body: dict[str, Any], what: str = "be told from that one"
) -> SubmitUncertainError:
    """The error of a submit answered with the key of another job (``whose``)."""
    # The gateway charged this submit but gave the key of another job: this job cannot be
    # followed, and overwriting the other would orphan it.
    error = SubmitUncertainError(
        f"the gateway returned {whose} ({key}): this submit may have been charged but its "
        f"job cannot {what}; the earlier job is unaffected",
        request=body,
    )
    error.__cause__ = ProtocolError(f"the gateway returned {whose}", body=key)
    return error
