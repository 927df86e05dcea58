"""``wujie-async``: generate images, run a bulk job, settle its journal, or serve the emulator.

Exit codes: 0 every line saved · 1 some lines ended failed, moderated, rejected, uncertain
or not sent · 2 bad input or usage (including a file that is not a journal) · 3 stopped on a
systemic error (credentials, base URL, balance, network) · 4 the journal, or the --out folder
(bulk, resume), is in use by another run · 130 interrupted (Ctrl-C) · 143 stopped by SIGTERM
· 70 internal error (run with --verbose for the traceback). A signal wins over 3: a run stopped
by a systemic error, then by Ctrl-C or SIGTERM, exits 130 or 143.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from rich.console import Console

from .. import InvalidRequestError, JournalLockedError, Limits, WujieError, emulator
from .._config import price_key_problem
from .._file_names import DEFAULT_NAME, PlannedJob
from .._models import GenerationRequest
from .._telemetry import log_level, show_log
from . import _journal_commands
from ._common import (
    DOWNLOAD_DEFAULTS,
    EXIT_BROKEN_PIPE,
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UsageError,
    add_budget_arguments,
    check_names,
    credentials,
    emulator_faults,
    json_ending_asked,
    new_json_ending,
    print_json_ending,
    shell_path,
)
from ._completion import SHELLS, script
from ._exit import DaemonThreadPool, ExitGuard
from ._input import FORMATS, BulkItem, InputFileError, decode_input, read_requests
from ._out_lock import LOCK_NAME, OutFolderBusyError, out_folder_lock, remove_stale_temp_files
from ._outcome import clean
from ._progress import PLAIN_INTERVAL_S, Mode
from ._run import Session, check_out_folder, journal_path
from ._single import build_request, check_keys, show_status, submit_no_wait

_DESCRIPTION = """wujie-async: generate images, run a bulk job, settle its journal, or serve
the gateway emulator.

exit codes:
  0    every line saved
  1    some lines ended failed, moderated, rejected, uncertain or not sent
  2    bad input or usage (including a file that is not a journal)
  3    stopped on a systemic error (credentials, base URL, balance, network, a gateway
       that answered no submit) or a disk that refused the journal, the manifest or an
       image; status: keys the gateway could not be asked about
  4    the journal, or the --out folder (bulk, resume), is in use by another run
  70   internal error (run with --verbose for the traceback)
  130  interrupted (Ctrl-C)
  141  stdout was closed by its reader (e.g. | head)
  143  stopped by SIGTERM (docker stop, systemd, Kubernetes)
a signal wins: a run stopped by a systemic error, then by Ctrl-C or SIGTERM, exits 130 or
143"""

# The embedded emulator's default: jobs look real (queue, then image by image) but take seconds.
DEMO_TIME_SCALE = 0.15
_INPUT_FORMATS = {"txt": "text", "jsonl": "jsonl", "csv": "csv", "json": "json"}
_REQUEST_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--size", "size", str, "image size, e.g. 1024x1024"),
    ("--quality", "quality", str, "quality (auto, high, medium, low, hd, standard)"),
    ("--style", "style", str, "style"),
    ("--background", "background", str, "background (transparent, opaque, auto)"),
    ("--output-format", "output_format", str, "png, jpeg or webp"),
    ("--output-compression", "output_compression", int, "0-100, jpeg/webp only"),
    ("--moderation", "moderation", str, "low or auto"),
)


def _version() -> str:
    try:
        return metadata.version("wujie-async")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="the DEBUG log: every request and job state change (never a secret)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "gateway (default: WUJIE_APP_ID, WUJIE_PRIVATE_KEY or WUJIE_PRIVATE_KEY_FILE, "
        "WUJIE_BASE_URL)"
    )
    group.add_argument("--app-id", help="app id (overrides WUJIE_APP_ID)")
    group.add_argument(
        "--private-key-file", type=Path, help="file holding the RSA private key (PEM or base64 DER)"
    )
    group.add_argument("--base-url", help="gateway base URL, ending in /wj-open/v1")
    group.add_argument(
        "--emulator",
        action="store_true",
        help="run against an embedded emulator on loopback (no credentials needed)",
    )
    group.add_argument(
        "--emulator-time-scale",
        type=float,
        default=DEMO_TIME_SCALE,
        help=f"latency scale of the embedded emulator (default {DEMO_TIME_SCALE}); the "
        "client's poll waits scale with it (never below 0.02 s)",
    )
    group.add_argument(
        "--emulator-fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fault knob of the embedded emulator, e.g. fail_jobs=0.1 (repeatable)",
    )
    group.add_argument(
        "--allow-http",
        action="store_true",
        help="allow plain http to hosts that are not loopback: the base URL (anyone on the "
        "path could replay the signed header) and image downloads",
    )
    group.add_argument(
        "--max-response-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="the largest API reply read, once decoded (default "
        f"{Limits().max_response_bytes}); raise it for a gateway that lists images inline "
        "(b64_json), whose reports on one job can be larger",
    )
    group.add_argument(
        "--allow-private-addresses",
        action="store_true",
        help="allow image downloads from loopback, private, link-local and reserved addresses "
        "(by default an image URL may point at loopback only when the gateway is on loopback, "
        "as --emulator's is, and at a private address only when the gateway is on one: a "
        "gateway must not reach services on your machine or network)",
    )


# The fields --name takes, per command: only bulk's rows have an id and an input line; a
# resumed job has the ones its bulk row had.
_NAME_FIELDS = "fields {key} (the job key), {index} (the image's position), {ext}"
_NAME_HELP = {
    "single": _NAME_FIELDS + "; e.g. 'fox-{key}-{index}.{ext}'",
    "bulk": _NAME_FIELDS + ", {id} (the row's id; every row needs one), {line} (the input "
    "line); e.g. '{id}-{index}.{ext}'",
    "resume": _NAME_FIELDS + ", and those of the bulk run's rows: {id} for rows that had "
    "one, {line} for the others; e.g. 'fox-{key}-{index}.{ext}'",
}


def _add_request_arguments(
    parser: argparse.ArgumentParser, *, defaults_only: bool, names: str
) -> None:
    what = " (default for rows that do not say)" if defaults_only else ""
    parser.add_argument("--model", default="gpt-image-1", help=f"model{what}")
    parser.add_argument("-n", type=int, default=None, help=f"images per prompt{what}")
    for flag, dest, kind, text in _REQUEST_FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text + what)
    _add_output_arguments(parser, names=names)


def _add_output_arguments(
    parser: argparse.ArgumentParser,
    *,
    names: str,
    out_default: Path | None = Path("out"),
    out_help: str = "folder for images (default out/)",
) -> None:
    parser.add_argument("-o", "--out", type=Path, default=out_default, help=out_help)
    parser.add_argument(
        "--name",
        default=DEFAULT_NAME,
        metavar="TEMPLATE",
        help=f"image file names (default {DEFAULT_NAME!r}); {_NAME_HELP[names]}",
    )
    parser.add_argument(
        "--job-timeout", type=float, default=None, help="seconds a job may take (default 900)"
    )
    parser.add_argument(
        "--download-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds one image may take to download and save, retries included "
        f"(default {DOWNLOAD_DEFAULTS.deadline:g})",
    )
    parser.add_argument(
        "--min-download-rate",
        type=float,
        default=None,
        metavar="BYTES_PER_S",
        help=f"an image server sending less than this over {DOWNLOAD_DEFAULTS.rate_window:g} s "
        f"is too slow (the try fails, retries are bounded); 0 turns it off "
        f"(default {DOWNLOAD_DEFAULTS.min_rate:g})",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="the largest image saved; a larger one is refused, and the line fails "
        f"(default {DOWNLOAD_DEFAULTS.max_bytes})",
    )


def _add_single_job_arguments(parser: argparse.ArgumentParser) -> None:
    _add_request_arguments(parser, defaults_only=False, names="single")
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job key and exit without waiting"
    )
    _add_run_arguments(parser)
    _add_common_arguments(parser)
    _add_connection_arguments(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=("auto", "rich", "plain", "none"),
        default="auto",
        help="live bar (rich), a line every --progress-interval seconds (plain), or none; "
        "auto: rich on a terminal, plain otherwise",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=PLAIN_INTERVAL_S,
        help=f"seconds between plain progress lines (default {PLAIN_INTERVAL_S:.0f})",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors (exit 2) also end in the ``--json`` object when
    the command line asks for JSON (the message on stderr is argparse's own)."""

    def error(self, message: str) -> NoReturn:
        if json_ending_asked():
            self.print_usage(sys.stderr)
            print_json_ending({"exit_code": EXIT_USAGE, "error": f"{self.prog}: {message}"})
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
        super().error(message)


class _Started:
    """What ``main`` knows of this process before (and while) its command starts."""

    terminated = False  # a SIGTERM came before the run's own handlers were in place


def _terminate_as_interrupt(number: int, frame: FrameType | None) -> None:
    """SIGTERM before a run installs its own handlers (see ``_signals``): the command stops as
    at Ctrl-C (the run's start undone, its client closed), then says so and exits 143. It was
    killed outright, and a ``--json`` caller read nothing at all."""
    _Started.terminated = True
    on_interrupt = signal.getsignal(signal.SIGINT)
    if callable(on_interrupt):
        # A running loop's (it cancels the command's task), or Python's (it raises).
        on_interrupt(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt  # SIGINT ignored (a background job): stop all the same


def build_parser() -> argparse.ArgumentParser:
    """The ``wujie-async`` argument parser."""
    parser = _Parser(
        prog="wujie-async", description=_DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"wujie-async {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="one prompt: submit, wait, save the images (prints their paths)",
        description="Submit one prompt, wait for its images and save them; prints each saved "
        "file's path on stdout (with --no-wait: the job key).",
    )
    generate.add_argument("prompt")
    _add_single_job_arguments(generate)

    edit = commands.add_parser(
        "edit",
        help="edit images with a prompt: submit, wait, save (prints their paths)",
        description="Edit one or more source images with a prompt. --image and --mask take an "
        "http(s) URL (the gateway fetches it) or a local PNG/JPEG/WEBP file (sent inline as a "
        "base64 data URL).",
    )
    edit.add_argument("prompt")
    edit.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="PATH_OR_URL",
        help="a source image: a local file or an http(s) URL (repeatable)",
    )
    edit.add_argument(
        "--mask", metavar="PATH_OR_URL", help="a mask image: transparent where to edit"
    )
    _add_single_job_arguments(edit)

    status = commands.add_parser(
        "status",
        help="show jobs by key (submitted elsewhere, or with --no-wait); --wait saves them",
        description="Print one line per key: its state, progress and images, or why it ended "
        "(exit 1 when a key is not found or unreadable; exit 3 when the gateway could not be "
        "asked: no answer). With --wait, wait for the jobs and save their images like "
        "generate.",
    )
    status.add_argument("keys", nargs="+", metavar="KEY", help="job keys")
    status.add_argument(
        "--wait", action="store_true", help="wait for the jobs and save their images"
    )
    _add_output_arguments(status, names="single")
    _add_run_arguments(status)
    _add_common_arguments(status)
    _add_connection_arguments(status)

    bulk = commands.add_parser(
        "bulk",
        help="many prompts from a file, with live progress",
        description="Every input line ends in one outcome (saved, failed, moderated, rejected, "
        "uncertain, not_sent), recorded in OUT/manifest.jsonl. Re-running the same command "
        "skips saved lines and collects pending ones, never resends uncertain ones, and "
        "resends failed ones only with --retry-failed.",
    )
    bulk.add_argument(
        "file",
        type=Path,
        help=f"prompts or requests, or - for stdin: {', '.join(sorted(FORMATS))} "
        "(.txt: a prompt per line; .jsonl: a request object per line; .csv: a header row with "
        "a prompt column; .json: an array of prompts or request objects; a row may have an id)",
    )
    bulk.add_argument(
        "--input-format",
        choices=sorted(_INPUT_FORMATS),
        default=None,
        help="the input's format (default: from its extension; for stdin, an array is json, "
        "objects are jsonl, anything else a prompt per line)",
    )
    _add_request_arguments(bulk, defaults_only=True, names="bulk")
    bulk.add_argument(
        "--journal",
        type=Path,
        default=None,
        help="SQLite journal making the run resumable (default: OUT/journal.sqlite, "
        "none with --emulator)",
    )
    bulk.add_argument("--no-journal", action="store_true", help="run without a journal")
    bulk.add_argument(
        "--retry-failed",
        action="store_true",
        help="resend lines that ended failed, moderated or rejected (each resend costs points)",
    )
    bulk.add_argument(
        "--retry-uncertain",
        action="store_true",
        help="resend lines that ended uncertain: sent without a reply, they may have been "
        "charged already (check the gateway's console first: each resend costs points)",
    )
    bulk.add_argument(
        "--max-in-flight",
        type=int,
        default=2000,
        help="jobs tracked at once (memory bound; default 2000)",
    )
    bulk.add_argument(
        "--concurrency", type=int, default=16, help="submits on the wire at once (default 16)"
    )
    bulk.add_argument(
        "--rate", type=float, default=None, help="max submits per second (default: no limit)"
    )
    add_budget_arguments(bulk)
    _add_run_arguments(bulk)
    _add_common_arguments(bulk)
    _add_connection_arguments(bulk)

    resume = commands.add_parser(
        "resume", help="collect the images of a journaled run's unfinished jobs"
    )
    resume.add_argument("journal", type=Path, help="the run's journal (e.g. out/journal.sqlite)")
    _add_output_arguments(
        resume,
        names="resume",
        out_default=None,
        out_help="the run's folder, for images and its manifest (default: the journal's "
        "folder, when it holds the run's manifest)",
    )
    _add_run_arguments(resume)
    _add_common_arguments(resume)
    _add_connection_arguments(resume)

    _journal_commands.add_parser(
        commands, _add_common_arguments, _add_connection_arguments, names=_NAME_HELP["resume"]
    )

    emulator_parser = commands.add_parser("emulator", help="serve the gateway emulator")
    emulator.add_arguments(emulator_parser)

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script generated from this parser. Install it, e.g.: "
        "wujie-async completion bash > ~/.local/share/bash-completion/completions/wujie-async; "
        'eval "$(wujie-async completion zsh)" in ~/.zshrc; '
        "wujie-async completion fish > ~/.config/fish/completions/wujie-async.fish",
    )
    completion.add_argument("shell", choices=SHELLS)
    return parser


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"model": args.model, "n": args.n}
    fields |= {dest: getattr(args, dest) for _, dest, _, _ in _REQUEST_FLAGS}
    return {name: value for name, value in fields.items() if value is not None}


def _read_input(args: argparse.Namespace) -> list[BulkItem]:
    kind = _INPUT_FORMATS.get(args.input_format) if args.input_format else None
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
        flags = {"n": "-n", "model": "--model"} | {
            dest: flag for flag, dest, _, _ in _REQUEST_FLAGS
        }
        problems = [f"{flags[field]}: {rule}" for field, rule in exc.violations if field in flags]
        if problems:
            raise UsageError(
                "; ".join(problems) + " (flags are the defaults of every row)"
            ) from None


# Set by main() when it runs as the process's command (on the main thread): the command's
# process then ends within its grace even when a blocked thread holds the loop's close.
_exit_guard: ExitGuard | None = None


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    guard = _exit_guard
    try:
        return _loop_runner()(_without_waiting_threads(main, guard))
    finally:
        if guard is not None:
            guard.disarm()


async def _without_waiting_threads(main: Coroutine[Any, Any, int], guard: ExitGuard | None) -> int:
    """``main`` on a loop whose default executor never holds the exit, and whose close gets
    a bounded time once ``main`` has ended (see ``_exit``): a name lookup that hangs must not
    keep a run that has printed its summary from ending."""
    asyncio.get_running_loop().set_default_executor(DaemonThreadPool())
    code: int | None = None
    error: BaseException | None = None
    try:
        code = await main
    except BaseException as exc:
        error = exc
        raise
    finally:
        if guard is not None:
            guard.arm(code, error)
    return code


def _loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    # The import is tried apart from the run: an error in the run must not chain under an
    # ImportError of an optional speed-up.
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return asyncio.run
    run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return run


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


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    _check_numbers(args)  # journal resend's too: --job-timeout, --max-points, --point-price
    if args.command == "journal":
        if getattr(args, "name", None) is not None:
            check_names(args.name, [])  # the template; its rows' names once they are read
        return _run_loop(_journal_commands.run(args, console))
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
            return _run_loop(submit_no_wait(args, request))
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
            return _run_loop(show_status(args))
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
        return _run_loop(session.run(items))  # one job each: runs side by side may share OUT
    with out_folder_lock(args.out):  # plans from OUT's manifest: one such run at a time
        remove_stale_temp_files(args.out, time.time())
        return _run_loop(session.run(items))


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


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option is reported by the command it was
    given to (argparse leaves it to the top parser, whose usage names no option), with the
    option it is closest to: ``wujie-async bulk: error: ... --emulatr (did you mean
    --emulator?)``."""
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    command = parser
    while True:  # down to the (sub)command the line named
        subparsers = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subparsers[0].dest, None) if subparsers else None
        if name is None or name not in subparsers[0].choices:
            break
        command = subparsers[0].choices[name]
    options = [flag for action in command._actions for flag in action.option_strings]
    said = []
    for word in extras:
        close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
        said.append(
            f"{word} (did you mean {close[0]}?)" if word.startswith("-") and close else word
        )
    command.error(f"unrecognized arguments: {' '.join(said)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``wujie-async`` and ``python -m wujie_async``."""
    words = sys.argv[1:] if argv is None else argv
    _Started.terminated = False
    # Before the parse (its usage errors end in the object too), as the words say; then as
    # the parsed arguments do (a "--json" that is a prompt asks for nothing).
    new_json_ending(
        asked="--json" in words[: words.index("--")] if "--" in words else "--json" in words
    )
    args = _parse(build_parser(), argv)
    new_json_ending(asked=bool(getattr(args, "json", False)))
    verbose = getattr(args, "verbose", False)
    # Other libraries' WARNINGs on stderr; ours from the level --verbose (DEBUG: the story of
    # every request and job) or WUJIE_LOG asks for, else WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    show_log(logging.DEBUG if verbose else log_level() or logging.WARNING)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    global _exit_guard
    if threading.current_thread() is threading.main_thread():
        _exit_guard = ExitGuard(lambda exc: _said(exc, console, verbose=verbose))
        if args.command not in ("emulator", "completion"):
            signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        if args.command == "emulator":
            return emulator.run(args)
        if args.command == "completion":
            print(script(build_parser(), args.shell), end="")  # noqa: T201 - the output
            return EXIT_OK
        return _dispatch(args, console)
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as exc:
        return _said(exc, console, verbose=verbose)
    finally:
        _exit_guard = None


def _said(exc: BaseException, console: Console, *, verbose: bool) -> int:
    """Say why a command ended with ``exc`` (on stderr; with ``--json``, also as one JSON
    object on stdout: ``exit_code`` and ``error``); its exit code."""
    said: list[str] = []

    def say(text: str, *, highlight: bool = False) -> None:
        said.append(text)
        console.out(text, highlight=highlight)  # plain text, never markup

    code = _say_why(exc, say, verbose=verbose)
    if json_ending_asked() and code != EXIT_BROKEN_PIPE:
        error = clean(said[0] if said else type(exc).__name__)
        if len(said) > 1 and isinstance(exc, InputFileError):
            error = "; ".join(clean(line) for line in said)
        with contextlib.suppress(OSError, ValueError):
            print_json_ending({"exit_code": code, "error": error})
    return code


def _say_why(exc: BaseException, say: Callable[..., None], *, verbose: bool) -> int:
    if isinstance(exc, InputFileError):
        for problem in exc.problems:
            say(clean(problem) if len(exc.problems) > 1 else problem, highlight=False)
        return EXIT_USAGE
    if isinstance(exc, UsageError):
        say(f"error: {exc}", highlight=False)
        return EXIT_USAGE
    if isinstance(exc, InvalidRequestError):
        say(f"error: {clean(exc)}", highlight=False)
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
        if _Started.terminated:
            say("stopped by SIGTERM", highlight=False)
            return EXIT_TERMINATED
        say("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    if isinstance(exc, JournalLockedError | OutFolderBusyError):
        say(f"error: {clean(exc)}", highlight=False)
        return EXIT_BUSY
    if isinstance(exc, WujieError):
        say(f"error: {clean(exc)}", highlight=False)
        return EXIT_FAILED
    if isinstance(exc, BrokenPipeError):
        # The reader of stdout left (`| head`): stop quietly, as a command killed by SIGPIPE
        # does, and let nothing flush into the closed pipe at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    say(f"internal error: {type(exc).__name__}: {clean(exc)}", highlight=False)
    if verbose:
        say("".join(traceback.format_exception(exc)), highlight=False)
    else:
        say("run with --verbose for the traceback", highlight=False)
    return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
