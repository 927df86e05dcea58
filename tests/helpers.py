"""Test helpers: a minimal signing client written from API.md alone, and PNG checks.

It deliberately does not use wujie_async's transport or signer, so emulator tests do not lean
on the code they are meant to check.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import shutil
import struct
import subprocess
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import wujie_async

BASE_PATH = "/wj-open/v1"
GENERATIONS = "/ai/wj/images/generations"
EDITS = "/ai/wj/images/edits"
INFO = "/ai/wj/images/info"


def load_key(text: str) -> rsa.RSAPrivateKey:
    if "-----BEGIN" in text:
        key = serialization.load_pem_private_key(text.encode(), None)
    else:
        key = serialization.load_der_private_key(base64.b64decode(text), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def sign_header(app_id: str, private_key: str, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    original = json.dumps({"appId": app_id, "timestamp": ts}, separators=(",", ":"))
    signature = load_key(private_key).sign(original.encode(), padding.PKCS1v15(), hashes.SHA256())
    sign = base64.b64encode(signature).decode()
    return json.dumps(
        {"secretKeyVersion": "1", "appId": app_id, "sign": sign, "original": original},
        separators=(",", ":"),
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class SteppedClock:
    """An emulator's clock (``emulator(clock=...)``) that moves only when the test moves it:
    what a test sees of a job's timeline then depends on no host's speed."""

    def __init__(self) -> None:
        self.reading = time.monotonic()

    def __call__(self) -> float:
        return self.reading

    def advance(self, seconds: float) -> None:
        self.reading += seconds


async def raw_post(
    base_url: str,
    path: str,
    body: Any,
    *,
    header: str | None,
    raw_body: bytes | None = None,
) -> Reply:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Authorization"] = header
    data = raw_body if raw_body is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(base_url + path, data=data, headers=headers) as reply,
    ):
        return Reply(reply.status, dict(reply.headers), await reply.read())


async def raw_get(url: str) -> Reply:
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return Reply(reply.status, dict(reply.headers), await reply.read())


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG after checking its signature, IHDR and data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[29:33])[0]
    assert crc == zlib.crc32(data[12:29]) & 0xFFFFFFFF, "bad IHDR crc"
    idat_at = data.index(b"IDAT")
    idat_len = struct.unpack(">I", data[idat_at - 4 : idat_at])[0]
    raw = zlib.decompress(data[idat_at + 4 : idat_at + 4 + idat_len])
    assert len(raw) == height * (1 + 3 * width), "pixel data does not match IHDR"
    return width, height


def stray_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are still alive, the in-process emulator's aside."""
    current = asyncio.current_task()
    return {
        task
        for task in asyncio.all_tasks() - before
        if task is not current
        and not task.done()
        and not getattr(task.get_coro(), "__qualname__", "").startswith("RequestHandler")
    }


async def stop_process(
    proc: asyncio.subprocess.Process, *, sig: int = 15, grace: float = 5.0
) -> tuple[bytes, bytes]:
    """End a child process within bounded time: ``sig`` (SIGTERM), then SIGKILL after ``grace``.

    Its pipes are drained with a deadline too, so a grandchild holding them open (or a child
    slow to shut down) can never hang a test.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return await asyncio.wait_for(proc.communicate(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            return await asyncio.wait_for(proc.communicate(), grace)
        except TimeoutError:
            return b"", b""


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "the condition",
    alive: Callable[[], bool] | None = None,
) -> Any:
    """Wait until ``check()`` (a function or a coroutine function) returns something truthy,
    and return it; an AssertionError naming ``what`` after ``timeout`` seconds, or as soon as
    ``alive()`` says the process the wait depends on has ended.

    The one way the tests wait for something observable to happen (never to prove that
    something did not).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if alive is not None and not alive():
            raise AssertionError(f"the process ended before {what}")
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g} s")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def full_disk(folder: Path, *, size: str = "256k", fill: bool = True) -> Iterator[Path]:
    """A small tmpfs at ``folder``, filled up unless not ``fill`` (skips where mounting is not
    allowed)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        if fill:
            with (
                (folder / "filler").open("wb", buffering=0) as filler,
                contextlib.suppress(OSError),
            ):
                while True:
                    filler.write(bytes(4096))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def freezable_disk(folder: Path) -> Iterator[Path]:
    """An 8 MB ext4 file system in a file, loop-mounted at ``folder`` (skips where that is not
    allowed); thawed and unmounted at the end, whatever happened."""
    if shutil.which("fsfreeze") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs fsfreeze and mkfs.ext4 (util-linux, e2fsprogs)")
    image = folder.with_suffix(".img")
    folder.mkdir()
    with image.open("wb") as file:
        file.truncate(8 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 file system here: {made.stderr.decode().strip()}")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount a file system here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["fsfreeze", "-u", str(folder)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@contextlib.contextmanager
def freeze(folder: Path) -> Iterator[None]:
    """``folder``'s file system frozen (every write blocks, as on a hung NFS mount) within the
    block, thawed at its end."""
    subprocess.run(["fsfreeze", "-f", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["fsfreeze", "-u", str(folder)], check=False)


_PACKAGE_DIR = str(Path(wujie_async.__file__).resolve().parent) + "/"


def reported_locals(error: BaseException) -> list[str]:
    """``file:function:name`` followed by the repr of each local of the package's frames in
    ``error``'s traceback, as an error reporter records them
    (``TracebackException(capture_locals=True)``, which is what Sentry and the like do: it
    raises if a repr does)."""
    report = traceback.TracebackException.from_exception(error, capture_locals=True)
    return [
        f"{Path(frame.filename).name}:{frame.name}:{name} {shown}"
        for frame in report.stack
        if str(Path(frame.filename).resolve()).startswith(_PACKAGE_DIR)
        for name, shown in (frame.locals or {}).items()
    ]


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every error behind it (causes and contexts, however they branch), once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
