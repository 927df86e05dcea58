"""What every ``wujie-async`` command shares: exit codes, usage errors, opening a client."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Final

from .. import Credentials, DownloadPolicy, InvalidRequestError, Limits, PollPolicy, WujieClient
from .._auth import read_key_file as key_file_text
from .._env import Environment
from .._file_names import PlannedJob, check_planned_names, check_template
from ..emulator import Emulator, EmulatorConfig, FaultConfig, fault_config_from_pairs

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # some lines ended failed/moderated/rejected/uncertain
EXIT_USAGE: Final = 2  # bad input or usage
EXIT_SYSTEMIC: Final = 3  # a systemic error, a disk that refused a write, status unasked
EXIT_BUSY: Final = 4  # the journal or the --out folder is in use by another run
EXIT_INTERNAL: Final = 70  # a bug: one line, the traceback with --verbose
EXIT_BROKEN_PIPE: Final = 141  # stdout's reader left (`| head`): as SIGPIPE ends a command
EXIT_INTERRUPTED: Final = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED: Final = 143  # SIGTERM (128 + SIGTERM): docker stop, systemd, Kubernetes


# The shortest poll gap against the embedded emulator, however small its time scale: below
# this a tiny scale would turn polling into a busy loop.
EMULATOR_POLL_FLOOR_S: Final = 0.02


class UsageError(Exception):
    """A command-line problem, said in one line that names the flag to change."""


def shell_path(path: Path | str | None) -> str:
    """A path as a shell, then this command's parser, reads it back (the commands we print
    are to be pasted): quoted, and a relative path that starts with ``-`` given as ``./-...``
    (as it is, the parser took it for an option and the command failed)."""
    text = str(path)
    if text.startswith("-"):
        text = "./" + text
    return shlex.quote(text)


def emulator_poll_policy(time_scale: float) -> PollPolicy:
    """The default PollPolicy with its waits scaled to the emulator's time scale.

    The embedded emulator runs jobs ``time_scale`` times as long as the real gateway, so its
    waits shrink by the same factor (never below ``EMULATOR_POLL_FLOOR_S``). Without this a
    demo at scale 0.01 would still wait a whole second for its first poll.
    """
    base = PollPolicy()
    factor = min(time_scale, 1.0)

    def scaled(seconds: float) -> float:
        return max(seconds * factor, EMULATOR_POLL_FLOOR_S)

    min_interval = scaled(base.min_interval)
    return dataclasses.replace(
        base,
        first_poll_delay=scaled(base.first_poll_delay),
        min_interval=min_interval,
        max_interval=max(scaled(base.max_interval), min_interval),
        batch_fill_horizon=base.batch_fill_horizon * factor,
    )


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-points`` and ``--point-price`` (``bulk`` and ``journal resend``)."""
    parser.add_argument(
        "--max-points",
        type=float,
        default=None,
        help="a points budget for this input's run, re-runs included (what earlier runs into "
        "OUT/ were charged counts): lines that could take it past end not_sent, and a re-run "
        "with a larger budget sends them",
    )
    parser.add_argument(
        "--point-price",
        action="append",
        default=None,
        metavar="MODEL=POINTS",
        help="points per image of MODEL (or MODEL/SIZE, MODEL/SIZE/QUALITY), for --max-points: "
        "reserved before the first job of a kind ends, and needed when the gateway does not "
        "report what jobs cost; repeat for each model",
    )


def check_names(template: str, jobs: list[PlannedJob], *, taken: Iterable[str] = ()) -> None:
    """Refuse a bad ``--name``, and names some row could not be saved under (too long,
    reserved, the same as another row's after cleaning), before anything is sent."""
    try:
        check_template(template)
    except InvalidRequestError as exc:
        raise UsageError("; ".join(f"--name: {rule}" for _, rule in exc.violations)) from None
    without_id = [job.label for job in jobs if job.id is None]
    if "{id" in template and without_id:
        raise UsageError(
            f"--name {template!r} uses {{id}}, but {', '.join(without_id[:5])} "
            f"{'has' if len(without_id) == 1 else 'have'} no id; give every row an id or use "
            "{key} or {line}"
        )
    try:
        check_planned_names(template, jobs, taken=taken)
    except InvalidRequestError as exc:
        rules = [rule for _, rule in exc.violations]
        raise UsageError(
            f"--name {template!r} cannot save every image (nothing was sent):\n  "
            + "\n  ".join(rules)
            + "\nchange the ids or --name ({line} is unique per row, {index} per image)"
        ) from None


# The defaults of the download flags: the library's.
DOWNLOAD_DEFAULTS: Final = DownloadPolicy()


def download_policy(args: argparse.Namespace) -> DownloadPolicy:
    """How the flags ask for images to be downloaded (``--download-timeout``,
    ``--min-download-rate``, ``--max-image-bytes``, ``--allow-http``); the client's one
    downloader follows it."""
    min_rate = getattr(args, "min_download_rate", None)
    return dataclasses.replace(
        DOWNLOAD_DEFAULTS,
        max_bytes=getattr(args, "max_image_bytes", None) or DOWNLOAD_DEFAULTS.max_bytes,
        deadline=getattr(args, "download_timeout", None) or DOWNLOAD_DEFAULTS.deadline,
        min_rate=DOWNLOAD_DEFAULTS.min_rate if min_rate is None else (min_rate or None),
        allow_http=bool(getattr(args, "allow_http", False)),
    )


def read_key_file(path: Path, flag: str) -> str:
    """The text of a private-key file, or a UsageError naming ``flag`` (never a key pasted
    where its path belongs)."""
    try:
        return key_file_text(path, flag)
    except InvalidRequestError as exc:
        problem = exc.rule
    raise UsageError(f"{flag}: {problem}")


def credentials(args: argparse.Namespace) -> Credentials:
    """Credentials from the flags, else the environment; a UsageError says what is missing."""
    env = Environment.read()
    app_id = args.app_id or env.app_id
    where = "WUJIE_PRIVATE_KEY"
    if args.private_key_file is not None:
        where = "--private-key-file"
        private_key: str | None = read_key_file(args.private_key_file, where)
    elif env.private_key:
        private_key = env.private_key
    elif env.private_key_file:
        where = "WUJIE_PRIVATE_KEY_FILE"
        private_key = read_key_file(Path(env.private_key_file), where)
    else:
        private_key = None
    if not app_id or not private_key:
        raise UsageError(
            "no credentials: set WUJIE_APP_ID and WUJIE_PRIVATE_KEY (or WUJIE_PRIVATE_KEY_FILE), "
            "pass --app-id and --private-key-file, or add --emulator to try the embedded emulator"
        )
    try:
        return Credentials(app_id=app_id, private_key=private_key)
    except InvalidRequestError as exc:
        rule = exc.rule
    # A refused key must not stay in this frame's locals (error reporters record them).
    del private_key, env
    raise UsageError(f"{where}: {rule}")


def emulator_faults(pairs: list[str]) -> FaultConfig:
    """``--emulator-fault NAME=VALUE`` pairs as a FaultConfig (a UsageError names the flag)."""
    try:
        return fault_config_from_pairs(pairs)  # in range too (fail_jobs=5), named by the flag
    except InvalidRequestError as exc:
        raise UsageError(
            "; ".join(f"--emulator-fault {field}: {rule}" for field, rule in exc.violations)
        ) from None


@contextlib.asynccontextmanager
async def open_client(
    args: argparse.Namespace,
    limits: Limits,
    journal: Path | None,
    *,
    unknown_key_grace: float | None = None,
) -> AsyncIterator[WujieClient]:
    """An open client on the gateway the arguments name (or an embedded emulator).

    ``unknown_key_grace``: the client's ``PollPolicy.unknown_key_grace`` (None: its default).
    """

    def poll_policy(base: PollPolicy) -> PollPolicy:
        if unknown_key_grace is None:
            return base
        return dataclasses.replace(base, unknown_key_grace=unknown_key_grace)

    reply_cap = getattr(args, "max_response_bytes", None)
    if reply_cap is not None:
        limits = dataclasses.replace(limits, max_response_bytes=reply_cap)

    if args.emulator:
        config = EmulatorConfig(
            time_scale=args.emulator_time_scale, faults=emulator_faults(args.emulator_fault)
        )
        async with Emulator(config) as emu:
            client = WujieClient(
                emu.credentials,
                base_url=emu.base_url,
                limits=limits,
                journal=journal,
                poll=poll_policy(emulator_poll_policy(config.time_scale)),
                downloads=download_policy(args),
                allow_private_addresses=bool(getattr(args, "allow_private_addresses", False)),
            )
            async with client:
                yield client
        return
    creds = credentials(args)
    try:
        client = WujieClient(
            creds,
            base_url=args.base_url,
            limits=limits,
            journal=journal,
            poll=poll_policy(PollPolicy()),
            allow_insecure_http=args.allow_http,
            downloads=download_policy(args),
            allow_private_addresses=bool(getattr(args, "allow_private_addresses", False)),
        )
    except InvalidRequestError as exc:
        rule = exc.rule.replace("pass allow_insecure_http=True", "add --allow-http")
        raise UsageError(f"--base-url / WUJIE_BASE_URL: {rule}") from None
    async with client:
        yield client


class _Ending:
    """This process's ``--json`` ending (the one object a run ends with): whether the command
    line asks for it, and whether it was printed. Its one owner: the functions below."""

    asked = False
    printed = False


def new_json_ending(*, asked: bool) -> None:
    """A command starts (or its arguments are parsed): ``asked`` says whether it ends in a
    ``--json`` object, yet to be printed."""
    _Ending.asked = asked
    _Ending.printed = False


def json_ending_asked() -> bool:
    """Whether this command ends in a ``--json`` object (an error included)."""
    return _Ending.asked


def print_json_ending(said: dict[str, Any]) -> None:
    """Print the one JSON object a ``--json`` command ends with, on stdout (once: a command
    that printed its summary prints no second object for an error after it)."""
    if _Ending.printed:
        return
    _Ending.printed = True
    print(json.dumps(said), flush=True)  # noqa: T201 - the machine-readable ending is output


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question}: pass --yes to confirm (stdin is not a terminal)")
    answer = input(f"{question} [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was changed")
