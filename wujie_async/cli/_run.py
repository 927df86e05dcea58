"""What ``bulk``, ``generate``, ``resume`` and ``status`` do once their arguments are read.

A ``Session`` opens the client, the manifest and the journal, runs the plan (``_plan`` decides
what each line needs: sent, collected, or left as it is), stops on signals and systemic
errors; the summary and the commands to run next are ``_summary``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.text import Text

from .. import (
    ClientStateError,
    JournalLockedError,
    Limits,
    WujieClient,
)
from .._budget import Kind, PriceKind, kind_of
from .._file_names import DEFAULT_NAME
from .._keys import images_in
from ._bulk import BulkRun
from ._bulk_data import BulkResult, Row
from ._common import (
    UsageError,
    open_client,
    shell_path,
)
from ._disk_reserve import DiskReserve, reserve_size
from ._input import BulkItem
from ._manifest import (
    Manifest,
    of_source,
    open_manifest,
    other_inputs,
    read_manifest,
    run_source,
    saved_indexes,
)
from ._manifest_keys import charged_keys, names_taken
from ._manifest_plan import plan_from_manifest
from ._manifest_prices import (
    Unreported,
    points_spent,
    prices_charged,
    uncertain_cost,
    uncertain_unpriced,
    unreported_cost,
    unreported_unpriced,
    with_learned_prices,
)
from ._outcome import LineOutcome, clean
from ._plan import Plan, known_keys, plan_status, sent_lines
from ._progress import Display, Mode, Tally
from ._rerun_plan import journal_uncertain, plan_rerun, plan_resume
from ._rows import ROWS_DEADLINE_S
from ._signals import Signals, stopping_on_signals
from ._summary import Summary


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.resolve() == other.resolve()
    except OSError:
        return False


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a file or cannot be written, or whose manifest is not a
    file, before anything is sent."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the images")
    manifest = out / "manifest.jsonl"
    if manifest.exists() and not manifest.is_file():
        raise UsageError(
            f"{manifest} is not a file (a folder?); move it away, or give another --out "
            "(nothing was sent)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A name of its own: two runs testing one folder at once must not remove each other's.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".wujie-async-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(
            f"--out {out}: cannot write there ({reason}); give a writable folder"
        ) from None


def journal_path(args: argparse.Namespace) -> Path | None:
    """The run's journal: ``--journal``, else OUT/journal.sqlite (none with --emulator)."""
    if args.command not in ("bulk", "resume"):
        return None
    if args.command == "resume":
        return Path(args.journal)
    if args.no_journal:
        return None
    if args.journal is not None:
        return Path(args.journal)
    # The embedded emulator's jobs die with this process: nothing to resume there.
    return None if args.emulator else args.out / "journal.sqlite"


class Session:
    """One command's run: client, display, Ctrl-C handling and the closing summary."""

    def __init__(self, args: argparse.Namespace, console: Console, mode: Mode) -> None:
        self.args = args
        self.console = console
        self.mode = mode
        self.journal = journal_path(args)
        self.result: BulkResult | None = None
        self.base_url = ""
        self.signals: Signals | None = None  # what the signals did, once the run started
        self.out_disk_held = False  # the output folder's disk took no manifest row
        self.points_before = 0.0  # what earlier runs of this input were charged
        # Keys of journal records its disk had not taken when the client closed (it stopped
        # waiting: a frozen file system, a hung mount): the summary names them.
        self.journal_left: list[str] = []
        self.forget_failed: str | None = None  # see BulkRun.forget_failed
        self.forget_rows: list[int] = []  # see BulkRun.forget_rows
        self.points_uncertain = 0.0  # what their uncertain lines may have been (with a budget)
        # With a budget: kinds of their uncertain lines that have no known price (see _unpriced).
        self.unpriced_kinds: set[Kind] = set()
        # With a budget: kinds (model, size, quality) of their saved jobs whose cost the gateway
        # never reported and that have no known price, with how many (see _unpriced).
        self.unreported_kinds: dict[PriceKind, int] = {}
        self.prices_before: dict[str, float] = {}  # with a budget: their cost per image, by kind
        # Earlier runs' saved jobs whose cost the gateway did not report, at their kind's price:
        # counted with what earlier runs spent (and against the budget).
        self.unreported_before = Unreported()
        self.prices_learned: dict[str, float] = {}  # what earlier runs were charged, by kind
        self.points = 0.0  # what this run's jobs were charged
        self.bodies: dict[str, dict[str, Any]] = {}  # bulk: the request bodies, by tag

    def limits(self) -> Limits:
        args = self.args
        budget = getattr(args, "max_points", None)
        return Limits(
            max_in_flight=getattr(args, "max_in_flight", None),
            max_concurrent_submits=getattr(args, "concurrency", 4),
            max_submits_per_second=getattr(args, "rate", None),
            # The budget is the input's, across re-runs: what earlier runs spent counts.
            max_points=(
                None
                if budget is None
                else max(budget - self.spent_before() - self.points_uncertain, 0.0)
            ),
            point_prices=self._point_prices(),
        )

    def _unpriced(self, plan: Plan) -> None:
        """Lines of a kind whose earlier line may have been charged without a reply, with no
        price known, end ``not_sent`` (``unpriced``), as the budget ends them within a run:
        a job sent to learn the price would pass the budget by what that line cost."""
        send = []
        for row in plan.send:
            model = row.body.get("model")
            kind = kind_of(row.body, images_in(row.body) or 1)
            if kind in self.unpriced_kinds:
                why = f"a {model} line of an earlier run may have been charged without a reply"
            elif (jobs := self.unreported_kinds.get(kind[:3])) is not None:
                # A job sent to learn the price: this gateway did not report it for the
                # earlier ones, and each re-run so paid one more job past the budget.
                why = (
                    f"{jobs} {model} job(s) of earlier runs were charged a cost the gateway "
                    "never reported"
                )
            else:
                send.append(row)
                continue
            outcome = LineOutcome(
                "not_sent",
                row.line,
                row.row_id,
                None,
                "unpriced",
                clean(
                    f"not sent: {why}, and what a {model} job costs is not known, so "
                    f"--max-points {self.args.max_points:g} cannot be held; give its price "
                    f"with --point-price {model}=POINTS (points per image) and re-run"
                ),
            )
            plan.settled.append(outcome)
            plan.unrecorded.append((row, outcome))
        plan.send = send

    def _point_prices(self, learned: dict[str, float] | None = None) -> dict[str, float] | None:
        """The user's ``--point-price`` table, and (with a budget) what earlier runs of this
        input were charged, by kind, for models the user gave no price for: a kind whose cost
        is known is not sent to learn it again (that probing job could pass the budget).
        ``learned``: those prices, in place of the budget's."""
        given = getattr(self.args, "point_prices", None)
        prices = with_learned_prices(given, self.prices_before if learned is None else learned)
        return prices or None

    def spent_before(self) -> float:
        """What earlier runs of this input spent: the costs their rows record, and their saved
        jobs whose cost was not reported at their kind's price."""
        return self.points_before + self.unreported_before.points

    async def run(self, items: list[BulkItem]) -> int:
        """Run the command; returns its exit code."""
        # The signal handlers, installed as the run starts, stay until the summary is printed
        # (see _signals: a signal in the closing waits ends them, never the summary).
        with contextlib.ExitStack() as handlers:
            return await self._run(items, handlers)

    async def _run(self, items: list[BulkItem], handlers: contextlib.ExitStack) -> int:
        args = self.args
        out: Path = args.out
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        manifest_path = out / "manifest.jsonl"
        records = await anyio.to_thread.run_sync(read_manifest, manifest_path)
        source = self.source(records)
        if args.command == "bulk":
            others = other_inputs(records, source)
            if others:
                raise UsageError(
                    f"--out {out} holds the manifest of another input ({clean(others[0])}); "
                    f"give this input its own --out, or move {manifest_path} away to start over"
                )
            records = of_source(records, source)
            self.points_before = points_spent(records)
            self.bodies = bodies = {item.tag: item.request.body() for item in items}
            self.prices_learned = learned = prices_charged(records, bodies)
            # Saved jobs whose cost the gateway did not report cost their kind's price.
            self.unreported_before = unreported_cost(
                records, bodies, self._point_prices(learned) or {}
            )
            if getattr(args, "max_points", None) is not None:  # prices serve the budget only
                self.prices_before = learned
                # Lines left uncertain may have been charged: the budget counts them spent,
                # those only the journal holds too (a run killed while they were on the wire).
                if self.journal is not None:
                    records = [*records, *await journal_uncertain(self.journal, items, records)]
                self.points_uncertain = uncertain_cost(records, bodies, self._point_prices())
                self.unpriced_kinds = uncertain_unpriced(records, bodies, self._point_prices())
                self.unreported_kinds = unreported_unpriced(records, bodies, self._point_prices())
        async with self._opened(items) as (client, reserve, close):
            if args.command == "resume":
                plan = await plan_resume(client, records)
            elif args.command == "status":
                plan = plan_status(client, args.keys, job_timeout=args.job_timeout)
            elif self.journal is not None:
                plan = await plan_rerun(
                    client,
                    items,
                    records,
                    retry_failed=args.retry_failed,
                    job_timeout=args.job_timeout,
                    own_journal=_same_file(self.journal, out / "journal.sqlite"),
                    retry_uncertain=args.retry_uncertain,
                    unpriced=self.unpriced_kinds,
                )
                if plan.skipped:
                    self._say(
                        f"skipping {plan.skipped} line(s) already sent, as the journal says (or "
                        "the manifest, for lines the journal has no row of): pending ones are "
                        f"collected; {self._resent_said(failed=False)}"
                    )
            elif args.command == "bulk":
                plan = plan_from_manifest(
                    client,
                    items,
                    records,
                    retry_failed=args.retry_failed,
                    job_timeout=args.job_timeout,
                    retry_uncertain=args.retry_uncertain,
                    unpriced=self.unpriced_kinds,
                )
                if plan.skipped:
                    self._say(
                        f"continuing {manifest_path}: skipping {plan.skipped} line(s) an earlier "
                        f"run ended ({self._resent_said(failed=True)})"
                    )
            else:
                plan = Plan(send=[Row.of(item) for item in items])
            if plan.rechecked:
                self._say(
                    f"asking the gateway again about {len(plan.rechecked)} uncertain line(s) "
                    "whose job it accepted (no resend): their images are saved if it lists them "
                    "done now, else they stay uncertain"
                )
            if self.unpriced_kinds or self.unreported_kinds:
                self._unpriced(plan)
            # A gateway that hands out a key again (a counter reset by a restart) gave a new
            # line an earlier run's key: it was taken for that saved job, read "saved", and
            # its own image was never written.
            client.refuse_keys(known_keys(records) | plan.journal_keys)
            if plan.changed:
                self._say(
                    f"{plan.changed} row(s) with an id changed since their jobs were sent: "
                    "those jobs stand, as the requests they were; give a changed row a new id "
                    "to send it as it is now"
                )
            if plan.orphans:
                self._say(
                    f"collecting {plan.orphans} job(s) sent for rows no longer in the input "
                    "(edited or removed since): they are paid, and saved as the requests they were"
                )
            if plan.unclaimed:
                self._say(
                    f"{plan.unclaimed} job(s) in the journal may still be running for rows no "
                    "longer in the input (edited or removed since): they are paid; "
                    f"`wujie-async resume {shell_path(self.journal)} -o {shell_path(out)}` "
                    "collects them"
                )
            if plan.moved:
                self._say(
                    f"{plan.moved} line(s) moved since they were recorded: recognised by their "
                    "request (give rows an id to name them whatever their place)"
                )
            if plan.unusable:
                shown = ", ".join(str(row_id) for row_id in plan.unusable[:10])
                self.console.print(
                    Text(
                        f"warning: {len(plan.unusable)} journal row(s) hold a job key that is not "
                        f"usable (row id {shown}{' ...' if len(plan.unusable) > 10 else ''}): "
                        "they end failed; every other row goes on"
                    ),
                    soft_wrap=True,
                )
            total = len(plan.send) + len(plan.collect) + len(plan.settled)
            display = Display(
                Tally(total),
                self.console,
                mode=self.mode,
                quiet=args.quiet,
                interval=args.progress_interval,
            )
            stop = anyio.Event()
            try:
                handle = await anyio.to_thread.run_sync(open_manifest, manifest_path)
            except OSError as exc:
                raise UsageError(
                    f"cannot write {manifest_path} ({exc.strerror or type(exc).__name__}); "
                    "make it writable (nothing was sent)"
                ) from None
            manifest = Manifest(handle, source=source)
            run: BulkRun | None = None
            try:
                run = BulkRun(
                    client,
                    send=plan.send,
                    collect=plan.collect,
                    settled=plan.settled,
                    manifest=manifest,
                    out=out,
                    name=getattr(args, "name", None) or DEFAULT_NAME,
                    display=display,
                    already_saved=saved_indexes(records),
                    job_timeout=args.job_timeout,
                    stop=stop,
                    charged_before=charged_keys(records),
                    unrecorded=plan.unrecorded,
                    names_taken=names_taken(records),
                    # The embedded emulator's jobs end with this process: no key outlives it.
                    keys_on_accept=self.journal is None and not getattr(args, "emulator", False),
                    make_room=reserve.halve,
                    spare_room=reserve.spare,
                    journaled=self.journal is not None,
                    rechecked=frozenset(plan.rechecked),
                    keys_given=args.command == "status",
                )
                signals = handlers.enter_context(stopping_on_signals(stop, self.console))
                self.signals = signals
                result = await signals.run_or_quit(run.run, run.interrupted_at_once)
                self.result = result

                def forget() -> list[int]:
                    # Lines whose new job was accepted and left pending by a stop have no
                    # outcome, yet their old uncertain row is superseded all the same.
                    sent = sent_lines(result.outcomes)
                    sent |= {row.row_id or row.line for row in result.went_out}
                    return [row for line, row in plan.superseded.items() if line in sent]

                # The closing waits (what they leave unwritten is listed in the summary).
                await run.end(
                    signals,
                    close,
                    forget=forget if plan.superseded else None,
                    make_room=reserve.release,
                )
                self.out_disk_held = run.rows_held
                self.forget_failed = run.forget_failed
                self.forget_rows = run.forget_rows
            finally:
                if run is not None:
                    run.close_rows()
                else:
                    manifest.close()
            # What this run's manifest rows record: a job collected again was counted by
            # the run that first recorded its cost.
            self.points = self.result.points if self.result is not None else 0.0
            if self.result is not None and plan.rechecked:
                self._told(plan, records)
        return self.finish(total)

    def _told(self, plan: Plan, records: list[dict[str, Any]]) -> None:
        """Uncertain lines asked about again that are told now (saved, or ended otherwise):
        what they may have cost is no longer "up to ... on uncertain lines" (a job saved
        now is in this run's points: it is never counted twice). One whose wait ended before
        the gateway said anything of it stays counted there."""
        assert self.result is not None
        # A wait that ended (timeout) told nothing: the gateway may still not know the key.
        told = {
            o.key
            for o in self.result.outcomes
            if o.key in plan.rechecked and o.status != "uncertain" and o.error_code != "timeout"
        }
        tags = {row.tag for row, job in plan.collect if job.key in told}
        if tags and self.points_uncertain:
            mine = [record for record in records if record.get("tag") in tags]
            held = uncertain_cost(mine, self.bodies, self._point_prices())
            self.points_uncertain = max(self.points_uncertain - held, 0.0)

    def source(self, records: list[dict[str, Any]]) -> str:
        """What the manifest's records of this run say for ``input``."""
        args = self.args
        if args.command == "bulk":
            return "<stdin>" if str(args.file) == "-" else str(Path(args.file).resolve())
        if args.command == "resume":
            return run_source(records, "resume")
        return str(args.command)

    @contextlib.asynccontextmanager
    async def _opened(
        self, items: list[BulkItem]
    ) -> AsyncIterator[tuple[WujieClient, DiskReserve, Callable[[], Awaitable[None]]]]:
        """Room set aside on the output folder's disk first (before the journal is opened
        there), then the client; both given back at the end. The client's close is given
        too, for the run's closing waits (else it is closed as the block ends)."""
        out: Path = self.args.out
        reserve = DiskReserve(out, reserve_size(item.request.body() for item in items))
        refused = await anyio.to_thread.run_sync(reserve.take)
        if refused is not None:
            if refused.errno in (errno.ENOSPC, errno.EDQUOT):
                why = "no room on its disk for the manifest (not even 64 KB free); make room"
            else:  # a file size limit (EFBIG), a folder others own, ...: said as it is
                why = (
                    f"the room for the manifest could not be set aside "
                    f"({refused.strerror or type(refused).__name__}); mend that"
                )
            raise UsageError(f"--out {out}: {why}, then re-run (nothing was sent)")
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    client = await stack.enter_async_context(
                        open_client(self.args, self.limits(), self.journal)
                    )
                except JournalLockedError:
                    raise  # another run holds it: exit 4
                except ClientStateError as exc:  # the journal cannot be opened (a full disk)
                    raise UsageError(f"{clean(exc)} (nothing was sent)") from None
                self.base_url = client.base_url

                async def close() -> None:
                    await self._close(stack.pop_all())  # (an empty stack, once closed)

                yield client, reserve, close
                await close()
                # What its journal could not commit (its close stopped waiting for a disk
                # that took no write, or a signal stopped the wait): the summary names them.
                self.journal_left = client.uncommitted_journal_keys()
        finally:
            # Off the loop, bounded: a disk that stopped answering must not hold the summary.
            # One that took no manifest row is not waited for at all: the file is the
            # output folder's, on that disk (a run left it: the next one reuses it).
            release = asyncio.get_running_loop().run_in_executor(None, reserve.release)
            if not self.out_disk_held:
                with self._cut_short(), contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(release), ROWS_DEADLINE_S)

    @property
    def terminated(self) -> bool:
        """A SIGTERM came (exit 143), not only Ctrl-C (130)."""
        return self.signals is not None and self.signals.terminated

    async def _close(self, stack: contextlib.AsyncExitStack) -> None:
        """Close the client: a wait a signal after the first ends (see ``Signals.close``)."""
        if self.signals is not None:
            await self.signals.close(stack.aclose())
        else:
            await asyncio.shield(asyncio.ensure_future(stack.aclose()))

    def _cut_short(self) -> contextlib.AbstractContextManager[object]:
        """A closing wait a signal after the first ends (see _signals)."""
        return self.signals.cut_short() if self.signals is not None else contextlib.nullcontext()

    def _resent_said(self, *, failed: bool) -> str:
        """What a re-run does with the lines an earlier run left uncertain (and, with
        ``failed``, those it left failed)."""
        args = self.args
        uncertain = (
            "uncertain ones are sent again (--retry-uncertain)"
            if args.retry_uncertain
            else "uncertain ones are never resent"
        )
        if not failed:
            return uncertain
        resent = (
            "failed ones are sent again (--retry-failed)"
            if args.retry_failed
            else "--retry-failed resends failed ones"
        )
        return f"{uncertain}; {resent}"

    def _say(self, message: str) -> None:
        if not self.args.quiet:
            self.console.print(Text(message), soft_wrap=True)

    def finish(self, total: int) -> int:
        """Print the summary (stderr; ``--json`` also on stdout) and return the exit code."""
        return Summary(self).finish(total)
