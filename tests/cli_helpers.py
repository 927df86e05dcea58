"""Running ``wujie-async`` and a standalone emulator as real processes, as a user would."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import itertools
import json
import logging
import os
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from wujie_async.cli._disk_reserve import RESERVE_NAME

from .helpers import stop_process

CLEAN_ENV = {name: value for name, value in os.environ.items() if not name.startswith("WUJIE_")} | {
    "PYTHONUNBUFFERED": "1"
}
FAST = ("--emulator-time-scale", "0.01")


# The CLI runs in processes forked from one server per pytest worker that imported it already
# (tests/cli_zygote.py): real processes, without half a second of imports each. Set this to run
# each one with `python -m wujie_async` instead.
REAL_PROCESSES = bool(os.environ.get("WUJIE_TEST_REAL_PROCESSES")) or not (
    sys.platform == "linux" and hasattr(os, "fork")
)
ZYGOTE_START_S = 60.0  # its imports, on a loaded machine
FORK_REPLY_S = 20.0  # a fork and a reply: well under a second, unless the machine is swamped
STOP_GRACE_S = 5.0


class _Zygote:
    """This worker's fork server: a subprocess it talks to over a Unix socket."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="wujie-zygote-"))
        self.socket_path = str(self.folder / "zygote.sock")
        self.calls = itertools.count()
        # -P: the tests folder must not shadow an installed module in the server's imports.
        # Its stdin is a pipe held by this worker only: when the worker ends, the server sees
        # EOF and ends too, killing what it forked.
        script = Path(__file__).with_name("cli_zygote.py")
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(script), self.socket_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=CLEAN_ENV,
        )  # fmt: skip
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            ready = selector.select(ZYGOTE_START_S)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the CLI fork server did not start: {line!r}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Close its stdin (it kills its children and exits), then wait, bounded."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_GRACE_S)
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    async def spawn(
        self, args: Sequence[str], env: dict[str, str], stdin: bytes | None = None
    ) -> ForkedCli:
        """Start ``python -m wujie_async ARGS`` as a child of the server."""
        files = self.folder / f"call-{next(self.calls)}"
        files.mkdir()
        (files / "stdin").write_bytes(stdin or b"")
        for name in ("stdout", "stderr"):  # there before the child runs: readers may poll them
            (files / name).touch(mode=0o600)
        request = {
            "argv": list(args),
            "env": env,
            "cwd": os.getcwd(),
            "stdin": str(files / "stdin"),
            "stdout": str(files / "stdout"),
            "stderr": str(files / "stderr"),
        }
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.socket_path), STOP_GRACE_S
        )
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            reply = json.loads(await asyncio.wait_for(reader.readline(), FORK_REPLY_S) or b"{}")
        except BaseException:
            writer.close()
            raise
        if "pid" not in reply:
            writer.close()
            raise RuntimeError(f"the CLI fork server refused a request: {reply!r}")
        return ForkedCli(int(reply["pid"]), reader, writer, files)


class ForkedCli:
    """A ``wujie-async`` process forked by the server; its output goes to files."""

    def __init__(
        self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, files: Path
    ) -> None:
        self.pid = pid
        self._writer = writer
        self._files = files
        # The server writes the exit status when the child ends: read it as it comes, so
        # ``returncode`` says at any time whether the child still runs.
        self._status = asyncio.ensure_future(self._read_status(reader))

    @staticmethod
    async def _read_status(reader: asyncio.StreamReader) -> int:
        line = await reader.readline()
        # No line: the server went away, and it kills its children when it does.
        return int(json.loads(line)["status"]) if line else -signal.SIGKILL

    @property
    def returncode(self) -> int | None:
        """Its exit status once it ended (negative: the signal that ended it), else None."""
        return self._status.result() if self._status.done() else None

    async def wait(self) -> int:
        """Wait until it ends; its exit status."""
        return await asyncio.shield(self._status)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    def stdout(self) -> bytes:
        return (self._files / "stdout").read_bytes()

    def stderr(self) -> bytes:
        return (self._files / "stderr").read_bytes()

    async def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait (bounded) until it ends; (exit code, stdout, stderr). Killed on timeout."""
        try:
            code = await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            self.kill()
            raise
        return code, self.stdout().decode(), self.stderr().decode()

    async def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
        """End it within bounded time: ``sig``, then SIGKILL after ``grace``; forget its files."""
        try:
            self.send_signal(sig)
            try:
                await asyncio.wait_for(self.wait(), grace)
            except TimeoutError:
                self.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wait(), grace)
        finally:
            self.close()

    def close(self) -> None:
        """Hang up (the server kills the child if it still runs) and remove its files."""
        self._status.cancel()
        self._writer.close()
        shutil.rmtree(self._files, ignore_errors=True)


class _SubprocessCli:
    """``python -m wujie_async`` as a plain subprocess (no fork server), same interface."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def send_signal(self, sig: int) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def finish(self, timeout: float) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self._proc.communicate(), timeout)
        assert self._proc.returncode is not None
        return self._proc.returncode, out.decode(), err.decode()

    async def stop(self) -> None:
        await stop_process(self._proc, sig=signal.SIGKILL)


RunningCli = ForkedCli | _SubprocessCli


@asynccontextmanager
async def running_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> AsyncIterator[RunningCli]:
    """``python -m wujie_async ARGS`` started; killed (if it still runs) when the block ends.

    For tests that signal the process or watch it while it runs; ``finish(timeout)`` waits for
    its end and gives (exit code, stdout, stderr).
    """
    server = _zygote_server()
    if server is None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wujie_async", *args, env=env or CLEAN_ENV,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        running = _SubprocessCli(proc)
        try:
            yield running
        finally:
            await running.stop()
        return
    child = await server.spawn(args, env or CLEAN_ENV, stdin)
    try:
        yield child
    finally:
        child.kill()
        child.close()


_zygote: _Zygote | None = None


def _zygote_server() -> _Zygote | None:
    """This worker's fork server, started on first use (None: run real subprocesses)."""
    global _zygote
    if REAL_PROCESSES:
        return None
    if _zygote is None or not _zygote.alive():
        if _zygote is not None:
            _zygote.stop()
        _zygote = _Zygote()
        atexit.register(_zygote.stop)
    return _zygote


def stop_zygote() -> None:
    """Stop this worker's fork server, if it runs."""
    global _zygote
    if _zygote is not None:
        _zygote.stop()
        _zygote = None


@pytest.fixture(scope="session", autouse=True)
def cli_zygote() -> Iterator[None]:
    """Stops the worker's fork server at the end of the session (import it in a test module).

    Before tests/run_guard.py looks for processes left running: the server is not one.
    """
    yield
    stop_zygote()


# Most CLI tests run `wujie_async.cli.main(argv)` in this process (on a worker thread, with its
# own environment, stdin, stdout and stderr), which is what `wujie-async` runs; the tests that
# need a process of its own (signals, exit through sys.exit, a pid) use `running_cli`. Set
# WUJIE_TEST_CLI_PROCESSES=1 to run every one as a process.
IN_PROCESS = not os.environ.get("WUJIE_TEST_CLI_PROCESSES")
_one_at_a_time = threading.Lock()  # the process's stdio and environment are swapped for a run


async def cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 50,
    stdin: bytes | None = None,
    process: bool = False,
) -> tuple[int, str, str]:
    """Run ``wujie-async ARGS``; (exit code, stdout, stderr). In this process unless
    ``process`` (or WUJIE_TEST_CLI_PROCESSES) says to run it as a process of its own."""
    if process or not IN_PROCESS:
        async with running_cli(*args, env=env, stdin=stdin) as running:
            return await running.finish(timeout)
    with anyio.fail_after(timeout):
        return await anyio.to_thread.run_sync(
            _main_in_process, list(args), env or CLEAN_ENV, stdin, abandon_on_cancel=True
        )


def _main_in_process(
    argv: list[str], env: dict[str, str], stdin: bytes | None
) -> tuple[int, str, str]:
    """``main(argv)`` as a run of the command would see it; everything swapped is restored."""
    from wujie_async.cli import main

    loggers = [logging.getLogger(), logging.getLogger("wujie_async")]
    with _one_at_a_time:
        saved_env = dict(os.environ)
        saved = (sys.stdin, sys.stdout, sys.stderr, sys.argv)
        saved_logging = [(log, list(log.handlers), log.level) for log in loggers]
        out, err = io.StringIO(), io.StringIO()
        try:
            os.environ.clear()
            os.environ.update(env)
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")
            sys.stdout, sys.stderr = out, err
            sys.argv = ["wujie-async", *argv]
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's usage errors, --help, --version
                code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdin, sys.stdout, sys.stderr, sys.argv = saved
            os.environ.clear()
            os.environ.update(saved_env)
            for log, handlers, level in saved_logging:
                log.handlers[:] = handlers
                log.setLevel(level)
    return code, out.getvalue(), err.getvalue()


@dataclass
class Served:
    """A standalone emulator process and the environment that points at it."""

    env: dict[str, str]
    base_url: str

    async def stats(self) -> dict[str, Any]:
        origin = self.base_url.removesuffix("/wj-open/v1")
        async with aiohttp.ClientSession() as http, http.get(f"{origin}/_emulator/stats") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def set_faults(self, **faults: Any) -> None:
        """Replace the emulator's faults (every field left out goes back to its default)."""
        origin = self.base_url.removesuffix("/wj-open/v1")
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{origin}/_emulator/faults", json=faults) as reply,
        ):
            assert reply.status == 200, await reply.text()


@asynccontextmanager
async def served_emulator(tmp_path: Path, *flags: str) -> AsyncIterator[Served]:
    """``wujie-async emulator --port 0`` with ``flags``; yields its environment."""
    creds_file = tmp_path / "creds.json"
    args = (
        "emulator", "--port", "0", "--credentials-out", str(creds_file), "--time-scale", "0.01",
        *flags,
    )  # fmt: skip
    server = _zygote_server()
    if server is None:
        async with _served_subprocess(creds_file, args) as served:
            yield served
        return
    child = await server.spawn(args, CLEAN_ENV)
    try:
        await _first_line(child, 20)
        yield _served(creds_file)
    finally:
        await child.stop()


async def _first_line(child: ForkedCli, timeout: float) -> None:
    """Wait until the child printed its first line (it listens then), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while b"\n" not in child.stdout():
        if child.returncode is not None or loop.time() > deadline:
            raise RuntimeError(f"the emulator did not start: {child.stderr()!r}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.wait(), 0.01)


def _served(creds_file: Path) -> Served:
    creds = json.loads(creds_file.read_text())
    env = CLEAN_ENV | {
        "WUJIE_APP_ID": creds["app_id"],
        "WUJIE_PRIVATE_KEY": creds["private_key"],
        "WUJIE_BASE_URL": creds["base_url"],
    }
    return Served(env, creds["base_url"])


@asynccontextmanager
async def _served_subprocess(creds_file: Path, args: Sequence[str]) -> AsyncIterator[Served]:
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async", *args, stdout=asyncio.subprocess.PIPE, env=CLEAN_ENV
    )
    try:
        assert server.stdout is not None
        await asyncio.wait_for(server.stdout.readline(), 20)
        yield _served(creds_file)
    finally:
        await stop_process(server)


def proc_alive(proc: RunningCli) -> Callable[[], bool]:
    """For ``eventually(..., alive=...)``: True while ``proc`` runs."""
    return lambda: proc.returncode is None


def manifest(out: Path) -> list[dict[str, Any]]:
    """Every record of OUT/manifest.jsonl."""
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def manifest_so_far(out: Path) -> list[dict[str, Any]]:
    """The complete records of OUT/manifest.jsonl while a run writes it: its last line may be
    a row being written, or one a full disk cut short that the run has yet to take out."""
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].split("\n") if line]


def journal_keys(journal: Path) -> set[str]:
    """The keys committed to a journal another process holds open (none while it cannot be
    read: the caller asks again)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT job_key FROM submits WHERE job_key IS NOT NULL").fetchall()
    except sqlite3.Error:
        return set()
    return {str(key) for (key,) in rows}


def reserve_size(out: Path) -> int:
    """The room a bulk run has set aside in OUT for its rows (bytes; 0: none, or given back)."""
    try:
        return (out / RESERVE_NAME).stat().st_size
    except FileNotFoundError:
        return 0


def keys_in_rows_after_a_refusal(
    emu: Served, out: Path, reserved: int
) -> Callable[[], Awaitable[bool]]:
    """For ``eventually``: the disk refused a row (the run gave back some of the ``reserved``
    bytes it set aside, so it stops sending), no submit is on the wire (each one the emulator
    received was accepted) and every accepted key is in a pending row (the refused one too).

    What a run without a journal killed outright needs for a re-run that pays for no line
    again; ``accepted > N`` stood for the refusal, and waited in vain when the row the disk
    refused was that of the N-th key, accepted just before the disk filled.
    """

    async def check() -> bool:
        stats = await emu.stats()
        accepted = int(stats["submits_accepted"])
        arrived = int(stats["requests"].get("generations", 0))
        keys = {r.get("key") for r in manifest_so_far(out) if r["status"] == "pending"}
        return reserve_size(out) < reserved and arrived == accepted == len(keys)

    return check


def final_outcomes(out: Path) -> dict[int, str]:
    """Each input line's last recorded status."""
    final: dict[int, str] = {}
    for record in manifest(out):
        final[int(record["line"])] = str(record["status"])
    return final


def rows_with_ids(tmp_path: Path, *ids: str) -> Path:
    """A JSONL input of dall-e-2 lines with these ids (prompts p0, p1, ...)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"id": row_id, "prompt": f"p{i}", "model": "dall-e-2"}) + "\n"
            for i, row_id in enumerate(ids)
        )
    )
    return rows
