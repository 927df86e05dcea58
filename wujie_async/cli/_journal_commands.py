"""``wujie-async journal list|resend|forget``: see and settle what a bulk run left open.

Rows are named the way the input named them: ``id`` when the row had one, else its line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.text import Text

from .. import JournalEntry, JournalFile
from .._errors import ClientStateError
from .._file_names import DEFAULT_NAME
from .._gateway_identity import shown_base_url
from .._journal import ALL_STATES
from .._journal_worker import read_only_query
from .._keys import is_job_key
from .._local_files import not_regular
from ._common import (
    EXIT_OK,
    UsageError,
    add_budget_arguments,
    confirm,
    shell_path,
)
from ._journal_resend import resend
from ._journal_rows import (
    manifest_lines,
    matches,
    own_ids,
    paid_said,
    refuse_unknown,
    row_name,
)
from ._manifest import manifest_records
from ._outcome import clean
from ._plan import known_keys, line_of, readable_error

_STATES = ALL_STATES
_SQLITE_HEADER = b"SQLite format 3\x00"


def add_parser(
    commands: Any,
    add_common: Callable[[argparse.ArgumentParser], None],
    add_connection: Callable[[argparse.ArgumentParser], None],
    *,
    names: str,
) -> None:
    """The ``journal`` command and its three subcommands (``names``: the fields ``resend
    --name`` takes, as ``resume``'s help says them)."""
    journal = commands.add_parser("journal", help="list, resend or forget journaled submits")
    actions = journal.add_subparsers(dest="action", required=True)

    def where(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-o",
            "--out",
            type=Path,
            default=None,
            help="the run's folder (default out/; with --journal, the journal's folder is read "
            "for its manifest, and resend needs -o)",
        )
        parser.add_argument(
            "--journal", type=Path, default=None, help="the journal (default OUT/journal.sqlite)"
        )
        add_common(parser)

    listing = actions.add_parser("list", help="show journaled submits, oldest first")
    listing.add_argument("--status", action="append", choices=_STATES, help="only these states")
    listing.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    where(listing)

    resend = actions.add_parser(
        "resend", help="send rows again (each resend may be charged) and collect their images"
    )
    resend.add_argument(
        "rows",
        nargs="*",
        metavar="LINE_OR_ID",
        help="input line numbers or ids, or as journal list and summaries print them "
        "(line 4, id fox, 'line 4 (id fox)', 'row 12')",
    )
    resend.add_argument("--all-uncertain", action="store_true", help="every uncertain row")
    resend.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    resend.add_argument("--job-timeout", type=float, default=None, help="seconds a job may take")
    resend.add_argument(
        "--name",
        default=DEFAULT_NAME,
        metavar="TEMPLATE",
        help=f"image file names (default {DEFAULT_NAME!r}); {names}",
    )
    add_budget_arguments(resend)
    where(resend)
    add_connection(resend)

    forget = actions.add_parser("forget", help="drop rows from the journal")
    forget.add_argument(
        "rows",
        nargs="*",
        metavar="LINE_OR_ID",
        help="input line numbers or ids, or as journal list and summaries print them "
        "(line 4, id fox, 'line 4 (id fox)', 'row 12')",
    )
    forget.add_argument("--status", action="append", choices=_STATES, help="every row in these")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    where(forget)


def _journal_file(args: argparse.Namespace) -> Path:
    if args.out is None and args.journal is None:
        args.out = Path("out")  # the default run's folder, and its journal
    path: Path = args.journal or args.out / "journal.sqlite"
    check_journal_file(path)
    if args.out is None and args.action == "resend":
        # It saves images, writes a manifest and takes the folder's lock: in a folder the
        # user names, never ./out/ (another run's, perhaps) nor one guessed from the journal.
        raise UsageError(
            "journal resend: pass -o/--out, the run's folder (the resent rows' images, its "
            "manifest and its lock go there), e.g. "
            f"-o {shell_path(clean(str(path.parent)))}; nothing was sent"
        )
    return path


def _run_folder(args: argparse.Namespace, journal: Path) -> Path:
    """The folder whose manifest ``list`` and ``forget`` read (they write nothing there):
    ``-o``'s, else the journal's own folder (a run's journal is ``OUT/journal.sqlite``),
    never ./out/ of wherever the command runs."""
    out: Path | None = args.out
    return out if out is not None else journal.parent


def check_journal_file(path: Path, *, resume: bool = False) -> None:
    """Refuse a path that is not a journal, before opening it (which would create its lock
    file beside whatever file it is). ``resume`` takes the journal as its argument, not as
    ``--journal``: its messages say so."""
    if resume:
        missing = (
            "pass the journal of a run that kept one (runs with --emulator keep none), "
            "e.g. wujie-async resume OUT/journal.sqlite -o OUT"
        )
        not_journal = "pass the run's journal: wujie-async resume out/journal.sqlite"
    else:
        missing = "pass --journal or -o/--out of the run"
        not_journal = "pass the run's journal, e.g. --journal out/journal.sqlite"
    if not path.exists():
        raise UsageError(f"no journal at {path}; {missing}")
    try:
        # Opening a FIFO for reading would wait for a writer, perhaps for ever; a device is
        # no journal either. A folder is most likely the run's --out: name its journal.
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            inside = path / "journal.sqlite"
            shown, folder = shell_path(clean(str(inside))), shell_path(clean(str(path)))
            if not inside.exists():
                fix = not_journal
            elif resume:
                fix = f"pass the journal in it: wujie-async resume {shown} -o {folder}"
            else:
                fix = f"pass the journal in it, --journal {shown}, or -o {folder}"
            raise UsageError(f"{path} is a folder, not a journal; {fix}")
        problem = not_regular(mode)
        if problem is not None:
            raise UsageError(f"{path} is not a wujie-async journal ({problem}); {not_journal}")
        with path.open("rb") as handle:
            head = handle.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or 'error'})") from None
    if head != _SQLITE_HEADER:
        raise UsageError(f"{path} is not a wujie-async journal (not an SQLite file); {not_journal}")
    # Another program's database: opened for writing, it would get a journal's table (and a
    # lock file beside it). Read-only, this writes nothing and waits for no run using it.
    try:
        tables = read_only_query(
            path, "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'submits'", ()
        )
    except ClientStateError as exc:
        raise UsageError(f"{exc}; {not_journal}") from None
    if not tables:
        raise UsageError(
            f"{path} is not a wujie-async journal (an SQLite file without its submits table); "
            f"{not_journal}"
        )


def _run_manifest(folder: Path) -> list[dict[str, Any]] | None:
    """The records of the run's manifest in ``folder``, None when it holds none (then it is
    no run's folder), for the commands that only read it (blocking: on a thread).

    Whether there is one and what it records are the answer of one file: the one opened, by
    its own stat, never a second look by name, between which a run could create the file or
    a user delete it. One that is no file is refused, unread: reading a FIFO would wait for a
    writer for ever (it is opened without blocking), and a folder was an internal error."""
    manifest = folder / "manifest.jsonl"
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(f"-o {folder} is not a folder; give the run's folder") from None
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read it ({exc.strerror or 'error'})") from None
    chunks = []
    try:
        mode = os.fstat(fd).st_mode
        problem = "a folder" if stat.S_ISDIR(mode) else not_regular(mode)
        while problem is None and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read it ({exc.strerror or 'error'})") from None
    finally:
        os.close(fd)
    if problem is not None:
        raise UsageError(
            f"{manifest} is not a run's manifest ({problem}); move it away, or give the run's "
            "folder with -o"
        )
    return manifest_records(b"".join(chunks))


async def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``journal ACTION``."""
    path = _journal_file(args)
    if args.action == "resend":
        return await resend(args, console, path)
    if args.action == "list":
        return await _list_rows(args, console, path)
    # Forgetting needs no gateway, so no credentials: the journal file alone (its lock).
    async with JournalFile(path) as journal:
        return await _forget(args, console, journal, _run_folder(args, path))


async def _list_rows(args: argparse.Namespace, console: Console, path: Path) -> int:
    """``journal list``: read-only, beside a run using the journal (no lock taken)."""
    states = set(args.status or _STATES)
    if "uncertain" in states:
        # An intent is a submit on the wire now, or one a killed run left: uncertain as soon
        # as a writer opens the journal. A reader writes nothing, so it lists it as it is.
        states.add("intent")
    async with JournalFile(path, read_only=True) as journal:
        entries = await journal.entries(*(state for state in _STATES if state in states))
        every = await journal.entries() if args.json else []
    if args.json:
        # An id row's tag holds no line number: the manifest row of its submit gives it
        # (read only; a row of the same id another run left there is another line).
        records = await anyio.to_thread.run_sync(_run_manifest, _run_folder(args, path))
        lines = manifest_lines(every, records or [])
        for entry in entries:
            print(json.dumps(_as_json(entry, lines.get(entry.id))))  # noqa: T201 - its output
    else:
        _list(entries)
    intents = sum(1 for entry in entries if entry.state == "intent")
    if intents:
        console.print(
            Text(
                f"{intents} row(s) read intent: a submit on the wire now, if a run is using "
                "this journal; else one a killed run left, which may have been charged (it "
                "reads uncertain once resume, journal resend or forget, or a re-run opens the "
                "journal)"
            ),
            soft_wrap=True,
        )
    return EXIT_OK


def _as_json(entry: JournalEntry, manifest_line: int | None) -> dict[str, Any]:
    """A row for ``list --json``: ``line`` and ``id`` both when known (an id row's line is
    ``manifest_line``, the manifest's, null when the run's folder names none)."""
    line, row_id = line_of(entry)
    return {
        "row": entry.id,
        "name": row_name(entry),
        "line": line or manifest_line,
        "id": row_id,
        "state": entry.state,
        "key": entry.job_key,
        "key_usable": entry.job_key is not None and is_job_key(entry.job_key),
        "created": entry.created,
        "prompt": entry.request.get("prompt"),
        "error": readable_error(entry.error) if entry.error else None,
        # The gateway its submit went to (null: a row written before rows recorded it); its
        # key is known there only. (The app id is not stored: only a fingerprint of it.)
        "base_url": shown_base_url(entry.base_url) if entry.base_url else None,
    }


def _list(entries: list[JournalEntry]) -> None:
    # Rows sent to more than one gateway (or account) name theirs: a key is known there only.
    gateways = {entry.gateway_fingerprint for entry in entries if entry.gateway_fingerprint}
    for entry in entries:
        when = datetime.datetime.fromtimestamp(entry.created).strftime("%Y-%m-%d %H:%M:%S")
        prompt = clean(str(entry.request.get("prompt", "")))[:60]
        key = clean(entry.job_key) if entry.job_key else "-"
        if entry.job_key and not is_job_key(entry.job_key):
            key = f"{key[:40]!r} (not a usable key)"
        parts = [when, f"{row_name(entry):<12}", f"{entry.state:<10}", key, prompt]
        if entry.error:
            parts.append(f"({readable_error(entry.error)[:160]})")
        if len(gateways) > 1:
            parts.append(f"[base URL {clean(shown_base_url(entry.base_url or '')) or '?'}]")
        print("  ".join(parts))  # noqa: T201 - the listing is this command's output
    print(f"{len(entries)} row(s)")  # noqa: T201


def _refuse_only_record(
    chosen: list[JournalEntry],
    path: Path,
    out: Path,
    recorded: set[str],
    *,
    run_folder: bool,
    cut_off: set[int],
) -> None:
    """Refuse to forget a row that is the only record of a paid job's key: accepted (running,
    or past its wait) or cancelled (only its wait was), and named by no manifest row (a run
    killed outright writes none). A re-run would not know the job, and send its line again.
    In a run's folder (``run_folder``: OUT holds a manifest, which a run opens before it
    sends anything) a succeeded row too: a run killed while it saved the images left it so.
    A program's own journal holds succeeded rows whose images it has, which may go, but for
    those whose ``job.save()`` was cut off (``cut_off``, by row id): ``resume()`` returns
    their jobs to be saved, and forgotten, their images were never saved."""
    unsaved = [entry for entry in chosen if entry.id in cut_off]
    if unsaved:
        rows = "; ".join(row_name(entry) for entry in unsaved[:10])
        raise UsageError(
            f"journal forget: {len(unsaved)} row(s) succeeded while their job.save() was cut "
            f"off ({rows}): paid images not on disk, which the program's resume() returns to "
            "be saved; forgotten, they would never be. Let the program resume and save them "
            "first (a save that fails for good, an expired image, ends the record too); "
            "nothing was forgotten"
        )
    paid = ("accepted", "cancelled", "succeeded") if run_folder else ("accepted", "cancelled")
    only = [
        entry for entry in chosen if entry.state in paid and entry.job_key not in (None, *recorded)
    ]
    if only:
        said = paid_said(only)
        raise UsageError(
            f"journal forget: {said}, and only this journal holds its key: forgotten, a re-run "
            "would send its line again (paid twice). Collect it first with `wujie-async resume "
            f"{shell_path(clean(str(path)))} -o {shell_path(clean(str(out)))}`; nothing was "
            "forgotten"
        )


async def _forget(
    args: argparse.Namespace, console: Console, journal: JournalFile, out: Path
) -> int:
    if not args.rows and not args.status:
        raise UsageError("journal forget: name LINE_OR_ID rows or pass --status")
    entries = await journal.entries(*(args.status or _STATES))
    # In a run's folder (one holding a manifest) a succeeded row may be a paid job's only
    # record: one look at the manifest says both whether it is one and what it records, and
    # the line of each id row, as the summaries printed it (`line 3 (id c)`).
    records = await anyio.to_thread.run_sync(_run_manifest, out)
    if args.rows:
        every = await journal.entries()
        lines = manifest_lines(every, records or [])
        refuse_unknown("forget", "forgotten", args.rows, entries, lines)
        ids = own_ids(every)  # "#1" is the id of a row in any state
        entries = [entry for entry in entries if matches(entry, set(args.rows), ids, lines)]
    recorded = known_keys(records or [])
    cut_off = {entry.id for entry in await journal.saves_cut_off()}
    _refuse_only_record(
        entries, journal.path, out, recorded, run_folder=records is not None, cut_off=cut_off
    )
    if entries:
        confirm(f"forget {len(entries)} journal row(s)", args.yes)
    count = await journal.forget(entry.id for entry in entries)
    console.print(Text(f"forgot {count} row(s)"))
    return EXIT_OK
