"""``wujie-async``: generate images, run a bulk job, settle its journal, or serve the emulator.

Exit codes: 0 every line saved · 1 some lines ended failed, moderated, rejected, uncertain
or not sent · 2 bad input or usage (including a file that is not a journal) · 3 stopped on a
systemic error (credentials, base URL, balance, network) · 4 the journal, or the --out folder
(bulk, resume), is in use by another run · 130 interrupted (Ctrl-C) · 143 stopped by SIGTERM
· 70 internal error (run with --verbose for the traceback). A signal wins over 3: a run stopped
by a systemic error, then by Ctrl-C or SIGTERM, exits 130 or 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from types import FrameType

from rich.console import Console

from .. import InvalidRequestError, JournalLockedError, WujieError, emulator
from .._telemetry import log_level, show_log
from ._common import (
    EXIT_BROKEN_PIPE,
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UsageError,
    json_ending_asked,
    new_json_ending,
    print_json_ending,
)
from ._completion import script
from ._dispatch import dispatch
from ._exit import ExitGuard
from ._input import InputFileError
from ._out_lock import OutFolderBusyError
from ._outcome import clean
from ._parser import build_parser, parse


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``wujie-async`` and ``python -m wujie_async``."""
    words = sys.argv[1:] if argv is None else argv
    _Started.terminated = False
    # Before the parse (its usage errors end in the object too), as the words say; then as
    # the parsed arguments do (a "--json" that is a prompt asks for nothing).
    new_json_ending(
        asked="--json" in words[: words.index("--")] if "--" in words else "--json" in words
    )
    args = parse(build_parser(), argv)
    new_json_ending(asked=bool(getattr(args, "json", False)))
    verbose = getattr(args, "verbose", False)
    # Other libraries' WARNINGs on stderr; ours from the level --verbose (DEBUG: the story of
    # every request and job) or WUJIE_LOG asks for, else WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    show_log(logging.DEBUG if verbose else log_level() or logging.WARNING)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    # When it runs as the process's command (on the main thread): the command's process then
    # ends within its grace even when a blocked thread holds the loop's close.
    guard: ExitGuard | None = None
    if threading.current_thread() is threading.main_thread():
        guard = ExitGuard(lambda exc: _said(exc, console, verbose=verbose))
        if args.command not in ("emulator", "completion"):
            signal.signal(signal.SIGTERM, _terminate_as_interrupt)
            # Ctrl-C stops the command from here on, as the run's own handler does later. A
            # process started with SIGINT ignored (a script's background job, `cmd &`) kept it
            # ignored until the run installed its handler: a `kill -INT` while it read and
            # planned a large input was lost, and the run went on sending, and paying.
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "emulator":
            return emulator.run(args)
        if args.command == "completion":
            print(script(build_parser(), args.shell), end="")  # noqa: T201 - the output
            return EXIT_OK
        return dispatch(args, console, guard)
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as exc:
        return _said(exc, console, verbose=verbose)


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
