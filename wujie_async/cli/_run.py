"""What ``bulk``, ``generate``, ``resume`` and ``status`` do once their arguments are read.

A ``Session`` opens the client, the manifest and the journal, runs the plan (``_plan`` decides
what each line needs: sent, collected, or left as it is), stops on signals and systemic
errors, and prints the summary and the commands to run next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import shlex
import sys
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
from .._budget import Kind, kind_of
from .._errors import some_and_more
from .._file_names import DEFAULT_NAME
from .._journal_worker import CLOSE_DEADLINE_S as JOURNAL_CLOSE_DEADLINE_S
from .._keys import images_in
from ._bulk import (
    NOT_AN_IMAGE,
    RE_RUN,
    TOO_LARGE,
    BulkResult,
    BulkRun,
    GatewayFailingError,
    OutputUnwritableError,
    Row,
    charged_keys,
    names_taken,
)
from ._common import (
    DOWNLOAD_DEFAULTS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SYSTEMIC,
    EXIT_TERMINATED,
    UsageError,
    open_client,
    print_json_ending,
    shell_path,
)
from ._disk_reserve import DiskReserve, reserve_size
from ._input import BulkItem
from ._journal_rows import numbered
from ._outcome import (
    LineOutcome,
    Manifest,
    Unreported,
    clean,
    count,
    fix_message,
    of_source,
    open_manifest,
    other_inputs,
    points_spent,
    priced_at,
    prices_charged,
    read_manifest,
    run_source,
    saved_indexes,
    uncertain_cost,
    uncertain_unpriced,
    unreported_cost,
    with_learned_prices,
)
from ._plan import (
    Plan,
    journal_uncertain,
    known_keys,
    plan_from_manifest,
    plan_rerun,
    plan_resume,
    plan_status,
    sent_lines,
)
from ._progress import Display, Mode, Tally
from ._rows import ROWS_DEADLINE_S
from ._signals import Signals, stopping_on_signals

# What generate or edit says beside the command that collects its job: the obvious other way
# pays again.
_PAYS_AGAIN = "(running the same command again sends a new job, paid again)"


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.resolve() == other.resolve()
    except OSError:
        return False


def _keys_held(records: list[dict[str, Any]]) -> list[str]:
    """The job keys rows hold, each once, in order."""
    return list(dict.fromkeys(r["key"] for r in records if isinstance(r.get("key"), str)))


def _unrecorded_keys(records: list[dict[str, Any]]) -> str:
    """What the summary says of rows the manifest could not take: the keys they held."""
    keys = _keys_held(records)
    if not keys:
        return ""
    return f"\n{_keys_to_keep(keys, 'whose outcome the manifest could not record')}"


def _keys_to_keep(keys: list[str], which: str) -> str:
    """``N job(s) <which> (keep these keys; ...): K1, K2, ...`` (the first 20 shown)."""
    shown = some_and_more([clean(key) for key in keys], 20)
    return (
        f"{len(keys)} job(s) {which} (keep these keys; `wujie-async status KEY` fetches one): "
        f"{shown}"
    )


def stop_said(result: BulkResult, base_url: str, *, app_id_flag: bool) -> str | None:
    """What stopped the sending (a systemic error, a disk that refused or stopped answering)
    and the keys of the jobs whose rows the manifest could not take; None: nothing did."""
    if isinstance(result.systemic, OutputUnwritableError):
        said = result.systemic.said(keys_listed=bool(_keys_held(result.unrecorded)))
        return said + _unrecorded_keys(result.unrecorded)
    if isinstance(result.systemic, GatewayFailingError):
        return str(result.systemic) + _unrecorded_keys(result.unrecorded)
    if result.systemic is not None:
        # The manifest may have refused rows after another error stopped the sending: its
        # keys are said all the same.
        return fix_message(result.systemic, base_url, app_id_flag=app_id_flag) + _unrecorded_keys(
            result.unrecorded
        )
    return None


def forget_failed_said(why: str, journal: Path | None, rows: list[int]) -> str:
    """The summary's warning for a journal that did not forget ``rows``, the rows a run
    superseded; its commands name ``journal`` (without it they would read OUT's default
    one). The rows go by their journal numbers: a line's number or id would name its new row
    too, which may be uncertain, the only record of a job that may have been charged."""
    named = f" --journal {_sh(journal)}" if journal is not None else ""
    shown = " ".join(f"'{numbered(row)}'" for row in rows[:50])
    more = f" (and {len(rows) - 50} more: see `journal list`)" if len(rows) > 50 else ""
    return (
        f"warning: the journal did not forget the {len(rows)} old row(s) of the lines this "
        f"run sent again ({clean(why)}): they are still listed, and a later --retry-uncertain "
        f"would send them once more; drop them, and only them (not the lines' new rows), "
        f"with `wujie-async journal forget {shown} --yes{named}`{more}"
    )


def journal_left_said(journal: Path | None, keys: list[str]) -> str:
    """What the summary says of the records the journal had not committed when it closed."""
    return (
        f"warning: the journal {journal} took no write for {JOURNAL_CLOSE_DEADLINE_S:g} s at "
        "the end of the run (its disk stopped answering): "
        f"{_keys_to_keep(keys, 'whose records it may lack')}"
    )


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


def _line_name(outcome: LineOutcome) -> str:
    if outcome.row_id is not None:
        return f"line {outcome.line} (id {clean(outcome.row_id)})"
    return f"line {outcome.line}"


def _sh(path: Path | str | None) -> str:
    """A path as a shell reads it back: the commands we print are to be pasted."""
    return shell_path(path)


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
                else max(budget - self._spent_before() - self.points_uncertain, 0.0)
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
            if kind_of(row.body, images_in(row.body) or 1) not in self.unpriced_kinds:
                send.append(row)
                continue
            outcome = LineOutcome(
                "not_sent",
                row.line,
                row.row_id,
                None,
                "unpriced",
                clean(
                    f"not sent: a {model} line of an earlier run may have been charged without "
                    f"a reply, and what a {model} job costs is not known, so --max-points "
                    f"{self.args.max_points:g} cannot be held; give its price with "
                    f"--point-price {model}=POINTS (points per image) and re-run"
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

    def _spent_before(self) -> float:
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
            if self.unpriced_kinds:
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
                    f"`wujie-async resume {_sh(self.journal)} -o {_sh(out)}` collects them"
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
        result = self.result
        assert result is not None
        counts = count(result.outcomes)
        stopped = self._for_one_job(
            stop_said(result, self.base_url, app_id_flag=bool(getattr(self.args, "app_id", None)))
        )
        if result.interrupted or (self.signals is not None and self.signals.received):
            # A signal is the stronger word, after a systemic stop too: a supervisor that sent
            # SIGTERM reads 143 as "stopped as asked" (the summary still says what stopped it).
            # So after the run's end: a signal in its closing waits ends the command as asked.
            code = EXIT_TERMINATED if self.terminated else EXIT_INTERRUPTED
        elif stopped is not None:
            code = EXIT_SYSTEMIC
        elif counts["saved"] == total:
            code = EXIT_OK
        else:
            code = EXIT_FAILED
        out = self.args.out
        parts = " · ".join(f"{name} {counts[name]}" for name in counts if counts[name])
        self.console.print(
            Text(
                f"{total} line(s): {parts or 'none ended'}"
                + (f" · pending {result.pending}" if result.pending else "")
                + f"; {result.images} image(s) saved in {out}/ (manifest: {out / 'manifest.jsonl'})"
                + self._points_said()
            ),
            soft_wrap=True,
        )
        self._hints(counts, result, stopped)
        if getattr(self.args, "json", False):
            summary = {
                "lines": total,
                "outcomes": dict(counts),
                "pending": result.pending,
                "images": result.images,
                "exit_code": code,
                "stopped": stopped,
                "manifest": str(out / "manifest.jsonl"),
                "journal": str(self.journal) if self.journal else None,
                "points": self.points,
                "points_total": self._spent_before() + self.points,
                # The part of points_total counted at a price: earlier jobs whose cost the
                # gateway did not report.
                "points_estimated": self.unreported_before.points,
                # The keys the summary lists to keep: jobs whose rows the manifest did not
                # take, and jobs whose records the journal had not committed.
                "manifest_unwritten_keys": _keys_held(result.unrecorded),
                "journal_uncommitted_keys": list(self.journal_left),
                # As every --json ending has: what ended the command early (null: nothing).
                "error": stopped,
            }
            if self.args.command in ("generate", "edit", "status"):
                summary["paths"] = [str(path) for path in result.saved_paths]
            print_json_ending(summary)
        elif self.args.command in ("generate", "edit", "status"):
            for path in result.saved_paths:
                print(path)  # noqa: T201 - the saved paths are this command's output
        return code

    def _points_said(self) -> str:
        before, unreported = self._spent_before(), self.unreported_before
        if not self.points and not before and not self.points_uncertain:
            return ""
        estimated = (
            f", {unreported.points:g} of it for {unreported.priced} earlier job(s) whose cost "
            "was not reported, at their kind's price"
            if unreported.priced
            else ""
        )
        earlier = f" ({before + self.points:g} with earlier runs{estimated})" if before else ""
        budget = getattr(self.args, "max_points", None)
        of = f" of a {budget:g} budget" if budget is not None else ""
        maybe = (
            f", and up to {self.points_uncertain:g} on uncertain lines"
            if self.points_uncertain
            else ""
        )
        return f"; {self.points:g} points spent{earlier}{maybe}{of}"

    def _unreported_said(self, result: BulkResult) -> None:
        """What the summary's points leave out: jobs that ended without a reported cost."""
        price = "give its model's price with --point-price MODEL=POINTS (points per image)"
        if result.uncosted:
            prices = dict(self.prices_learned)
            for key, each in result.prices.items():  # the most a kind cost wins
                prices[key] = max(prices.get(key, 0.0), each)
            now = priced_at(result.uncosted, self._point_prices(prices) or {})
            about = f" (about {now.points:g} at their kind's price)" if now.priced else ""
            self._say(
                f"the gateway did not report what {now.jobs} job(s) of this run cost: the "
                f"points above leave them out{about}; a re-run of this input counts each at "
                "its kind's price (its --point-price, or what the gateway reported for others "
                "of the kind), with earlier runs and against --max-points"
                + (
                    f"; {now.unpriced} of them have no known price: for a re-run to count "
                    f"them, {price}"
                    if now.unpriced
                    else ""
                )
            )
        if self.unreported_before.unpriced:
            self._say(
                f"{self.unreported_before.unpriced} job(s) of earlier runs saved their images "
                "without a reported cost, and their kind has no known price: nothing counts "
                f"them (with earlier runs, or against --max-points); {price}"
            )

    @property
    def _one_job(self) -> bool:
        """``generate`` and ``edit``: run again, they send a new job (paid again) instead of
        collecting the one they sent; ``status KEY --wait`` collects it."""
        return self.args.command in ("generate", "edit")

    def _for_one_job(self, stopped: str | None) -> str | None:
        """What stopped ``generate`` or ``edit`` (a disk that refused its image), with the
        command that collects its job where it said to re-run the same command: that sends
        a new job, paid again, while the one it paid for is done or still running."""
        result = self.result
        if stopped is None or result is None or not self._one_job or RE_RUN not in stopped:
            return stopped
        keys = list(
            dict.fromkeys(
                [o.key for o in result.outcomes if o.key and o.status != "saved"]
                + result.pending_keys
            )
        )
        if not keys:  # no job was accepted: nothing is paid, and running it again is right
            return stopped
        return stopped.replace(RE_RUN, f"then collect its job with {self._collect(keys)}", 1) + (
            f" {_PAYS_AGAIN}"
        )

    def _collect(self, keys: list[str]) -> str:
        """The command that collects (waits for and saves) the jobs of ``keys``."""
        name = getattr(self.args, "name", None)
        named = f" --name {_sh(name)}" if name and name != DEFAULT_NAME else ""
        return f"wujie-async status {' '.join(keys)} --wait -o {_sh(self.args.out)}{named}"

    def _hints(self, counts: Any, result: BulkResult, stopped: str | None) -> None:
        say = self._say
        if self.journal_left:
            self.console.print(
                Text(journal_left_said(self.journal, self.journal_left)), soft_wrap=True
            )
        if self.forget_failed is not None:
            self.console.print(
                Text(forget_failed_said(self.forget_failed, self.journal, self.forget_rows)),
                soft_wrap=True,
            )
        self._unreported_said(result)
        if stopped is not None:
            self.console.print(Text(stopped), soft_wrap=True)
            if not result.interrupted:
                return
        # Quoted for a shell: it is to be pasted as it is (a path with a space, a --name).
        command = shlex.join(sys.argv[1:]) if sys.argv[1:] else "bulk ..."
        if str(getattr(self.args, "file", "")) == "-":
            command += "  # fed the same input on stdin"  # else it reads the terminal
        if result.interrupted:
            word = "stopped by SIGTERM" if self.terminated else "interrupted"
            uncertain = [o for o in result.outcomes if o.error_code == "interrupted"]
            if uncertain:
                names = some_and_more([_line_name(o) for o in uncertain], 10)
                see = (
                    f"wujie-async journal list --status uncertain --journal {_sh(self.journal)}"
                    if self.journal is not None
                    else "the gateway's console (no journal kept their fate)"
                )
                say(
                    f"interrupted at once: {len(uncertain)} line(s) were being submitted and may "
                    f"have been charged ({names}); they are never resent silently. "
                    f"See: {see}"
                )
            if self.journal is not None and self.args.command == "resume":
                # It never sends: "send the rest" and "or collect only" said it might.
                say(
                    f"{word}: submitted jobs keep running on the gateway; run it again to "
                    f"collect the rest (it sends nothing):\n  wujie-async {command}"
                )
            elif self.journal is not None:
                # The images keep this run's names (resume's default is another).
                name = getattr(self.args, "name", None)
                # (--name=: a template that starts with "-" is no option either.)
                sep = "=" if str(name).startswith("-") else " "
                named = f" --name{sep}{shlex.quote(name)}" if name and name != DEFAULT_NAME else ""
                say(
                    f"{word}: submitted jobs keep running on the gateway; re-run the same "
                    f"command to collect them and send the rest:\n  wujie-async {command}\n"
                    f"(or collect only: wujie-async resume {_sh(self.journal)} "
                    f"--out {_sh(self.args.out)}{named})"
                )
            elif self.args.emulator:
                say(f"{word} (the embedded emulator stops with this process)")
            else:
                # (Keys the manifest could not take are listed above: a re-run would not know
                # them, and would send their lines again.)
                except_listed = (
                    ", but for the keys listed above (look them up with wujie-async status "
                    "KEY; a re-run would send their lines again)"
                    if result.unrecorded
                    else ""
                )
                if self._one_job and result.pending_keys:
                    say(
                        f"{word}: the job keeps running on the gateway (paid); collect it "
                        f"with:\n  {self._collect(result.pending_keys)}\n{_PAYS_AGAIN}"
                    )
                elif not self._one_job:
                    say(
                        f"{word}: submitted jobs keep running on the gateway; their keys are "
                        f"in the manifest (pending rows){except_listed}: re-run the same "
                        f"command to collect them and send the rest:\n  wujie-async {command}"
                    )
            return
        unpriced = sum(1 for o in result.outcomes if o.error_code == "unpriced")
        if unpriced:
            say(
                f"{unpriced} line(s) not sent: the gateway has not reported what these jobs "
                "cost (it does not say, or the first job ended without saying: it timed out, "
                "its reply was lost, or the gateway lost it), so --max-points "
                "cannot be held; give each model's price with --point-price MODEL=POINTS "
                "and re-run"
            )
        over = sum(1 for o in result.outcomes if o.error_code == "budget")
        if over:
            # Lines this run resent (failed, or uncertain) and the budget kept back are still
            # failed or uncertain to a re-run: without the flag that chose them, it skips them.
            again = [
                flag
                for flag, on in (
                    ("--retry-failed", getattr(self.args, "retry_failed", False)),
                    ("--retry-uncertain", getattr(self.args, "retry_uncertain", False)),
                )
                if on
            ]
            with_flags = f" and {' '.join(again)}" if again else ""
            say(
                f"{over} line(s) not sent: over the points budget (--max-points "
                f"{self.args.max_points:g}); re-run with a larger --max-points{with_flags} to "
                "send them"
            )
        accepted = sum(
            1
            for o in result.outcomes
            if o.status == "uncertain" and o.error_code in ("protocol_error", "unknown_job")
        )
        missing: list[str | None] = []
        if self.args.command == "status":
            # Keys typed in: one never listed is most likely mistyped, not a job seen accepted.
            missing = [
                o.key
                for o in result.outcomes
                if o.error_code == "unknown_job" and o.error and ": not found:" in o.error
            ]
            if missing:
                accepted -= len(missing)
                say(
                    f"{len(missing)} key(s) the gateway does not list (not found): check each "
                    "key (a mistyped one, or another app's); a job whose result was cleaned up "
                    "is gone from the gateway too: "
                    + some_and_more([clean(key) for key in missing if key], 10)
                )
        if accepted and self.args.command in ("bulk", "resume"):
            resend = (
                "resend them by adding --retry-uncertain to the bulk command"
                if self.args.command == "resume"
                else "resend them by adding --retry-uncertain"
            )
            say(
                f"{accepted} line(s) were accepted by the gateway, which then reported them "
                "only in ways that could not be read, or never listed or forgot them: they may "
                "have run and been charged, and are never resent silently. A re-run of the "
                "same command asks about them again (and saves their images if the gateway "
                "lists them done then); `wujie-async status KEY` asks about one (keys in the "
                f"manifest); {resend} once the gateway's console shows they were not charged"
            )
        elif accepted:
            # generate/edit run again send a new job (paid again), and neither has
            # --retry-uncertain.
            keys = [
                o.key
                for o in result.outcomes
                if o.status == "uncertain"
                and o.error_code in ("protocol_error", "unknown_job")
                and o.key
            ]
            say(
                f"{accepted} line(s) were accepted by the gateway, which then reported them "
                "only in ways that could not be read, or never listed or forgot them: they may "
                "have run and been charged, and are never resent silently. Ask about them "
                f"again, and save their images if the gateway lists them done, with:\n  "
                f"{self._collect(keys)}" + (f" {_PAYS_AGAIN}" if self._one_job else "")
            )
        if counts["uncertain"] - accepted - len(missing):
            see = (
                f"wujie-async journal list --status uncertain --journal {_sh(self.journal)}"
                if self.journal is not None
                else f"their rows in {self.args.out / 'manifest.jsonl'} (status uncertain)"
            )
            resend = (
                "run the same command again (it sends a new job)"
                if self._one_job
                else "resend them by adding --retry-uncertain"
            )
            say(
                f"{counts['uncertain'] - accepted - len(missing)} line(s) may have been charged "
                "without a "
                f"reply; they are never resent silently. See them with: {see}; once the "
                f"gateway's console shows they were not charged, {resend}"
            )
        timed_out = sum(1 for o in result.outcomes if o.error_code == "timeout")
        if timed_out:
            # Paid and maybe still running: collected by a re-run, never resent.
            keys = [o.key for o in result.outcomes if o.error_code == "timeout" and o.key]
            how = (
                f"collect it with {self._collect(keys)} {_PAYS_AGAIN}"
                if self._one_job
                else "re-run the same command to collect them (they are not sent again)"
            )
            say(
                f"{timed_out} line(s) timed out while their jobs still ran on the gateway "
                f"(already paid); {how}; --job-timeout sets how long to wait"
            )
        unsaved = sum(1 for o in result.outcomes if o.error_code == "download")
        too_large = sum(1 for o in result.outcomes if o.lasting == TOO_LARGE)
        not_images = sum(1 for o in result.outcomes if o.lasting == NOT_AN_IMAGE)
        if unsaved - too_large - not_images:
            keys = [
                o.key
                for o in result.outcomes
                if o.error_code == "download" and o.key and o.lasting is None
            ]
            how = (
                f"fetch them again with {self._collect(keys)} {_PAYS_AGAIN}"
                if self._one_job
                else "re-run the same command to fetch them again (they are not sent again)"
            )
            say(
                f"{unsaved - too_large - not_images} line(s) succeeded but their images could "
                f"not be saved; {how}"
            )
        if too_large:
            cap = getattr(self.args, "max_image_bytes", None) or DOWNLOAD_DEFAULTS.max_bytes
            keys = [o.key for o in result.outcomes if o.lasting == TOO_LARGE and o.key]
            how = (
                f"fetch it with {self._collect(keys)} --max-image-bytes BYTES, BYTES larger "
                f"than the cap {_PAYS_AGAIN}"
                if self._one_job
                else "re-run with a larger --max-image-bytes to fetch it (the jobs are paid "
                "and not sent again)"
            )
            say(
                f"{too_large} line(s) succeeded but an image is larger than the {cap}-byte cap "
                f"on images, so it was not saved; {how}"
            )
        if not_images:
            say(
                f"{not_images} line(s) succeeded but the gateway listed an image whose bytes are "
                "not an image (not PNG, JPEG or WEBP), so it was not saved; a re-run fails the "
                "same way: ask the gateway's operator about those jobs (keys in the manifest)"
            )
        gone = sum(1 for o in result.outcomes if o.error_code == "gone")
        if gone:
            keys = [o.key for o in result.outcomes if o.error_code == "gone" and o.key]
            how = (
                f"{self._collect(keys)} asks for its newest listing once more {_PAYS_AGAIN}"
                if self._one_job
                else "a re-run asks for their newest listing once more, and --retry-failed "
                "sends them again (each resend costs points)"
            )
            say(
                f"{gone} line(s) succeeded but their images' URLs are gone (HTTP 404 or 410: "
                f"the gateway cleans up old results); {how}"
            )
        resendable = (
            counts["failed"] - timed_out - unsaved - gone + counts["moderated"] + counts["rejected"]
        )
        if resendable and self.journal:
            say("resend the failed lines (each resend costs points) by adding --retry-failed")
