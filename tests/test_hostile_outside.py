"""An attacker's gateway, written from API.md alone, against the public API and the CLI.

The gateway below (``HostileGateway``) speaks the wire contract of API.md: it checks the
signed header, hands out keys, answers batch-detail queries and serves images. What it says
is scripted per test: entries whose fields are missing, null, of the wrong type, huge, NaN or
negative; progress that goes backwards; images before or after the status says done; batch
replies with repeated, unknown, fewer or more entries; replies that are compression bombs,
endless, dripped a byte at a time or carry huge headers; messages full of terminal escapes,
rich markup and bidi overrides; and error texts that echo the request's signature.

Each test asserts what the client must do: a malformed entry costs its own job at most (never
the poller), errors are typed, memory stays bounded, every wait ends by its deadline, and no
text a terminal acts on, nor any secret, reaches an exception, a log line or the CLI's output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import socket
import struct
import time
import traceback
import tracemalloc
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDict

from wujie_async import (
    Credentials,
    DownloadPolicy,
    ImageJob,
    JobError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    Limits,
    PollPolicy,
    ProtocolError,
    RetryPolicy,
    SubmitUncertainError,
    Timeouts,
    TransportError,
    UnknownJobError,
    WujieClient,
    WujieError,
)

from .cli_helpers import CLEAN_ENV, cli
from .cli_helpers import cli_zygote as cli_zygote  # stops the CLI fork server at the end
from .helpers import error_chain, eventually

pytestmark = pytest.mark.anyio

BASE_PATH = "/wj-open/v1"
SUBMIT_PATHS = ("/ai/wj/images/generations", "/ai/wj/images/edits")
INFO_PATH = "/ai/wj/images/info"

# Text a terminal acts on: escapes (colour, title, screen clear), other C0/C1 controls, and the
# bidi overrides, embeddings and isolates that make text read other than it is.
ANSI = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\x1b[0m"
BIDI = "\u202egnp.exe\u202c \u2066iso\u2069"
CONTROLS = "a\x00b\x08c\rd\x7fe\x9bf"
MARKUP = "[bold red]LOUD[/bold red] [link=https://evil.example]click[/link]"
NASTY = f"{ANSI} {BIDI} {CONTROLS} {MARKUP}"
_ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

POLL = PollPolicy(
    first_poll_delay=0.02,
    min_interval=0.02,
    max_interval=0.1,
    max_estimate_wait=0.1,
    batch_fill_horizon=0.02,
    unknown_key_grace=0.6,
)
QUICK_RETRY = RetryPolicy(max_attempts=2, initial_wait=0, max_wait=0, max_elapsed=5)


# --- credentials and images ------------------------------------------------------------------


def _new_credentials() -> Credentials:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Credentials(app_id="hostile-app", private_key=base64.b64encode(der).decode())


CREDS = _new_credentials()


def png_bytes(width: int = 2, height: int = 2) -> bytes:
    """A small, valid PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + b"\x10\x20\x30" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


PNG = png_bytes()
# Stands for the gateway's own image URL in what plans list (its port is known once it
# listens): the gateway writes the URL in its place.
OK_IMAGE = "@@OK_IMAGE@@"
GIB = 1024**3


def _bomb_blocks(total: int) -> tuple[bytes, bytes, int]:
    """One raw-deflate block of 1 MiB of zeros (full-flushed, so it repeats), its end, and
    the crc of ``total`` zeros: a bomb is built in a fraction of a second."""
    size = 1024 * 1024
    zeros = bytes(size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(total // size):
        crc = zlib.crc32(zeros, crc)
    return block, deflate.flush(), crc


_BOMB_CACHE: dict[str, bytes] = {}


def bomb(kind: str, total: int = GIB) -> bytes:
    """``total`` zero bytes as a gzip or zlib ("deflate") stream of about total/1000 bytes."""
    name = f"{kind}-{total}"
    if name not in _BOMB_CACHE:
        block, end, crc = _bomb_blocks(total)
        body = block * (total // (1024 * 1024)) + end
        if kind == "gzip":
            header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
            data = header + body + struct.pack("<II", crc, total & 0xFFFFFFFF)
        else:  # zlib wrapper, as HTTP's "deflate" means; the adler is not checked before EOF
            data = b"\x78\x9c" + body + b"\x00\x00\x00\x01"
        _BOMB_CACHE[name] = data
    return _BOMB_CACHE[name]


# --- the gateway -------------------------------------------------------------------------------

# A plan says what the gateway lists for a key at its N-th ask (0-based): raw entries (any JSON
# value, any number of them; [] leaves the key out of the reply).
Plan = Callable[[str, int], list[Any]]
ReplyHook = Callable[[web.Request, list[str], int], Awaitable[web.StreamResponse | None]]


class RawJson(str):
    """JSON text the gateway writes as it is (what Python's json would not write: a number of
    5,000 digits, a repeated field)."""


def _dumps(value: Any) -> str:
    raws: list[str] = []

    def placeholder(item: Any) -> Any:
        if isinstance(item, RawJson):
            raws.append(item)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(item, dict):
            return {name: placeholder(inner) for name, inner in item.items()}
        if isinstance(item, list):
            return [placeholder(inner) for inner in item]
        return item

    # allow_nan (the default): NaN and Infinity, as some gateways' serializers write them.
    text = json.dumps(placeholder(value))
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{index}@@"', raw)
    return text


def entry(key: str, status: Any, **fields: Any) -> dict[str, Any]:
    return {"key": key, "status": status, **fields}


def done_with(*urls: str) -> Callable[[str, int], list[Any]]:
    """A plan: generating at the first ask, succeeded with ``urls`` after."""

    def plan(key: str, asked: int) -> list[Any]:
        if asked == 0:
            return [entry(key, 1, complete_percent=10, expected_seconds=0.05)]
        images = [{"url": url, "b64_json": None, "revised_prompt": None} for url in urls]
        return [entry(key, 4, complete_percent=100, images=images)]

    return plan


@dataclass
class HostileGateway:
    """A gateway from API.md whose answers a test scripts.

    A submit's prompt names its plan (``plans[prompt]``, default: succeed with one PNG); a
    batch call lists what each asked key's plan says, then ``extra`` (junk, unknown keys). A
    ``reply_hook`` may answer a batch call (or a submit) wholesale: a bomb, a drip, a huge
    header. ``submit_reply`` replaces a submit's reply envelope.
    """

    plans: dict[str, Plan] = field(default_factory=dict)
    extra: list[Any] = field(default_factory=list)
    files: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=dict
    )
    reply_hook: ReplyHook | None = None
    submit_hook: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None
    port: int = 0
    keys: dict[str, str] = field(default_factory=dict)  # key -> prompt
    asks: dict[str, int] = field(default_factory=dict)  # key -> times asked
    batch_calls: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    submits: int = 0
    signs: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # the gateway's own bugs: the test fails
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_PATH}"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/img/{name}"

    def _auth_refusal(self, request: web.Request) -> web.Response | None:
        """None when the Authorization header is the contract's, signed by CREDS."""
        try:
            header = json.loads(request.headers["Authorization"])
            original = header["original"]
            sign = header["sign"]
            said = json.loads(original)
            assert header["appId"] == said["appId"] == CREDS.app_id
            assert header["secretKeyVersion"] == "1"
            CREDS.public_key().verify(
                base64.b64decode(sign), original.encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except Exception:
            return web.json_response(
                {"code": "401", "message": "bad sign", "data": None}, status=401
            )
        if sign not in self.signs:
            self.signs.append(sign)
        return None

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        refused = self._auth_refusal(request)
        if refused is not None:
            return refused
        self.submits += 1
        if self.submit_hook is not None:
            hooked = await self.submit_hook(request)
            if hooked is not None:
                return hooked
        body = await request.json()
        key = f"{next(self._numbers):032X}"
        self.keys[key] = body["prompt"]
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    async def _info(self, request: web.Request) -> web.StreamResponse:
        refused = self._auth_refusal(request)
        if refused is not None:
            return refused
        asked = await request.json()
        assert isinstance(asked, list) and all(isinstance(key, str) for key in asked)
        assert 1 <= len(asked) <= 50, "the contract's limit of 50 keys per call"
        call = self.batch_calls
        self.batch_calls += 1
        self.batch_sizes.append(len(asked))
        if self.reply_hook is not None:
            hooked = await self.reply_hook(request, asked, call)
            if hooked is not None:
                return hooked
        listed: list[Any] = []
        for key in asked:
            prompt = self.keys.get(key)
            if prompt is None:
                continue
            count = self.asks.get(key, 0)
            self.asks[key] = count + 1
            plan = self.plans.get(prompt) or done_with(OK_IMAGE)
            listed.extend(plan(key, count))
        listed.extend(self.extra)
        envelope = {"code": "200", "message": "success", "data": {"list": listed}}
        text = _dumps(envelope).replace(OK_IMAGE, self.url("ok.png"))
        return web.Response(text=text, content_type="application/json")

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"].split("/")[0]  # the rest of a path: any text
        handler = self.files.get(name)
        if handler is not None:
            return await handler(request)
        return web.Response(body=PNG, content_type="image/png")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HostileGateway]:
        @web.middleware
        async def own_bugs(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            try:
                return await handler(request)
            except (web.HTTPException, asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                # A hook of the test that broke would answer 500, and a probe would pass
                # without probing anything.
                self.faults.append(traceback.format_exc())
                raise

        app = web.Application(client_max_size=1024 * 1024, middlewares=[own_bugs])
        for path in SUBMIT_PATHS:
            app.router.add_post(BASE_PATH + path, self._submit)
        app.router.add_post(BASE_PATH + INFO_PATH, self._info)
        app.router.add_get("/img/{name:.+}", self._file)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        try:
            yield self
        finally:
            await runner.cleanup()
        assert not self.faults, "the test's gateway broke:\n" + "\n".join(self.faults)


@asynccontextmanager
async def gateway(**settings: Any) -> AsyncIterator[HostileGateway]:
    async with HostileGateway(**settings).running() as gw:
        yield gw


def client_of(gw: HostileGateway, **kwargs: Any) -> WujieClient:
    kwargs.setdefault("poll", POLL)
    kwargs.setdefault("retry", QUICK_RETRY)
    kwargs.setdefault("timeouts", Timeouts(connect=2, request=2, job=6, close=2))
    return WujieClient(CREDS, base_url=gw.base_url, **kwargs)


@asynccontextmanager
async def raw_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A bare TCP server on loopback that reads a request's head, then runs ``serve``."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(Exception):
                await reader.readuntil(b"\r\n\r\n")
                await serve(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


# --- what no text may hold -----------------------------------------------------------------


def _letters(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)


PRIVATE_KEY_LETTERS = _letters(CREDS.private_key)


def secrets_in(text: str, signs: list[str]) -> list[str]:
    """What of the private key or of a signature ``text`` quotes (24 letters in a row)."""
    letters = _letters(text)
    found = []
    for name, secret in [("private key", PRIVATE_KEY_LETTERS)] + [
        ("signature", _letters(sign)) for sign in signs
    ]:
        pieces = {secret[start : start + 24] for start in range(0, len(secret) - 24, 8)}
        if any(piece in letters for piece in pieces):
            found.append(name)
    return found


def exception_texts(exc: BaseException) -> str:
    """Everything an error shows: str, repr, args, notes and the whole traceback with its
    causes and contexts."""
    texts: list[str] = []
    for current in error_chain(exc):
        texts += [str(current), repr(current), repr(current.args)]
        texts += getattr(current, "__notes__", [])
        texts += (
            [repr(value) for value in vars(current).values()]
            if hasattr(current, "__dict__")
            else []
        )
    texts += traceback.format_exception(exc)
    return "\n".join(texts)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.formatter_ = logging.Formatter("%(levelname)s %(name)s %(message)s")
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.formatter_.format(record))


@pytest.fixture
def logs() -> Iterator[Records]:
    """Every log record of the package at DEBUG, formatted with its traceback."""
    records = Records()
    logger = logging.getLogger("wujie_async")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


def assert_clean(text: str, gw: HostileGateway, what: str) -> None:
    """No secret and nothing a terminal acts on in ``text``."""
    leaked = secrets_in(text, gw.signs)
    assert not leaked, f"{what} quotes the {leaked}: {text[:2000]!r}"
    active = sorted(set(_ACTIVE.findall(text)) - {"\n", "\t"})
    assert not active, f"{what} holds {active!r}: {text[:2000]!r}"


def assert_logs_clean(logs: Records, gw: HostileGateway) -> None:
    for line in logs.lines:
        # A log line may span lines (a traceback); each must be clean.
        assert_clean(line, gw, "a log line")


async def ended(job: ImageJob, within: float) -> BaseException | None:
    """The job's error (None: it succeeded), failing the test if it is not over ``within``."""
    try:
        async with asyncio.timeout(within):
            with contextlib.suppress(WujieError):
                await job
    except TimeoutError:
        raise AssertionError(f"{job!r} not over after {within} s") from None
    return job.exception()


# --- entries: every field of every entry may be anything -----------------------------------------


def _then_done(*reports: Callable[[str], list[Any]]) -> Plan:
    """A plan that lists ``reports`` in turn, then succeeds with one image."""

    def plan(key: str, asked: int) -> list[Any]:
        if asked < len(reports):
            return reports[asked](key)
        return [entry(key, 4, complete_percent=100, images=[{"url": OK_IMAGE}])]

    return plan


def _forever(report: Callable[[str], list[Any]]) -> Plan:
    return lambda key, asked: report(key)


NESTED_JUNK: Any = {"a": [[{"b": [None, {"c": float("nan")}]}]] * 3, "d": "\x1b[2J"}
for _ in range(40):
    NESTED_JUNK = {"deeper": NESTED_JUNK}

HEALTHY_BUT_ODD: dict[str, Plan] = {
    "nan-and-infinity": _then_done(
        lambda k: [
            entry(
                k,
                1,
                complete_percent=float("nan"),
                expected_seconds=float("inf"),
                queue_before_num=float("-inf"),
                integral_cost=float("nan"),
                start_gen_time=float("nan"),
            )
        ]
    ),
    "numbers-as-text": _then_done(
        lambda k: [entry(k, "1", complete_percent="41.5", expected_seconds="12")],
        lambda k: [entry(k, " 0 ", complete_percent="", expected_seconds="soon")],
    ),
    "huge-numbers": _then_done(
        lambda k: [
            entry(
                k,
                1,
                complete_percent=10**400,
                expected_seconds=1e308,
                queue_before_num=RawJson("1" * 5000),
                integral_cost=-(10**30),
                complete_time=10**30,
            )
        ]
    ),
    "negative": _then_done(
        lambda k: [entry(k, 0, complete_percent=-50, expected_seconds=-1, queue_before_num=-3)]
    ),
    "nulls": _then_done(
        lambda k: [
            entry(
                k,
                1,
                complete_percent=None,
                expected_seconds=None,
                images=None,
                fail_message=None,
                queue_before_num=None,
            )
        ]
    ),
    "wrong-types": _then_done(
        lambda k: [
            entry(
                k,
                1,
                complete_percent=[50],
                expected_seconds={"s": 3},
                queue_before_num=True,
                integral_cost="free",
                start_gen_time=["x"],
                fail_message=12345,
                images=[],
            )
        ],
        lambda k: [
            entry(
                k,
                1,
                images=[{"url": 5, "b64_json": ["x"], "revised_prompt": {"p": 1}}],
            )
        ],
    ),
    "nested-junk": _then_done(
        lambda k: [entry(k, 1, junk=NESTED_JUNK, fail_message=NESTED_JUNK, more=[NESTED_JUNK])]
    ),
    "repeated-fields": _then_done(
        lambda k: [
            RawJson(
                f'{{"key":"{k}","status":4,"status":1,"complete_percent":"x",'
                f'"complete_percent":20,"images":7,"images":[],"key":"{k}"}}'
            )
        ]
    ),
    "float-status": _then_done(lambda k: [entry(k, 1.0, complete_percent=1e-320)]),
    "unknown-status": _then_done(lambda k: [entry(k, 2, complete_percent=99)]),
}

MALFORMED_FOR_EVER: dict[str, Plan] = {
    "no-status": _forever(lambda k: [{"key": k, "complete_percent": 50}]),
    "status-true": _forever(lambda k: [entry(k, True)]),
    "status-nan": _forever(lambda k: [entry(k, float("nan"))]),
    "status-huge": _forever(lambda k: [entry(k, 10**30)]),
    "status-text": _forever(lambda k: [entry(k, "done")]),
    "images-text": _forever(lambda k: [entry(k, 4, images="https://x.example/a.png")]),
    "images-of-numbers": _forever(lambda k: [entry(k, 4, images=[1, 2])]),
    "status-of-5000-digits": _forever(lambda k: [entry(k, RawJson("4" * 5000))]),
}

JUNK_ENTRIES: list[Any] = [
    None,
    5,
    "text",
    [],
    [[]],
    {},
    {"key": None, "status": 4},
    {"key": 12, "status": 4},
    {"key": "F" * 32, "status": 4, "images": [{"url": "https://evil.example/x.png"}]},
    {"key": "", "status": 3},
    NESTED_JUNK,
]


async def test_a_malformed_entry_fails_its_own_job_only(logs: Records) -> None:
    plans = {**HEALTHY_BUT_ODD, **MALFORMED_FOR_EVER}
    async with gateway(plans=plans, extra=JUNK_ENTRIES) as gw, client_of(gw) as client:
        jobs = {
            prompt: await client.images.submit(prompt=prompt, model="gpt-image-1")
            for prompt in plans
        }
        outcomes = {prompt: await ended(job, 5) for prompt, job in jobs.items()}
        wrong = {
            prompt: repr(error)
            for prompt, error in outcomes.items()
            if prompt in HEALTHY_BUT_ODD and error is not None
        }
        assert not wrong, f"jobs whose entries were readable failed: {wrong}"
        for prompt in HEALTHY_BUT_ODD:
            job = jobs[prompt]
            assert 0.0 <= job.progress <= 100.0
            assert job.expected_seconds is None or 0 <= job.expected_seconds <= 86_400
        for prompt in MALFORMED_FOR_EVER:
            assert isinstance(outcomes[prompt], JobProtocolError), (prompt, outcomes[prompt])
            assert_clean(exception_texts(outcomes[prompt]), gw, f"{prompt}'s error")  # type: ignore[arg-type]
        # The poller is alive and well after all that.
        after = await client.images.submit(prompt="after", model="gpt-image-1")
        assert await ended(after, 3) is None
    assert_logs_clean(logs, gw)


async def test_repeated_keys_in_one_reply_settle_on_the_terminal_entry() -> None:
    # The contract: "list may come in any order and may repeat a key". A reply that lists a
    # key twice, running and done (in either order), must not lose the done one.
    def running_then_done(key: str, asked: int) -> list[Any]:
        done = entry(key, 4, images=[{"url": OK_IMAGE}])
        running = entry(key, 1, complete_percent=30)
        return [running, running, done, running] if asked % 2 else [done, running, done]

    plans = {"twice": running_then_done}
    async with gateway(plans=plans) as gw, client_of(gw) as client:
        jobs = [await client.images.submit(prompt="twice", model="gpt-image-1") for _ in range(5)]
        for job in jobs:
            assert await ended(job, 3) is None


async def test_a_reply_with_fewer_entries_than_asked_ends_the_missing_job_as_unknown() -> None:
    # "A key the gateway does not know is simply absent": after the grace, UnknownJobError;
    # the keys it does list are unaffected.
    plans: dict[str, Plan] = {"never-listed": lambda key, asked: []}
    async with gateway(plans=plans) as gw, client_of(gw) as client:
        lost = await client.images.submit(prompt="never-listed", model="gpt-image-1")
        kept = await client.images.submit(prompt="fine", model="gpt-image-1")
        assert await ended(kept, 3) is None
        started = time.monotonic()
        error = await ended(lost, 4)
        assert isinstance(error, UnknownJobError), repr(error)
        assert time.monotonic() - started < POLL.unknown_key_grace + 2


async def test_a_reply_with_more_entries_than_asked_takes_only_the_asked_keys() -> None:
    # Every reply lists 3,000 entries of keys nobody asked about (other users' jobs, a stale
    # cache), some of them "done" with images, and 20 for the same asked key: the jobs asked
    # about end as their own entries say, and none takes a stranger's images.
    strangers = [
        entry(f"DEAD{n:028X}", 4, images=[{"url": "https://evil.example/not-yours.png"}])
        for n in range(3000)
    ]

    def plan(key: str, asked: int) -> list[Any]:
        if asked == 0:
            return [entry(key, 1)] * 20
        return [entry(key, 4, images=[{"url": OK_IMAGE}])]

    async with gateway(plans={"p": plan}, extra=strangers) as gw, client_of(gw) as client:
        jobs = [await client.images.submit(prompt="p", model="gpt-image-1") for _ in range(3)]
        results = [await asyncio.wait_for(job.result(), 3) for job in jobs]
        assert all(result.images[0].url == gw.url("ok.png") for result in results)


async def test_progress_going_backwards_and_estimates_rounded_every_way() -> None:
    # A gateway that restarts a job reports less progress than before; estimates come as
    # ints, floats, text and denormals. The job follows what it is told (0 to 100), its
    # updates keep coming, and the poller never spins on an estimate of about zero.
    reports = [
        (80, 0.333333333333),
        (20, "1e1"),
        (50, 5e-324),
        (100, 0),
        (10, -0.0),
        (30, 12.499999999),
    ]

    def plan(key: str, asked: int) -> list[Any]:
        if asked < len(reports):
            percent, seconds = reports[asked]
            return [entry(key, 1, complete_percent=percent, expected_seconds=seconds)]
        return [entry(key, 4, complete_percent=100, images=[{"url": OK_IMAGE}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        async with asyncio.timeout(3):
            seen = [update.progress async for update in job.updates()]
        assert await ended(job, 1) is None
        assert all(0 <= progress <= 100 for progress in seen)
        assert seen[-1] == 100
        # At most one call per min_interval, give or take: an estimate of 5e-324 s is no
        # reason to ask in a loop.
        assert gw.batch_calls <= len(reports) + 3


async def test_images_listed_before_the_status_says_done_resolve_early() -> None:
    release = asyncio.Event()

    def plan(key: str, asked: int) -> list[Any]:
        first = {"url": OK_IMAGE + "?0"}
        if not release.is_set():
            return [entry(key, 1, complete_percent=50, images=[first])]
        return [entry(key, 4, images=[first, {"url": OK_IMAGE + "?1"}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1", n=2)
        image = await job.image(0, timeout=3)
        assert not job.done() and image.url == gw.url("ok.png") + "?0"
        release.set()
        result = await asyncio.wait_for(job.result(), 3)
        assert [image.url for image in result.images] == [
            gw.url("ok.png") + "?0",
            gw.url("ok.png") + "?1",
        ]


async def test_images_listed_only_after_the_status_says_done_are_waited_for() -> None:
    # Status 4 with no images for two reports, then the images: a short while after "done",
    # the listing still counts; the job succeeds with both.
    def plan(key: str, asked: int) -> list[Any]:
        if asked < 2:
            return [entry(key, 4, complete_percent=100, images=[])]
        return [entry(key, 4, images=[{"url": OK_IMAGE}, {"url": OK_IMAGE + "?1"}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1", n=2)
        result = await asyncio.wait_for(job.result(), 3)
        assert len(result.images) == 2


# --- sizes and time: bombs, endless and dripped replies, huge headers ---------------------------

BOMB_SIZE = 256 * 1024 * 1024  # inflates 1,000-fold: 256 KB on the wire
SMALL_REPLIES = Limits(max_response_bytes=256 * 1024)


def _bomb_reply(kind: str) -> web.Response:
    return web.Response(
        body=bomb("gzip" if kind == "gzip" else "zlib", BOMB_SIZE),
        headers={"Content-Encoding": kind, "Content-Type": "application/json"},
    )


async def _endless(request: web.Request, content_type: str, piece: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    with contextlib.suppress(ConnectionError, RuntimeError):
        while True:  # until the client hangs up
            await response.write(piece)
    return response


async def _drip(request: web.Request, content_type: str, first: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(first)
        while True:
            await asyncio.sleep(0.05)
            await response.write(b" ")
    return response


def _huge_header(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": content_type, "X-Junk": "j" * 200_000})


def _batch_fault(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def reply(request: web.Request) -> web.StreamResponse:
        if kind in ("gzip", "deflate"):
            return _bomb_reply(kind)
        if kind == "endless":
            piece = b'{"code":"200","message":"success","data":{"list":[' + b" " * 65536
            return await _endless(request, "application/json", piece)
        if kind == "drip":
            return await _drip(request, "application/json", b'{"code":"200",')
        if kind == "nested":  # 100,000 levels: a recursive reader runs out of stack
            body = b'{"code":"200","message":"","data":{"list":[' + b"[" * 100_000
            return web.Response(
                body=body + b"]" * 100_000 + b"]}}", content_type="application/json"
            )
        if kind == "repeated-envelope":  # the last "code" is an error, the first a success
            body = b'{"code":"200","data":{"list":[]},"message":"ok","code":"500","data":7}'
            return web.Response(body=body, content_type="application/json")
        assert kind == "huge-header"
        return _huge_header(b'{"code":"200","message":"ok","data":{"list":[]}}', "application/json")

    return reply


@pytest.mark.parametrize(
    "kind", ["gzip", "deflate", "endless", "drip", "huge-header", "nested", "repeated-envelope"]
)
async def test_batch_replies_too_big_or_too_slow_cost_a_call_not_the_poller(
    kind: str, logs: Records
) -> None:
    # The first two batch calls get the fault; the poller asks again, and the job ends as the
    # healthy replies after say, with memory bounded by the reply cap, not the bomb's size.
    fault = _batch_fault(kind)

    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse | None:
        return await fault(request) if call < 2 else None

    async with gateway(reply_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=0.5, job=6, close=2)
        tracemalloc.start()
        try:
            async with client_of(gw, limits=SMALL_REPLIES, timeouts=timeouts) as client:
                started = time.monotonic()
                job = await client.images.submit(prompt="p", model="gpt-image-1")
                error = await ended(job, 5)
                took = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert error is None, repr(error)
    assert gw.batch_calls >= 3
    assert peak < 32 * 1024 * 1024, f"{peak / 1e6:.0f} MB at the peak"
    # Two faulty calls, each bounded by the request timeout (0.5 s) at worst.
    assert took < 2 * 0.5 + 1.5
    assert_logs_clean(logs, gw)


async def test_batch_replies_that_never_end_end_the_job_by_its_deadline() -> None:
    # Every batch reply drips for ever: the job ends with JobTimeoutError at its deadline, not
    # later, and the client closes promptly.
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        return await _drip(request, "application/json", b"{")

    async with gateway(reply_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=5, job=1.0, close=1)
        async with client_of(gw, timeouts=timeouts) as client:
            started = time.monotonic()
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            error = await ended(job, 3)
            assert isinstance(error, JobTimeoutError), repr(error)
            assert time.monotonic() - started < 1.0 + 0.5
        assert time.monotonic() - started < 1.0 + 2.0


@pytest.mark.parametrize("kind", ["gzip", "deflate", "endless", "drip", "huge-header"])
async def test_submit_replies_too_big_or_too_slow_are_typed_and_bounded(kind: str) -> None:
    # The submit was received: whatever its reply does, the caller gets a WujieError by the
    # request deadline, never a raw aiohttp or zlib error, and (sent, maybe charged) it is
    # never resent.
    fault = _batch_fault(kind)

    async def hook(request: web.Request) -> web.StreamResponse:
        return await fault(request)

    async with gateway(submit_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=0.5, job=5, close=1)
        async with client_of(gw, limits=SMALL_REPLIES, timeouts=timeouts) as client:
            started = time.monotonic()
            with pytest.raises(WujieError) as caught:
                await client.images.submit(prompt="p", model="gpt-image-1")
            assert time.monotonic() - started < 0.5 + 1.0
    assert isinstance(caught.value, SubmitUncertainError | ProtocolError), repr(caught.value)
    assert gw.submits == 1, "a submit that may have been charged was sent again"
    assert_clean(exception_texts(caught.value), gw, "the submit's error")


def _image_fault(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def reply(request: web.Request) -> web.StreamResponse:
        if kind in ("gzip", "deflate"):
            return web.Response(
                body=bomb("gzip" if kind == "gzip" else "zlib", BOMB_SIZE),
                headers={"Content-Encoding": kind, "Content-Type": "image/png"},
            )
        if kind == "endless":
            return await _endless(request, "image/png", PNG[:16] + bytes(65536))
        if kind == "drip":
            return await _drip(request, "image/png", PNG[:16])
        if kind == "huge-header":
            return _huge_header(PNG, "image/png")
        assert kind == "lying-length"  # says 1 KB, sends 10 MB
        body = PNG + bytes(10 * 1024 * 1024)
        response = web.StreamResponse(
            headers={"Content-Type": "image/png", "Content-Length": "1024"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(body)
        return response

    return reply


@pytest.mark.parametrize("kind", ["gzip", "deflate", "endless", "drip", "huge-header"])
async def test_image_downloads_too_big_or_too_slow_fail_typed_by_the_deadline(
    kind: str, tmp_path: Path, logs: Records
) -> None:
    async with gateway() as gw:
        gw.files["bad.png"] = _image_fault(kind)
        gw.plans["p"] = done_with(gw.url("bad.png"))
        downloads = DownloadPolicy(
            max_bytes=1024 * 1024, deadline=1.5, min_rate=64 * 1024, rate_window=0.5,
            connect_timeout=1, read_timeout=1,
        )  # fmt: skip
        tracemalloc.start()
        try:
            async with client_of(gw, downloads=downloads) as client:
                job = await client.images.submit(prompt="p", model="gpt-image-1")
                started = time.monotonic()
                with pytest.raises(WujieError) as caught:
                    await job.save(tmp_path)
                took = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert isinstance(caught.value, ProtocolError | TransportError), repr(caught.value)
    assert took < 1.5 + 1.0, f"{took:.1f} s"
    assert peak < 32 * 1024 * 1024, f"{peak / 1e6:.0f} MB at the peak"
    assert [path.name for path in tmp_path.iterdir()] == [], "a partial file was left"
    assert_clean(exception_texts(caught.value), gw, "the download's error")
    assert_logs_clean(logs, gw)


@pytest.mark.parametrize("stage", ["status-line", "headers", "body"])
async def test_an_image_server_that_drips_bytes_fails_by_the_deadline(
    stage: str, tmp_path: Path
) -> None:
    # A raw socket that sends its reply a byte every 50 ms, for ever: within the status line,
    # within the headers, or within the body. Silence never lasts long enough for a read
    # timeout; only the download's deadline (or its minimum rate) ends it.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-A: " + b"a" * 5000
    start = {"status-line": b"", "headers": head[:40], "body": b""}[stage]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if stage == "body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000000\r\n\r\n" + PNG[:16])  # fmt: skip
        else:
            writer.write(start)
        rest = (
            head if stage == "status-line" else head[40:] if stage == "headers" else b"\0" * 10**8
        )
        for byte in itertools.islice(rest, None):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    async with raw_server(serve) as port, gateway() as gw:
        url = f"http://127.0.0.1:{port}/drip.png"
        gw.plans["p"] = done_with(url)
        downloads = DownloadPolicy(
            deadline=1.0, min_rate=4096, rate_window=0.5, connect_timeout=1, read_timeout=1
        )
        async with client_of(gw, downloads=downloads) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            await job
            started = time.monotonic()
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
            took = time.monotonic() - started
    assert isinstance(caught.value, ProtocolError | TransportError), repr(caught.value)
    assert took < 1.0 + 1.0, f"{took:.1f} s"


# --- text a terminal acts on, and secrets, in whatever the client shows ---------------------------


def _failed_with(status: int, fail: Any) -> Plan:
    return lambda key, asked: [entry(key, status, fail_message=fail)]


TEXT_PLANS: dict[str, Plan] = {
    "fail-text": _failed_with(3, NASTY),
    "fail-object": _failed_with(3, {"fail_code": 20110001, "fail_message": NASTY}),
    "fail-code-text": _failed_with(3, {"fail_code": NASTY, "fail_message": None}),
    "moderated": _failed_with(5, {"fail_code": "20110001", "fail_message": NASTY}),
    "ended": _failed_with(-1, NASTY),
    "odd-status": lambda key, asked: [entry(key, 7 if asked < 3 else 3, fail_message=NASTY)],
}


async def test_server_text_in_job_errors_and_logs_is_inert(logs: Records) -> None:
    async with gateway(plans=TEXT_PLANS) as gw, client_of(gw) as client:
        jobs = {
            prompt: await client.images.submit(prompt=prompt, model="gpt-image-1")
            for prompt in TEXT_PLANS
        }
        for prompt, job in jobs.items():
            error = await ended(job, 3)
            assert isinstance(error, JobFailedError), (prompt, error)
            assert_clean(exception_texts(error), gw, f"{prompt}'s error")
            assert_clean(repr(job) + repr(job.snapshot()), gw, f"{prompt}'s job")
            if prompt != "fail-code-text":
                # Made inert, not dropped: what the gateway said is still there to read.
                assert "LOUD" in str(error) and "gnp.exe" in str(error), str(error)
    assert_logs_clean(logs, gw)


def _refusal(status: int, code: str, message: Any, *, html: bool = False) -> web.Response:
    if html:
        return web.Response(status=status, text=f"<html><pre>{message}</pre></html>",
                            content_type="text/html")  # fmt: skip
    envelope = {"code": code, "message": message, "data": None}
    return web.Response(status=status, text=json.dumps(envelope), content_type="application/json")


SUBMIT_REFUSALS: dict[str, Callable[[str], web.Response]] = {
    "business": lambda said: _refusal(200, "20010001", said),
    "sensitive": lambda said: _refusal(200, "20110001", said),
    "balance": lambda said: _refusal(200, "20110010", said),
    "unknown-code": lambda said: _refusal(200, said[:40], said),
    "message-object": lambda said: _refusal(200, "20010001", {"said": said, "n": [said]}),
    "auth-401": lambda said: _refusal(401, "401", said),
    "rate-429": lambda said: _refusal(429, "429", said),
    "server-500-html": lambda said: _refusal(500, "", said, html=True),
    "proxy-502-text": lambda said: web.Response(status=502, text=said),
    "teapot-418": lambda said: _refusal(418, "418", said),
}


def _echo(request: web.Request) -> str:
    """What a careless gateway says: the nasty text, then the request's own headers."""
    header = request.headers.get("Authorization", "")
    return f"{NASTY} bad request; Authorization: {header}"


@pytest.mark.parametrize("refusal", sorted(SUBMIT_REFUSALS))
async def test_refusals_quoting_escapes_and_the_signature_are_shown_clean(
    refusal: str, logs: Records
) -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return SUBMIT_REFUSALS[refusal](_echo(request))

    async with gateway(submit_hook=hook) as gw:
        retry = RetryPolicy(max_attempts=2, initial_wait=0, max_wait=0, max_elapsed=1)
        async with client_of(gw, retry=retry) as client:
            with pytest.raises(WujieError) as caught:
                await client.images.submit(prompt="p", model="gpt-image-1")
    assert gw.signs, "the gateway saw no signed request"
    assert_clean(exception_texts(caught.value), gw, f"the {refusal} error")
    assert_logs_clean(logs, gw)


async def test_job_failures_quoting_the_signature_are_shown_clean(logs: Records) -> None:
    # The batch reply's fail_message quotes the header of the very call it answers, verbatim,
    # URL-encoded and HTML-escaped.
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        header = request.headers["Authorization"]
        sign = json.loads(header)["sign"]
        fails = [
            header,
            urllib.parse.quote(header, safe=""),
            "".join(f"&#x{ord(c):x};" if not c.isalnum() else c for c in sign),
            "\n".join(sign[i : i + 40] for i in range(0, len(sign), 40)),
        ]
        listed = [
            entry(key, 3, fail_message={"fail_code": 1, "fail_message": fails[n % len(fails)]})
            for n, key in enumerate(asked)
        ]
        envelope = {"code": "200", "message": "success", "data": {"list": listed}}
        return web.json_response(envelope)

    async with gateway(reply_hook=hook) as gw, client_of(gw) as client:
        jobs = [await client.images.submit(prompt="p", model="gpt-image-1") for _ in range(4)]
        for job in jobs:
            error = await ended(job, 3)
            assert isinstance(error, JobFailedError)
            assert_clean(exception_texts(error), gw, "a job's error")
            assert not secrets_in(frame_locals(error), gw.signs)
    assert_logs_clean(logs, gw)


async def test_a_key_full_of_escapes_never_reaches_a_terminal(logs: Records) -> None:
    # The submit's reply hands out a "key" made of terminal escapes and bidi overrides. It is
    # either refused (a typed error) or shown inert wherever the client shows it.
    async def hook(request: web.Request) -> web.StreamResponse:
        key = f"{ANSI}{BIDI}KEY"
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    async with gateway(submit_hook=hook) as gw, client_of(gw) as client:
        try:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
        except WujieError as exc:
            assert_clean(exception_texts(exc), gw, "the refusal of the key")
        else:
            error = await ended(job, 4)
            assert isinstance(error, JobError)
            assert_clean(repr(job) + exception_texts(error), gw, "the job")
    assert_logs_clean(logs, gw)


async def test_image_hosts_never_see_the_signature(tmp_path: Path) -> None:
    # Downloads go to hosts the gateway names: the signed header must not go with them, nor
    # through a redirect.
    seen: list[dict[str, str]] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        raise web.HTTPFound(location=request.url.with_path("/img/final.png").human_repr())

    async def final(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.Response(body=PNG, content_type="image/png")

    async with gateway(files={"hop.png": redirect, "final.png": final}) as gw:
        gw.plans["p"] = done_with(gw.url("hop.png"), gw.url("final.png"))
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1", n=2)
            saved = await job.save(tmp_path)
    assert len(saved) == 2 and len(seen) == 3
    for headers in seen:
        assert not any(name.lower() == "authorization" for name in headers), headers
        assert not secrets_in(json.dumps(headers), gw.signs), headers


async def test_reprs_of_everything_hold_no_secret(logs: Records) -> None:
    async with gateway() as gw:
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            result = await job
            shown = [repr(CREDS), str(CREDS), repr(client), repr(job), repr(result)]
            shown += [repr(client.stats), repr(client.images), repr(job.snapshot())]
            text = "\n".join(shown)
    assert_clean(text, gw, "a repr")
    assert_logs_clean(logs, gw)


# --- the command line, against the same gateway --------------------------------------------------


def cli_env(gw: HostileGateway) -> dict[str, str]:
    return CLEAN_ENV | {
        "WUJIE_APP_ID": CREDS.app_id,
        "WUJIE_PRIVATE_KEY": CREDS.private_key,
        "WUJIE_BASE_URL": gw.base_url,
    }


def assert_markup_literal(output: str) -> None:
    """Rich markup in server text is printed as written, never interpreted (no style, no
    hyperlink): where "LOUD" shows, its tags show with it."""
    if "LOUD" in output:
        assert "[bold red]LOUD" in output, output


@pytest.mark.long  # the CLI first asks about a job after a second
@pytest.mark.parametrize("flags", [[], ["--verbose"], ["--json"]], ids=["plain", "verbose", "json"])
async def test_cli_generate_shows_a_hostile_failure_inert(flags: list[str], tmp_path: Path) -> None:
    plans = {"p": _failed_with(3, {"fail_code": 20110001, "fail_message": NASTY})}
    async with gateway(plans=plans) as gw:
        code, out, err = await cli(
            "generate", "p", "-o", str(tmp_path), "--progress", "plain", *flags, env=cli_env(gw)
        )
    assert code != 0, (out, err)
    assert "Traceback" not in err, err
    assert_clean(out, gw, "stdout")
    assert_clean(err, gw, "stderr")
    assert_markup_literal(out + err)
    assert "LOUD" in out + err, "what the gateway said is not shown at all"


async def test_cli_generate_shows_a_refusal_quoting_the_signature_inert(tmp_path: Path) -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return _refusal(200, "20010001", _echo(request))

    async with gateway(submit_hook=hook) as gw:
        code, out, err = await cli(
            "generate", "p", "-o", str(tmp_path), "--verbose", env=cli_env(gw)
        )
    assert code != 0 and "Traceback" not in err, (out, err)
    assert gw.signs
    assert_clean(out, gw, "stdout")
    assert_clean(err, gw, "stderr")
    assert_markup_literal(out + err)


@pytest.mark.long  # the CLI polls on its own schedule: 3 s
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
async def test_cli_status_shows_hostile_entries_inert(as_json: bool) -> None:
    # Keys the gateway lists with escapes in every text field: the fail message, an image's
    # URL and revised prompt, a time stamp.
    async with gateway() as gw:
        gw.keys = {"A" * 32: "failed", "B" * 32: "done", "C" * 32: "junk"}
        gw.plans = {
            "failed": _failed_with(3, {"fail_code": NASTY, "fail_message": NASTY}),
            "done": lambda key, asked: [
                entry(
                    key,
                    4,
                    images=[{"url": gw.url("ok.png") + "?x=" + NASTY, "revised_prompt": NASTY}],
                    start_gen_time=NASTY,
                    complete_time="2024-01-01 \u202e00:00",
                )
            ],
            "junk": lambda key, asked: [entry(key, NASTY)],
        }
        flags = ["--json"] if as_json else []
        code, out, err = await cli("status", *gw.keys, *flags, env=cli_env(gw))
    assert code in (0, 1), (code, out, err)
    assert "Traceback" not in err, err
    assert_clean(out, gw, "stdout")
    assert_clean(err, gw, "stderr")
    assert_markup_literal(out + err)
    for key in gw.keys:
        assert key in out + err, f"{key} is not reported"


@pytest.mark.long  # the CLI polls on its own schedule: 3 s
@pytest.mark.parametrize("kind", ["gzip", "drip"])
async def test_cli_generate_with_a_hostile_image_ends_in_time(kind: str, tmp_path: Path) -> None:
    async with gateway() as gw:
        gw.files["bad.png"] = _image_fault(kind)
        gw.plans["p"] = done_with(gw.url("bad.png"))
        started = time.monotonic()
        code, out, err = await cli(
            "generate", "p", "-o", str(tmp_path), "--download-timeout", "1.5",
            "--max-image-bytes", "1048576", env=cli_env(gw),
        )  # fmt: skip
        took = time.monotonic() - started
    assert code != 0 and "Traceback" not in err, (out, err)
    assert took < 1.5 + 5, f"{took:.1f} s"  # a second of polling, then the download's deadline
    assert_clean(out + err, gw, "the output")
    assert not list(tmp_path.rglob("*.png")), "an image was saved"


# --- more waits that must end: Retry-After, closing, cancelling, estimates ---------------------

RETRY_AFTERS = ["1e12", "-5", "nan", "inf", "Fri, 31 Dec 9999 23:59:59 GMT", "9" * 400, "soon"]


@pytest.mark.parametrize("retry_after", RETRY_AFTERS)
async def test_a_hostile_retry_after_on_batch_calls_does_not_park_the_poller(
    retry_after: str,
) -> None:
    # Two batch calls are refused with 429 and an absurd Retry-After; the job still ends
    # within seconds of the gateway answering again, not when the Retry-After says.
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse | None:
        if call >= 2:
            return None
        envelope = {"code": "429", "message": "slow down", "data": None}
        return web.json_response(envelope, status=429, headers={"Retry-After": retry_after})

    async with gateway(reply_hook=hook) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        assert await ended(job, 5) is None


@pytest.mark.parametrize("retry_after", ["1e12", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_hostile_retry_after_on_a_submit_ends_in_a_typed_error_soon(
    retry_after: str,
) -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        envelope = {"code": "429", "message": "slow down", "data": None}
        return web.json_response(envelope, status=429, headers={"Retry-After": retry_after})

    async with gateway(submit_hook=hook) as gw, client_of(gw) as client:
        started = time.monotonic()
        with pytest.raises(WujieError) as caught:
            await client.images.submit(prompt="p", model="gpt-image-1")
        assert time.monotonic() - started < 2
    assert type(caught.value).__name__ == "RateLimitedError", repr(caught.value)


async def test_closing_while_a_batch_reply_drips_ends_within_the_close_timeout() -> None:
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        return await _drip(request, "application/json", b"{")

    async with gateway(reply_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=60, job=60, close=1)
        client = client_of(gw, timeouts=timeouts)
        await client.open()
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        await eventually(lambda: gw.batch_calls > 0, timeout=3, what="a batch call")
        started = time.monotonic()
        await client.aclose()
        assert time.monotonic() - started < 1 + 1
        assert job.done()


async def test_cancelling_a_submit_whose_reply_drips_is_prompt() -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return await _drip(request, "application/json", b'{"code":"200"')

    async with gateway(submit_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=60, job=60, close=1)
        async with client_of(gw, timeouts=timeouts) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await client.images.submit(prompt="p", model="gpt-image-1")
            assert time.monotonic() - started < 0.3 + 0.5


async def test_an_estimate_of_years_does_not_delay_seeing_the_end() -> None:
    # "1e9 seconds left", then done 0.4 s after the submit: seen within max_interval.
    born: dict[str, float] = {}

    def plan(key: str, asked: int) -> list[Any]:
        born.setdefault(key, time.monotonic())
        if time.monotonic() - born[key] < 0.4:
            return [entry(key, 1, complete_percent=1, expected_seconds=1e9, queue_before_num=10**9)]
        return [entry(key, 4, images=[{"url": OK_IMAGE}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        assert await ended(job, 3) is None
        took = time.monotonic() - min(born.values())
    assert took < 0.4 + POLL.max_interval + 0.3, f"{took:.2f} s"


# --- what a gateway may name as an image -------------------------------------------------------

HOSTILE_URLS = {
    "file": "file:///etc/passwd",
    "javascript": "javascript:alert(1)",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "private": "http://10.0.0.1/x.png",
    "credentials": "http://user:hunter2@127.0.0.1:{port}/img/ok.png",
    "header-injection": "http://127.0.0.1:{port}/img/ok.png\r\nX-Injected: 1",
    "escapes": "http://127.0.0.1:{port}/img/\x1b[2J\u202eok.png",
    "long": "http://127.0.0.1:{port}/img/" + "a" * 100_000,
    "blank": "   ",
    "ftp": "ftp://127.0.0.1:{port}/ok.png",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_URLS))
async def test_hostile_image_urls_are_refused_typed(
    name: str, tmp_path: Path, logs: Records
) -> None:
    seen: list[str] = []

    async with gateway() as gw:
        url = HOSTILE_URLS[name].replace("{port}", str(gw.port))
        gw.plans["p"] = done_with(url)

        async def ok(request: web.Request) -> web.StreamResponse:
            seen.append(str(request.url) + repr(dict(request.headers)))
            return web.Response(body=PNG, content_type="image/png")

        gw.files["ok.png"] = ok
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            started = time.monotonic()
            try:
                saved = await job.save(tmp_path)
            except WujieError as exc:
                assert_clean(exception_texts(exc), gw, "the refusal")
                assert len(str(exc)) < 2000, f"{len(str(exc))} characters"
            else:
                # Only a URL that names the loopback gateway's own image server may be
                # fetched (its odd characters percent-encoded, as a URL parser does), never
                # with a header injected. (The user:password@ of a URL goes to the host it
                # names, as Basic auth: what such a URL means, not a leak.)
                fetchable = ("credentials", "escapes", "header-injection")
                assert name in fetchable, f"{url[:80]!r} was fetched: {saved}"
            assert time.monotonic() - started < 3
    for request in seen:
        assert "X-Injected" not in request, request
        assert name == "credentials" or "authorization" not in request.lower(), request
    assert not any("hunter2" in line for line in logs.lines)
    assert all(len(line) < 5000 for line in logs.lines), max(map(len, logs.lines))
    assert_logs_clean(logs, gw)


B64_IMAGES = {
    "not-base64": "!!!not base64!!!",
    "html": base64.b64encode(b"<html><script>alert(1)</script></html>").decode(),
    "too-big": base64.b64encode(bytes(2 * 1024 * 1024)).decode(),
    "data-url-html": "data:text/html;base64," + base64.b64encode(b"<html></html>").decode(),
}


@pytest.mark.parametrize("name", sorted(B64_IMAGES))
async def test_hostile_inline_images_are_refused_typed(name: str, tmp_path: Path) -> None:
    def plan(key: str, asked: int) -> list[Any]:
        return [entry(key, 4, images=[{"url": None, "b64_json": B64_IMAGES[name]}])]

    async with gateway(plans={"p": plan}) as gw:
        downloads = DownloadPolicy(max_bytes=1024 * 1024)
        async with client_of(gw, downloads=downloads) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
    assert isinstance(caught.value, ProtocolError), repr(caught.value)
    assert list(tmp_path.iterdir()) == []


async def test_a_key_of_100k_characters_is_refused_and_never_logged_whole(logs: Records) -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        data = {"key": "K" * 100_000}
        return web.json_response({"code": "200", "message": "success", "data": data})

    async with gateway(submit_hook=hook) as gw, client_of(gw) as client:
        with pytest.raises(WujieError) as caught:
            await client.images.submit(prompt="p", model="gpt-image-1")
    assert len(exception_texts(caught.value)) < 20_000
    assert all(len(line) < 5000 for line in logs.lines), max(map(len, logs.lines))


async def test_fifty_thousand_headers_on_an_image_fail_typed(tmp_path: Path) -> None:
    async def many(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict([("X-H", str(n)) for n in range(50_000)])
        headers["Content-Type"] = "image/png"
        return web.Response(body=PNG, headers=headers)

    async with gateway(files={"many.png": many}) as gw:
        gw.plans["p"] = done_with(gw.url("many.png"))
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            started = time.monotonic()
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
            assert time.monotonic() - started < 3
    assert isinstance(caught.value, ProtocolError | TransportError), repr(caught.value)


@pytest.mark.parametrize("fault", ["404", "drip", "html"])
async def test_a_password_in_an_image_url_never_shows(
    fault: str, tmp_path: Path, logs: Records
) -> None:
    async def bad(request: web.Request) -> web.StreamResponse:
        if fault == "404":
            return web.Response(status=404, text=f"no such image: {request.url}")
        if fault == "drip":
            return await _drip(request, "image/png", PNG[:8])
        return web.Response(text=f"<html>{request.url}</html>", content_type="text/html")

    async with gateway(files={"bad.png": bad}) as gw:
        url = gw.url("bad.png").replace("http://", "http://user:hunter2@") + "?sig=hunter2"
        gw.plans["p"] = done_with(url)
        downloads = DownloadPolicy(deadline=1, min_rate=4096, rate_window=0.3)
        async with client_of(gw, downloads=downloads) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            result = await job
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
            shown = exception_texts(caught.value) + repr(result) + repr(job.snapshot())
    assert "hunter2" not in shown, shown
    assert not [line for line in logs.lines if "hunter2" in line]


# --- what lands on disk ------------------------------------------------------------------------

HOSTILE_KEYS = ["../../../escaped", "..", "a/b\\c", "CON", "%2e%2e%2fup", ".hidden", "-rf"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
async def test_a_hostile_key_never_names_a_file_outside_the_folder(
    key: str, tmp_path: Path
) -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        gw.keys[key] = "p"
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    out = tmp_path / "deep" / "out"
    async with gateway(submit_hook=hook) as gw, client_of(gw) as client:
        try:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            saved = await job.save(out)
        except WujieError as exc:
            assert_clean(exception_texts(exc), gw, "the refusal")
        else:
            assert [image.path.parent for image in saved] == [out], saved
            assert not saved[0].path.name.startswith((".", "-")), saved
    everything = {path for path in tmp_path.rglob("*") if path.is_file()}
    assert all(out in path.parents for path in everything), everything


IMAGE_LIES: dict[str, Callable[[], web.Response]] = {
    "svg": lambda: web.Response(
        text='<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        content_type="image/svg+xml",
    ),
    "html-as-png": lambda: web.Response(
        text="<html><script>alert(1)</script></html>", content_type="image/png"
    ),
    "gif": lambda: web.Response(body=b"GIF89a" + bytes(64), content_type="image/gif"),
    "empty": lambda: web.Response(body=b"", content_type="image/png"),
    "truncated-png": lambda: web.Response(body=PNG[:20], content_type="image/png"),
}


@pytest.mark.parametrize("lie", sorted(IMAGE_LIES))
async def test_a_body_that_is_no_image_is_refused(lie: str, tmp_path: Path) -> None:
    async def serve(request: web.Request) -> web.StreamResponse:
        return IMAGE_LIES[lie]()

    async with gateway(files={"x.png": serve}) as gw:
        gw.plans["p"] = done_with(gw.url("x.png"))
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
    # A body cut short may be the connection's doing (TransportError, retried); anything else
    # is the server's (ProtocolError).
    wanted = TransportError if lie == "truncated-png" else ProtocolError
    assert isinstance(caught.value, wanted), repr(caught.value)
    assert list(tmp_path.iterdir()) == []


async def test_a_content_disposition_names_no_file(tmp_path: Path) -> None:
    async def serve(request: web.Request) -> web.StreamResponse:
        disposition = "attachment; filename=\"../../evil.sh\"; filename*=UTF-8''..%2F..%2Fevil.sh"
        return web.Response(
            body=PNG, headers={"Content-Type": "image/png", "Content-Disposition": disposition}
        )

    out = tmp_path / "a" / "b"
    async with gateway(files={"x.png": serve}) as gw:
        gw.plans["p"] = done_with(gw.url("x.png"))
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            saved = await job.save(out)
    assert [image.path.parent for image in saved] == [out]
    assert [path.name for path in tmp_path.rglob("evil*")] == []


REDIRECTS = {
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "file": "file:///etc/passwd",
    "private": "http://192.168.1.1/x.png",
    "loop": "/img/loop.png",
}


@pytest.mark.parametrize("where", sorted(REDIRECTS))
async def test_image_redirects_to_forbidden_places_are_refused(where: str, tmp_path: Path) -> None:
    async def hop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(location=REDIRECTS[where])

    async with gateway(files={"loop.png": hop}) as gw:
        gw.plans["p"] = done_with(gw.url("loop.png"))
        async with client_of(gw) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            started = time.monotonic()
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
            assert time.monotonic() - started < 2
    assert not isinstance(caught.value, TransportError) or where == "loop", repr(caught.value)
    assert list(tmp_path.iterdir()) == []


async def test_a_million_image_placeholders_fail_their_own_job_only(tmp_path: Path) -> None:
    # One job's report lists ten images and then a million empty placeholders (3 MB, under
    # the reply cap): that job may fail (JobProtocolError), but the jobs asked about in the
    # same batch calls must not wait out their deadlines with it.
    def flood(key: str, asked: int) -> list[Any]:
        listing = RawJson(
            "["
            + ",".join(f'{{"url":"{OK_IMAGE}?{n}"}}' for n in range(10))
            + ",{}" * 1_000_000
            + "]"
        )
        return [entry(key, 4, images=listing)]

    def slow(key: str, asked: int) -> list[Any]:  # asked about alongside the flood
        if asked < 2:
            return [entry(key, 1, expected_seconds=0.05)]
        return [entry(key, 4, images=[{"url": OK_IMAGE}])]

    async with gateway(plans={"flood": flood, "slow": slow}) as gw:
        timeouts = Timeouts(connect=1, request=2, job=2, close=1)
        async with client_of(gw, timeouts=timeouts) as client:
            flooded = await client.images.submit(prompt="flood", model="gpt-image-1")
            others = [
                await client.images.submit(prompt="slow", model="gpt-image-1") for _ in range(3)
            ]
            outcomes = [await ended(job, 5) for job in others]
            flood_error = await ended(flooded, 5)
    assert outcomes == [None] * 3, [repr(error) for error in outcomes]
    assert flood_error is None or isinstance(flood_error, JobProtocolError), repr(flood_error)


@pytest.mark.long  # the client waits IMAGES_AFTER_SUCCESS_GRACE (3 s) for images listed late
@pytest.mark.parametrize("placeholder", [{"url": None, "b64_json": None}, None])
async def test_a_placeholder_image_is_not_an_image(placeholder: Any) -> None:
    # n=2, done with image 0 a placeholder (neither url nor b64_json, or null) and image 1
    # real: image 1 resolves, image 0 and the job end with IncompleteJobError holding image 1.
    def plan(key: str, asked: int) -> list[Any]:
        return [entry(key, 4, images=[placeholder, {"url": OK_IMAGE}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1", n=2)
        second = await job.image(1, timeout=2)
        assert second.url == gw.url("ok.png")
        error = await ended(job, 6)
        assert type(error).__name__ == "IncompleteJobError", repr(error)
        with pytest.raises(JobError):
            await job.image(0, timeout=1)


# --- image replies no HTTP library should have to read ------------------------------------------

_PNG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
RAW_IMAGE_REPLIES: dict[str, bytes] = {
    "negative-length": _PNG_HEAD + b"Content-Length: -1\r\n\r\n" + PNG,
    "huge-length": _PNG_HEAD + b"Content-Length: " + b"9" * 30 + b"\r\n\r\n" + PNG,
    "two-lengths": _PNG_HEAD + b"Content-Length: 10, 73\r\n\r\n" + PNG,
    "length-and-chunked": _PNG_HEAD
    + b"Content-Length: 73\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"ffffffffffffffffffff\r\n"
    + PNG,
    "bad-chunk-size": _PNG_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + PNG,
    "chunk-bigger-than-sent": _PNG_HEAD + b"Transfer-Encoding: chunked\r\n\r\nfffffff\r\n" + PNG,
    "unknown-encoding": _PNG_HEAD + b"Content-Encoding: xz\r\nContent-Length: 73\r\n\r\n" + PNG,
    "brotli-garbage": _PNG_HEAD + b"Content-Encoding: br\r\nContent-Length: 73\r\n\r\n" + PNG,
    "bad-status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 73\r\n\r\n" + PNG,
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "http-0.9": PNG,
    "header-nul": _PNG_HEAD + b"X-A: a\x00b\r\nContent-Length: 73\r\n\r\n" + PNG,
    "header-folded": _PNG_HEAD + b"X-A: a\r\n  folded\r\nContent-Length: 73\r\n\r\n" + PNG,
    "cut-mid-body": _PNG_HEAD + b"Content-Length: 73\r\n\r\n" + PNG[:30],
    "no-blank-line": _PNG_HEAD + b"Content-Length: 73\r\n",
    "many-headers": _PNG_HEAD + b"X: y\r\n" * 200_000 + b"Content-Length: 73\r\n\r\n" + PNG,
    "100-continue-forever": b"HTTP/1.1 100 Continue\r\n\r\n" * 100_000,
}


@pytest.mark.parametrize("name", sorted(RAW_IMAGE_REPLIES))
async def test_an_image_reply_of_broken_http_fails_typed_and_in_time(
    name: str, tmp_path: Path, logs: Records
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(RAW_IMAGE_REPLIES[name])
        await writer.drain()
        await asyncio.sleep(0.3)

    async with raw_server(serve) as port, gateway() as gw:
        gw.plans["p"] = done_with(f"http://127.0.0.1:{port}/x.png")
        downloads = DownloadPolicy(deadline=1, connect_timeout=0.5, read_timeout=0.5)
        async with client_of(gw, downloads=downloads) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            await job
            started = time.monotonic()
            try:
                saved = await job.save(tmp_path)
            except WujieError as exc:
                assert isinstance(exc, ProtocolError | TransportError), repr(exc)
                assert_clean(exception_texts(exc), gw, "the error")
            else:
                # A lenient reader may take a few (a second Content-Length, folded headers):
                # then what it saved is the whole, valid image.
                assert saved[0].path.read_bytes() == PNG, name
            took = time.monotonic() - started
    assert took < 1 + 1, f"{took:.1f} s"
    assert_logs_clean(logs, gw)


SURROGATES = "bad \ud800 half \udfff pair \U0001f600 end"


async def test_lone_surrogates_in_server_text_neither_crash_nor_leak(
    logs: Records, tmp_path: Path
) -> None:
    # JSON may escape half a surrogate pair ("\\ud800"): Python reads a string that cannot be
    # encoded as UTF-8. Printing or logging it must not raise UnicodeEncodeError.
    def listed(key: str, asked: int) -> list[Any]:
        image = {"url": OK_IMAGE + "?q=\ud800", "revised_prompt": SURROGATES}
        return [entry(key, 4, images=[image])]

    plans = {
        "p": _failed_with(3, {"fail_code": 1, "fail_message": SURROGATES}),
        "text": _failed_with(3, SURROGATES),
        "img": listed,
    }

    async def hook(request: web.Request) -> web.StreamResponse | None:
        body = await request.json()
        if body["prompt"] == "refused":
            return _refusal(200, "20010001", SURROGATES)
        return None

    async with gateway(plans=plans, submit_hook=hook) as gw, client_of(gw) as client:
        errors = []
        for prompt in ("p", "text"):
            job = await client.images.submit(prompt=prompt, model="gpt-image-1")
            errors.append(await ended(job, 3))
        with pytest.raises(WujieError) as caught:
            await client.images.submit(prompt="refused", model="gpt-image-1")
        errors.append(caught.value)
        job = await client.images.submit(prompt="img", model="gpt-image-1")
        [image] = (await job).images
        f"{image.url} {image.revised_prompt} {image!r}".encode()
        try:
            await job.save(tmp_path)
        except WujieError as exc:
            errors.append(exc)
    for shown in errors:
        assert shown is not None
        exception_texts(shown).encode("utf-8")  # no lone surrogate left
    for line in logs.lines:
        line.encode("utf-8")


@pytest.mark.long  # the CLI first asks about a job after a second
@pytest.mark.parametrize("progress", ["rich", "plain"])
async def test_cli_progress_displays_keep_markup_literal(progress: str, tmp_path: Path) -> None:
    plans = {"p": _failed_with(3, {"fail_code": 1, "fail_message": f"{MARKUP} {SURROGATES}"})}
    async with gateway(plans=plans) as gw:
        code, out, err = await cli(
            "generate", "p", "-o", str(tmp_path), "--progress", progress, env=cli_env(gw)
        )
    assert code != 0 and "Traceback" not in err, (out, err)
    assert "Logging error" not in err, err
    assert_markup_literal(out + err)
    assert "LOUD" in out + err
    (out + err).encode("utf-8")


async def test_image_fields_quoting_the_signature_stay_out_of_reprs_and_logs(
    logs: Records,
) -> None:
    # A proxy that echoes the request's header into a 200 reply's image fields (the revised
    # prompt, the URL's path): the job succeeds, and its reprs and logs do not quote it.
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        sign = json.loads(request.headers["Authorization"])["sign"]
        image = {
            "url": f"http://127.0.0.1:{gw.port}/img/{urllib.parse.quote(sign, safe='')}.png",
            "revised_prompt": f"echo: {sign}",
        }
        listed = [entry(key, 4, images=[image]) for key in asked]
        return web.json_response({"code": "200", "message": "success", "data": {"list": listed}})

    async with gateway(reply_hook=hook) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        result = await job
        shown = "\n".join([repr(job), repr(result), repr(job.snapshot()), repr(result.images)])
    assert_clean(shown, gw, "a repr")
    assert_logs_clean(logs, gw)


@pytest.mark.parametrize("fault", ["404", "html", "drip"])
async def test_download_errors_of_a_url_quoting_the_signature_do_not_quote_it(
    fault: str, tmp_path: Path, logs: Records
) -> None:
    async def bad(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if fault == "404":
            return web.Response(status=404, text=f"no such image: {request.url}")
        if fault == "drip":
            return await _drip(request, "image/png", PNG[:8])
        return web.Response(text=f"<html>{request.url}</html>", content_type="text/html")

    seen: list[str] = []

    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        sign = json.loads(request.headers["Authorization"])["sign"]
        quoted = urllib.parse.quote(sign, safe="")
        image = {"url": f"http://127.0.0.1:{gw.port}/img/bad.png/{quoted}/x.png"}
        listed = [entry(key, 4, images=[image]) for key in asked]
        return web.json_response({"code": "200", "message": "success", "data": {"list": listed}})

    async with gateway(reply_hook=hook) as gw:
        gw.files["bad.png"] = bad
        downloads = DownloadPolicy(deadline=1, min_rate=4096, rate_window=0.3)
        async with client_of(gw, downloads=downloads) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            await job
            with pytest.raises(WujieError) as caught:
                await job.save(tmp_path)
    assert seen, "the image server was never asked"
    assert_clean(exception_texts(caught.value), gw, "the download's error")
    assert_logs_clean(logs, gw)


# --- deeper: what an error reporter records, log volume, silent and vanishing servers -------------


def frame_locals(exc: BaseException) -> str:
    """The reprs of every local of every frame in the tracebacks of ``exc`` and its causes and
    contexts: what an error reporter that records locals (Sentry's default) stores."""
    texts: list[str] = []
    for current in error_chain(exc):
        tb = current.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_filename != __file__:  # this test's own frames hold its gateway
                for name, value in tb.tb_frame.f_locals.items():
                    with contextlib.suppress(Exception):
                        texts.append(f"{code.co_filename}:{code.co_name}: {name}={value!r}")
            tb = tb.tb_next
    return "\n".join(texts)


@pytest.mark.parametrize("refusal", ["auth-401", "business", "server-500-html", "proxy-502-text"])
async def test_no_frame_of_a_refusal_holds_the_signature(refusal: str) -> None:
    async def hook(request: web.Request) -> web.StreamResponse:
        return SUBMIT_REFUSALS[refusal](_echo(request))

    async with gateway(submit_hook=hook) as gw:
        retry = RetryPolicy(max_attempts=1, initial_wait=0, max_wait=0, max_elapsed=1)
        async with client_of(gw, retry=retry) as client:
            with pytest.raises(WujieError) as caught:
                await client.images.submit(prompt="p", model="gpt-image-1")
    leaked = [
        line for line in frame_locals(caught.value).splitlines() if secrets_in(line, gw.signs)
    ]
    assert not leaked, "frames of the error's traceback hold the signature:\n" + "\n".join(
        line[:300] for line in leaked
    )


async def test_a_gateway_failing_every_call_differently_writes_few_log_lines(
    logs: Records,
) -> None:
    # Every batch call fails with a new message (a 503 quoting a request id): the warnings are
    # gated, not one per call.
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        return _refusal(503, "503", f"busy, request id {call} {NASTY}")

    async with gateway(reply_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=1, job=1.0, close=1)
        async with client_of(gw, timeouts=timeouts) as client:
            jobs = [await client.images.submit(prompt="p", model="gpt-image-1") for _ in range(20)]
            for job in jobs:
                assert isinstance(await ended(job, 3), JobTimeoutError)
    assert gw.batch_calls >= 10
    warnings = [line for line in logs.lines if line.startswith("WARNING")]
    assert len(warnings) <= 5, "\n".join(warnings)
    assert_logs_clean(logs, gw)


@pytest.mark.parametrize("behaviour", ["silent", "close", "reset"])
async def test_a_gateway_that_says_nothing_fails_a_submit_typed_by_the_deadline(
    behaviour: str,
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "silent":
            await asyncio.sleep(30)
        elif behaviour == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async with raw_server(serve) as port:
        timeouts = Timeouts(connect=1, request=0.5, job=5, close=1)
        client = WujieClient(
            CREDS,
            base_url=f"http://127.0.0.1:{port}{BASE_PATH}",
            poll=POLL,
            retry=QUICK_RETRY,
            timeouts=timeouts,
        )
        async with client:
            started = time.monotonic()
            with pytest.raises(WujieError) as caught:
                await client.images.submit(prompt="p", model="gpt-image-1")
            assert time.monotonic() - started < 0.5 * 2 + 1
    # The request went out: it may have been taken (and charged).
    assert isinstance(caught.value, SubmitUncertainError), repr(caught.value)


async def test_cancelling_a_save_from_a_server_that_never_ends_leaves_no_file(
    tmp_path: Path,
) -> None:
    # No deadline and no minimum rate (both off): only the caller's own timeout ends a save
    # from a server that sends a byte at a time for ever. It ends at once, and no partial or
    # temporary file stays behind.
    async def endless(request: web.Request) -> web.StreamResponse:
        return await _drip(request, "image/png", PNG[:16])

    async with gateway(files={"x.png": endless}) as gw:
        gw.plans["p"] = done_with(gw.url("x.png"))
        downloads = DownloadPolicy(deadline=None, min_rate=None, read_timeout=30)
        async with client_of(gw, downloads=downloads) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            await job
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await job.save(tmp_path)
            assert time.monotonic() - started < 0.3 + 0.5
            # The client is still usable, and saves the next image as usual.
            gw.plans["q"] = done_with(gw.url("ok.png"))
            other = await client.images.submit(prompt="q", model="gpt-image-1")
            saved = await other.save(tmp_path)
    assert sorted(tmp_path.iterdir()) == [saved[0].path]


@pytest.mark.parametrize(
    "code", ["200 ", " 200", "200\n", "0", "success", "SUCCESS", True, None, [200], {"c": 200}]
)
async def test_an_odd_success_code_beside_a_key_is_never_read_as_not_accepted(code: Any) -> None:
    # A reply whose code is not the contract's "200" but whose data holds a key: the job may
    # exist (and be charged). Accepted, or uncertain: never "refused, not charged".
    async def hook(request: web.Request) -> web.StreamResponse:
        envelope = {"code": code, "message": "success", "data": {"key": "K" * 32}}
        return web.json_response(envelope)

    async with gateway(submit_hook=hook) as gw, client_of(gw) as client:
        try:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
        except WujieError as exc:
            assert isinstance(exc, SubmitUncertainError), repr(exc)
        else:
            assert job.key == "K" * 32


async def test_as_completed_over_hostile_jobs_yields_each_once_by_its_deadline() -> None:
    plans: dict[str, Plan] = {
        "ok": done_with(OK_IMAGE),
        "failed": _failed_with(3, NASTY),
        "malformed": _forever(lambda k: [entry(k, "done")]),
        "absent": lambda key, asked: [],
        "forever": lambda key, asked: [entry(key, 1, expected_seconds=-1)],
    }
    async with gateway(plans=plans) as gw:
        timeouts = Timeouts(connect=1, request=1, job=1.5, close=1)
        async with client_of(gw, timeouts=timeouts) as client:
            jobs = [
                await client.images.submit(prompt=prompt, model="gpt-image-1")
                for prompt in plans
                for _ in range(3)
            ]
            async with asyncio.timeout(4):
                seen = [job async for job in client.as_completed(jobs)]
    assert sorted(job.key for job in seen) == sorted(job.key for job in jobs)
    errors = {job.request["prompt"] if job.request else "": type(job.exception()) for job in seen}
    assert errors == {
        "ok": type(None),
        "failed": JobFailedError,
        "malformed": JobProtocolError,
        "absent": UnknownJobError,
        "forever": JobTimeoutError,
    }


async def test_a_null_image_in_a_running_listing_is_an_image_not_made_yet() -> None:
    # n=2, image 1 finished first: while the job runs (longer than the unknown-key grace) the
    # gateway lists [null, image 1], null standing for the image not made yet, then both. The
    # paid job succeeds with both, image 1 resolving early; a null item is no image, not a
    # reason to read the whole entry (its status included) as malformed.
    started: dict[str, float] = {}
    running_for = POLL.unknown_key_grace * 2

    def plan(key: str, asked: int) -> list[Any]:
        started.setdefault(key, time.monotonic())
        if time.monotonic() - started[key] < running_for:
            return [entry(key, 1, complete_percent=50, images=[None, {"url": OK_IMAGE + "?1"}])]
        return [entry(key, 4, images=[{"url": OK_IMAGE + "?0"}, {"url": OK_IMAGE + "?1"}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1", n=2)
        second = await job.image(1, timeout=running_for)
        assert not job.done() and second.url == gw.url("ok.png") + "?1"
        result = await asyncio.wait_for(job.result(), running_for + 2)
    assert [image.url for image in result.images] == [
        gw.url("ok.png") + "?0",
        gw.url("ok.png") + "?1",
    ]


@pytest.mark.parametrize("empty", [{}, RawJson("{ }")], ids=["object", "object-spaced"])
async def test_an_empty_object_for_an_empty_image_list_is_an_empty_list(empty: Any) -> None:
    # Lua's cjson (OpenResty gateways) writes an empty table as {}: a running job's "images"
    # come as {} until there are some. The job goes on (longer than the unknown-key grace)
    # and succeeds, and a key the gateway lists as {"list": {}} is absent, not a failed call.
    started: dict[str, float] = {}
    running_for = POLL.unknown_key_grace * 2

    def plan(key: str, asked: int) -> list[Any]:
        started.setdefault(key, time.monotonic())
        if time.monotonic() - started[key] < running_for:
            return [entry(key, 1, complete_percent=50, images=empty)]
        return [entry(key, 4, images=[{"url": OK_IMAGE}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        assert await ended(job, running_for + 2) is None


async def test_an_empty_object_for_an_empty_list_of_entries_means_none_listed() -> None:
    # {"list": {}}: nothing listed (Lua's cjson again). A key never listed so ends as unknown
    # after the grace, not at its deadline as if every call had failed.
    async def hook(request: web.Request, asked: list[str], call: int) -> web.StreamResponse:
        envelope = {"code": "200", "message": "success", "data": {"list": {}}}
        return web.json_response(envelope)

    async with gateway(reply_hook=hook) as gw:
        timeouts = Timeouts(connect=1, request=1, job=30, close=1)
        async with client_of(gw, timeouts=timeouts) as client:
            job = await client.images.submit(prompt="p", model="gpt-image-1")
            error = await ended(job, POLL.unknown_key_grace + 2)
    assert isinstance(error, UnknownJobError), repr(error)


_B64 = base64.b64encode(PNG).decode()
INLINE_FORMS = {
    "plain": _B64,
    "data-url": "data:image/png;base64," + _B64,
    "mime-wrapped": "\n".join(_B64[start : start + 20] for start in range(0, len(_B64), 20)),
    "urlsafe": base64.urlsafe_b64encode(PNG).decode(),
    "no-padding": _B64.rstrip("="),
    "padded": "  " + _B64 + "\n",
}


@pytest.mark.parametrize("form", sorted(INLINE_FORMS))
async def test_a_paid_inline_image_in_any_common_base64_form_is_saved(
    form: str, tmp_path: Path
) -> None:
    def plan(key: str, asked: int) -> list[Any]:
        return [entry(key, 4, images=[{"url": None, "b64_json": INLINE_FORMS[form]}])]

    async with gateway(plans={"p": plan}) as gw, client_of(gw) as client:
        job = await client.images.submit(prompt="p", model="gpt-image-1")
        [saved] = await job.save(tmp_path)
    assert saved.path.read_bytes() == PNG
