"""``wujie-async``: generate images, run a bulk job, settle its journal, or serve the emulator.

Exit codes: 0 every line saved · 1 some lines ended failed, moderated, rejected or uncertain ·
2 bad input or usage · 3 stopped on a systemic error (credentials, base URL, balance, network) ·
130 interrupted · 70 internal error (run with --verbose for the traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
import traceback
from collections.abc import Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from . import _cli_journal
from ._cli_common import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from ._cli_input import FORMATS, BulkItem, InputFileError, read_requests
from ._cli_outcome import clean
from ._cli_progress import PLAIN_INTERVAL_S, Mode
from ._cli_run import Session, check_out_folder
from ._errors import InvalidRequestError, WujieError
from ._models import GenerationRequest
from .emulator import _server as emulator_server

# The embedded emulator's default: jobs look real (queue, then image by image) but take seconds.
DEMO_TIME_SCALE = 0.15
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
    parser.add_argument("--verbose", action="store_true", help="DEBUG logs (secrets redacted)")
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
        help=f"latency scale of the embedded emulator (default {DEMO_TIME_SCALE})",
    )
    group.add_argument(
        "--emulator-fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fault knob of the embedded emulator, e.g. fail_jobs=0.1 (repeatable)",
    )
    group.add_argument(
        "--allow-http", action="store_true", help="allow image downloads over plain http"
    )


def _add_request_arguments(parser: argparse.ArgumentParser, *, defaults_only: bool) -> None:
    what = " (default for rows that do not say)" if defaults_only else ""
    parser.add_argument("--model", default="gpt-image-1", help=f"model{what}")
    parser.add_argument("-n", type=int, default=None, help=f"images per prompt{what}")
    for flag, dest, kind, text in _REQUEST_FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text + what)
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("out"), help="folder for images (default out/)"
    )
    parser.add_argument(
        "--job-timeout", type=float, default=None, help="seconds a job may take (default 900)"
    )


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


def build_parser() -> argparse.ArgumentParser:
    """The ``wujie-async`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="wujie-async", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"wujie-async {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="one prompt: submit, wait, save the images")
    generate.add_argument("prompt")
    _add_request_arguments(generate, defaults_only=False)
    generate.add_argument(
        "--no-wait", action="store_true", help="print the job key and exit without waiting"
    )
    _add_run_arguments(generate)
    _add_common_arguments(generate)
    _add_connection_arguments(generate)

    bulk = commands.add_parser(
        "bulk",
        help="many prompts from a file, with live progress",
        description="Every input line ends in one outcome (saved, failed, moderated, rejected, "
        "uncertain, not_sent), recorded in OUT/manifest.jsonl. Re-running the same command "
        "skips saved and pending lines, never resends uncertain ones, and resends failed ones "
        "only with --retry-failed.",
    )
    bulk.add_argument(
        "file",
        type=Path,
        help=f"prompts or requests: {', '.join(sorted(FORMATS))} "
        "(.txt: a prompt per line; .jsonl: a request object per line; .csv: a header row with "
        "a prompt column; .json: an array of prompts or request objects; a row may have an id)",
    )
    _add_request_arguments(bulk, defaults_only=True)
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
        "--max-in-flight", type=int, default=2000, help="jobs tracked at once (memory bound)"
    )
    bulk.add_argument("--concurrency", type=int, default=16, help="submits on the wire at once")
    bulk.add_argument("--rate", type=float, default=None, help="max submits per second")
    _add_run_arguments(bulk)
    _add_common_arguments(bulk)
    _add_connection_arguments(bulk)

    resume = commands.add_parser(
        "resume", help="collect the images of a journaled run's unfinished jobs"
    )
    resume.add_argument("journal", type=Path, help="the run's journal (e.g. out/journal.sqlite)")
    resume.add_argument("-o", "--out", type=Path, default=Path("out"), help="folder for images")
    resume.add_argument("--job-timeout", type=float, default=None, help="seconds a job may take")
    _add_run_arguments(resume)
    _add_common_arguments(resume)
    _add_connection_arguments(resume)

    _cli_journal.add_parser(commands, _add_common_arguments, _add_connection_arguments)

    emulator = commands.add_parser("emulator", help="serve the gateway emulator")
    emulator_server.add_arguments(emulator)
    return parser


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"model": args.model, "n": args.n}
    fields |= {dest: getattr(args, dest) for _, dest, _, _ in _REQUEST_FLAGS}
    return {name: value for name, value in fields.items() if value is not None}


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    # Import outside any except block: an error in the run must not chain under ImportError.
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        uvloop = None
    if uvloop is None:
        return asyncio.run(main)
    return int(uvloop.run(main))


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
    ):
        value = getattr(args, dest, None)
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be a positive number")


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "journal":
        return _run_loop(_cli_journal.run(args, console))
    _check_numbers(args)
    items: list[BulkItem] = []
    if args.command == "bulk":
        items = read_requests(args.file, _defaults(args))
    elif args.command == "generate":
        try:
            request = GenerationRequest.build({**_defaults(args), "prompt": args.prompt})
        except InvalidRequestError as exc:
            raise UsageError(
                "; ".join(f"--{f.replace('_', '-')}: {r}" for f, r in exc.violations)
            ) from None
        items = [BulkItem(1, request)]
        if args.no_wait:
            return _run_loop(_cli_journal.submit_no_wait(args, request))
    elif not args.journal.exists():
        raise UsageError(f"{args.journal}: no such journal")
    check_out_folder(args.out)
    session = Session(args, console, _progress_mode(args))
    return _run_loop(session.run(items))


def _serve_emulator(args: argparse.Namespace) -> int:
    try:
        asyncio.run(emulator_server.serve(args))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"emulator: port {args.port} on {args.host} is in use; pick another --port "
                "(--port 0 picks a free one)"
            ) from None
        raise UsageError(
            f"emulator: cannot listen on {args.host}:{args.port}: {exc.strerror}"
        ) from None
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``wujie-async`` and ``python -m wujie_async``."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    say = console.out  # plain text, never markup
    try:
        if args.command == "emulator":
            return _serve_emulator(args)
        return _dispatch(args, console)
    except InputFileError as exc:
        for problem in exc.problems:
            say(clean(problem) if len(exc.problems) > 1 else problem, highlight=False)
        return EXIT_USAGE
    except UsageError as exc:
        say(f"error: {exc}", highlight=False)
        return EXIT_USAGE
    except InvalidRequestError as exc:
        say(f"error: {clean(exc)}", highlight=False)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except WujieError as exc:
        say(f"error: {clean(exc)}", highlight=False)
        return EXIT_FAILED
    except Exception as exc:
        say(f"internal error: {type(exc).__name__}: {clean(exc)}", highlight=False)
        if verbose:
            say(traceback.format_exc(), highlight=False)
        else:
            say("run with --verbose for the traceback", highlight=False)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
