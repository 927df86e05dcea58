"""The ``wujie-async`` argument parser: every command, its flags and their help (the CLI
reference in the docs is generated from it), and how an unknown option is reported."""

from __future__ import annotations

import argparse
import difflib
import sys
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from .. import Limits, emulator
from .._file_names import DEFAULT_NAME
from . import _journal_commands
from ._common import (
    DOWNLOAD_DEFAULTS,
    EXIT_USAGE,
    add_budget_arguments,
    json_ending_asked,
    print_json_ending,
)
from ._completion import SHELLS
from ._input import FORMATS
from ._progress import PLAIN_INTERVAL_S

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
# --input-format's names, and the input reader's for each.
INPUT_FORMATS = {"txt": "text", "jsonl": "jsonl", "csv": "csv", "json": "json"}
# The request flags (generate, edit; bulk's are every row's defaults): flag, field, type, help.
REQUEST_FLAGS: tuple[tuple[str, str, type, str], ...] = (
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
    for flag, dest, kind, text in REQUEST_FLAGS:
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
        choices=sorted(INPUT_FORMATS),
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


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
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
