"""A deliberately broken gateway for the cases the emulator is too well-behaved to produce."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wujie_async import Credentials

from .helpers import GENERATIONS, INFO

HUGE = 20 * 1024 * 1024

REPLIES: dict[str, tuple[int, bytes, str]] = {
    "nested": (200, b"[" * 200_000 + b"]" * 200_000, "application/json"),
    "wrong-types": (
        200,
        b'{"code":"200","message":"ok","data":{"list":[{"key":5,"status":"done"},'
        b'{"key":"K","status":[1]},{"nokey":true}]}}',
        "application/json",
    ),
    "no-list": (200, b'{"code":"200","message":"ok","data":{"items":[]}}', "application/json"),
    "null-list": (200, b'{"code":"200","message":"ok","data":{"list":null}}', "application/json"),
    "bare-list": (
        200,
        b'{"code":"200","message":"ok","data":[{"key":"K","status":1,"extra":{"x":1}}]}',
        "application/json",
    ),
    "not-envelope": (200, b'{"status":"ok"}', "application/json"),
    "array": (200, b"[1,2,3]", "application/json"),
    "empty-key": (200, b'{"code":"200","message":"ok","data":{"key":"  "}}', "application/json"),
    "teapot": (418, b"short and stout", "text/plain"),
    "balance-429": (
        429,
        b'{"code":"20110010","message":"insufficient points","data":null}',
        "application/json",
    ),
}


async def _reply(request: web.Request) -> web.StreamResponse:
    mode = request.match_info["mode"]
    if mode == "huge-declared":
        return web.Response(body=b"x" * HUGE, content_type="application/json")
    if mode == "huge-chunked":
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * 1024 * 1024
        for _ in range(HUGE // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response
    status, body, content_type = REPLIES[mode]
    return web.Response(status=status, body=body, content_type=content_type)


@asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yields its origin."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def hostile_gateway() -> AsyncIterator[str]:
    """Yields a base URL; ``{base}/{mode}`` answers with the broken reply named ``mode``."""
    app = web.Application()
    app.router.add_post("/{mode}", _reply)
    async with _serve(app) as origin:
        yield origin


async def _file(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    if kind == "png":
        from wujie_async.emulator._png import render_png

        return web.Response(body=render_png("K", 0, 8, 8), content_type="image/png")
    if kind == "html":
        return web.Response(body=b"<html>not an image</html>", content_type="image/png")
    if kind == "huge":
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024))
    return web.Response(status=404)


@asynccontextmanager
async def file_server() -> AsyncIterator[str]:
    """Yields an origin; ``{origin}/files/{png|html|huge|missing}`` serve those bodies."""
    app = web.Application()
    app.router.add_get("/files/{kind}", _file)
    async with _serve(app) as origin:
        yield origin


@functools.cache
def throwaway_credentials() -> Credentials:
    """Credentials with a fresh RSA key: the scripted gateway checks no signature."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return Credentials("hostile-app", pem)


# What a test's script returns for the keys of one batch call: the ``list`` as Python objects
# (dumped with Python's json, so NaN and Infinity go out as written), or as raw JSON bytes.
BatchScript = Callable[[list[str]], Any]


@dataclass
class ScriptedGateway:
    """A gateway whose batch replies a test writes (see :func:`scripted_gateway`).

    Attributes:
        base_url: give this to ``WujieClient(base_url=...)``.
        asked: the keys of every batch call, in order.
        released: set when the gateway shuts down; a script holding a reply can wait on it.
    """

    base_url: str
    asked: list[list[str]] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    submits: int = 0


@asynccontextmanager
async def scripted_gateway(script: BatchScript) -> AsyncIterator[ScriptedGateway]:
    """A gateway that accepts every submit (keys ``K00000``, ``K00001``, ...) and answers each
    batch call with ``{"code":"200","data":{"list": script(keys)}}``; ``script`` may be async.
    """
    app = web.Application(client_max_size=1024 * 1024)
    gateway = ScriptedGateway(base_url="")

    async def submit(request: web.Request) -> web.Response:
        key = f"K{gateway.submits:05d}"
        gateway.submits += 1
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    async def info(request: web.Request) -> web.Response:
        keys = await request.json()
        gateway.asked.append(keys)
        listed = script(keys)
        if inspect.isawaitable(listed):
            listed = await listed
        raw = listed if isinstance(listed, bytes) else json.dumps(listed).encode()
        body = b'{"code":"200","message":"success","data":{"list":' + raw + b"}}"
        return web.Response(body=body, content_type="application/json")

    app.router.add_post(GENERATIONS, submit)
    app.router.add_post(INFO, info)
    async with _serve(app) as origin:
        gateway.base_url = origin
        try:
            yield gateway
        finally:
            gateway.released.set()  # let held replies go, so shutdown does not wait on them
