"""``wujie-async``: generate images, run a bulk job, or serve the emulator.

Exit codes: 0 all jobs succeeded · 1 some jobs failed · 2 bad input or usage · 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.console import Console

from ._auth import Credentials
from ._bulk import BulkItem, BulkRun, InputFileError, read_requests
from ._client import WujieClient
from ._config import Limits
from ._errors import InvalidRequestError, WujieError
from ._models import GenerationRequest
from .emulator import _server as emulator_server
from .emulator._state import EmulatorConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The embedded emulator's default: jobs look real (queue, then image by image) but take seconds.
DEMO_TIME_SCALE = 0.15


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "gateway (default: WUJIE_APP_ID / WUJIE_PRIVATE_KEY / WUJIE_BASE_URL)"
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
        "--allow-http", action="store_true", help="allow image downloads over plain http"
    )


def _add_request_arguments(parser: argparse.ArgumentParser, *, defaults_only: bool) -> None:
    what = "default for lines that do not say" if defaults_only else "request field"
    parser.add_argument("--model", default="gpt-image-1", help=f"model ({what})")
    parser.add_argument("-n", type=int, default=None, help=f"images per prompt ({what})")
    parser.add_argument("--size", default=None, help=f"size ({what})")
    parser.add_argument("--quality", default=None, help=f"quality ({what})")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for images")


def build_parser() -> argparse.ArgumentParser:
    """The ``wujie-async`` argument parser."""
    parser = argparse.ArgumentParser(prog="wujie-async", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="one prompt: submit, wait, save the images")
    generate.add_argument("prompt")
    _add_request_arguments(generate, defaults_only=False)
    _add_connection_arguments(generate)

    bulk = commands.add_parser("bulk", help="many prompts from a file, with live progress")
    bulk.add_argument("file", type=Path, help="prompts (.txt, one per line) or requests (.jsonl)")
    _add_request_arguments(bulk, defaults_only=True)
    bulk.add_argument(
        "--max-in-flight", type=int, default=2000, help="jobs tracked at once (memory bound)"
    )
    bulk.add_argument("--concurrency", type=int, default=16, help="submits on the wire at once")
    bulk.add_argument("--rate", type=float, default=None, help="max submits per second")
    _add_connection_arguments(bulk)

    emulator = commands.add_parser("emulator", help="serve the gateway emulator")
    emulator_server.add_arguments(emulator)
    return parser


def _credentials(args: argparse.Namespace) -> tuple[Credentials, str | None]:
    app_id = args.app_id or os.environ.get("WUJIE_APP_ID")
    if args.private_key_file is not None:
        private_key = args.private_key_file.read_text()
    else:
        private_key = os.environ.get("WUJIE_PRIVATE_KEY")
    if not app_id or not private_key:
        raise InvalidRequestError(
            [
                (
                    "credentials",
                    "none given: set WUJIE_APP_ID and WUJIE_PRIVATE_KEY, pass --app-id and "
                    "--private-key-file, or add --emulator to try it against the embedded emulator",
                )
            ]
        )
    return Credentials(app_id=app_id, private_key=private_key), args.base_url


@contextlib.asynccontextmanager
async def _open_client(args: argparse.Namespace, limits: Limits) -> AsyncIterator[WujieClient]:
    if args.emulator:
        config = EmulatorConfig(time_scale=args.emulator_time_scale)
        async with emulator_server.Emulator(config) as emu:
            async with WujieClient(emu.credentials, base_url=emu.base_url, limits=limits) as client:
                yield client
        return
    credentials, base_url = _credentials(args)
    async with WujieClient(credentials, base_url=base_url, limits=limits) as client:
        yield client


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"model": args.model, "n": args.n, "size": args.size, "quality": args.quality}
    return {name: value for name, value in fields.items() if value is not None}


async def _generate_all(args: argparse.Namespace, console: Console, items: list[BulkItem]) -> int:
    limits = Limits(
        max_in_flight=getattr(args, "max_in_flight", None),
        max_concurrent_submits=getattr(args, "concurrency", 1),
        max_submits_per_second=getattr(args, "rate", None),
    )
    async with _open_client(args, limits) as client:
        allow_http = args.allow_http or args.emulator
        run = BulkRun(client, items, args.out, console=console, allow_http=allow_http)
        tally = await run.run()
    console.print(
        f"{tally.done} job(s) done, {tally.failed} failed, {tally.images} image(s) in "
        f"{args.out}/ (manifest: {args.out / 'manifest.jsonl'})"
    )
    if args.command == "generate":
        for path in tally.saved:
            print(path)  # noqa: T201 - the saved paths are this command's output
    return EXIT_FAILED if tally.failed else EXIT_OK


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    defaults = _defaults(args)
    try:
        if args.command == "bulk":
            items = read_requests(args.file, defaults)
        else:
            items = [BulkItem(1, GenerationRequest.build({**defaults, "prompt": args.prompt}))]
        return _run_loop(_generate_all(args, console, items))
    except InputFileError as exc:
        for problem in exc.problems:
            console.print(problem, markup=False, highlight=False)
        return EXIT_USAGE
    except InvalidRequestError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("interrupted: jobs already submitted keep running on the gateway")
        return EXIT_INTERRUPTED
    except WujieError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_FAILED


def _run_loop(main: Any) -> int:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return int(asyncio.run(main))
    return int(uvloop.run(main))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``wujie-async`` and ``python -m wujie_async``."""
    args = build_parser().parse_args(argv)
    if args.command == "emulator":
        asyncio.run(emulator_server.serve(args))
        return EXIT_OK
    return _run(args)


__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
