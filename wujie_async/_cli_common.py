"""What every ``wujie-async`` command shares: exit codes, usage errors, opening a client."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from ._auth import Credentials
from ._client import WujieClient
from ._config import Limits
from ._errors import InvalidRequestError
from .emulator import _server as emulator_server
from .emulator._state import EmulatorConfig, FaultConfig

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # some lines ended failed/moderated/rejected/uncertain
EXIT_USAGE: Final = 2  # bad input or usage
EXIT_SYSTEMIC: Final = 3  # stopped on a systemic error (credentials, URL, balance, network)
EXIT_INTERNAL: Final = 70  # a bug: one line, the traceback with --verbose
EXIT_INTERRUPTED: Final = 130


class UsageError(Exception):
    """A command-line problem, said in one line that names the flag to change."""


def read_key_file(path: Path, flag: str) -> str:
    """The text of a private-key file, or a UsageError naming ``flag``."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise UsageError(f"{flag} {path}: cannot read it ({reason})") from None


def credentials(args: argparse.Namespace) -> Credentials:
    """Credentials from the flags, else the environment; a UsageError says what is missing."""
    app_id = args.app_id or os.environ.get("WUJIE_APP_ID")
    if args.private_key_file is not None:
        private_key: str | None = read_key_file(args.private_key_file, "--private-key-file")
    elif os.environ.get("WUJIE_PRIVATE_KEY"):
        private_key = os.environ["WUJIE_PRIVATE_KEY"]
    elif os.environ.get("WUJIE_PRIVATE_KEY_FILE"):
        key_file = Path(os.environ["WUJIE_PRIVATE_KEY_FILE"])
        private_key = read_key_file(key_file, "WUJIE_PRIVATE_KEY_FILE")
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
        where = "--private-key-file" if args.private_key_file else "WUJIE_PRIVATE_KEY"
        raise UsageError(f"{where}: {exc.rule}") from None


def emulator_faults(pairs: list[str]) -> FaultConfig:
    """``--emulator-fault NAME=VALUE`` pairs as a FaultConfig."""
    known = {f.name: f for f in dataclasses.fields(FaultConfig)}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in known or not raw:
            raise UsageError(
                f"--emulator-fault {pair!r}: expected NAME=VALUE, NAME among {', '.join(known)}"
            )
        try:
            values[name] = json.loads(raw)
        except ValueError:
            values[name] = raw
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    try:
        return FaultConfig(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--emulator-fault: {exc}") from None


@contextlib.asynccontextmanager
async def open_client(
    args: argparse.Namespace, limits: Limits, journal: Path | None
) -> AsyncIterator[WujieClient]:
    """An open client on the gateway the arguments name (or an embedded emulator)."""
    if args.emulator:
        config = EmulatorConfig(
            time_scale=args.emulator_time_scale, faults=emulator_faults(args.emulator_fault)
        )
        async with emulator_server.Emulator(config) as emu:
            client = WujieClient(
                emu.credentials, base_url=emu.base_url, limits=limits, journal=journal
            )
            async with client:
                yield client
        return
    creds = credentials(args)
    try:
        client = WujieClient(creds, base_url=args.base_url, limits=limits, journal=journal)
    except InvalidRequestError as exc:
        raise UsageError(f"--base-url / WUJIE_BASE_URL: {exc.rule}") from None
    async with client:
        yield client
