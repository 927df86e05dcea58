"""Running the emulator: in-process (``async with Emulator()``) or standalone (CLI)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .. import _contract
from .._auth import Credentials
from ._app import Gateway
from ._state import EmulatorConfig, FaultConfig

DEFAULT_APP_ID = "wjemulator0001"


@functools.cache
def _generated_key_pem() -> str:
    # One key per process: RSA key generation costs ~100 ms, and tests start many emulators.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode("ascii")


class Emulator:
    """The emulated gateway on a loopback port, for tests, benchmarks and demos.

    Example::

        async with Emulator(EmulatorConfig(time_scale=0.01)) as emu:
            async with WujieClient(credentials=emu.credentials, base_url=emu.base_url) as client:
                ...

    Attributes:
        base_url: ``http://127.0.0.1:<port>/wj-open/v1``.
        credentials: an app registered with the emulator, ready to sign with.
        gateway: the state behind it (faults, jobs, stats), changeable while it runs.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        app_id: str = DEFAULT_APP_ID,
    ) -> None:
        self.gateway = Gateway(config or EmulatorConfig())
        self.credentials = Credentials(app_id=app_id, private_key=_generated_key_pem())
        self.register(self.credentials)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def register(self, credentials: Credentials) -> None:
        """Accept requests signed with these credentials too (several apps may coexist)."""
        self.gateway.register_app(credentials.app_id, credentials.public_key())

    @property
    def origin(self) -> str:
        """``http://host:port``, where image files are served."""
        return self.base_url.removesuffix(_contract.BASE_PATH)

    def stats(self, *, timelines: bool = True) -> dict[str, Any]:
        """Every counter (what ``GET /_emulator/stats`` returns)."""
        return self.gateway.snapshot(timelines=timelines)

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the fault settings while running."""
        self.gateway.set_faults(faults)

    async def start(self) -> None:
        """Bind the port and start serving."""
        runner = web.AppRunner(self.gateway.build_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.base_url = f"http://{host}:{port}{_contract.BASE_PATH}"

    async def stop(self) -> None:
        """Stop serving and close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's command-line options (shared by both entry points)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    parser.add_argument("--credentials-out", type=Path, help="write app_id/private_key/base_url")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every latency")
    parser.add_argument("--seed", type=int, default=None, help="seed every random draw")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests/s per app")
    parser.add_argument(
        "--strict-regexps", action="store_true", help="apply the doc's strict validators"
    )
    faults = parser.add_argument_group("faults (probabilities 0..1, off by default)")
    for name, help_text in (
        ("http-5xx", "reply 503"),
        ("http-429", "reply 429 with Retry-After"),
        ("drop-connection", "close the socket without a reply"),
        ("drop-after-accept", "accept a submit, then lose its reply"),
        ("slow-reply", "delay a reply by --slow-reply-s"),
        ("html-reply", "reply with an HTML page"),
        ("business-error", "refuse a submit with --business-error-code"),
        ("absent-jobs", "hide a new job from batch replies for --absent-s"),
        ("duplicate-entries", "list an entry twice"),
        ("unknown-status", "report a running job with status 2"),
        ("fail-jobs", "make a job fail (status 3)"),
    ):
        faults.add_argument(f"--{name}", type=float, default=0.0, help=help_text)
    faults.add_argument("--slow-reply-s", type=float, default=2.0)
    faults.add_argument("--business-error-code", default=_contract.CODE_LOCK_RACE)
    faults.add_argument("--absent-s", type=float, default=1.0)
    faults.add_argument("--shuffle-entries", action="store_true")
    faults.add_argument("--moderation-word", action="append", default=[], dest="moderation_words")


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """An EmulatorConfig from parsed command-line options."""
    faults = FaultConfig(
        http_5xx=args.http_5xx,
        http_429=args.http_429,
        drop_connection=args.drop_connection,
        drop_after_accept=args.drop_after_accept,
        slow_reply=args.slow_reply,
        slow_reply_s=args.slow_reply_s,
        html_reply=args.html_reply,
        business_error=args.business_error,
        business_error_code=args.business_error_code,
        absent_jobs=args.absent_jobs,
        absent_s=args.absent_s,
        duplicate_entries=args.duplicate_entries,
        shuffle_entries=args.shuffle_entries,
        unknown_status=args.unknown_status,
        fail_jobs=args.fail_jobs,
        moderation_words=tuple(args.moderation_words),
    )
    return EmulatorConfig(
        time_scale=args.time_scale,
        seed=args.seed,
        rate_limit_rps=args.rate_limit,
        strict_regexps=args.strict_regexps,
        faults=faults,
    )


def write_credentials(path: Path, emulator: Emulator) -> None:
    """Write the emulator's app credentials as JSON, readable by the owner only."""
    data = {
        "app_id": emulator.credentials.app_id,
        "private_key": emulator.credentials.private_key,
        "base_url": emulator.base_url,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)


async def serve(args: argparse.Namespace) -> None:
    """Run the emulator until SIGINT/SIGTERM."""
    emulator = Emulator(config_from_args(args), host=args.host, port=args.port)
    async with emulator:
        if args.credentials_out:
            write_credentials(args.credentials_out, emulator)
        print(f"wujie-async emulator serving {emulator.base_url}", flush=True)  # noqa: T201
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m wujie_async.emulator``."""
    parser = argparse.ArgumentParser(
        prog="python -m wujie_async.emulator", description="Run the Wujie gateway emulator."
    )
    add_arguments(parser)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0
