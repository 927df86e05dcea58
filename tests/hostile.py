"""A deliberately broken gateway for the cases the emulator is too well-behaved to produce."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import inspect
import json
import struct
import urllib.parse
import zlib
from collections import Counter
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
BOMB_INFLATED = 1024 * 1024 * 1024  # what the gzip bomb inflates to: 1 GiB of zeros
ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\x1b[0m"  # set a title, clear, colour

REPLIES: dict[str, tuple[int, bytes, str]] = {
    "nested": (200, b"[" * 200_000 + b"]" * 200_000, "application/json"),
    # 3.3 MB that json.loads would turn into 1.1 million dicts (about 80 MB).
    "many-objects": (
        200,
        b'{"code":"200","message":"success","data":{"list":[{"key":"K","status":1,"images":['
        + b",".join([b"{}"] * 1_100_000)
        + b"]}]}}",
        "application/json",
    ),
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
    # nginx's own page for a body over client_max_body_size (1 MB by default)
    "too-large-413": (
        413,
        b"<html><head><title>413 Request Entity Too Large</title></head></html>",
        "text/html",
    ),
    "bad-request-json": (400, b'{"message":"Bad Request"}', "application/json"),
    "proxy-auth-407": (407, b"<html>Proxy Authentication Required</html>", "text/html"),
    "balance-429": (
        429,
        b'{"code":"20110010","message":"insufficient points","data":null}',
        "application/json",
    ),
    "unauthorized": (401, b'{"code":"401","message":"bad sign","data":null}', "application/json"),
    "forbidden": (403, b'{"code":"403","message":"forbidden","data":null}', "application/json"),
    "not-found-html": (404, b"<html><body>404 Not Found</body></html>", "text/html"),
    "not-found-json": (
        404,
        b'{"timestamp":"2024-01-01","status":404,"error":"Not Found","path":"/x"}',
        "application/json",
    ),
    "not-allowed": (405, b"Method Not Allowed", "text/plain"),
    "server-error": (503, b'{"code":"503","message":"busy","data":null}', "application/json"),
    "html-200": (200, b"<html>maintenance</html>", "text/html"),
    "escapes-business": (
        200,
        (
            b'{"code":"20010001","message":"bad \\u001b]0;PWNED\\u0007\\u001b[2J'
            b'\\u001b[31mred\\u001b[0m size","data":null}'
        ),
        "application/json",
    ),
    "escapes-5xx": (500, f"<html>{ESCAPES}oops</html>".encode(), "text/html"),
    "markup-business": (
        200,
        (
            b'{"code":"20010001","message":"bad <script>alert(1)</script><b>red</b>'
            b'<img src=x onerror=alert(2)> size","data":null}'
        ),
        "application/json",
    ),
}


@functools.cache
def gzip_bomb() -> bytes:
    """About 1 MiB of gzip that inflates to ``BOMB_INFLATED`` zero bytes.

    Built from one full-flushed deflate block repeated (a full flush resets the compressor, so
    every block of zeros compresses to the same bytes): 0.3 s instead of compressing 1 GiB.
    """
    block_size = 1024 * 1024
    zeros = bytes(block_size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(BOMB_INFLATED // block_size):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, BOMB_INFLATED & 0xFFFFFFFF)
    return header + block * (BOMB_INFLATED // block_size) + deflate.flush() + trailer


async def _reply(request: web.Request) -> web.StreamResponse:
    mode = request.match_info["mode"]
    request.app[HITS][mode] += 1
    request.app[AUTHORIZATIONS].append(request.headers.get("Authorization", ""))
    if mode == "redirect-self":  # a 307 loop: a client that follows it POSTs again and again
        raise web.HTTPTemporaryRedirect(location=str(request.url))
    if mode == "redirect-away":
        location = "http://user:hunter2@169.254.169.254/latest/meta-data"
        return web.Response(status=302, headers={"Location": location})
    if mode.startswith("echo-"):  # a gateway or proxy that quotes the request's headers
        header = request.headers.get("Authorization", "")
        if mode == "echo-200-data":  # a "success" whose data is the header (no key)
            return web.json_response({"code": "200", "message": "success", "data": {"Key": header}})
        if mode == "echo-200-reused":  # one key for every submit, the header beside it
            reused = {"key": "KAAAA1", "Echo": header}
            return web.json_response({"code": "200", "message": "success", "data": reused})
        if mode == "echo-200-key":  # a "success" whose key quotes the signature
            sign = json.loads(header)["sign"] if header else ""
            return web.json_response({"code": "200", "message": "ok", "data": {"key": "x " + sign}})
        if mode == "echo-entities":  # HTML-escaped as OWASP ESAPI's encodeForHTML writes it
            header = "".join(
                c if c.isalnum() or c in ",.-_ " else f"&#x{ord(c):x};" for c in header
            )
        elif mode == "echo-wrapped":  # a header dump wrapped at 64 columns
            header = "\n".join(header[start : start + 64] for start in range(0, len(header), 64))
        elif mode == "echo-percent":  # URL-encoded
            header = urllib.parse.quote(header, safe="")
        elif mode == "echo-hex":  # the signature it checked, as hex digits (upper case)
            sign = json.loads(header)["sign"] if header else ""
            header = base64.b64decode(sign).hex().upper()
        said = f"bad request; headers: Authorization: {header}"
        if mode == "echo-html-502":
            return web.Response(status=502, text=f"<h1>Bad gateway</h1><pre>{said}</pre>")
        status = 401 if mode == "echo-401" else 200
        if mode == "echo-object":  # the message an object: the request's headers, as JSON
            dump = {"error": "bad request", "headers": {"Authorization": header}}
            return web.json_response({"code": "20010001", "message": dump, "data": None})
        return web.json_response({"code": "20010001", "message": said, "data": None}, status=status)
    if mode == "gzipped":  # an nginx with gzip on: a whole, ordinary reply, compressed
        data: dict[str, Any] = (
            {"key": "K0001"} if request.path.endswith("generations") else {"list": []}
        )
        raw = json.dumps({"code": "200", "message": "success", "data": data}).encode()
        return web.Response(
            body=gzip.compress(raw),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    if mode == "gzip-plain":  # a proxy that labels a body gzip but sends it as it is
        data = {"key": "K0001"} if request.path.endswith("generations") else {"list": []}
        raw = json.dumps({"code": "200", "message": "success", "data": data}).encode()
        return web.Response(
            body=b"\n " + raw,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    if mode.startswith("garbled-"):  # garbled-{coding}-{status}: a body that does not decode
        _, coding, code = mode.split("-")
        return web.Response(
            status=int(code),
            body=b"<html><body>" + code.encode() + b"</body></html>",
            headers={"Content-Encoding": coding, "Content-Type": "text/html"},
        )
    if mode == "gzip-bomb":
        return web.Response(
            body=gzip_bomb(),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    if mode == "slow":
        await asyncio.sleep(0.5)  # past the tests' short request timeouts
        return web.Response(body=b'{"code":"200","message":"ok","data":{}}')
    if mode == "huge-declared":
        return web.Response(body=b"x" * HUGE, content_type="application/json")
    if mode == "huge-chunked":
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * 1024 * 1024
        try:
            for _ in range(HUGE // len(chunk)):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading at its cap, as it should
        return response
    status, body, content_type = REPLIES[mode]
    return web.Response(status=status, body=body, content_type=content_type)


@asynccontextmanager
async def _serve(
    app: web.Application, host: str = "127.0.0.1", *, keepalive_timeout: float | None = None
) -> AsyncIterator[str]:
    """Serve ``app`` on a free port of ``host`` (loopback by default); yields its origin.
    ``keepalive_timeout``: seconds an idle connection is kept before the server closes it
    (None: aiohttp's default)."""
    options: dict[str, Any] = {}
    if keepalive_timeout is not None:
        options["keepalive_timeout"] = keepalive_timeout
    runner = web.AppRunner(app, access_log=None, **options)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


serve = _serve  # for a test's own small server


HITS = web.AppKey("hits", Counter[str])
AUTHORIZATIONS = web.AppKey("authorizations", list[str])


@dataclass
class HostileGateway:
    """A running hostile gateway: its origin and what it has seen."""

    origin: str
    hits: Counter[str] = field(default_factory=Counter)  # requests per mode
    authorizations: list[str] = field(default_factory=list)  # Authorization headers received


@asynccontextmanager
async def recording_gateway() -> AsyncIterator[HostileGateway]:
    """Like :func:`hostile_gateway`, and says how often each mode was asked.

    ``{origin}/{mode}`` and ``{origin}/{mode}/any/path`` both answer as ``mode``, so a client can
    use ``{origin}/{mode}`` as its base URL.
    """
    app = web.Application()
    seen = HostileGateway(origin="")
    app[HITS] = seen.hits
    app[AUTHORIZATIONS] = seen.authorizations
    app.router.add_post("/{mode}", _reply)
    app.router.add_post("/{mode}/{tail:.*}", _reply)
    async with _serve(app) as origin:
        seen.origin = origin
        yield seen


@asynccontextmanager
async def hostile_gateway() -> AsyncIterator[str]:
    """Yields a base URL; ``{base}/{mode}`` answers with the broken reply named ``mode``."""
    async with recording_gateway() as gateway:
        yield gateway.origin


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


def images_at(*urls: str) -> Callable[[list[str]], list[dict[str, Any]]]:
    """A batch script: every job has succeeded, with images at ``urls``."""

    def script(keys: list[str]) -> list[dict[str, Any]]:
        images = [{"url": url} for url in urls]
        return [{"key": key, "status": 4, "images": images} for key in keys]

    return script


def all_running(keys: list[str]) -> list[dict[str, Any]]:
    """A batch script: every job is generating."""
    return [{"key": key, "status": 1} for key in keys]


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
async def scripted_gateway(
    script: BatchScript,
    host: str = "127.0.0.1",
    *,
    submit_data: Callable[[str], Any] | None = None,
) -> AsyncIterator[ScriptedGateway]:
    """A gateway that accepts every submit (keys ``K00000``, ``K00001``, ...) and answers each
    batch call with ``{"code":"200","data":{"list": script(keys)}}`` (or with what ``script``
    returns, when that is a ``web.Response``); ``script`` may be async.
    ``submit_data(key)``: the ``data`` of a submit's reply, for the job of ``key`` (by default
    ``{"key": key}``). It listens on ``host`` (loopback by default).
    """
    app = web.Application(client_max_size=1024 * 1024)
    gateway = ScriptedGateway(base_url="")

    async def submit(request: web.Request) -> web.Response:
        key = f"K{gateway.submits:05d}"
        gateway.submits += 1
        data = {"key": key} if submit_data is None else submit_data(key)
        return web.json_response({"code": "200", "message": "success", "data": data})

    async def info(request: web.Request) -> web.Response:
        keys = await request.json()
        gateway.asked.append(keys)
        listed = script(keys)
        if inspect.isawaitable(listed):
            listed = await listed
        if isinstance(listed, web.Response):
            return listed  # a whole reply of the script's own
        raw = listed if isinstance(listed, bytes) else json.dumps(listed).encode()
        body = b'{"code":"200","message":"success","data":{"list":' + raw + b"}}"
        return web.Response(body=body, content_type="application/json")

    app.router.add_post(GENERATIONS, submit)
    app.router.add_post(INFO, info)
    async with _serve(app, host) as origin:
        gateway.base_url = origin
        try:
            yield gateway
        finally:
            gateway.released.set()  # let held replies go, so shutdown does not wait on them


@dataclass
class ImageServer:
    """A running image server (see :func:`image_server`): its origins and what it saw."""

    origin: str
    other_origin: str | None = None  # on the second address, when one was asked for
    hits: Counter[str] = field(default_factory=Counter)  # requests per first path segment
    released: asyncio.Event = field(default_factory=asyncio.Event)  # ends held replies

    def url(self, path: str) -> str:
        return f"{self.origin}/{path}"


TRICKLE_GAP_S = 0.02  # a byte every 20 ms: 50 bytes/s


@asynccontextmanager
async def image_server(also_on: str | None = None) -> AsyncIterator[ImageServer]:
    """An image server on 127.0.0.1 (and on ``also_on`` too, if given) whose paths say what
    it does; every request is counted under its first path segment:

    * ``png``: a small PNG;
    * ``trickle``: a 64 KiB PNG's headers at once, then its body a byte every 20 ms;
    * ``silent``: no reply at all (until the server stops);
    * ``cut``: the headers and half the body, then the connection closes;
    * ``to?url=URL``: a 302 to URL;
    * ``gone``: a 404, as a signed URL that expired answers;
    * ``varying``: once ``released`` is set, a PNG that differs at each request (a CDN that
      re-encodes);
    * anything else (``admin/reset``, say): a PNG, so a fetch that should not happen shows.
    """
    from wujie_async.emulator._png import render_png

    png = render_png("K", 0, 8, 8)
    big = png + b"\0" * (64 * 1024)
    server = ImageServer(origin="")

    async def handle(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["path"].split("/", 1)[0]
        server.hits[kind] += 1
        if kind == "to":
            raise web.HTTPFound(request.query["url"])
        if kind == "gone":
            return web.Response(status=404, text="expired")
        if kind == "silent":
            await server.released.wait()
            return web.Response(status=503)
        if kind == "varying":
            await server.released.wait()
            body = render_png("K", server.hits[kind], 8, 8)
            return web.Response(body=body, content_type="image/png")
        if kind in ("trickle", "cut"):
            body = big if kind == "trickle" else png
            response = web.StreamResponse(
                headers={"Content-Length": str(len(body)), "Content-Type": "image/png"}
            )
            await response.prepare(request)
            if kind == "cut":
                await response.write(body[: len(body) // 2])
                request.transport.close()  # type: ignore[union-attr]
                return response
            try:
                for byte in body:
                    if server.released.is_set():
                        break
                    await response.write(bytes([byte]))
                    await asyncio.sleep(TRICKLE_GAP_S)
            except ConnectionError:
                pass  # the client gave up, as it should
            return response
        return web.Response(body=png, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{path:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    if also_on is not None:
        await web.TCPSite(runner, also_on, 0).start()
        server.other_origin = f"http://{also_on}:{runner.addresses[1][1]}"
    try:
        yield server
    finally:
        server.released.set()
        await runner.cleanup()
