"""``wujie-async``: generate images, run a bulk job, resume one, or serve the emulator.

Exit codes: 0 all jobs succeeded · 1 some jobs failed · 2 bad input or usage · 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from ._auth import Credentials
from ._bulk import BulkItem, BulkRun, BulkTally, InputFileError, read_requests
from ._client import WujieClient
from ._config import Limits
from ._errors import InvalidRequestError, WujieError
from ._jobs import ImageJob
from ._journal import ALL_STATES
from ._models import GenerationRequest
from .emulator import _server as emulator_server
from .emulator._state import EmulatorConfig, FaultConfig

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
        "--emulator-fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fault knob of the embedded emulator, e.g. fail_jobs=0.1 (repeatable)",
    )
    group.add_argument(
        "--allow-http", action="store_true", help="allow image downloads over plain http"
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for images")


def _add_request_arguments(parser: argparse.ArgumentParser, *, defaults_only: bool) -> None:
    what = "default for lines that do not say" if defaults_only else "request field"
    parser.add_argument("--model", default="gpt-image-1", help=f"model ({what})")
    parser.add_argument("-n", type=int, default=None, help=f"images per prompt ({what})")
    parser.add_argument("--size", default=None, help=f"size ({what})")
    parser.add_argument("--quality", default=None, help=f"quality ({what})")
    _add_output_arguments(parser)


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
        "--journal",
        type=Path,
        default=None,
        help="SQLite journal making the run resumable (default: OUT/journal.sqlite, "
        "none with --emulator)",
    )
    bulk.add_argument("--no-journal", action="store_true", help="run without a journal")
    bulk.add_argument(
        "--max-in-flight", type=int, default=2000, help="jobs tracked at once (memory bound)"
    )
    bulk.add_argument("--concurrency", type=int, default=16, help="submits on the wire at once")
    bulk.add_argument("--rate", type=float, default=None, help="max submits per second")
    _add_connection_arguments(bulk)

    resume = commands.add_parser(
        "resume", help="collect the images of a journaled run's unfinished jobs"
    )
    resume.add_argument("journal", type=Path, help="the run's journal (e.g. out/journal.sqlite)")
    _add_output_arguments(resume)
    _add_connection_arguments(resume)

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


def _emulator_faults(pairs: list[str]) -> FaultConfig:
    known = {f.name: f for f in dataclasses.fields(FaultConfig)}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in known or not raw:
            raise InvalidRequestError(
                [("--emulator-fault", f"{pair!r}: expected NAME=VALUE, NAME among {sorted(known)}")]
            )
        try:
            values[name] = json.loads(raw)
        except ValueError:
            values[name] = raw
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    return FaultConfig(**values)


@contextlib.asynccontextmanager
async def _open_client(
    args: argparse.Namespace, limits: Limits, journal: Path | None
) -> AsyncIterator[WujieClient]:
    if args.emulator:
        config = EmulatorConfig(
            time_scale=args.emulator_time_scale, faults=_emulator_faults(args.emulator_fault)
        )
        async with emulator_server.Emulator(config) as emu:
            client = WujieClient(
                emu.credentials, base_url=emu.base_url, limits=limits, journal=journal
            )
            async with client:
                yield client
        return
    credentials, base_url = _credentials(args)
    async with WujieClient(
        credentials, base_url=base_url, limits=limits, journal=journal
    ) as client:
        yield client


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"model": args.model, "n": args.n, "size": args.size, "quality": args.quality}
    return {name: value for name, value in fields.items() if value is not None}


async def _not_yet_journaled(client: WujieClient, items: list[BulkItem]) -> list[BulkItem]:
    """Drop items a previous run on this journal already sent, so nothing is paid twice."""
    sent_states = [state for state in ALL_STATES if state != "rejected"]
    entries = await client._require_journal().entries(*sent_states)
    sent = Counter(json.dumps(entry.request, sort_keys=True) for entry in entries)
    fresh = []
    for item in items:
        body = json.dumps(item.request.body(), sort_keys=True)
        if sent[body] > 0:
            sent[body] -= 1
        else:
            fresh.append(item)
    return fresh


def _saved_images(manifest: Path) -> Counter[str]:
    """How many images of each key the manifest already lists."""
    saved: Counter[str] = Counter()
    with contextlib.suppress(FileNotFoundError):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                saved[json.loads(line)["key"]] += 1
    return saved


async def _jobs_to_collect(client: WujieClient, manifest: Path) -> list[ImageJob]:
    """Unfinished journaled jobs, and finished ones whose images are not all in the manifest
    (a run stopped after the gateway finished them but before their files were written)."""
    jobs = await client.resume()
    saved = await asyncio.to_thread(_saved_images, manifest)
    for entry in await client._require_journal().entries("succeeded"):
        n = entry.request.get("n") or 1
        if entry.job_key and saved[entry.job_key] < n:
            jobs.append(client._attach(entry.job_key, job_timeout=None, n=n, request=entry.request))
    return jobs


class _Session:
    """What a command did, for the closing summary (also after Ctrl-C)."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.tally: BulkTally | None = None
        self.journal: Path | None = None
        if args.command == "bulk" and args.journal is not None:
            self.journal = args.journal
        elif args.command == "bulk" and not args.no_journal and not args.emulator:
            # The embedded emulator's jobs die with this process: nothing to resume there.
            self.journal = args.out / "journal.sqlite"
        elif args.command == "resume":
            self.journal = args.journal

    def limits(self) -> Limits:
        args = self.args
        return Limits(
            max_in_flight=getattr(args, "max_in_flight", None),
            max_concurrent_submits=getattr(args, "concurrency", 4),
            max_submits_per_second=getattr(args, "rate", None),
        )

    async def run(self, items: list[BulkItem]) -> int:
        args, console = self.args, self.console
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        async with _open_client(args, self.limits(), self.journal) as client:
            resumed = []
            if args.command == "resume":
                resumed = await _jobs_to_collect(client, args.out / "manifest.jsonl")
            elif self.journal is not None:
                fresh = await _not_yet_journaled(client, items)
                if len(fresh) < len(items):
                    console.print(
                        f"skipping {len(items) - len(fresh)} request(s) this journal already "
                        f"sent; collect their images with: wujie-async resume {self.journal} "
                        f"--out {args.out}"
                    )
                items = fresh
            allow_http = args.allow_http or args.emulator
            stop = asyncio.Event()
            run = BulkRun(
                client,
                items,
                args.out,
                console=console,
                resumed=resumed,
                allow_http=allow_http,
                stop=stop,
            )
            self.tally = run.tally
            with self._first_ctrl_c_stops(stop):
                await run.run()
            if self.journal is not None:
                await self._report_uncertain(client)
        if run.tally.interrupted:
            self.interrupted()
            return EXIT_INTERRUPTED
        self.summary()
        if args.command == "generate":
            for path in run.tally.saved:
                print(path)  # noqa: T201 - the saved paths are this command's output
        return EXIT_FAILED if run.tally.failed else EXIT_OK

    @contextlib.contextmanager
    def _first_ctrl_c_stops(self, stop: asyncio.Event) -> Iterator[None]:
        """First Ctrl-C: stop gently (submits on the wire get their keys). Second: at once."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()

        def on_interrupt() -> None:
            if stop.is_set() and main is not None:
                main.cancel()
                return
            stop.set()
            self.console.print("stopping: letting submits on the wire finish (Ctrl-C to quit now)")

        try:
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def _report_uncertain(self, client: WujieClient) -> None:
        uncertain = await client.uncertain_submits()
        if not uncertain:
            return
        self.console.print(
            f"{len(uncertain)} submit(s) got no reply and MAY have been charged; they were not "
            "resent. Check them in the platform console before sending them again:"
        )
        for entry in uncertain[:20]:
            prompt = str(entry.request.get("prompt", ""))[:80]
            self.console.print(f"  #{entry.id} {prompt!r}: {entry.error}", markup=False)

    def summary(self) -> None:
        tally, args = self.tally, self.args
        if tally is None:
            return
        self.console.print(
            f"{tally.done} job(s) done, {tally.failed} failed, {tally.images} image(s) in "
            f"{args.out}/ (manifest: {args.out / 'manifest.jsonl'})"
        )

    def interrupted(self) -> None:
        self.summary()
        if self.journal is not None:
            self.console.print(
                "interrupted: submitted jobs keep running on the gateway. Collect them with:\n"
                f"  wujie-async resume {self.journal} --out {self.args.out}\n"
                "and re-run the same bulk command to send the prompts not sent yet."
            )
        elif self.args.emulator:
            self.console.print("interrupted (the embedded emulator stops with this process)")
        else:
            self.console.print(
                "interrupted: submitted jobs keep running on the gateway, but without a journal "
                "their keys are not kept; run bulk with a journal to make it resumable."
            )


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    session = _Session(args, console)
    try:
        if args.command == "bulk":
            items = read_requests(args.file, _defaults(args))
        elif args.command == "generate":
            request = GenerationRequest.build({**_defaults(args), "prompt": args.prompt})
            items = [BulkItem(1, request)]
        else:
            if not args.journal.exists():
                raise InvalidRequestError([("journal", f"{args.journal} does not exist")])
            items = []
        return _run_loop(session.run(items))
    except InputFileError as exc:
        for problem in exc.problems:
            console.print(problem, markup=False, highlight=False)
        return EXIT_USAGE
    except InvalidRequestError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        session.interrupted()
        return EXIT_INTERRUPTED
    except WujieError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``wujie-async`` and ``python -m wujie_async``."""
    args = build_parser().parse_args(argv)
    if args.command == "emulator":
        asyncio.run(emulator_server.serve(args))
        return EXIT_OK
    return _run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
