"""The main job: rows in, images and a manifest out, every row ending in one known outcome.

The first submit goes alone: when the credentials, the URL or the balance are wrong, that one
request says so and nothing else is sent. After it, ``max_concurrent_submits`` submitters share
the queue. A systemic error (see ``_outcome.is_systemic``) stops all submitting at once:
submits already on the wire finish (and keep their keys), the rest end ``not_sent``. Its other
stops are ``_stops``'s; its manifest rows, ``_run_rows``'s; what an image that could not be
saved means, ``_image_problems``'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .. import (
    APIError,
    AuthenticationError,
    ClientStateError,
    GeneratedImage,
    ImageJob,
    JobError,
    ProtocolError,
    SubmitUncertainError,
    TransportError,
    UnknownJobError,
    WujieClient,
)
from .._file_names import render_name
from .._journal_worker import CLOSE_DEADLINE_S as JOURNAL_CLOSE_DEADLINE_S
from ._bulk_data import BulkResult, Row
from ._image_problems import GONE, describe, disk_refused, lasting_problem, precedence
from ._manifest import Manifest, base_record
from ._manifest_prices import learn_price
from ._outcome import LineOutcome, Status, classify, clean, counted_as, is_systemic
from ._progress import Display
from ._refusals import watching_refusals
from ._rows import ROWS_DEADLINE_S
from ._run_rows import RunRows
from ._signals import Signals, unread
from ._single import submit
from ._stops import UNCERTAIN_IN_A_ROW, GatewayFailingError, OutputUnwritableError


class BulkRun:
    """Sends ``send``, collects ``collect`` (jobs already accepted), and records every outcome.

    ``settled`` are lines a previous run ended and this one does not touch (counted only).
    ``charged_before``: keys whose cost an earlier run's manifest row records already (a job
    collected again is never counted twice). ``unrecorded``: settled lines whose outcome the
    manifest lacks (a run killed before writing it): written once at the start.
    ``names_taken``: file names (``{ext}`` for the extension) an earlier run saved, and the
    job key each belongs to (see ``_manifest_keys.names_taken``). ``keys_on_accept``: write a
    ``pending`` row with its key as each job is accepted (no journal: the manifest is the only
    record of the key, and a run killed outright would otherwise leave the re-run to pay
    again).
    ``make_room``: called once, at the first row the disk refuses, before writing it again;
    ``spare_room(size)``: called for each later refused ``pending`` row (a job's key: it must
    be on disk at once), before writing it again. ``journaled``: the client keeps a journal: a
    key it could not write there (a full disk) gets a ``pending`` row at once, as every key
    does with ``keys_on_accept``. ``rechecked``: keys of jobs an earlier run left uncertain,
    asked about again: one the gateway does not list now ends ``uncertain`` again, its message
    saying that an earlier run saw it accepted. ``keys_given``: the jobs are keys a user typed
    (``status KEY --wait``): one the gateway never lists is said "not found", not "handed out".
    Setting ``stop`` (a signal) ends the run gently: no new submits, the ones on the wire get
    their keys, then collection is abandoned (those jobs stay in the journal) and
    ``interrupted`` is set, also after a systemic error stopped the sending (which collects
    on): the signal is the stronger word.
    """

    def __init__(
        self,
        client: WujieClient,
        *,
        send: list[Row],
        collect: list[tuple[Row, ImageJob]],
        settled: list[LineOutcome],
        manifest: Manifest,
        out: Path,
        name: str,
        display: Display,
        already_saved: dict[str, set[int]],
        job_timeout: float | None = None,
        stop: anyio.Event | None = None,
        charged_before: frozenset[str] = frozenset(),
        unrecorded: list[tuple[Row, LineOutcome]] | None = None,
        names_taken: dict[str, str] | None = None,
        keys_on_accept: bool = False,
        make_room: Callable[[], None] | None = None,
        spare_room: Callable[[int], None] | None = None,
        journaled: bool = False,
        rechecked: frozenset[str] = frozenset(),
        keys_given: bool = False,
    ) -> None:
        self._client = client
        self._rechecked = rechecked
        self._keys_given = keys_given
        self._send = send
        self._collect = collect
        self._out = out
        self._name = name
        self._display = display
        self._already_saved = already_saved
        self._job_timeout = job_timeout
        self._stop = stop or anyio.Event()
        # The gateway refused a batch call for the credentials: collecting stops too, as at a
        # signal (the jobs are left pending: collected with the right credentials).
        self._refused = anyio.Event()
        self._submitters_idle = anyio.Event()
        # A systemic error (or a disk that refuses) stops the sending but not the collection;
        # ``stop`` is the caller's (a signal), and stops both.
        self._systemic_stop = False
        self.result = BulkResult(outcomes=list(settled))
        self._tally = display.tally
        self._seq: dict[int, int] = {}
        # Rows not yet sent. A plain deque: submitters take rows without waiting (an empty
        # queue means the work is done), so no queue that blocks is needed.
        self._queue: collections.deque[Row] = collections.deque()
        self._on_the_wire: dict[int, Row] = {}
        self._charged: set[str] = set()  # keys whose points a row of this run carries
        self._charged_before = charged_before
        self._downloads: collections.Counter[int] = collections.Counter()  # per row, now
        for number, outcome in enumerate(settled):
            self._tally.settle(-1 - number, counted_as(outcome))
        self._unrecorded = unrecorded or []
        self._names_taken = names_taken or {}
        self._keys_on_accept = keys_on_accept
        # Submits in a row (as they end) that got no usable reply: see UNCERTAIN_IN_A_ROW.
        self._uncertain_in_a_row = 0
        self._rows = RunRows(
            manifest,
            not_written=self.result.unrecorded,
            stop=self._stop_sending,
            make_room=make_room,
            spare_room=spare_room,
            journaled=journaled,
        )
        # Why the journal did not forget the rows this run superseded (None: it did, or had
        # none to): the summary says so, as those rows would be sent again by a later
        # --retry-uncertain.
        self.forget_failed: str | None = None
        # The journal rows it was to forget (the summary names them by number: a line's
        # name would take its new row too, uncertain perhaps, the only record of that job).
        self.forget_rows: list[int] = []
        self._journaled = journaled
        # Accepted jobs whose key is yet to be checked against the journal (see _keep_key),
        # and the one check at a time that takes them all.
        self._unchecked: list[tuple[Row, ImageJob]] = []
        self._checking = anyio.Lock()
        self._keys: set[str] = set()  # the keys of the jobs this run holds

    async def run(self) -> BulkResult:
        """Run to the end; the result says how every line ended."""
        for row, outcome in self._unrecorded:
            record = base_record(outcome.status, row.line, row.row_id, row.body, row.tag)
            if outcome.key is not None:
                record["key"] = outcome.key
            self._rows.write(record | {"error_code": outcome.error_code, "error": outcome.error})
        queue = self._queue
        for row in self._send:
            queue.append(row)
        # The lines a stop left end inside the display, so its last line counts them as the
        # summary does (it said "to send 19" above a summary of 20 not sent).
        with self._display.running():
            async with watching_refusals(self._client, self._credentials_refused):
                with anyio.CancelScope() as scope:
                    # A bare task, not a task group's: the watcher waits on ``stop``, which may
                    # never come, so it must not hold the run open, and a task group around the
                    # collectors would wrap their ExceptionGroup in another. It is cancelled when
                    # the work ends.
                    watcher = asyncio.get_running_loop().create_task(self._cancel_on_stop(scope))
                    try:
                        async with anyio.create_task_group() as collectors:
                            for row, job in self._collect:
                                self._keys.add(job.key)
                                self._move(row, "generating")
                                collectors.start_soon(self._collect_job, row, job)
                            await self._submit_all(queue, collectors)
                    finally:
                        watcher.cancel()
            self._end_on_the_wire()  # submits stopped waiting for a journal that took no write
            return self._close(interrupted=self._stop.is_set())

    def interrupted_at_once(self) -> BulkResult:
        """The result after ``run()`` was cancelled outright (a second Ctrl-C).

        Lines whose submit was under way end ``uncertain``: the request may have reached the
        gateway (the journal, when there is one, knows which did). Lines not sent end
        ``not_sent``; accepted jobs stay pending (their keys are in the journal).
        """
        self._end_on_the_wire()
        return self._close(interrupted=True)

    def _end_on_the_wire(self) -> None:
        """Lines whose submit was cancelled while under way end ``uncertain``."""
        for row in list(self._on_the_wire.values()):
            message = (
                "interrupted while its submit was under way: it may have been accepted (and "
                "charged); it is never resent silently"
            )
            self._end(row, "uncertain", None, "interrupted", message, quiet=True)
        self._on_the_wire.clear()

    def _close(self, *, interrupted: bool) -> BulkResult:
        for row in _drain(self._queue):
            reason = "the run stopped before this line was sent"
            self._end(row, "not_sent", None, "not_sent", reason)
        self.result.interrupted = interrupted
        self.result.pending = self._tally.total - len(self.result.outcomes)
        ended = {outcome.key for outcome in self.result.outcomes}
        self.result.pending_keys = sorted(self._keys - ended)
        return self.result

    def _move(self, row: Row, to: Any) -> None:
        self._tally.move(self._seq.setdefault(id(row), len(self._seq)), to)
        self._display.refresh()

    def _halted(self) -> bool:
        """True once nothing more may be sent: a signal, or a systemic stop."""
        return self._stop.is_set() or self._systemic_stop

    def _halt_sending(self) -> None:
        """Send nothing more. Rows already taken may wait for a slot (--max-in-flight,
        --rate): they must not be sent after the stop. The client ends them at once, unsent;
        those on the wire finish."""
        with contextlib.suppress(ClientStateError):
            self._client.stop_submitting()

    def _credentials_refused(self, refusal: AuthenticationError) -> None:
        """The gateway refused a batch call for the credentials: every later call would be
        refused too, and the jobs would wait out their deadlines (902 s) to end "timed out".
        The run stops as at a refused submit (exit 3), and stops collecting: its jobs are
        left pending, for the same command with the right credentials."""
        if self.result.systemic is None:
            self.result.systemic = refusal
        self._systemic_stop = True
        self._halt_sending()
        self._refused.set()

    async def _stopped_or_refused(self) -> None:
        """Wait for a signal's stop, or for the gateway to refuse the credentials."""
        async with anyio.create_task_group() as either:

            async def first(event: anyio.Event) -> None:
                await event.wait()
                either.cancel_scope.cancel()

            either.start_soon(first, self._stop)
            either.start_soon(first, self._refused)

    async def _cancel_on_stop(self, scope: anyio.CancelScope) -> None:
        await self._stopped_or_refused()
        self._halt_sending()
        if self._journaled:
            await self._submits_done_or_journal_held()
        else:
            await self._submitters_idle.wait()
        # Ctrl-C or SIGTERM: abandon collection, the journal (or the pending rows) keeps the
        # keys; after a systemic stop too, which collects on until a signal says otherwise.
        scope.cancel()

    async def _submits_done_or_journal_held(self) -> None:
        """After a stop: wait for the submits on the wire to end, but not for a journal whose
        disk took no write for ``JOURNAL_CLOSE_DEADLINE_S`` (a frozen file system, a hung
        mount) once every one of them has its key back.

        A submit returns once the journal has its key: held by such a disk, it waited out the
        whole grace after a SIGTERM (8 s) for nothing, and with the closing waits the summary
        came 13 s after the SIGTERM, past ``docker stop``'s 10 s. A key the journal holds
        uncommitted, of no job this run holds, is such a submit's; when they account for all
        those on the wire, they stop waiting (cancelled as at a second signal: the client
        keeps their keys queued for the journal, and the summary lists them). A submit still
        waiting for the gateway's reply is waited for as before: its key may yet come.
        """
        first_seen: dict[str, float] = {}
        while not self._submitters_idle.is_set():
            with anyio.move_on_after(JOURNAL_CLOSE_DEADLINE_S / 8):
                await self._submitters_idle.wait()
            now = anyio.current_time()
            held = [
                key
                for key in self._client.uncommitted_journal_keys()
                if now - first_seen.setdefault(key, now) >= JOURNAL_CLOSE_DEADLINE_S
            ]
            unknown = [key for key in held if key not in self._keys]
            if held and len(unknown) >= len(self._on_the_wire):
                if len(unknown) == len(self._on_the_wire) == 1:
                    # One submit, one key: its line's row carries the key (a re-run collects
                    # the job by it, the journal lacking it or not).
                    (row,) = self._on_the_wire.values()
                    self._on_the_wire.clear()
                    self._left_pending(row, unknown[0])
                return

    async def _submit_all(
        self, queue: collections.deque[Row], collectors: anyio.abc.TaskGroup
    ) -> None:
        try:
            async with anyio.create_task_group() as watch:
                watch.start_soon(self._watch_rows)
                if queue:
                    await self._submit_one(queue.popleft(), collectors)  # the probe, alone
                async with anyio.create_task_group() as submitters:
                    for _ in range(self._client.limits.max_concurrent_submits):
                        submitters.start_soon(self._submitter, queue, collectors)
                watch.cancel_scope.cancel()
        finally:
            self._submitters_idle.set()

    async def _watch_rows(self) -> None:
        """While lines are being sent: a manifest whose disk has taken no row for
        ``ROWS_DEADLINE_S`` (a hung mount, a frozen file system) stops the sending, as a
        refusing disk does. The loop does not wait on the disk any more, so nothing else would
        see it: every next line was sent and paid for while its key's row waited in memory
        (10 of 10 lines, against 3 when rows were written on the loop)."""
        while not self._halted():
            await anyio.sleep(ROWS_DEADLINE_S / 4)
            if self._rows.waiting_for() > ROWS_DEADLINE_S:
                self._stop_sending(OutputUnwritableError.manifest_held())

    async def _submitter(
        self, queue: collections.deque[Row], collectors: anyio.abc.TaskGroup
    ) -> None:
        while queue and not self._halted():
            await self._submit_one(queue.popleft(), collectors)

    async def _submit_one(self, row: Row, collectors: anyio.abc.TaskGroup) -> None:
        self._move(row, "submitting")
        self._on_the_wire[id(row)] = row
        try:
            job = await submit(self._client, row.body, tag=row.tag, job_timeout=self._job_timeout)
        except Exception as exc:
            self._on_the_wire.pop(id(row), None)
            if self._halted() and _not_sent(exc):
                reason = "the run stopped before this line was sent"
                self._end(row, "not_sent", None, "not_sent", reason, quiet=True)
                return
            if _not_sent(exc) and _JOURNAL_REFUSED in str(exc):
                # Nothing left (the client's promise): the journal could not record the
                # intent (a full disk, a broken file), and every next line would end so too.
                said = clean(exc).removeprefix("the submit was not sent: ")
                self._stop_sending(
                    OutputUnwritableError(
                        "the journal refused a submit", said, "the journal's folder"
                    )
                )
                self._end(row, "not_sent", None, "journal", clean(exc), quiet=True)
                return
            if is_systemic(exc):
                if self.result.systemic is None:
                    self.result.systemic = exc
                self._systemic_stop = True
                self._halt_sending()
            status, code, message = classify(exc)
            if isinstance(exc, SubmitUncertainError):
                self._uncertain_in_a_row += 1
                if self._uncertain_in_a_row >= UNCERTAIN_IN_A_ROW:
                    self._stop_sending(GatewayFailingError(self._uncertain_in_a_row, clean(exc)))
            elif isinstance(exc, APIError) and not isinstance(exc, ProtocolError):
                self._uncertain_in_a_row = 0  # the gateway's verdict (a refusal): it answers
            self._end(row, status, None, code, message, quiet=self._systemic_stop)
            return
        self._uncertain_in_a_row = 0
        self._on_the_wire.pop(id(row), None)  # (gone: left pending as the journal held it)
        # A key this run was given, handed out again later (past the client's memory of
        # ended jobs), is refused as an earlier run's would be.
        self._client.refuse_keys((job.key,))
        self._keys.add(job.key)
        self.result.went_out.append(row)  # accepted: a stop now leaves it pending, not ended
        if self._keys_on_accept:
            self._left_pending(row, job)  # what it says if no later row follows it
        elif self._journaled:
            try:
                await self._keep_key(row, job)
            except BaseException:
                self._left_pending(row, job)  # cancelled while checking: keep it anyway
                raise
        self._move(row, "generating")
        collectors.start_soon(self._collect_job, row, job)

    async def _keep_key(self, row: Row, job: ImageJob) -> None:
        """A key the journal could not write (a full disk: the client keeps it in memory and
        lists it in ``uncertain_submits()``) gets a ``pending`` row with its key at once, so
        a run killed outright before the line's last row leaves it to the re-run (which
        gives it to the journal) rather than to a WARNING. One check at a time, each for
        every key accepted since the last: a journal read per check, not per submit."""
        self._unchecked.append((row, job))
        async with self._checking:
            batch, self._unchecked = self._unchecked, []
            if not batch:
                return  # the check that just ended covered this key
            try:
                listed = {entry.job_key for entry in await self._client.uncertain_submits()}
            except ClientStateError:  # the journal is closed, or cannot be read: keep them
                listed = {checked.key for _, checked in batch}
            for checked_row, checked in batch:
                if checked.key in listed:
                    self._left_pending(checked_row, checked)

    async def _collect_job(self, row: Row, job: ImageJob) -> None:
        try:
            await self._collect_images(row, job)
        except asyncio.CancelledError:
            if self._halted() and not self._keys_on_accept:
                self._left_pending(row, job)
            raise

    def _left_pending(self, row: Row, job: ImageJob | str) -> None:
        """The run stopped while ``job`` (or the job of this key) ran: a row with its key
        lets a re-run collect it, journal or not (without one, the manifest is the only
        record of the key)."""
        self.result.went_out.append(row)
        record = base_record("not_sent", row.line, row.row_id, row.body, row.tag)
        record |= {
            "status": "pending",
            "key": job if isinstance(job, str) else job.key,
            "error_code": "interrupted",
            "error": "the run ended while its job ran: a re-run collects it (never resends it)",
        }
        self._rows.write(record)

    async def _collect_images(self, row: Row, job: ImageJob) -> None:
        # Loop time, as every other duration the client measures (one clock for tests to move).
        started = asyncio.get_running_loop().time()
        count = job.n or row.body.get("n")
        if count is None:  # a key attached by `status --wait`: its images say how many
            with contextlib.suppress(Exception):
                await job
            count = max(len(job.images), 1)
        done = self._already_saved.get(job.key, set())
        wanted = [index for index in range(count) if index not in done]
        unsaved = [len(wanted)]  # the line's images not saved yet (its last row waits)
        # gather(return_exceptions=True), not a task group: every image is tried even when
        # one fails, and the first problem is the one reported (a task group would cancel
        # the others at the first failure).
        outcomes = await asyncio.gather(
            *(self._save(row, job, index, started, unsaved) for index in wanted),
            return_exceptions=True,
        )
        problems = [o for o in outcomes if isinstance(o, BaseException)]
        problem = min(problems, key=precedence, default=None)
        if isinstance(problem, asyncio.CancelledError):
            raise problem
        # The line ends with its job (bounded by the job's deadline), so that its last row
        # carries what the job cost even when an image failed while the job still ran.
        try:
            await job
        except Exception as exc:
            problem = problem or exc
        # The cost goes on this line's last row unless a row already carries it.
        points = job.points_charged if self._uncharged(job) else None
        lasting: str | None = None
        self._charged.discard(job.key)  # bounded: only jobs being collected are in it
        if job.points_charged is None and job.done() and job.exception() is None:
            self.result.uncosted.append(row.body)
        if problem is None:
            self._end(row, "saved", job.key, None, None)
            return
        if isinstance(problem, JobError):  # IncompleteJobError too: failed, "incomplete"
            status, code, message = classify(problem)
            if isinstance(problem, UnknownJobError) and self._keys_given and not problem.was_listed:
                # `status KEY --wait`: a key typed in, never listed, is no job this tool saw
                # accepted: most likely a mistyped key (or another app's, or cleaned up).
                message = clean(
                    f"job {job.key}: not found: the gateway has not listed this key (a mistyped "
                    "key, another app's key, or a result already cleaned up)"
                )
            elif isinstance(problem, UnknownJobError) and job.key in self._rechecked:
                # Uncertain (classify), and not a wrong key: an earlier run saw the gateway
                # accept it. Said so in place of classify's word on a key never listed.
                message = clean(
                    f"{clean(problem)}; an earlier run saw it accepted: it may have run and been "
                    "charged (not resent)"
                )
        elif (
            isinstance(problem, APIError)
            and problem.http_status in GONE
            and job.done()
            and job.exception() is None
        ):
            # The image's URL is gone (the gateway cleans up old results): a re-run asks for
            # its newest listing once more, but only a new job (--retry-failed) may bring it.
            status, code = "failed", "gone"
            message = (
                f"job {job.key}: an image's URL is gone ({describe(problem)}): a re-run "
                "asks for its newest listing once more; --retry-failed sends the line again"
            )
        else:  # the job succeeded, but an image could not be fetched or saved
            status, code = "failed", "download"
            message = f"job {job.key}: an image could not be saved: {describe(problem)}"
            if disk_refused(problem):
                # Every later image would be paid for and refused the same way.
                self._stop_sending(OutputUnwritableError.of("an image could not be saved", problem))
            lasting = lasting_problem(problem)
        self._end(row, status, job.key, code, message, points=points, lasting=lasting)

    async def _save(
        self, row: Row, job: ImageJob, index: int, started: float, unsaved: list[int]
    ) -> None:
        image = await job.image(index)
        line = row.line or None  # rows resumed from an id-only tag have no line number
        # The client's downloader fills in {ext} once it has seen the image's bytes.
        name = render_name(
            self._name, key=job.key, index=index, ext="{ext}", id=row.row_id, line=line
        )
        owner = self._names_taken.get(name)
        if owner is not None and owner != job.key:
            # An earlier run saved another job's image under this name (a {line} template,
            # and the input changed since): that paid image is kept, this one is named apart.
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}-{job.key}{dot}{ext}" if dot else f"{name}-{job.key}"
        self._downloading(row, +1)
        try:
            try:
                saved = await self._client.download(image, self._out / name, key=job.key)
            except (ProtocolError, TransportError):
                # The image as first listed may be a temporary URL, gone once the job ended:
                # the job's newest listing of it is tried before the line fails.
                newer = await _newest_listing(job, index)
                if newer is None or newer == image:
                    raise
                saved = await self._client.download(newer, self._out / name, key=job.key)
        finally:
            self._downloading(row, -1)
        unsaved[0] -= 1
        if unsaved[0] == 0:
            # The line's last row is written once its job has ended (bounded by the job's
            # deadline), so that it carries what the job cost: a gateway may list the last
            # image while generating and report the cost with the end.
            await _ended(job)
        record = base_record("saved", row.line, row.row_id, row.body, row.tag)
        record |= {
            "key": job.key,
            "index": index,
            "path": saved.path.name,
            "sha256": saved.sha256,
            "bytes": saved.bytes,
            "seconds": round(asyncio.get_running_loop().time() - started, 3),
        }
        # The job's cost goes on the first of its rows written once the gateway reported it
        # (the last image usually lands with it): the rows of a run add up to what it cost.
        if self._uncharged(job):
            self._charged.add(job.key)
            record["points"] = job.points_charged
            self.result.points += job.points_charged or 0.0
            if job.points_charged is not None:
                learn_price(self.result.prices, row.body, job.points_charged)
        self._rows.write(record)
        self.result.images += 1
        self._tally.images += 1
        self.result.saved_paths.append(saved.path)
        self._display.refresh()

    async def end(
        self,
        signals: Signals,
        close: Callable[[], Awaitable[None]],
        *,
        forget: Callable[[], Iterable[int]] | None = None,
        make_room: Callable[[], None] | None = None,
    ) -> None:
        """The closing waits of a run that has ended, each bounded (a disk that stopped
        answering holds them), each ended at once by a signal after the first (see
        ``_signals``): what they leave unwritten is the summary's to list.

        Two at once, as they wait on different files (a manifest and a journal on one frozen
        disk: SIGTERM to summary about 4.3 s, was 6 s with one after the other): the rows
        queued (``ROWS_DEADLINE_S``), and the journal's: ``forget``, the journal rows this run
        superseded, forgotten (``JOURNAL_CLOSE_DEADLINE_S``: a journal whose disk stopped
        answering keeps it queued, done if the disk answers again), then ``close``, the
        client's close (its last commit; to wait with :meth:`Signals.close`). Then, with
        ``make_room`` (blocking: the disk set-aside given back, once every download has
        ended), the rows the disk refused, written again into that room: after the journal's
        last writes, so that nothing else takes the room first.
        """

        async def journal() -> None:
            if forget is not None:
                self.forget_rows = sorted(set(forget()))
                try:
                    with anyio.move_on_after(JOURNAL_CLOSE_DEADLINE_S), signals.cut_short():
                        await self._client.forget_submits(self.forget_rows)
                except ClientStateError as exc:  # a journal that refused the write
                    # (A full disk): the client is still closed, and the summary printed.
                    self.forget_failed = str(exc)
            await close()

        journal_closed = asyncio.ensure_future(journal())
        try:
            with signals.cut_short():
                await self._rows.settle()
        except BaseException:
            journal_closed.add_done_callback(unread)  # cancelled: its end is nobody's to report
            raise
        await journal_closed
        if make_room is not None:
            with signals.cut_short():
                await self._rows.rewrite_refused(make_room)

    @property
    def rows_held(self) -> bool:
        """The manifest's disk took no row for ``ROWS_DEADLINE_S`` (or a signal stopped the
        wait): nothing more waits on that disk."""
        return self._rows.held

    def close_rows(self) -> None:
        """Close the manifest once its rows are written (never waits: see ``_run_rows``)."""
        self._rows.close()

    def _stop_sending(self, problem: OutputUnwritableError | GatewayFailingError) -> None:
        """Stop the run as a systemic error does (the first such problem is the one said)."""
        if self.result.systemic is None:
            self.result.systemic = problem
            self._systemic_stop = True
            self._halt_sending()

    def _uncharged(self, job: ImageJob) -> bool:
        """True when the job's cost is known and no manifest row records it yet."""
        key = job.key
        return job.points_charged is not None and not (
            key in self._charged or key in self._charged_before
        )

    def _downloading(self, row: Row, change: int) -> None:
        """A download of the row's starts (+1) or ends (-1): the row shows ``saving`` while
        one runs, ``generating`` between them (its job may still be making images)."""
        downloads = self._downloads
        downloads[id(row)] += change
        if downloads[id(row)] <= 0:
            del downloads[id(row)]
            self._move(row, "generating")
        elif change > 0 and downloads[id(row)] == 1:
            self._move(row, "saving")

    def _end(
        self,
        row: Row,
        status: Status,
        key: str | None,
        code: str | None,
        message: str | None,
        *,
        quiet: bool = False,
        points: float | None = None,
        lasting: str | None = None,
    ) -> None:
        outcome = LineOutcome(status, row.line, row.row_id, key, code, message, lasting)
        self.result.outcomes.append(outcome)
        if status != "not_sent":
            self.result.went_out.append(row)
        self._move(row, status)
        if status == "saved":
            return
        record = base_record(status, row.line, row.row_id, row.body, row.tag)
        if key is not None:
            record["key"] = key
        if points is not None:
            record["points"] = points
            self.result.points += points
        record |= {"error_code": code, "error": message}
        self._rows.write(record)
        if not quiet and status != "not_sent":
            self._display.note(f"✗ {row.label}: {status}: {message}")


async def _ended(job: ImageJob) -> None:
    """Wait for ``job`` to end, however it ends (its error is the line's to report)."""
    with contextlib.suppress(Exception):
        await job


async def _newest_listing(job: ImageJob, index: int) -> GeneratedImage | None:
    """Image ``index`` as the job's newest listing gives it, once the job has ended."""
    await _ended(job)
    return next((image for image in job.images if image.index == index), None)


# What the client's ClientStateError says when the journal could not write a submit's intent.
_JOURNAL_REFUSED = "journal write failed"


def _not_sent(exc: BaseException) -> bool:
    """True for a submit that ended before its request left (stop_submitting(), say)."""
    return isinstance(exc, ClientStateError)


def _drain(queue: collections.deque[Row]) -> list[Row]:
    rows = list(queue)
    queue.clear()
    return rows
