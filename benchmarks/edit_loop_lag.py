"""How long a big inline edit holds the event loop: the worst gap of a 1 ms ticker while the
client checks, encodes and sends (or refuses) megabytes of base64 image.

    .venv/bin/python benchmarks/edit_loop_lag.py [--rounds 3]

Three cases, against a gateway in this process that drains each body a piece at a time and
parses nothing (so what holds the loop is the client's doing), with a journal: a valid 32 MB
gpt-image-1 edit sent (and journaled), the same refused for ``n=11`` (a cheap rule, before any
image is decoded), and a 100 MB string refused by its length. Prints one line per round: the
worst stall of each, in ms. A web app's other requests, event streams and polls wait that long.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import struct
import tempfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wujie_async import Credentials, InvalidRequestError, WujieClient


def padded_png(extra: int) -> bytes:
    """A whole 4x4 PNG carrying ``extra`` random bytes of metadata (nothing compresses)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tEXt", b"c\0" + os.urandom(extra))
        + chunk(b"IDAT", zlib.compress(bytes(4 * 13)))
        + chunk(b"IEND", b"")
    )


@asynccontextmanager
async def draining_gateway() -> AsyncIterator[str]:
    async def edits(request: web.Request) -> web.Response:
        while await request.content.readany():
            pass
        key = uuid.uuid4().hex.upper()  # a new job each time (a journal refuses a key twice)
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    async def info(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"code": "200", "message": "success", "data": {"list": []}})

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/ai/wj/images/edits", edits)
    app.router.add_post("/ai/wj/images/info", info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def worst_stall(step: Callable[[], Awaitable[None]]) -> float:
    """The longest the loop went without running a 1 ms ticker while ``step()`` ran."""
    worst, last = 0.0, time.perf_counter()

    async def tick() -> None:
        nonlocal worst, last
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.002)
    last = time.perf_counter()
    try:
        await step()
    finally:
        worst = max(worst, time.perf_counter() - last)
        ticker.cancel()
        with suppress(asyncio.CancelledError):
            await ticker
    return worst


async def main(rounds: int) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    image = base64.b64encode(padded_png(24_000_000)).decode()  # 32 MB of base64
    huge = "A" * 100_000_000
    async with draining_gateway() as base_url:
        folder = tempfile.mkdtemp()
        journal = os.path.join(folder, "jobs.sqlite")  # a journal's record of it counts too
        async with WujieClient(
            Credentials("bench", pem), base_url=base_url, journal=journal
        ) as client:

            async def sent() -> None:
                job = await client.images.submit_edit(
                    prompt="a hat", model="gpt-image-1", image=[image]
                )
                job.cancel()

            async def refused(**extra: object) -> None:
                with suppress(InvalidRequestError):
                    await client.images.submit_edit(prompt="a hat", model="gpt-image-1", **extra)  # type: ignore[arg-type]

            for _ in range(rounds):
                stalls = [
                    await worst_stall(sent),
                    await worst_stall(lambda: refused(image=[image], n=11)),
                    await worst_stall(lambda: refused(image=[huge])),
                ]
                sent_ms, n_ms, length_ms = (stall * 1000 for stall in stalls)
                print(
                    f"worst stall: sent {sent_ms:.1f} ms, refused for n {n_ms:.1f} ms, "
                    f"refused by length {length_ms:.1f} ms"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args().rounds))
