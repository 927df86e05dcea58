"""A second gateway, written from API.md alone by an outside reader (not from the emulator).

It follows the wire contract but differs from the emulator wherever the contract leaves room:
numbers as floats, integers or strings; fields absent, null or late; batch replies in any
order with repeated keys; keys listed only after a while; jobs done at once or slowly;
replies gzipped, deflated, chunked, closing the connection, with content types that carry
parameters and extra fields everywhere; image URLs that redirect, are slow, are missing once
or come with another content type; errors with odd codes and markup or escape codes in text.

A job's behaviour is picked by its prompt: the first word naming a plan in :data:`PLANS`
(``fast``, ``late``, ``failmid`` ...), else ``normal``. Every submit is counted, so a test can
check that nothing was paid twice.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import itertools
import json
import random
import struct
import textwrap
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from wujie_async import PollPolicy
from wujie_async.emulator._png import render_png

# Polling for a test of a gateway of this kind: quick, and a key unknown for 1.5 s is ended.
POLL = PollPolicy(
    first_poll_delay=0.05,
    min_interval=0.05,
    max_interval=0.3,
    max_estimate_wait=0.3,
    batch_fill_horizon=0.05,
    unknown_key_grace=1.5,
)

ESCAPED_TEXT = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred<b>bold</b><script>x()</script>\x1b[0m 失败"


def jpeg_bytes(seed: int) -> bytes:
    """A tiny JPEG-shaped body: SOI, an APP0 segment, some bytes, EOI."""
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return (
        b"\xff\xd8\xff\xe0"
        + struct.pack(">H", len(app0) + 2)
        + app0
        + bytes([seed % 256]) * 32
        + b"\xff\xd9"
    )


def webp_bytes(seed: int) -> bytes:
    """A WEBP-shaped body whose RIFF length is right."""
    payload = b"WEBPVP8L" + struct.pack("<I", 8) + bytes([seed % 256]) * 8
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


@dataclass
class Job:
    key: str
    plan: str
    n: int
    born: float
    body: dict[str, Any]
    asked: int = 0  # batch calls that listed it


@dataclass
class OutsideGateway:
    """What a running outside gateway has seen; give ``base_url`` to the client."""

    base_url: str = ""
    origin: str = ""
    submits: Counter[str] = field(default_factory=Counter)  # per path
    accepted: list[str] = field(default_factory=list)  # keys handed out, in order
    jobs: dict[str, Job] = field(default_factory=dict)
    info_calls: int = 0
    info_times: list[float] = field(default_factory=list)  # loop time of each batch call
    image_hits: Counter[str] = field(default_factory=Counter)
    served: dict[str, bytes] = field(default_factory=dict)  # image path -> bytes last served
    style: str | None = None  # every reply's HTTP style (None: each in turn, see _STYLES)
    submit_script: list[Callable[[web.Request], web.StreamResponse | None]] = field(
        default_factory=list
    )  # one-shot replies for the next submits (None: accept as usual)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    late_seconds: float = 2.5  # how long a "late" job is left out of the replies
    stuck_seconds: float = 20.0  # how long a "stuckestimate" job runs
    info_delay: float = 0.0  # seconds every batch reply is held (a slow gateway)
    submit_delay: float = 0.0  # seconds every submit reply is held, after the job is made

    def image_url(self, kind: str, key: str, index: int) -> str:
        return f"{self.origin}/img/{kind}/{key}/{index}"

    def sha256_of(self, key: str, index: int) -> str | None:
        for path, body in self.served.items():
            if path.endswith(f"/{key}/{index}"):
                return hashlib.sha256(body).hexdigest()
        return None


def _image(gw: OutsideGateway, kind: str, job: Job, index: int) -> dict[str, Any]:
    # Extra fields, unicode text, nulls where a value could be.
    return {
        "url": gw.image_url(kind, job.key, index),
        "b64_json": None,
        "revised_prompt": f"修订 «{job.body.get('prompt', '')}» #{index}",
        "width": 8,
        "x-extra": {"nested": [1, 2, 3]},
    }


def _entry(gw: OutsideGateway, job: Job, now: float) -> dict[str, Any] | None:
    """The entry the gateway lists for ``job`` now, or None (absent from the reply)."""
    age = now - job.born
    plan = job.plan
    base: dict[str, Any] = {"key": job.key, "extra_field": "ignored", "nested": {"a": None}}
    if plan == "fast":  # done before the first ask; numbers as strings; cost as a string
        images = [_image(gw, "png", job, i) for i in range(job.n)]
        return base | {
            "status": 4,
            "complete_percent": "100",
            "expected_seconds": "0",
            "images": images,
            "fail_message": None,
            "integral_cost": str(4 * job.n),
        }
    if plan == "late":  # unlisted for late_seconds, then done quickly
        if age < gw.late_seconds:
            return None
        if age < gw.late_seconds + 0.5:
            return base | {"status": 0, "queue_before_num": 3}
        return base | {
            "status": 4,
            "complete_percent": 100.0,
            "images": [_image(gw, "redirect", job, i) for i in range(job.n)],
            "integral_cost": 4.0 * job.n,
        }
    if plan == "trickle":  # image by image; estimate null, then absent, then a float
        landed = min(job.n, int(age / 0.6))
        status = 4 if landed == job.n else 1
        entry = base | {
            "status": status,
            "complete_percent": round(100 * landed / job.n, 3),
            "images": [_image(gw, "flaky" if i % 2 else "slow", job, i) for i in range(landed)],
            "integral_cost": 4 * job.n if status == 4 else None,
        }
        if age < 0.5:
            entry["expected_seconds"] = None
        elif age > 1.0:
            entry["expected_seconds"] = max(0.0, job.n * 0.6 - age) + 0.0001
        return entry
    if plan == "failmid":  # generating, then failed with a hostile message, odd code type
        if age < 0.8:
            return base | {"status": 1, "complete_percent": 33.333333333, "expected_seconds": 1}
        return base | {
            "status": 3,
            "complete_percent": 33.3,
            "images": [],
            "fail_message": {"fail_code": "20110001", "fail_message": ESCAPED_TEXT},
        }
    if plan == "noresult":  # ends with -1 and fail_message null
        if age < 0.4:
            return base | {"status": 0}
        return base | {"status": -1, "images": None, "fail_message": None}
    if plan == "moderated":
        return base | {
            "status": 5,
            "fail_message": {"fail_code": 20110001, "fail_message": "<i>nsfw</i> 涉黄"},
        }
    if plan == "malformed":  # an entry that cannot be read: status as text
        return base | {"status": "finished", "complete_percent": "lots"}
    if plan == "never":
        return None
    if plan == "types":  # other image kinds with content types of their own
        if age < 0.5:
            return base | {"status": 1, "complete_percent": 50, "expected_seconds": 0.25}
        kinds = ["octet", "jpeg", "webp", "gzip"]
        return base | {
            "status": 4,
            "complete_percent": 100,
            "images": [_image(gw, kinds[i % len(kinds)], job, i) for i in range(job.n)],
            "integral_cost": 8,
        }
    if plan == "slowjob":  # takes a while, estimates in integers counting down
        total = 4.0
        if age < total:
            return base | {
                "status": 1 if age > 1 else 0,
                "complete_percent": int(100 * age / total),
                "expected_seconds": int(total - age) + 1,
                "queue_before_num": max(0, 2 - int(age)),
                "start_gen_time": "2026-12-06 23:00:00",
            }
        return base | {
            "status": 4,
            "complete_percent": 100,
            "images": [_image(gw, "png", job, i) for i in range(job.n)],
            "integral_cost": 4 * job.n,
            "complete_time": 1765000000000,
        }
    if plan == "dupstale":  # listed twice in one reply: the stale report beside the new one
        if age < 0.3:
            return base | {"status": 1, "complete_percent": 10}
        return base | {
            "status": 4,
            "complete_percent": 100,
            "images": [_image(gw, "png", job, i) for i in range(job.n)],
            "integral_cost": 4 * job.n,
            "_stale": {"status": 1, "complete_percent": 60, "images": [], "integral_cost": None},
        }
    if plan == "oddnums":  # numbers the way a loose serializer writes them
        if age < 0.6:
            return base | {
                "status": 1,
                "complete_percent": 12.5,
                "expected_seconds": "3",
                "queue_before_num": 2.0,
                "integral_cost": None,
            }
        return base | {
            "status": 4,
            "complete_percent": 1e2,
            "expected_seconds": 0.0,
            "queue_before_num": 0,
            "images": [_image(gw, "png", job, i) for i in range(job.n)],
            "integral_cost": "8.00",
        }
    if plan == "placeholder":  # images listed without url while generating, then real ones
        if age < 0.6:
            return base | {
                "status": 1,
                "images": [{"url": None, "b64_json": None} for _ in range(job.n)],
            }
        return base | {
            "status": 4,
            "images": [_image(gw, "png", job, i) for i in range(job.n)],
            "integral_cost": 4,
        }
    if plan == "evilurl":  # image URL and revised prompt carrying escape codes and markup
        image = _image(gw, "png", job, 0)
        image["url"] += "?t=" + ESCAPED_TEXT
        image["revised_prompt"] = ESCAPED_TEXT
        if age < 0.3:
            return base | {"status": 1, "images": [image], "complete_percent": 50}
        return base | {"status": 4, "images": [image], "integral_cost": 4}
    if plan == "costearly":  # charged when it starts: the cost is listed while generating
        if age < 0.6:
            return base | {"status": 1, "complete_percent": 20, "integral_cost": 4 * job.n}
        return base | {"status": 4, "images": [_image(gw, "png", job, i) for i in range(job.n)]}
    if plan == "oddstatus":  # a status the contract does not name, for a while
        if age < 1.5:
            return base | {"status": 2, "complete_percent": 70}
        return base | {"status": 4, "images": [_image(gw, "png", job, i) for i in range(job.n)]}
    if plan == "expired":  # done, its first image's URL already cleaned up (404 for good)
        kinds = ["gone", *["png"] * (job.n - 1)]
        images = [_image(gw, kind, job, i) for i, kind in enumerate(kinds)]
        return base | {"status": 4, "images": images, "integral_cost": 4}
    if plan == "stuckestimate":  # an estimate that never moves, for stuck_seconds
        if age < gw.stuck_seconds:
            return base | {"status": 1, "complete_percent": 50, "expected_seconds": 1}
        return base | {"status": 4, "images": [_image(gw, "png", job, 0)], "integral_cost": 4}
    if plan == "inline":  # images inline, b64_json written every way base64 is written
        forms = [
            lambda b: "data:image/png;base64," + base64.b64encode(b).decode(),
            lambda b: "data:image/png;name=x.png;base64," + base64.b64encode(b).decode(),
            lambda b: "\r\n".join(textwrap.wrap(base64.b64encode(b).decode(), 76)),
            lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
            lambda b: " " + base64.b64encode(b).decode() + "\n",
        ]
        images = []
        for index in range(job.n):
            body = render_png(job.key, index, 8, 8)
            gw.served[f"/inline/{job.key}/{index}"] = body
            images.append({"url": None, "b64_json": forms[index % len(forms)](body)})
        return base | {"status": 4, "images": images, "integral_cost": 4}
    if plan == "failcost":  # failed, and charged all the same
        if age < 0.3:
            return base | {"status": 1, "complete_percent": 90}
        return base | {"status": 3, "fail_message": "upstream timeout", "integral_cost": "2.5"}
    # normal: queued, generating with float progress, done
    if age < 0.3:
        return base | {"status": 0, "complete_percent": 0, "queue_before_num": 1}
    if age < 1.0:
        return base | {
            "status": 1,
            "complete_percent": 41.5,
            "expected_seconds": 0.7,
        }
    return base | {
        "status": 4,
        "complete_percent": 100,
        "expected_seconds": 0,
        "images": [_image(gw, "png", job, i) for i in range(job.n)],
        "integral_cost": 4 * job.n,
    }


_STYLES = itertools.cycle(
    ["plain", "gzip", "chunked", "deflate", "close", "charset", "x-gzip", "drop"]
)


async def _send(request: web.Request, payload: Any, style: str | None = None) -> web.StreamResponse:
    raw = json.dumps(payload, ensure_ascii=False).encode()
    style = style or next(_STYLES)
    if style in ("gzip", "x-gzip"):  # x-gzip: gzip's old name (RFC 9110: read it as gzip)
        return web.Response(
            body=gzip.compress(raw),
            headers={"Content-Encoding": style, "Content-Type": "application/json"},
        )
    if style == "deflate":
        return web.Response(
            body=zlib.compress(raw),
            headers={"Content-Encoding": "deflate", "Content-Type": "application/json"},
        )
    if style == "chunked":
        response = web.StreamResponse(headers={"Content-Type": "application/json;charset=UTF-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(raw), 7):
            await response.write(raw[start : start + 7])
        await response.write_eof()
        return response
    if style == "drop":  # the connection closed after the reply, without Connection: close
        response = web.Response(body=raw, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write_eof()
        assert request.transport is not None
        request.transport.close()
        return response
    if style == "close":
        return web.Response(
            body=raw, headers={"Content-Type": "application/json", "Connection": "close"}
        )
    return web.Response(body=raw, headers={"Content-Type": "application/json; charset=utf-8"})


def _plan_of(prompt: object) -> str:
    for word in str(prompt).split():
        if word in PLANS:
            return word
    return "normal"


PLANS = {
    "normal",
    "fast",
    "late",
    "trickle",
    "failmid",
    "noresult",
    "moderated",
    "malformed",
    "never",
    "types",
    "slowjob",
    "dupstale",
    "oddnums",
    "placeholder",
    "evilurl",
    "costearly",
    "oddstatus",
    "expired",
    "stuckestimate",
    "inline",
    "failcost",
}


@asynccontextmanager
async def outside_gateway(seed: int = 7) -> AsyncIterator[OutsideGateway]:
    """Serve an outside gateway on loopback; yields what it has seen."""
    gw = OutsideGateway()
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    counter = itertools.count()

    async def submit(request: web.Request) -> web.StreamResponse:
        gw.submits[request.path] += 1
        if gw.submit_script:
            scripted = gw.submit_script.pop(0)(request)
            if scripted is not None:
                return scripted
        body = await request.json()
        number = next(counter)
        # Keys: mostly 32 upper hex, some lower case: the contract does not promise a form.
        key = hashlib.md5(f"{seed}-{number}".encode()).hexdigest()
        key = key.upper() if number % 3 else key
        gw.accepted.append(key)
        gw.jobs[key] = Job(
            key, _plan_of(body.get("prompt")), int(body.get("n", 1)), loop.time(), body
        )
        data = {"key": key, "requestId": f"req-{number}", "extra": None}
        if gw.submit_delay:
            await asyncio.sleep(gw.submit_delay)
        return await _send(
            request,
            {"code": "200", "message": "成功 success", "data": data, "traceId": "t"},
            gw.style,
        )

    async def info(request: web.Request) -> web.StreamResponse:
        gw.info_calls += 1
        gw.info_times.append(loop.time())
        keys = await request.json()
        if gw.info_delay:
            await asyncio.sleep(gw.info_delay)
        if not isinstance(keys, list) or len(keys) > 50:
            return await _send(request, {"code": "20010001", "message": "too many", "data": None})
        now = loop.time()
        listed: list[dict[str, Any]] = []
        for key in keys:
            job = gw.jobs.get(key)
            if job is None:
                continue
            entry = _entry(gw, job, now)
            if entry is None:
                continue
            job.asked += 1
            stale = entry.pop("_stale", None)
            if stale is not None:
                listed.append(entry | stale)
            listed.append(entry)
            if rng.random() < 0.3:  # the same entry again
                listed.append(dict(entry))
        # another key nobody asked about, and a stranger's entry
        listed.append({"key": "NOT-ASKED-ABOUT", "status": 1})
        rng.shuffle(listed)
        await asyncio.sleep(rng.choice([0, 0, 0, 0.05, 0.2]))
        return await _send(
            request,
            {"code": "200", "message": "success", "data": {"list": listed, "total": len(listed)}},
            gw.style,
        )

    async def image(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        key = request.match_info["key"]
        index = int(request.match_info["index"])
        gw.image_hits[kind] += 1
        path = request.path
        png = render_png(key, index, 8, 8)
        if kind == "gone":
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        if kind == "redirect":
            raise web.HTTPFound(gw.image_url("png", key, index))
        if kind == "flaky":  # not on the CDN yet at the first ask
            gw.image_hits[f"flaky:{key}:{index}"] += 1
            if gw.image_hits[f"flaky:{key}:{index}"] == 1:
                return web.Response(status=404, text="not yet")
        if kind == "slow":
            await asyncio.sleep(1.5)
        if kind == "jpeg":
            body = jpeg_bytes(index)
            gw.served[path] = body
            return web.Response(body=body, content_type="image/jpeg")
        if kind == "webp":
            body = webp_bytes(index)
            gw.served[path] = body
            return web.Response(body=body, headers={"Content-Type": "image/webp; q=1"})
        if kind == "gzip":
            gw.served[path] = png
            return web.Response(
                body=gzip.compress(png),
                headers={"Content-Encoding": "gzip", "Content-Type": "image/png"},
            )
        gw.served[path] = png
        content_type = "application/octet-stream" if kind == "octet" else "image/png"
        return web.Response(body=png, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post("/wj-open/v1/ai/wj/images/generations", submit)
    app.router.add_post("/wj-open/v1/ai/wj/images/edits", submit)
    app.router.add_post("/wj-open/v1/ai/wj/images/info", info)
    app.router.add_get("/img/{kind}/{key}/{index}", image)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    gw.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    gw.base_url = gw.origin + "/wj-open/v1"
    try:
        yield gw
    finally:
        gw.released.set()
        await runner.cleanup()


def business(code: Any, message: str | None, status: int = 200, **headers: str) -> web.Response:
    """A one-shot submit reply: an envelope with ``code`` and ``message``."""
    raw = json.dumps({"code": code, "message": message, "data": None}, ensure_ascii=False)
    return web.Response(
        status=status,
        body=raw.encode(),
        headers={"Content-Type": "application/json; charset=utf-8", **headers},
    )
