"""``wujie-async journal resend``: send again the lines a bulk run left uncertain or failed,
within the folder's points budget, keeping back the rows whose jobs were paid.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
from collections.abc import Collection
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.text import Text

from .. import JournalEntry, JournalFile, Limits
from .._budget import Kind, PriceKind, kind_of
from .._file_names import PlannedJob
from .._keys import images_in
from ._bulk import BulkRun
from ._bulk_data import Row
from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SYSTEMIC,
    EXIT_TERMINATED,
    UsageError,
    check_names,
    confirm,
    open_client,
    shell_path,
)
from ._journal_rows import (
    PAID_STATES,
    edited_lines,
    edited_said,
    latest_per_row,
    manifest_lines,
    matches,
    numbered,
    own_ids,
    paid_said,
    refuse_unknown,
    rows_per_line,
)
from ._manifest import (
    Manifest,
    lines_ended,
    of_source,
    open_manifest,
    read_manifest,
    run_source,
    saved_indexes,
)
from ._manifest_keys import charged_keys, names_taken, record_manifest_keys
from ._manifest_prices import (
    points_spent,
    prices_charged,
    uncertain_cost,
    uncertain_unpriced,
    unreported_cost,
    unreported_unpriced,
    with_learned_prices,
)
from ._out_lock import LOCK_NAME, out_folder_lock
from ._outcome import LineOutcome, clean, count
from ._plan import known_keys, line_of, lines_by_id
from ._progress import Display, Tally
from ._run import check_out_folder
from ._run_warnings import forget_failed_said, journal_left_said, stop_said
from ._signals import stopping_on_signals


def _say_paid_kept(console: Console, paid: list[list[JournalEntry]], path: Path, out: Path) -> None:
    """``--all-uncertain`` leaves the uncertain rows of lines another row of which holds a
    paid job (the line was sent again and its job taken): sending it again would pay twice."""
    rows = [entry for line in paid for entry in line if entry.state in PAID_STATES]
    console.print(
        Text(
            f"{len(paid)} line(s) with uncertain rows not resent: {paid_said(rows)}; "
            "collect a running job with `wujie-async resume "
            f"{shell_path(clean(str(path)))} -o {shell_path(clean(str(out)))}`; its uncertain "
            f"rows go with `wujie-async journal forget LINE_OR_ID --status uncertain"
            f"{_folder_flags(path, out)}`"
        ),
        soft_wrap=True,
    )


def _refuse_paid(chosen: list[JournalEntry], path: Path, out: Path) -> None:
    paid = [entry for entry in chosen if entry.state in PAID_STATES]
    if paid:
        said = paid_said(paid)
        raise UsageError(
            f"journal resend: {said}. Sending it again would pay again and drop the row that "
            "leads to its images (a job still running is collected with `wujie-async resume "
            f"{shell_path(clean(str(path)))} -o {shell_path(clean(str(out)))}`); nothing was "
            "sent"
        )


def _folder_flags(path: Path, out: Path) -> str:
    """What a printed ``journal`` command needs to act on this folder and journal: pasted
    without ``-o`` it would read ./out/, another run's folder (a resend there pays for a row
    of another run), and a journal kept elsewhere is named too."""
    flags = f" -o {shell_path(clean(str(out)))}"
    if path.absolute() != (out / "journal.sqlite").absolute():
        flags += f" --journal {shell_path(clean(str(path)))}"
    return flags


def _edited_hint(edited: list[list[list[JournalEntry]]], path: Path, out: Path) -> str:
    requests = edited[0]
    keep = numbered(requests[-1][-1].id)
    other = " ".join(f"'{numbered(entry.id)}'" for rows in requests[:-1] for entry in rows)
    where = _folder_flags(path, out)
    return (
        f"name the row to send by its number (`wujie-async journal resend '{keep}'{where}`, "
        f"say); the other's rows stay (it may have been charged: see the gateway's console), "
        f"dropped with `wujie-async journal forget {other}{where}`"
    )


def _edited_kept(edited: list[list[list[JournalEntry]]], path: Path, out: Path) -> str:
    """``--all-uncertain`` leaves a line edited between runs (two requests): sending each
    would make two jobs of one line."""
    return (
        f"{len(edited)} line(s) not resent: {edited_said(edited)}; each would be sent, two "
        f"jobs for one line: {_edited_hint(edited, path, out)}"
    )


def _refuse_edited(wanted: list[list[JournalEntry]], path: Path, out: Path) -> None:
    """Refuse a line named by its number that holds two requests (see ``edited_lines``),
    naming their rows, as a word naming two rows is refused."""
    edited = edited_lines(wanted)
    if edited:
        raise UsageError(
            f"journal resend: {edited_said(edited)}; each would be sent, two jobs for one "
            f"line: {_edited_hint(edited, path, out)}; nothing was sent"
        )


async def resend(args: argparse.Namespace, console: Console, path: Path) -> int:
    if not args.rows and not args.all_uncertain:
        raise UsageError("journal resend: name LINE_OR_ID rows or pass --all-uncertain")
    if args.rows and args.all_uncertain:
        # Either would send rows the other did not name: each resend may be charged.
        raise UsageError(
            "journal resend: name LINE_OR_ID rows or pass --all-uncertain, not both (it "
            "resends every uncertain row, whatever rows are named); nothing was sent"
        )
    check_out_folder(args.out)
    # As bulk and resume: one run at a time plans from OUT's manifest and writes there (a
    # bulk run with another journal, or none, would send the lines this one resends).
    with out_folder_lock(args.out):
        return await _resend_in(args, console, path)


async def _resend_in(args: argparse.Namespace, console: Console, path: Path) -> int:
    manifest_path = args.out / "manifest.jsonl"
    records = await anyio.to_thread.run_sync(read_manifest, manifest_path)
    budget = await _budget(args, path, records)
    # As bulk's: the signal handlers, installed as the run starts, stay until the summary is
    # printed (see _signals: a signal in the closing waits ends them, never the summary).
    with contextlib.ExitStack() as handlers:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(open_client(args, budget.limits, path))
            # A key only the manifest kept (a full disk) makes its row accepted: never resent.
            every = await client.journal_entries()
            if await record_manifest_keys(client, records, every):
                every = await client.journal_entries()
            # Each line is sent once, whichever of its rows are named or uncertain (its
            # latest row's request), and never when any of its rows holds a paid job.
            if args.all_uncertain:
                wanted = [
                    rows
                    for rows in rows_per_line(every)
                    if any(entry.state in ("uncertain", "intent") for entry in rows)
                ]
                paid = [rows for rows in wanted if any(e.state in PAID_STATES for e in rows)]
                if paid:
                    _say_paid_kept(console, paid, path, args.out)
                    wanted = [rows for rows in wanted if rows not in paid]
                # A line edited between runs holds two requests: each sent, two jobs.
                edited = edited_lines(wanted)
                if edited:
                    console.print(Text(_edited_kept(edited, path, args.out)), soft_wrap=True)
                    two = [rows for requests in edited for rows in requests]
                    wanted = [rows for rows in wanted if rows not in two]
            else:
                # An id row's line is its manifest row's, as the summaries printed it.
                by_row = manifest_lines(every, records)
                refuse_unknown("resend", "sent", args.rows, every, by_row)
                ids = own_ids(every)
                wanted = [
                    rows
                    for rows in rows_per_line(every)
                    if any(matches(entry, set(args.rows), ids, by_row) for entry in rows)
                ]
                _refuse_paid([entry for rows in wanted for entry in rows], path, args.out)
                _refuse_edited(wanted, path, args.out)
            if not wanted:
                console.print(Text("nothing to resend"))
                return EXIT_OK
            chosen = [rows[-1] for rows in wanted]
            confirm(
                f"resend {len(chosen)} row(s)? each may be charged again if the first submit "
                "went through",
                args.yes,
            )
            # An id tag does not hold the line number; the manifest remembers it.
            lines = lines_by_id(records)
            rows = [Row(*line_of(entry, lines), entry.tag, entry.request) for entry in chosen]
            check_names(args.name, [_planned(row) for row in rows], taken=_run_files(args, path))
            # Rows of a kind an uncertain line may have been charged for at no known price:
            # not sent, as bulk's re-run does (--max-points could not be held).
            # So are rows of a kind whose earlier jobs were charged a cost never reported.
            unpriced: list[tuple[Row, LineOutcome]] = []
            for row in rows:
                kind = kind_of(row.body, images_in(row.body) or 1)
                if kind in budget.unpriced or kind[:3] in budget.unreported:
                    why = _unpriced(row, args.max_points, unreported=kind not in budget.unpriced)
                    unpriced.append((row, why))
            held = {id(row) for row, _ in unpriced}
            send = [row for row in rows if id(row) not in held]
            display = Display(Tally(len(rows)), console, mode="none", quiet=args.quiet)
            # As bulk: a key an earlier job holds, handed out again, ends the row uncertain.
            client.refuse_keys(known_keys(records, every))
            handle = await anyio.to_thread.run_sync(open_manifest, manifest_path)
            stop = anyio.Event()
            run = BulkRun(
                client,
                send=send,
                collect=[],
                settled=[outcome for _, outcome in unpriced],
                manifest=Manifest(handle, source=run_source(records, "resend")),
                out=args.out,
                name=args.name,
                display=display,
                already_saved=saved_indexes(records),
                job_timeout=args.job_timeout,
                stop=stop,
                charged_before=charged_keys(records),
                unrecorded=unpriced,
                names_taken=names_taken(records),
                journaled=True,
            )
            try:
                signals = handlers.enter_context(stopping_on_signals(stop, console))
                result = await signals.run_or_quit(run.run, run.interrupted_at_once)

                def forget() -> list[int]:
                    # Every old row of a line sent is superseded by its new submit (none of
                    # them holds a paid job); rows of lines not sent stay.
                    # By the row itself: journal rows with neither id nor line all read
                    # line 0, and one kept back (--max-points) was forgotten with the rest.
                    sent = {id(row) for row in result.went_out}
                    return [
                        entry.id
                        for line_rows, row in zip(wanted, rows, strict=True)
                        if id(row) in sent
                        for entry in line_rows
                    ]

                # The closing waits, as bulk's (the client's close among them: its journal's
                # last commit; the block's end closes it if they fail before).
                await run.end(
                    signals, lambda: signals.close(stack.pop_all().aclose()), forget=forget
                )
            finally:
                run.close_rows()
            # What its journal could not commit (its close stopped waiting for a disk that
            # took no write, or a signal stopped the wait): the summary names them.
            journal_left = client.uncommitted_journal_keys()
        counts = count(result.outcomes)
        saved = counts["saved"]
        # Every other ending counted too: "0 saved" alone hid rows the stop kept from being
        # sent (not_sent: as they were) and ones whose new submit may have been charged.
        others = "".join(f" · {name} {n}" for name, n in counts.items() if n and name != "saved")
        if result.pending:  # jobs a stop left running: paid, collected by resume
            others += f" · pending {result.pending}"
        console.print(Text(f"resent {len(rows)} row(s): {saved} saved{others}"))
        for code, said in (
            ("budget", f"over the points budget (--max-points {args.max_points or 0:g}); "
             "resend them with a larger --max-points"),
            ("unpriced", "a line of their kind may have been charged without a reply, and "
             "what such a job costs is not known, so --max-points cannot be held; give its "
             "price with --point-price MODEL=POINTS and resend them"),
        ):  # fmt: skip
            kept = [o for o in result.outcomes if o.error_code == code]
            if kept:
                names = ", ".join(_outcome_name(o) for o in kept[:10])
                console.print(
                    Text(f"{len(kept)} row(s) not sent ({names}): {said}"), soft_wrap=True
                )
        if journal_left:
            console.print(Text(journal_left_said(path, journal_left)), soft_wrap=True)
        if run.forget_failed is not None:
            console.print(
                Text(forget_failed_said(run.forget_failed, path, run.forget_rows)), soft_wrap=True
            )
        stopped = stop_said(
            result, client.base_url, app_id_flag=bool(getattr(args, "app_id", None))
        )
        if stopped is not None:
            console.print(Text(stopped), soft_wrap=True)
        if result.interrupted:
            again = ""
            # (Those held for want of a price have their own line above.)
            kept = [
                o for o in result.outcomes if o.status == "not_sent" and o.error_code != "unpriced"
            ]
            if kept:
                # resume never sends: rows the stop kept back are resent by resend alone.
                again = (
                    "; the rows not sent are in the journal as they were: resend them with "
                    f"`wujie-async journal resend {_resend_words(kept)}"
                    f"{_folder_flags(path, args.out)}`"
                )
            console.print(
                Text(
                    "stopped: collect the rest with `wujie-async resume "
                    f"{shell_path(path)} -o {shell_path(args.out)}`{again}"
                ),
                soft_wrap=True,
            )
        if result.interrupted or signals.received:
            # A signal is the stronger word, also one in the closing waits (see bulk's).
            return EXIT_TERMINATED if signals.terminated else EXIT_INTERRUPTED
        if stopped is not None:
            return EXIT_SYSTEMIC  # as bulk's: something systemic stopped the sending
        return EXIT_OK if saved == len(rows) else EXIT_FAILED


class _Budget:
    """What ``--max-points`` leaves a resend, as a ``bulk`` re-run of the folder's input
    reckons it: the limits of its client, and the kinds it cannot price."""

    def __init__(
        self, limits: Limits, unpriced: set[Kind], unreported: Collection[PriceKind] = ()
    ) -> None:
        self.limits = limits
        self.unpriced = unpriced
        # Kinds of saved jobs whose cost the gateway never reported, with no known price.
        self.unreported = unreported


async def _budget(args: argparse.Namespace, path: Path, records: list[dict[str, Any]]) -> _Budget:
    """``--max-points`` is the folder's input's budget, re-runs included, as ``bulk``'s: what
    the manifest's rows record it cost counts, and so do its saved jobs whose cost was not
    reported and its uncertain lines (the rows being resent too: they may have been charged),
    at their kind's price (``--point-price``, or what earlier runs were charged)."""
    if args.max_points is None:
        return _Budget(Limits(max_concurrent_submits=4), set())
    async with JournalFile(path) as journal:  # read first: the client's limits are set at once
        every = await journal.entries()
    entries = latest_per_row(every)
    mine = of_source(records, run_source(records, "resend"))
    bodies = {entry.tag: entry.request for entry in entries if entry.tag}
    prices = with_learned_prices(args.point_prices, prices_charged(mine, bodies))
    spent = points_spent(mine) + unreported_cost(mine, bodies, prices).points
    # Lines whose journal row reads uncertain that the manifest does not say ended (a run
    # killed while their submits were on the wire) may have been charged too.
    # Any row of the line, not only its latest: an older uncertain row (a line resent and
    # then failed, before it was forgotten) may have been charged all the same.
    ended = {tag for tag, r in lines_ended(mine).items() if r.get("status") != "not_sent"}
    uncertain = {e.tag for e in every if e.tag and e.state in ("uncertain", "intent")}
    open_rows = [{"tag": tag, "status": "uncertain"} for tag in sorted(uncertain - ended)]
    held = [*mine, *open_rows]
    room = args.max_points - spent - uncertain_cost(held, bodies, prices)
    limits = Limits(
        max_concurrent_submits=4, max_points=max(room, 0.0), point_prices=prices or None
    )
    return _Budget(
        limits, uncertain_unpriced(held, bodies, prices), unreported_unpriced(mine, bodies, prices)
    )


def _unpriced(row: Row, max_points: float, *, unreported: bool) -> LineOutcome:
    model = row.body.get("model")
    why = (
        f"{model} jobs of earlier runs were charged a cost the gateway never reported"
        if unreported
        else f"a {model} line may have been charged without a reply"
    )
    return LineOutcome(
        "not_sent",
        row.line,
        row.row_id,
        None,
        "unpriced",
        clean(
            f"not sent: {why}, and what a {model} job costs is not known, so --max-points "
            f"{max_points:g} cannot be held; give its price with --point-price {model}=POINTS "
            "(points per image) and resend it"
        ),
    )


def _planned(row: Row) -> PlannedJob:
    return PlannedJob(row.label, images_in(row.body) or 1, id=row.row_id, line=row.line or None)


def _run_files(args: argparse.Namespace, journal: Path) -> list[str]:
    """Names in OUT/ that belong to the run itself: no image may take them."""
    names = ["manifest.jsonl", LOCK_NAME]
    if journal.parent.resolve() == Path(args.out).resolve():
        names += [journal.name + suffix for suffix in ("", "-wal", "-shm", "-journal", ".lock")]
    return names


def _resend_words(kept: list[LineOutcome]) -> str:
    """The rows a stop kept from being sent, as ``journal resend`` takes them back (a row
    with neither a line nor an id has no such name: ``journal list`` gives its ``row N``)."""
    names = [_outcome_name(o) for o in kept]
    if any(o.row_id is None and o.line <= 0 for o in kept) or len(names) > 50:
        return "ROWS (as `journal list --status uncertain` names them)"
    return " ".join(shlex.quote(name) for name in names)


def _outcome_name(outcome: LineOutcome) -> str:
    if outcome.row_id is not None:
        return f"id {clean(outcome.row_id)}"
    if outcome.line <= 0:
        return "a row with neither line nor id (row N in journal list)"
    return f"line {outcome.line}"
