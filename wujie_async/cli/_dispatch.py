"""A parsed command line to a command run: its flags and input checked before anything is
sent (credentials, the output folder, file names), then the command on its event loop."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import InvalidRequestError
from .._config import price_key_problem
from .._file_names import PlannedJob
from .._models import GenerationRequest
from . import _journal_commands
from ._common import UsageError, check_names, credentials, emulator_faults, shell_path
from ._exit import ExitGuard, run_command
from ._input import BulkItem, decode_input, read_requests
from ._out_lock import LOCK_NAME, out_folder_lock, remove_stale_temp_files
from ._outcome import clean
from ._parser import INPUT_FORMATS, REQUEST_FLAGS
from ._progress import Mode
from ._run import Session, check_out_folder, journal_path
from ._single import build_request, check_keys, show_status, submit_no_wait


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"model": args.model, "n": args.n}
    fields |= {dest: getattr(args, dest) for _, dest, _, _ in REQUEST_FLAGS}
    return {name: value for name, value in fields.items() if value is not None}


def _read_input(args: argparse.Namespace) -> list[BulkItem]:
    kind = INPUT_FORMATS.get(args.input_format) if args.input_format else None
    if str(args.file) != "-":
        return read_requests(args.file, _defaults(args), kind=kind)
    # Bytes, decoded here as a file is: the locale's decoding would let bytes that are not
    # UTF-8 through as lone surrogates (a C locale) or read them as another encoding.
    stdin = Path("<stdin>")
    if sys.stdin is None:
        raise UsageError("stdin is closed: pipe the input into -, or give its file")
    text = decode_input(stdin, sys.stdin.buffer.read())
    return read_requests(stdin, _defaults(args), text=text, kind=kind)


def _check_defaults(args: argparse.Namespace) -> None:
    """The request flags of ``bulk`` are every row's defaults: a bad one is said once, as a
    flag error, not once per row."""
    defaults = _defaults(args)
    try:
        GenerationRequest.build({**defaults, "prompt": "a prompt"})
    except InvalidRequestError as exc:
        flags = {"n": "-n", "model": "--model"} | {dest: flag for flag, dest, _, _ in REQUEST_FLAGS}
        problems = [f"{flags[field]}: {rule}" for field, rule in exc.violations if field in flags]
        if problems:
            raise UsageError(
                "; ".join(problems) + " (flags are the defaults of every row)"
            ) from None


def _progress_mode(args: argparse.Namespace) -> Mode:
    if args.progress == "auto":
        return "rich" if sys.stderr.isatty() else "plain"
    mode: Mode = args.progress
    return mode


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, dest in (
        ("--job-timeout", "job_timeout"),
        ("--rate", "rate"),
        ("--concurrency", "concurrency"),
        ("--max-in-flight", "max_in_flight"),
        ("--progress-interval", "progress_interval"),
        ("--emulator-time-scale", "emulator_time_scale"),
        ("--download-timeout", "download_timeout"),
        ("--max-response-bytes", "max_response_bytes"),
        ("--max-image-bytes", "max_image_bytes"),
    ):
        value = getattr(args, dest, None)
        if value is not None and not 0 < value < math.inf:
            raise UsageError(f"{flag} must be a positive, finite number")
    points = getattr(args, "max_points", None)
    if points is not None and not 0 <= points < math.inf:
        raise UsageError("--max-points must be a finite number >= 0")
    prices: dict[str, float] = {}
    for given in getattr(args, "point_price", None) or ():
        key, sep, value = given.partition("=")
        try:
            points = float(value)
        except ValueError:
            points = -1.0
        if not sep or not key.strip() or not points >= 0 or points == float("inf"):
            raise UsageError(
                f"--point-price {given!r}: must be MODEL=POINTS (or MODEL/SIZE=POINTS), "
                "points per image as a number >= 0"
            )
        problem = price_key_problem(key.strip())
        if problem is not None:
            raise UsageError(
                f"--point-price {given!r}: {key.strip()!r} can never match a request "
                f"({problem}): must be MODEL=POINTS, MODEL/SIZE=POINTS or "
                "MODEL/SIZE/QUALITY=POINTS"
            )
        prices[key.strip()] = points
    args.point_prices = prices or None
    min_rate = getattr(args, "min_download_rate", None)
    if min_rate is not None and not 0 <= min_rate < math.inf:
        raise UsageError("--min-download-rate must be a finite number >= 0 (0 turns the check off)")


def _planned(item: BulkItem) -> PlannedJob:
    label = f"line {item.line}"
    if item.row_id is not None:
        shown = item.row_id if len(item.row_id) <= 40 else item.row_id[:40] + "…"
        label += f" (id {clean(shown)!r})"
    return PlannedJob(label, int(item.request.body().get("n") or 1), id=item.row_id, line=item.line)


def _run_files(args: argparse.Namespace) -> list[str]:
    """Names in OUT/ that belong to the run itself: no image may take them."""
    names = ["manifest.jsonl", LOCK_NAME]
    journal = journal_path(args)
    if journal is not None and journal.parent.resolve() == Path(args.out).resolve():
        names += [journal.name + suffix for suffix in ("", "-wal", "-shm", "-journal", ".lock")]
    return names


def dispatch(args: argparse.Namespace, console: Console, guard: ExitGuard | None) -> int:
    """Run the command ``args`` names (not ``emulator`` or ``completion``); its exit code.
    ``guard``: the process's (see ``_exit``), when the command is the process's own."""

    def run(command: Coroutine[Any, Any, int]) -> int:
        return run_command(command, guard)

    _check_numbers(args)  # journal resend's too: --job-timeout, --max-points, --point-price
    if args.command == "journal":
        if getattr(args, "name", None) is not None:
            check_names(args.name, [])  # the template; its rows' names once they are read
        return run(_journal_commands.run(args, console))
    items: list[BulkItem] = []
    planned: list[PlannedJob] = []
    if args.command == "bulk":
        _check_defaults(args)
        items = _read_input(args)
        planned = [_planned(item) for item in items]
        if args.journal is not None and args.journal.exists():
            _journal_commands.check_journal_file(args.journal)
    elif args.command in ("generate", "edit"):
        request = build_request(args, _defaults(args))
        if args.no_wait:
            return run(submit_no_wait(args, request))
        items = [BulkItem(1, request)]
        planned = [_planned(items[0])]
    elif args.command == "status":
        check_keys(args.keys)  # before credentials and the output folder: the key is wrong
        # A key given twice is one job: asked about, waited for and saved once.
        args.keys = list(dict.fromkeys(args.keys))
        planned = [
            PlannedJob(f"key {number}", 1, line=number) for number in range(1, len(args.keys) + 1)
        ]
        if not args.wait:
            return run(show_status(args))
    else:  # resume
        _journal_commands.check_journal_file(args.journal, resume=True)
        args.out = _resume_folder(args.journal, args.out)
    check_names(args.name, planned, taken=_run_files(args))
    if not getattr(args, "emulator", False):
        credentials(args)  # missing or unreadable: said before OUT is made
    elif getattr(args, "emulator_fault", None):
        emulator_faults(args.emulator_fault)  # likewise
    check_out_folder(args.out)
    session = Session(args, console, _progress_mode(args))
    if args.command not in ("bulk", "resume"):
        return run(session.run(items))  # one job each: runs side by side may share OUT
    with out_folder_lock(args.out):  # plans from OUT's manifest: one such run at a time
        remove_stale_temp_files(args.out, time.time())
        return run(session.run(items))


def _resume_folder(journal: Path, out: Path | None) -> Path:
    """``resume``'s OUT: ``-o``'s, else the journal's own folder when it is a run's (it holds
    the manifest that says which images were saved). ./out/ of wherever the command ran
    was used: every job saved again there, under other names, its points counted again."""
    if out is not None:
        return out
    folder = journal.parent
    if (folder / "manifest.jsonl").is_file():
        return folder
    raise UsageError(
        f"resume: {journal}'s folder holds no run's manifest; pass -o/--out, the run's folder "
        f"(its images and manifest), e.g. wujie-async resume {shell_path(clean(str(journal)))} "
        "-o OUT"
    )
