"""A second gateway written from API.md alone, on raw asyncio sockets, so that every byte of a
reply is the test's: compressed (gzip, zlib or raw deflate), chunked or not, written in pieces,
HTTP/1.0, ``Connection: close`` after each reply, a short keep-alive closed without a word,
slow replies, 429 with ``Retry-After``, 5xx bursts, a batch reply cut mid-body.

Jobs run on the wall clock: queued, then generating with images landing one by one, then done.
Images are served as URLs by the same server (or inline as ``b64_json``). Auth is checked as
API.md says: the Authorization header is JSON, its ``sign`` an RSA PKCS#1 v1.5 SHA-256
signature of ``original`` by the app's key, its timestamp recent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import itertools
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from wujie_async import Credentials

BASE = "/wj-open/v1"


def _png(seed: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes([(seed * 7 + y) % 256] * 12) for y in range(4))
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def credentials() -> tuple[Credentials, rsa.RSAPublicKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Credentials("outside2-app", base64.b64encode(der).decode()), key.public_key()


@dataclass
class Job:
    key: str
    n: int
    born: float
    images: list[bytes]
    inline: bool


@dataclass
class Gateway2:
    public_key: rsa.RSAPublicKey
    app_id: str
    port: int = 0
    # How replies go out.
    encoding: str = ""  # "", "gzip", "zlib" (Content-Encoding: deflate), "rawdeflate"
    chunked: bool = False
    pieces: int = 0  # write the body in pieces of this many bytes (0: at once)
    piece_pause: float = 0.0
    close_each: bool = False  # Connection: close after each reply
    silent_close: bool = False  # close after each reply without saying so
    keep_alive: float | None = None  # close an idle connection after this long, silently
    http10: bool = False
    no_length: bool = False  # HTTP/1.0 without Content-Length: the body ends at the close
    delay: float = 0.0  # before each batch reply
    submit_delay: float = 0.0
    # Job shapes.
    queued_for: float = 0.1
    per_image: float = 0.15
    estimate: str = "int"  # int, float, str, missing
    progress_fields: bool = True
    repeat_entries: bool = False
    stray_entries: bool = False
    inline: bool = False
    # Faults.
    submit_429_every: int = 0
    # The 429 as a proxy words it: plain text, labelled with `encoding` but not compressed.
    refusal_text_mislabelled: bool = False
    poll_5xx_burst: int = 0  # the first N batch calls get a 503
    poll_429_burst: int = 0  # the first N batch calls get a 429, Retry-After: 1
    poll_cut_every: int = 0  # every Nth batch reply is cut mid-body
    submit_cut_every: int = 0  # every Nth submit is accepted, its reply cut mid-body
    label: str = "gzip"  # the Content-Encoding a mislabelled reply carries
    # What happened.
    jobs: dict[str, Job] = field(default_factory=dict)
    submits_seen: int = 0
    accepted: list[str] = field(default_factory=list)
    info_calls: int = 0
    auth_failures: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE}"

    def sha256_of(self, key: str, index: int) -> str:
        return hashlib.sha256(self.jobs[key].images[index]).hexdigest()

    # -- the wire ------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    if self.keep_alive is not None:
                        head = await asyncio.wait_for(
                            reader.readuntil(b"\r\n\r\n"), self.keep_alive
                        )
                    else:
                        head = await reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self.answer(method, target, headers, body, writer)
                if not keep or self.close_each or self.http10 or self.silent_close:
                    return
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def answer(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if method == "GET" and target.startswith("/img/"):
            key, index = target[5:].rsplit(".", 1)[0].rsplit("-", 1)
            data = self.jobs[key].images[int(index)]
            await self.send(writer, 200, data, "image/png", compress=False)
            return True
        if method != "POST":
            await self.send(writer, 405, b"no", "text/plain")
            return True
        if not self.auth_ok(headers.get("authorization", "")):
            self.auth_failures += 1
            await self.send_json(writer, {"code": "401", "message": "bad sign", "data": None}, 401)
            return True
        path = target[len(BASE) :]
        if path in ("/ai/wj/images/generations", "/ai/wj/images/edits"):
            return await self.submit(json.loads(body), writer)
        if path == "/ai/wj/images/info":
            return await self.info(json.loads(body), writer)
        await self.send(writer, 404, b"not found", "text/plain")
        return True

    def auth_ok(self, header: str) -> bool:
        try:
            auth = json.loads(header)
            original = auth["original"]
            said = json.loads(original)
            if auth["appId"] != self.app_id or said["appId"] != self.app_id:
                return False
            if original != json.dumps(
                {"appId": self.app_id, "timestamp": said["timestamp"]}, separators=(",", ":")
            ):
                return False
            if not -300 <= time.time() - said["timestamp"] <= 600:
                return False
            self.public_key.verify(
                base64.b64decode(auth["sign"]),
                original.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, KeyError, TypeError, InvalidSignature):
            return False
        return bool(auth.get("secretKeyVersion") == "1")

    async def submit(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        self.submits_seen += 1
        if self.submit_429_every and self.submits_seen % self.submit_429_every == 0:
            if self.refusal_text_mislabelled:
                await self.send(
                    writer,
                    429,
                    b"Too Many Requests",
                    "text/plain",
                    extra={"Retry-After": "0", "Content-Encoding": self.label},
                    compress=False,
                )
                return True
            await self.send_json(
                writer,
                {"code": "429", "message": "slow down", "data": None},
                429,
                extra={"Retry-After": "0"},
            )
            return True
        if self.submit_delay:
            await asyncio.sleep(self.submit_delay)
        if self.submit_cut_every and self.submits_seen % self.submit_cut_every == 0:
            number = next(self._counter)
            key = hashlib.md5(f"{id(self)}-{number}".encode()).hexdigest().upper()
            n = int(request.get("n", 1))
            self.jobs[key] = Job(
                key, n, time.monotonic(), [_png(number * 10 + i) for i in range(n)], self.inline
            )
            self.accepted.append(key)
            reply = {"code": "200", "message": "success", "data": {"key": key}}
            await self.send_json(writer, reply, cut=True)
            return False
        number = next(self._counter)
        key = hashlib.md5(f"{id(self)}-{number}".encode()).hexdigest().upper()
        n = int(request.get("n", 1))
        self.jobs[key] = Job(
            key, n, time.monotonic(), [_png(number * 10 + i) for i in range(n)], self.inline
        )
        self.accepted.append(key)
        await self.send_json(writer, {"code": "200", "message": "success", "data": {"key": key}})
        return True

    def entry(self, job: Job) -> dict[str, Any]:
        age = time.monotonic() - job.born
        generating = age - self.queued_for
        landed = 0 if generating < 0 else min(job.n, int(generating / self.per_image))
        total = self.queued_for + job.n * self.per_image
        left = max(0.0, total - age)
        status = 0 if generating < 0 else 4 if landed == job.n else 1
        images = []
        for index in range(landed):
            if job.inline:
                b64 = base64.b64encode(job.images[index]).decode()
                images.append({"url": None, "b64_json": b64, "revised_prompt": None})
            else:
                url = f"http://127.0.0.1:{self.port}/img/{job.key}-{index}.png"
                images.append({"url": url, "b64_json": None, "revised_prompt": None})
        entry: dict[str, Any] = {"key": job.key, "status": status, "images": images}
        entry["fail_message"] = None
        if self.progress_fields:
            entry["complete_percent"] = round(100 * min(1.0, age / total), 1)
            if self.estimate == "int":
                entry["expected_seconds"] = round(left)
            elif self.estimate == "float":
                entry["expected_seconds"] = left
            elif self.estimate == "str":
                entry["expected_seconds"] = f"{left:.2f}"
            entry["queue_before_num"] = 0 if status else 1
            entry["integral_cost"] = 10 * job.n
        return entry

    async def info(self, keys: list[str], writer: asyncio.StreamWriter) -> bool:
        self.info_calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.info_calls <= self.poll_429_burst:
            await self.send_json(
                writer,
                {"code": "429", "message": "slow down", "data": None},
                429,
                extra={"Retry-After": "1"},
            )
            return True
        if self.info_calls <= self.poll_5xx_burst:
            await self.send(writer, 503, b"<html>busy</html>", "text/html")
            return True
        listed = [self.entry(self.jobs[key]) for key in keys if key in self.jobs]
        if self.repeat_entries:
            # an older copy of each entry after the newer one
            listed = listed + [dict(e, status=0, images=[]) for e in listed]
        if self.stray_entries:
            listed.append({"key": "F" * 32, "status": 4, "images": [{"url": "http://x/y.png"}]})
        reply = {"code": "200", "message": "success", "data": {"list": listed}}
        cut = bool(self.poll_cut_every) and self.info_calls % self.poll_cut_every == 0
        await self.send_json(writer, reply, cut=cut)
        return not cut

    async def send_json(
        self,
        writer: asyncio.StreamWriter,
        reply: dict[str, Any],
        status: int = 200,
        *,
        extra: dict[str, str] | None = None,
        cut: bool = False,
    ) -> None:
        data = json.dumps(reply, ensure_ascii=False).encode()
        await self.send(
            writer, status, data, "application/json;charset=UTF-8", extra=extra, cut=cut
        )

    async def send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        data: bytes,
        content_type: str,
        *,
        extra: dict[str, str] | None = None,
        cut: bool = False,
        compress: bool = True,
    ) -> None:
        headers = {"Content-Type": content_type} | (extra or {})
        if compress and self.encoding == "gzip":
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        elif compress and self.encoding == "zlib":
            data = zlib.compress(data)
            headers["Content-Encoding"] = "deflate"
        elif compress and self.encoding == "rawdeflate":
            squeeze = zlib.compressobj(wbits=-15)
            data = squeeze.compress(data) + squeeze.flush()
            headers["Content-Encoding"] = "deflate"
        version = "HTTP/1.0" if self.http10 else "HTTP/1.1"
        if self.close_each:
            headers["Connection"] = "close"
        elif self.keep_alive is not None and not self.http10:
            headers["Keep-Alive"] = f"timeout={self.keep_alive:g}"
        if self.chunked and not self.http10:
            headers["Transfer-Encoding"] = "chunked"
        elif not (self.http10 and self.no_length):
            headers["Content-Length"] = str(len(data))
        head = f"{version} {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode() + b"\r\n")
        if cut:
            data = data[: len(data) // 2]
        step = self.pieces or len(data) or 1
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            if self.chunked and not self.http10:
                piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            writer.write(piece)
            await writer.drain()
            if self.piece_pause:
                await asyncio.sleep(self.piece_pause)
        if self.chunked and not self.http10 and not cut:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        if cut:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def gateway2(**settings: Any) -> AsyncIterator[tuple[Gateway2, Credentials]]:
    creds, public = credentials()
    gateway = Gateway2(public, creds.app_id, **settings)
    server = await asyncio.start_server(gateway.serve, "127.0.0.1", 0)
    gateway.port = server.sockets[0].getsockname()[1]
    gateway._server = server
    try:
        yield gateway, creds
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
