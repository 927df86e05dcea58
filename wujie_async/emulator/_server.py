"""Running the emulator: in-process (``async with Emulator()``) or standalone (CLI)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .. import _contract
from .._auth import Credentials
from ._app import Gateway
from ._clock import Clock
from ._options import (
    add_config_arguments,
    config_from_args,
    config_to_json,
    emulator_config_from_json,
)
from ._state import EmulatorConfig, FaultConfig

__all__ = ["Emulator", "add_arguments", "config_from_args", "main", "run", "serve"]

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


@functools.cache
def _generated_credentials(app_id: str) -> Credentials:
    # Parsing the key checks it (~50 ms of CPU): once per app id and process, as for the key.
    return Credentials(app_id=app_id, private_key=_generated_key_pem())


SHUTDOWN_GRACE_SECONDS = 1.0


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
        credentials: Credentials | None = None,
        sock: socket.socket | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Prepare an emulator; nothing listens until ``start()`` (or ``async with``).

        Args:
            config: how the gateway behaves (default: no faults, time scale 1).
            host: address to bind (loopback by default).
            port: port to bind; 0 picks a free one.
            app_id: the app id of the generated credentials.
            credentials: serve this app instead of generating a key pair.
            sock: an already listening socket to serve on (``host``/``port`` are then unused).
            clock: a zero-argument callable returning seconds, the one clock of everything the
                emulator times (job progress, rate limit, 429 bursts, stats); default: the
                running event loop's clock, so a test that fast-forwards the loop moves the
                jobs too. Unix stamps (``complete_time``, stats timelines) are derived from it.
        """
        self.gateway = Gateway(config or EmulatorConfig(), clock=clock)
        self.credentials = credentials or _generated_credentials(app_id)
        self.register(self.credentials)
        self._host = host
        self._port = port
        self._sock = sock
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def register(self, credentials: Credentials) -> None:
        """Accept requests signed with these credentials too (several apps may coexist)."""
        self.gateway.register_app(credentials.app_id, credentials.public_key())

    @property
    def port(self) -> int:
        """The port it listens on (0 before ``start()``)."""
        return int(self._runner.addresses[0][1]) if self._runner is not None else 0

    @property
    def config(self) -> EmulatorConfig:
        """The settings in force (faults as last set with ``set_faults``)."""
        return self.gateway.config

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
        self.gateway.clock.start()  # unix stamps = clock readings + the offset taken now
        # A stopping emulator waits at most a second for replies still on the wire (a slow-reply
        # fault, a client killed mid-request): a test or a Ctrl-C never waits a minute for them.
        # A client that leaves does not cancel its handler (aiohttp's default, spelled out): a
        # submit that arrived is carried out, as at a real gateway, and the handler's reading
        # of a body that will never come is answered quietly (Gateway._peer_gone).
        runner = web.AppRunner(
            self.gateway.build_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
            handler_cancellation=False,
        )
        await runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(runner, self._sock)
        else:
            site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, port = runner.addresses[0][:2]
        bound_host = self._host if self._sock is None else bound_host
        self.base_url = _base_url(bound_host, port)

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


# --- the command line -----------------------------------------------------------------------------
class _StartError(Exception):
    """The emulator cannot start as asked; the message is one line that says what to do."""


def _port(text: str) -> int:
    """A TCP port number from the command line (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port from 0 to 65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's command-line options (shared by both entry points).

    Every EmulatorConfig and FaultConfig field has a flag named after it (``--time-scale``,
    ``--burst-429``, ``--endpoints``...): the dataclasses are the one source of the settings.
    """
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument(
        "--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)"
    )
    parser.add_argument(
        "--print-env",
        action="store_true",
        help="print export WUJIE_APP_ID=... WUJIE_PRIVATE_KEY=... WUJIE_BASE_URL=... lines "
        "for the served app (other lines are # comments), then keep serving in the "
        "foreground; to eval them in this shell, use --background",
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="detach once listening, print the --print-env lines plus WUJIE_EMULATOR_PID and "
        'exit: eval "$(wujie-async emulator --background)" leaves it running; '
        'stop it with kill "$WUJIE_EMULATOR_PID"',
    )
    parser.add_argument(
        "--credentials-out",
        type=Path,
        help="write {app_id, private_key, base_url} as JSON to this file, mode 0600 (a file "
        "already there is replaced; a symlink is refused)",
    )
    parser.add_argument("--child-fds", help=argparse.SUPPRESS)  # --background's own child
    add_config_arguments(parser)


def _key_base64(credentials: Credentials) -> str:
    """The private key as one line (base64 PKCS#8 DER), easy to put in a variable."""
    key = credentials.private_key
    if "-----BEGIN" not in key:
        return key
    return "".join(line.strip() for line in key.splitlines() if not line.startswith("-----"))


def _base_url(bound_host: str, port: int) -> str:
    """The base URL a client on this machine reaches the emulator at. Bound to every address
    (``0.0.0.0``, ``::``), that is loopback: "0.0.0.0" is no address to connect to, and image
    URLs built from it would be refused as unspecified (another machine uses this one's own
    address, with ``--allow-http``)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound_host, bound_host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{_contract.BASE_PATH}"


def _env_lines(credentials: Credentials, base_url: str, pid: int | None = None) -> list[str]:
    values = {
        "WUJIE_APP_ID": credentials.app_id,
        "WUJIE_PRIVATE_KEY": _key_base64(credentials),
        "WUJIE_BASE_URL": base_url,
    }
    if pid is not None:
        values["WUJIE_EMULATOR_PID"] = str(pid)
    return [f"export {name}={shlex.quote(value)}" for name, value in values.items()]


def write_credentials(path: Path, emulator: Emulator) -> None:
    """Write the app's credentials as JSON to a NEW file readable by the owner only.

    The file is written under a temporary name in the same folder, synced, then renamed over
    ``path``: an existing file is replaced (never rewritten in place, so its old mode does not
    survive), and a symlink at ``path`` is refused, never followed.

    Raises:
        OSError: the file cannot be written (the message names it).
    """
    _write_credentials(path, emulator.credentials, emulator.base_url)


def _write_credentials(path: Path, credentials: Credentials, base_url: str) -> None:
    data = {
        "app_id": credentials.app_id,
        "private_key": credentials.private_key,
        "base_url": base_url,
    }
    if path.is_symlink():
        raise _StartError(f"--credentials-out {path} is a symlink; refusing to write through it")
    if path.exists() and not path.is_file():
        raise _StartError(f"--credentials-out {path} exists and is not a regular file")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # mkstemp creates with O_EXCL (never through a link) and mode 0600.
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _StartError(f"cannot write --credentials-out {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(temp)
        if isinstance(exc, OSError):
            raise _StartError(f"cannot write --credentials-out {path}: {exc.strerror}") from None
        raise


def _bind_error(host: str, port: int, exc: OSError) -> _StartError:
    if exc.errno == errno.EADDRINUSE:
        return _StartError(
            f"port {port} on {host} is already in use: stop what runs there, or pick another "
            "with --port (--port 0 takes a free one)"
        )
    return _StartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise _bind_error(host, port, exc) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise _bind_error(host, port, exc) from None
    return sock


def _banner(base_url: str, port: int, config: EmulatorConfig) -> str:
    return (
        f"wujie-async emulator serving {base_url} (port {port}, time scale {config.time_scale}"
        f"{'' if config.faults == FaultConfig() else ', faults on'})"
    )


def _detach(args: argparse.Namespace, config: EmulatorConfig) -> None:
    """``--background``: bind here, hand the socket to a new session's process, print, return.

    The socket is listening before this returns, so a client started right after connects at
    once (the child accepts as soon as it is up). The key travels through a pipe, not argv.
    """
    sock = _listening_socket(args.host, args.port)
    credentials = _generated_credentials(DEFAULT_APP_ID)
    port = sock.getsockname()[1]
    base_url = _base_url(args.host, port)
    if args.credentials_out:
        _write_credentials(args.credentials_out, credentials, base_url)
    read_end, write_end = os.pipe()
    try:
        handoff = {
            "app_id": credentials.app_id,
            "private_key": credentials.private_key,
            "config": config_to_json(config),
        }
        with os.fdopen(write_end, "w", encoding="utf-8") as pipe:
            json.dump(handoff, pipe)  # a few KB: fits the pipe's buffer
        sock.set_inheritable(True)
        os.set_inheritable(read_end, True)
        argv = [
            sys.executable, "-m", "wujie_async.emulator",
            "--child-fds", f"{sock.fileno()},{read_end}",
        ]  # fmt: skip
        quiet = [
            (os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)
        ]  # nothing holds the caller's pipes open (so `$(...)` returns)
        pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=quiet, setsid=True)
    finally:
        os.close(read_end)
        sock.close()
    print(  # noqa: T201
        f"# {_banner(base_url, port, config)}, detached as pid {pid}; "
        f'stop it with: kill "$WUJIE_EMULATOR_PID"'
    )
    print("\n".join(_env_lines(credentials, base_url, pid)), flush=True)  # noqa: T201


def _from_parent(fds: str) -> Emulator:
    """The emulator ``--background`` handed over: its socket, its app and its settings."""
    listen_fd, pipe_fd = (int(fd) for fd in fds.split(","))
    with os.fdopen(pipe_fd, encoding="utf-8") as pipe:
        handoff = json.load(pipe)
    return Emulator(
        emulator_config_from_json(handoff["config"]),
        credentials=Credentials(app_id=handoff["app_id"], private_key=handoff["private_key"]),
        sock=socket.socket(fileno=listen_fd),
    )


async def serve(args: argparse.Namespace) -> None:
    """Run the emulator the flags describe until SIGINT/SIGTERM.

    It prints its URL, port and time scale at start. A problem starting it (a port in use, a
    credentials file it may not write) is one line on stderr and ``SystemExit(2)``.
    """
    try:
        if args.child_fds:
            emulator = _from_parent(args.child_fds)
            config = emulator.gateway.config
        else:
            config = config_from_args(args)
            if args.background:
                _detach(args, config)
                return
            emulator = Emulator(config, host=args.host, port=args.port)
        try:
            await emulator.start()
        except OSError as exc:
            raise _bind_error(args.host, args.port, exc) from None
        try:
            await _serve_started(args, emulator, config)
        finally:
            await emulator.stop()
    except _StartError as exc:
        print(f"wujie-async emulator: {exc}", file=sys.stderr, flush=True)  # noqa: T201
        raise SystemExit(2) from None


async def _serve_started(
    args: argparse.Namespace, emulator: Emulator, config: EmulatorConfig
) -> None:
    if args.credentials_out:
        write_credentials(args.credentials_out, emulator)
    banner = f"{_banner(emulator.base_url, emulator.port, config)}; Ctrl-C stops it"
    if args.print_env:
        lines = [f"# {banner}", *_env_lines(emulator.credentials, emulator.base_url)]
    else:
        lines = [banner]
        if args.credentials_out:
            lines.append(f"credentials (mode 0600): {args.credentials_out}")
    print("\n".join(lines), flush=True)  # noqa: T201
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(args: argparse.Namespace) -> int:
    """Serve as the parsed flags ask; the exit code (0, or 2 when it could not start)."""
    try:
        asyncio.run(serve(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m wujie_async.emulator``."""
    parser = argparse.ArgumentParser(
        prog="python -m wujie_async.emulator", description="Run the Wujie gateway emulator."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
