"""What the transport makes of failures: typed errors, retries that are safe, and no more."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import gzip
import json
import resource
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wujie_async import (
    AuthenticationError,
    Credentials,
    EndpointNotFoundError,
    InsufficientBalanceError,
    Limits,
    ParameterError,
    PollPolicy,
    ProtocolError,
    RateLimitedError,
    RequestRefusedError,
    ResponseTooLargeError,
    RetryPolicy,
    ServerError,
    SubmitUncertainError,
    Timeouts,
    TransportError,
    UnexpectedRedirectError,
    WujieClient,
    WujieError,
)
from wujie_async._body_decoding import BodyDecoder
from wujie_async._connections import SUBMIT_IDLE_SECONDS
from wujie_async._envelopes import decode_reply
from wujie_async._errors import ReplyTooComplexError
from wujie_async._failures import CallKind
from wujie_async._poller import BatchPoller
from wujie_async.emulator import FaultConfig

from .conftest import INSTANT_RETRY, EmulatorFactory, make_client, open_transport
from .helpers import GENERATIONS, INFO
from .hostile import (
    BOMB_INFLATED,
    HostileGateway,
    gzip_bomb,
    hostile_gateway,
    recording_gateway,
    serve,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("mode", "says", "error", "calls"),
    [
        # An oversized reply is not retried: the same question gets the same answer.
        ("huge-declared", "cap", ResponseTooLargeError, 1),
        ("huge-chunked", "cap", ResponseTooLargeError, 1),
        # Nested too deep to read: not retried either (the poller asks about fewer keys).
        ("nested", "nested deeper", ProtocolError, 1),
        ("not-envelope", "envelope", ProtocolError, 2),
        ("array", "envelope", ProtocolError, 2),
    ],
)
async def test_bad_replies_become_protocol_errors(
    emulator: EmulatorFactory, mode: str, says: str, error: type[ProtocolError], calls: int
) -> None:
    async with emulator() as emu, hostile_gateway() as base:
        async with open_transport(base, emu.credentials) as transport:
            with pytest.raises(error) as info:
                await transport.post(f"/{mode}", [], kind="poll")
            assert says in str(info.value)
            assert transport.counters.http_calls == calls  # polls are retried, then give up
            with pytest.raises(SubmitUncertainError) as uncertain:
                await transport.post(f"/{mode}", {"prompt": "p"}, kind="submit")
            assert isinstance(uncertain.value.__cause__, ProtocolError)
            assert uncertain.value.request == {"prompt": "p"}


async def test_a_refusal_whose_message_nests_deep_is_a_typed_error(
    emulator: EmulatorFactory,
) -> None:
    """A refusal whose message is an array nested about as deep as a JSON reader follows: the
    reply parsed, and quoting the message (json.dumps, a few frames deeper) ran out of stack:
    a bare RecursionError, untyped (a submit so answered "uncertain" for a bug). Every depth,
    up to where the reply is not read at all, is a typed error now."""

    async def deep(request: web.Request) -> web.Response:
        depth = int(request.match_info["depth"])
        nested = b"[" * depth + b"]" * depth
        body = b'{"code":"20010001","message":' + nested + b',"data":null}'
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/deep/{depth}", deep)
    seen: set[type[WujieError]] = set()
    async with emulator() as emu, serve(app) as origin:
        async with open_transport(
            origin, emu.credentials, retry=RetryPolicy(max_attempts=1)
        ) as transport:
            for depth in range(600, 1001):
                with pytest.raises(WujieError) as info:
                    await transport.post(f"/deep/{depth}", [], kind="poll")
                seen.add(type(info.value))
    assert ReplyTooComplexError in seen and ParameterError in seen  # both sides of the limit


async def test_a_reply_of_millions_of_tiny_objects_is_not_parsed(emulator: EmulatorFactory) -> None:
    """3.3 MB, under the default 8 MiB cap, that would parse into 1.1 million dicts."""
    async with emulator() as emu, hostile_gateway() as base:
        async with open_transport(base, emu.credentials, limits=Limits()) as transport:
            with pytest.raises(ProtocolError, match="over 1,000,000 JSON objects and arrays"):
                await transport.post("/many-objects", [], kind="poll")
            # Not retried whole: the poller asks about fewer keys (as for a reply nested too deep).
            assert transport.counters.http_calls == 1


async def test_out_of_points_is_never_a_rate_limit(emulator: EmulatorFactory) -> None:
    async with emulator() as emu, hostile_gateway() as base:
        async with open_transport(base, emu.credentials) as transport:
            with pytest.raises(InsufficientBalanceError) as info:
                await transport.post("/balance-429", [], kind="poll")
            assert info.value.code == "20110010" and transport.counters.http_calls == 1


async def test_malformed_entries_and_empty_keys(emulator: EmulatorFactory) -> None:
    async with emulator() as emu, hostile_gateway() as base:
        async with open_transport(base, emu.credentials) as transport:
            data = await transport.post("/wrong-types", [], kind="poll")
            poller = BatchPoller(transport, PollPolicy(), Limits())
            assert poller.read_reply(data) == {}
            assert poller.counters.malformed_entries == 3
            with pytest.raises(ProtocolError, match="no list"):
                poller.read_reply(await transport.post("/no-list", [], kind="poll"))
            assert poller.read_reply(await transport.post("/null-list", [], kind="poll")) == {}
            bare = poller.read_reply(await transport.post("/bare-list", [], kind="poll"))
            assert bare["K"].status == 1
    # An address where nothing listens. Not the hostile server's, once it is gone: another
    # test's server (xdist) may take that port at once (once seen: a 404 instead). A socket
    # bound and not listening keeps its port, and connections to it are refused.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{held.getsockname()[1]}"
        async with emulator() as emu, make_client(emu, base_url=gone) as client:
            with pytest.raises(TransportError) as refused:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert not refused.value.reached_server
            assert not isinstance(refused.value, SubmitUncertainError)


async def test_connect_refused_submits_are_retried_then_raised(emulator: EmulatorFactory) -> None:
    # Bound and not listening, held open: connections are refused, and no other test's
    # server can take the port meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        async with emulator() as emu:
            retry = RetryPolicy(max_attempts=3, initial_wait=0)
            async with open_transport(
                f"http://127.0.0.1:{port}", emu.credentials, retry=retry
            ) as transport:
                with pytest.raises(TransportError) as info:
                    await transport.post("/x", {}, kind="submit")
                assert info.value.reached_server is False
                assert transport.counters.http_calls == 3


async def test_submit_faults_map_to_the_right_errors(emulator: EmulatorFactory) -> None:
    cases: list[tuple[FaultConfig, type[BaseException], int]] = [
        (FaultConfig(drop_after_accept=1.0), SubmitUncertainError, 1),
        (FaultConfig(drop_connection=1.0), SubmitUncertainError, 0),
        (FaultConfig(http_5xx=1.0), SubmitUncertainError, 0),
        (FaultConfig(html_reply=1.0), SubmitUncertainError, 0),
        (
            FaultConfig(business_error=1.0, business_error_code="20110010"),
            InsufficientBalanceError,
            0,
        ),
    ]
    for faults, error, accepted in cases:
        async with emulator(faults=faults) as emu, make_client(emu) as client:
            with pytest.raises(error) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
            stats = emu.stats()
            assert stats["submits_accepted"] == accepted, faults
            # Nothing ambiguous was ever sent twice; refusals were not retried.
            assert stats["requests"]["generations"] == 1, faults
            if isinstance(info.value, SubmitUncertainError):
                assert info.value.request["prompt"] == "x"


@pytest.mark.long
async def test_retryable_refusals_are_retried(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(business_error=0.3, business_error_code="20010018", http_429=0.1)
    async with emulator(faults=faults) as emu, make_client(emu) as client:
        jobs = [await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(30)]
        stats = emu.stats()
        assert stats["submits_accepted"] == 30 == len({job.key for job in jobs})
        assert stats["faults"]["business_error"] > 0 and client.stats.retries > 0


@pytest.mark.fake_clock
async def test_retry_after_is_honoured(emulator: EmulatorFactory) -> None:
    retry = RetryPolicy(initial_wait=0, max_wait=5)
    loop = asyncio.get_running_loop()
    async with emulator(faults=FaultConfig(burst_429=1, retry_after_s=3)) as emu:
        async with make_client(emu, retry=retry) as client:
            started, real_start = loop.time(), time.monotonic()
            await client.images.submit(prompt="x", model="dall-e-2")
            assert 3.0 <= loop.time() - started < 5.0  # the loop's clock: Retry-After, not more
            assert time.monotonic() - real_start < 2.0  # and no real second was spent on it
            assert client.stats.rate_limited == 1


@pytest.mark.fake_clock
async def test_no_try_comes_after_max_elapsed(emulator: EmulatorFactory) -> None:
    """RetryPolicy.max_elapsed: 'give up retrying once this many seconds have gone by'. A
    Retry-After past it was waited for up to max_wait, and tried again at 10 s of a 5 s
    budget; it is now given up at once (a try sooner would be refused again). A backoff wait
    is cut to the time left."""
    loop = asyncio.get_running_loop()
    refused = frozenset({"generations"})
    retry = RetryPolicy(initial_wait=4, max_wait=10, max_elapsed=5, max_attempts=20)
    told = FaultConfig(http_429=1.0, retry_after_s=30, endpoints=refused)
    async with emulator(faults=told) as emu, make_client(emu, retry=retry) as client:
        started = loop.time()
        with pytest.raises(RateLimitedError):
            await client.images.submit(prompt="x", model="dall-e-2")
        assert loop.time() - started < 1.0 and client.stats.rate_limited == 1
    untold = FaultConfig(http_429=1.0, retry_after_s=0, endpoints=refused)  # backoff alone
    async with emulator(faults=untold) as emu, make_client(emu, retry=retry) as client:
        started = loop.time()
        with pytest.raises(RateLimitedError):
            await client.images.submit(prompt="x", model="dall-e-2")
        assert loop.time() - started < 5.0 + 1.0 and client.stats.rate_limited >= 2


@pytest.mark.fake_clock
async def test_no_try_comes_after_max_elapsed_for_the_submit_pacers_turn(
    emulator: EmulatorFactory,
) -> None:
    """A retried submit waits for its turn of max_submits_per_second too: a turn 2 s away
    under max_elapsed 1 s was taken and tried at 2 s."""
    loop = asyncio.get_running_loop()
    retry = RetryPolicy(initial_wait=0, max_wait=0.01, max_elapsed=1.0, max_attempts=20)
    limits = Limits(max_submits_per_second=0.5)
    refused = FaultConfig(http_429=1.0, retry_after_s=0, endpoints=frozenset({"generations"}))
    async with emulator(faults=refused) as emu:
        async with make_client(emu, retry=retry, limits=limits) as client:
            started = loop.time()
            with pytest.raises(RateLimitedError):
                await client.images.submit(prompt="x", model="dall-e-2")
            assert client.stats.rate_limited == 1 and loop.time() - started < 3.0


@pytest.mark.long
async def test_a_backoff_cut_to_the_time_left_still_gets_its_last_try(
    emulator: EmulatorFactory,
) -> None:
    """The wait was cut to the time left, then the pacer's turn (no rate: at once) moved the
    clock a few microseconds past max_elapsed, and the try the wait was for was given up."""
    retry = RetryPolicy(initial_wait=3, max_wait=3, max_elapsed=0.2, max_attempts=20)
    refused = FaultConfig(http_429=1.0, retry_after_s=0, endpoints=frozenset({"generations"}))
    async with emulator(faults=refused) as emu, make_client(emu, retry=retry) as client:
        for attempt in range(5):
            before = client.stats.rate_limited
            with pytest.raises(RateLimitedError):
                await client.images.submit(prompt="x", model="dall-e-2")
            assert client.stats.rate_limited - before >= 2, attempt


async def test_auth_failure_is_typed_and_not_retried_forever(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        stranger = Credentials("wjemulator0001", unregistered_key())  # the app's id, a wrong key
        async with WujieClient(stranger, base_url=emu.base_url, retry=INSTANT_RETRY) as client:
            with pytest.raises(AuthenticationError) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert info.value.http_status == 401 and info.value.code == "401"
            assert emu.stats()["requests"]["generations"] == 2  # once re-signed, then stop


def unregistered_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.long
async def test_polls_ride_out_server_trouble(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(
        endpoints=frozenset({"info"}), http_5xx=0.3, html_reply=0.2, drop_connection=0.1
    )
    async with emulator(faults=faults) as emu, make_client(emu, retry=INSTANT_RETRY) as client:
        jobs = []
        for wave in range(8):  # waves, so that many batch calls go out
            jobs += [
                await client.images.submit(prompt=f"{wave}", model="dall-e-2") for _ in range(5)
            ]
            await asyncio.sleep(0.05)
        for job in jobs:
            assert (await job.result(timeout=30)).status == 4
        faults_seen = emu.stats()["faults"]
        assert faults_seen.get("http_5xx", 0) + faults_seen.get("html_reply", 0) > 0
        # Every fault was retried, except the last of a call that ran out of tries (rare).
        stats = client.stats
        assert stats.retries + stats.batch_errors >= sum(faults_seen.values())


def test_retry_after_may_be_an_http_date() -> None:
    """RFC 9110: Retry-After is seconds or an HTTP date; a date is honoured as the seconds
    until it (none for one past), and text that is neither gives no hint."""
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)
    body = b'{"code":"429","message":"slow down","data":null}'
    cases = [
        (email.utils.format_datetime(soon, usegmt=True), (20.0, 31.0)),
        ("Wed, 21 Oct 2015 07:28:00 GMT", (0.0, 0.0)),
        ("7", (7.0, 7.0)),
    ]
    for value, (low, high) in cases:
        with pytest.raises(RateLimitedError) as info:
            decode_reply(429, body, {"Retry-After": value})
        assert info.value.retry_after is not None and low <= info.value.retry_after <= high
    for value in ("soon", "-3", "nan"):
        with pytest.raises(RateLimitedError) as info:
            decode_reply(429, body, {"Retry-After": value})
        assert info.value.retry_after is None, value


def test_rate_limited_error_carries_retry_after() -> None:
    error = RateLimitedError("slow down", retry_after=2.0, http_status=429)
    assert error.retry_after == 2.0 and "HTTP 429" in str(error)
    assert isinstance(ServerError("x"), Exception)


def _journaled_client(gateway: HostileGateway, mode: str, tmp_path: Path) -> WujieClient:
    """A client with a journal, on ``gateway``'s ``mode`` (instant retries)."""
    creds = Credentials("wjhostile", unregistered_key())
    base = f"{gateway.origin}/{mode}"
    journal = tmp_path / "journal.sqlite"
    return WujieClient(creds, base_url=base, retry=INSTANT_RETRY, journal=journal)


async def test_a_redirect_is_never_followed(tmp_path: Path) -> None:
    # A 307 to itself: a client that follows redirects POSTs (and pays) again and again.
    creds = Credentials("wjhostile", unregistered_key())
    async with recording_gateway() as gateway:
        async with _journaled_client(gateway, "redirect-self", tmp_path) as c:
            with pytest.raises(UnexpectedRedirectError) as info:
                await c.images.submit(prompt="x", model="dall-e-2")
            assert gateway.hits["redirect-self"] == 1
            error = info.value
            assert not isinstance(error, SubmitUncertainError) and error.systemic
            assert error.http_status == 307 and "base URL" in str(error)
            assert error.location.endswith("/redirect-self/ai/wj/images/generations")
            assert await c.uncertain_submits() == []  # nothing was accepted at our URL
        async with open_transport(gateway.origin, creds) as transport:
            with pytest.raises(UnexpectedRedirectError) as away:
                await transport.post("/redirect-away", [], kind="poll")
            assert gateway.hits["redirect-away"] == 1  # polls are not retried either
            text = str(away.value)
            assert "169.254.169.254" in text and "hunter2" not in text and "\x1b" not in text


async def test_a_tls_failure_says_so_not_a_permission_error(tmp_path: Path) -> None:
    """An https gateway whose certificate is not trusted (a corporate proxy's, an expired
    one) was reported as "Operation not permitted": the SSL error's code (1) was read as
    an OS errno. The message says the certificate could not be verified, and a plain-http
    port met with https says TLS failed, naming no permission."""
    from .test_download import self_signed_context

    hits: list[str] = []

    async def gateway(request: web.Request) -> web.Response:
        hits.append(request.path)  # never reached: the handshake fails first
        return web.json_response({"code": "200", "message": "ok", "data": {"key": "K1"}})

    app = web.Application()
    app.router.add_post("/{tail:.*}", gateway)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed_context(tmp_path)).start()
    port = runner.addresses[0][1]
    creds = Credentials("wjhostile", unregistered_key())
    try:
        async with open_transport(f"https://127.0.0.1:{port}/wj-open/v1", creds) as transport:
            with pytest.raises(TransportError) as info:
                await transport.post(GENERATIONS, {}, kind="poll")
        text = str(info.value)
        assert "certificate could not be verified" in text, text
        assert "not permitted" not in text, text
        async with recording_gateway() as plain:  # https to a plain-http port
            tls_to_plain = plain.origin.replace("http://", "https://") + "/wj-open/v1"
            async with open_transport(tls_to_plain, creds) as transport:
                with pytest.raises(TransportError) as info:
                    await transport.post(GENERATIONS, {}, kind="poll")
        text = str(info.value)
        assert "TLS" in text and "not permitted" not in text, text
    finally:
        await runner.cleanup()
    assert hits == []


@pytest.mark.long
async def test_a_gzip_bomb_stops_at_the_decoded_cap() -> None:
    bomb = gzip_bomb()  # built before measuring
    cap = Limits().max_response_bytes
    assert len(bomb) < cap < BOMB_INFLATED  # the compressed size passes a Content-Length check
    creds = Credentials("wjhostile", unregistered_key())
    async with (
        recording_gateway() as gateway,
        open_transport(gateway.origin, creds, limits=Limits()) as transport,
    ):
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        started = time.monotonic()
        with pytest.raises(ResponseTooLargeError) as info:
            await transport.post("/gzip-bomb", [], kind="poll")
        elapsed = time.monotonic() - started
        growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert info.value.limit == cap and "decoded" in str(info.value)
    assert gateway.hits["gzip-bomb"] == 1
    assert growth_mib < 200, f"the peak memory grew by {growth_mib:.0f} MiB"
    assert elapsed < 5, f"took {elapsed:.1f} s: it inflated far past the cap"


async def test_a_small_content_length_beside_a_chunked_body_is_still_capped() -> None:
    # A reply that declares 20 bytes but sends a chunked body far over the cap: whatever the
    # HTTP parser makes of the two, the client reads no more than the cap.
    cap = Limits().max_response_bytes
    chunk = b"x" * (1024 * 1024)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(4 * cap // len(chunk)):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    creds = Credentials("wjhostile", unregistered_key())
    try:
        async with open_transport(f"http://127.0.0.1:{port}", creds, limits=Limits()) as transport:
            with pytest.raises((ResponseTooLargeError, TransportError)) as info:
                await transport.post("/both", [], kind="poll")
        if isinstance(info.value, ResponseTooLargeError):
            assert info.value.limit == cap
    finally:
        server.close()


@pytest.mark.parametrize(
    ("mode", "error", "fix"),
    [
        ("unauthorized", AuthenticationError, "WUJIE_APP_ID and WUJIE_PRIVATE_KEY"),
        ("forbidden", AuthenticationError, "WUJIE_APP_ID and WUJIE_PRIVATE_KEY"),
        ("not-found-html", EndpointNotFoundError, "WUJIE_BASE_URL / --base-url"),
        ("not-found-json", EndpointNotFoundError, "WUJIE_BASE_URL / --base-url"),
        ("not-allowed", EndpointNotFoundError, "does not accept POST"),
        ("balance-429", InsufficientBalanceError, "top up"),
    ],
)
async def test_systemic_errors_say_what_to_fix_and_are_not_repeated(
    mode: str, error: type[WujieError], fix: str
) -> None:
    creds = Credentials("wjhostile", unregistered_key())
    async with recording_gateway() as gateway:
        async with open_transport(gateway.origin, creds) as transport:
            with pytest.raises(error) as polled:
                await transport.post(f"/{mode}", [], kind="poll")
            assert polled.value.systemic and fix in str(polled.value)
            # 401 is re-signed once (the cached signature may have gone stale); nothing else
            # that is systemic is sent twice.
            assert gateway.hits[mode] == (2 if mode == "unauthorized" else 1)
        base = f"{gateway.origin}/{mode}"
        async with WujieClient(creds, base_url=base, retry=INSTANT_RETRY) as client:
            with pytest.raises(error) as submitted:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert not isinstance(submitted.value, SubmitUncertainError)
            if isinstance(submitted.value, EndpointNotFoundError):
                assert submitted.value.url == base + "/ai/wj/images/generations"
                assert submitted.value.url in str(submitted.value)


@pytest.mark.long
async def test_systemic_flags_of_the_error_tree() -> None:
    assert TransportError("refused", reached_server=False).systemic
    assert not TransportError("reset", reached_server=True).systemic
    assert not SubmitUncertainError("lost", request={}).systemic
    assert not ServerError("busy", http_status=503).systemic
    assert not RateLimitedError("slow", http_status=429).systemic
    assert not ProtocolError("odd").systemic and not ResponseTooLargeError("big", limit=1).systemic


@pytest.mark.parametrize("mode", ["too-large-413", "bad-request-json", "teapot", "proxy-auth-407"])
async def test_a_4xx_a_proxy_sent_is_a_refusal_not_uncertain(mode: str, tmp_path: Path) -> None:
    """A proxy in front of the gateway refusing a body over its limit (nginx: 413 above 1 MB)
    made the submit "may have been charged" (uncertain, journaled so, held on the budget,
    never resent). A 4xx that is not the gateway's envelope never reached the gateway."""
    async with recording_gateway() as gateway:
        async with _journaled_client(gateway, mode, tmp_path) as c:
            with pytest.raises(RequestRefusedError) as refused:
                await c.images.submit(prompt="x", model="dall-e-2")
            # Systemic for 407 only: the proxy wants its own credentials from every request.
            assert refused.value.systemic == (mode == "proxy-auth-407")
            assert "nothing was accepted" in str(refused.value)
            assert await c.uncertain_submits() == []
            [row] = await c.journal_entries()
            assert row.state == "rejected"
        assert gateway.hits[mode] == 1  # not retried: the same request, the same answer
    if mode == "too-large-413":
        assert "too large" in str(refused.value) and "HTTP 413" in str(refused.value)


async def test_a_missing_route_is_rejected_not_uncertain(tmp_path: Path) -> None:
    async with recording_gateway() as gateway:
        async with _journaled_client(gateway, "not-found-html", tmp_path) as c:
            with pytest.raises(EndpointNotFoundError):
                await c.images.submit(prompt="x", model="dall-e-2")
            assert await c.uncertain_submits() == []
        assert gateway.hits["not-found-html"] == 1


@pytest.mark.long
async def test_submits_and_polls_have_separate_429_brakes(emulator: EmulatorFactory) -> None:
    kinds: tuple[tuple[str, CallKind, CallKind], ...] = (
        ("generations", "submit", "poll"),
        ("info", "poll", "submit"),
    )
    for endpoint, braked, free in kinds:
        faults = FaultConfig(endpoints=frozenset({endpoint}), http_429=0.3, retry_after_s=0)
        async with emulator(faults=faults) as emu:
            async with open_transport(emu.base_url, emu.credentials, retry=INSTANT_RETRY) as t:
                keys: list[str] = []
                # Until the 429s of one kind of call put its brake on (a few calls suffice).
                while t.brake_rates[braked] is None and len(keys) < 200:
                    body = {"prompt": f"{len(keys)}", "model": "dall-e-2"}
                    keys.append((await t.post(GENERATIONS, body, kind="submit"))["key"])
                    # A poll's 429 is not retried here: the poller asks again itself.
                    with contextlib.suppress(RateLimitedError):
                        await t.post(INFO, keys[-50:], kind="poll")
                rates = t.brake_rates
                assert rates[braked] is not None and t.counters.rate_limited > 0, rates
                assert rates[free] is None, rates  # the other kind of call never slowed down


async def test_a_refused_poll_is_left_to_the_poller_and_a_refused_submit_is_retried(
    emulator: EmulatorFactory,
) -> None:
    # A batch query refused with 429 is raised at once, Retry-After with it: the poller asks
    # again with every key due by then (test_poller). A refused submit is resent.
    faults = FaultConfig(burst_429=1, retry_after_s=2)
    async with emulator(faults=faults) as emu:
        async with open_transport(emu.base_url, emu.credentials, retry=INSTANT_RETRY) as t:
            with pytest.raises(RateLimitedError) as info:
                await t.post(INFO, ["K"], kind="poll")
            assert info.value.retry_after == 2 and t.counters.http_calls == 1
            emu.set_faults(FaultConfig(burst_429=1, retry_after_s=0))
            body = {"prompt": "p", "model": "dall-e-2"}
            assert (await t.post(GENERATIONS, body, kind="submit"))["key"]
            assert t.counters.http_calls == 3 and t.counters.retries == 1


async def test_a_name_service_that_never_answers_is_not_an_uncertain_submit(
    emulator: EmulatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving the gateway's name hangs: within Timeouts.connect that is a failure to
    connect (nothing was sent: retried, systemic), not a reply that never came (a submit that
    "may have been charged", after Timeouts.request)."""
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "gateway.hang.test":
            release.wait(30)  # the name service never answers (until the test ends)
            raise socket.gaierror(socket.EAI_AGAIN, "gave up")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        async with emulator() as emu:
            timeouts = Timeouts(connect=0.3, request=30)
            base = "https://gateway.hang.test/wj-open/v1"
            async with make_client(emu, base_url=base, timeouts=timeouts) as client:
                with pytest.raises(TransportError) as info:
                    await asyncio.wait_for(client.images.submit(prompt="x", model="dall-e-2"), 20)
        assert not isinstance(info.value, SubmitUncertainError)
        assert info.value.reached_server is False and info.value.systemic
        assert "Timeouts.connect" in str(info.value)
    finally:
        release.set()


async def test_a_reply_cut_short_says_so_in_its_error(emulator: EmulatorFactory) -> None:
    """aiohttp words a body cut short "Response payload is not completed: <ContentLengthError:
    400, message='Not enough data ...'>", whose nested error snippet() left out as markup: the
    error (shown by a web app, logged) ended "is not completed:" with the reason gone."""
    cut = FaultConfig(cut_reply=1.0, endpoints=frozenset({"generations"}))
    async with emulator(faults=cut) as emu, make_client(emu) as client:
        with pytest.raises(SubmitUncertainError) as lost:
            await client.images.submit(prompt="a fox", model="dall-e-2")
    text = str(lost.value)
    assert "ClientPayloadError: Response payload is not completed: ContentLengthError: " in text
    # (aiohttp 3.10 words it "Not enough data for satisfy ...": the reason is what counts.)
    assert "satisfy content length header" in text, text
    assert "<" not in text and not text.endswith(":"), text


def _submit_body() -> dict[str, Any]:
    return {"prompt": "a fox", "model": "dall-e-2"}


@pytest.mark.long
async def test_a_server_closing_idle_connections_never_makes_a_submit_uncertain() -> None:
    """A gateway whose keep-alive timeout is short (0.1 s here; gunicorn's is 2 s) closes an
    idle pooled connection just as a submit is written on it: the server never reads it, yet
    the client saw no reply and called it uncertain (72 of 200 such submits were). Submits
    spaced around the server's timeout, across it: every one is answered, each sent once."""
    read: list[int] = []

    async def submit(request: web.Request) -> web.Response:
        await request.read()
        read.append(1)
        key = f"K{len(read):05d}"
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    app = web.Application()
    app.router.add_post(GENERATIONS, submit)
    creds = Credentials("wjhostile", unregistered_key())
    failures: list[str] = []

    async def submitter(origin: str, offset: int) -> None:
        async with open_transport(origin, creds, retry=INSTANT_RETRY) as transport:
            for step in range(20):
                try:
                    await transport.post(GENERATIONS, _submit_body(), kind="submit")
                except WujieError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                # Around the server's 0.1 s: 95 to 105 ms after the last reply, in 1 ms steps.
                await asyncio.sleep(0.095 + (offset + step) % 11 / 1000)

    async with serve(app, keepalive_timeout=0.1) as origin, asyncio.TaskGroup() as group:
        for offset in range(4):  # four clients at once (each its own pool): 2 s, not 8
            group.create_task(submitter(origin, offset * 3))
    assert failures == [], failures
    assert len(read) == 80  # none resent either


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_submit_read_then_dropped_on_a_reused_connection_stays_uncertain(
    how: str,
) -> None:
    """The other side: a gateway that reads a submit and drops the connection without a reply
    (a clean close or a reset), on a connection that served the submit before: it may have
    accepted it, so it is SubmitUncertainError, never resent."""
    ports: list[int] = []

    async def submit(request: web.Request) -> web.Response:
        await request.read()
        transport = request.transport
        assert transport is not None
        ports.append(transport.get_extra_info("peername")[1])
        if len(ports) % 2 == 0:  # every other submit: read, then dropped
            transport.close() if how == "close" else transport.abort()
            return web.Response(status=499)
        key = f"K{len(ports):05d}"
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    app = web.Application()
    app.router.add_post(GENERATIONS, submit)
    creds = Credentials("wjhostile", unregistered_key())
    outcomes: list[str] = []
    async with (
        serve(app) as origin,
        open_transport(origin, creds, retry=INSTANT_RETRY) as transport,
    ):
        for _ in range(10):  # back to back: each on the connection of the submit before
            try:
                await transport.post(GENERATIONS, _submit_body(), kind="submit")
                outcomes.append("ok")
            except SubmitUncertainError:
                outcomes.append("uncertain")
    assert outcomes == ["ok", "uncertain"] * 5
    assert len(ports) == 10  # each sent once
    # The dropped ones came on a reused connection (the answered submit's before them).
    assert any(ports[i] == ports[i - 1] for i in range(1, 10, 2)), ports


async def test_a_pooled_connection_the_server_closed_while_the_loop_was_busy_is_not_used() -> None:
    """A server that closes a connection soon after its reply, unannounced, while the client's
    loop is busy (CPU-bound code of the application): the FIN is in the socket, but aiohttp,
    which learns of it only when its loop reads it, handed the connection to the next submit,
    which the server never read and which ended uncertain. The server here runs in a thread
    (its own loop), so it closes while this loop is blocked."""
    read: list[int] = []
    closed = threading.Event()

    async def submit(request: web.Request) -> web.StreamResponse:
        await request.read()
        read.append(1)
        data = {"key": f"K{len(read):05d}"}
        reply = web.json_response({"code": "200", "message": "success", "data": data})
        await reply.prepare(request)
        await reply.write_eof()
        transport = request.transport
        assert transport is not None
        if len(read) == 1:
            loop = asyncio.get_running_loop()

            def close() -> None:  # soon after the reply, unannounced
                transport.close()
                loop.call_soon(closed.set)  # after the socket's close, which close() schedules

            loop.call_later(0.005, close)
        return reply

    origin: list[str] = []
    stops: list[Callable[[], object]] = []
    started = threading.Event()

    def server() -> None:
        async def run() -> None:
            app = web.Application()
            app.router.add_post(GENERATIONS, submit)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            async with serve(app) as served:
                origin.append(served)
                stops.append(lambda: loop.call_soon_threadsafe(stop.set))
                started.set()
                await stop.wait()

        asyncio.run(run())

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        creds = Credentials("wjhostile", unregistered_key())
        async with open_transport(origin[0], creds, retry=INSTANT_RETRY) as transport:
            await transport.post(GENERATIONS, _submit_body(), kind="submit")
            assert closed.wait(5)  # this loop busy (blocked) as the server closes
            await transport.post(GENERATIONS, _submit_body(), kind="submit")
        assert len(read) == 2
    finally:
        for stop_server in stops:
            stop_server()
        thread.join(10)


async def test_a_reply_labelled_gzip_but_sent_plain_is_read(tmp_path: Path) -> None:
    """A proxy that stamps ``Content-Encoding: gzip`` on a body it did not compress: aiohttp
    could not inflate it ("Can not decode content-encoding"), and the submit, accepted and
    paid, was uncertain, its key (in the body as it came) unread. A body that is JSON as it is
    is read as it is; the batch call's too."""
    async with recording_gateway() as gateway:
        async with _journaled_client(gateway, "gzip-plain", tmp_path) as client:
            job = await client.images.submit(prompt="a fox", model="dall-e-2")
            assert job.key == "K0001"
            assert await client.uncertain_submits() == []
        assert gateway.hits["gzip-plain"] >= 1
        creds = Credentials("wjhostile", unregistered_key())
        async with open_transport(gateway.origin, creds) as transport:
            assert await transport.post("/gzip-plain", [], kind="poll") == {"list": []}


_SUBMIT_REPLY = json.dumps(
    {"code": "200", "message": "success", "data": {"key": "K0001", "pad": "x" * 300}}
).encode()


def _compressed_replies() -> dict[str, tuple[str, bytes]]:
    """Bodies as servers compress them: Content-Encoding, and the bytes sent."""
    raw = zlib.compressobj(wbits=-15)
    return {
        "gzip": ("gzip", gzip.compress(_SUBMIT_REPLY)),
        # A streaming compressor's output (one member per flush), RFC 1952's concatenation.
        "gzip-members": (
            "gzip",
            b"".join(
                gzip.compress(part)
                for part in (_SUBMIT_REPLY[:7], _SUBMIT_REPLY[7:99], _SUBMIT_REPLY[99:])
            ),
        ),
        "gzip-members-trailing-zeros": (
            "gzip",
            gzip.compress(_SUBMIT_REPLY[:9]) + gzip.compress(_SUBMIT_REPLY[9:]) + b"\0\0\0",
        ),
        "deflate-zlib": ("deflate", zlib.compress(_SUBMIT_REPLY)),
        "deflate-raw": ("deflate", raw.compress(_SUBMIT_REPLY) + raw.flush()),
    }


@pytest.mark.parametrize("name", sorted(_compressed_replies()))
def test_a_compressed_reply_decodes_however_it_is_split(name: str) -> None:
    """The body decoded the same whatever reads the network cut it into: the zlib header of a
    deflate reply split after its first byte was taken for raw deflate (the reply lost), and
    a gzip body of several members was cut to its first (aiohttp read them all)."""
    encoding, body = _compressed_replies()[name]

    def decoded(parts: list[bytes], cap: int) -> bytes | WujieError:
        decoder = BodyDecoder(encoding, cap, 200)
        for part in parts:
            problem = decoder.feed(part)
            if problem is not None:
                return problem
        return decoder.finish()

    size = len(_SUBMIT_REPLY)
    for cut in range(len(body) + 1):
        for second in {cut, min(cut + 1, len(body)), (cut + len(body)) // 2, len(body)}:
            parts = [body[:cut], body[cut:second], body[second:]]
            assert decoded(parts, size) == _SUBMIT_REPLY, (cut, second)
    # The cap counts decoded bytes, across members: one byte over it is refused.
    assert isinstance(decoded([body], size - 1), ResponseTooLargeError)
    assert isinstance(decoded([bytes([b]) for b in body], size - 1), ResponseTooLargeError)


@pytest.mark.parametrize(
    ("name", "first"), [("deflate-zlib", 1), ("deflate-zlib", 2), ("gzip-members", 30)]
)
async def test_a_submit_answered_compressed_in_pieces_is_read(name: str, first: int) -> None:
    """A gateway (or proxy) that streams a compressed submit reply in pieces: a deflate reply
    whose first read was the zlib header's first byte alone, or a gzip reply of several
    members, was a ProtocolError: the submit, accepted and paid, ended uncertain, its key
    unread."""
    encoding, body = _compressed_replies()[name]
    parts = [body[:first], body[first:]]
    submits: list[int] = []

    async def submit(request: web.Request) -> web.StreamResponse:
        await request.read()
        submits.append(1)
        response = web.StreamResponse(
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"}
        )
        await response.prepare(request)
        for index, part in enumerate(parts):
            if index:
                await asyncio.sleep(0.05)  # each piece in a read of its own, as a slow link
            await response.write(part)
        await response.write_eof()
        return response

    data = await _one_submit(submit)
    assert data["key"] == "K0001"
    assert submits == [1]


async def _one_submit(submit: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """One submit through a transport to a gateway whose submit handler is ``submit``: the
    reply's data."""
    app = web.Application()
    app.router.add_post(GENERATIONS, submit)
    creds = Credentials("wjhostile", unregistered_key())
    async with serve(app) as origin, open_transport(origin, creds) as transport:
        return await transport.post(GENERATIONS, _submit_body(), kind="submit")


async def test_a_submit_after_a_pause_leaves_the_pooled_connections_to_the_polls() -> None:
    """A submit takes no pooled connection idle over SUBMIT_IDLE_SECONDS: it opened a new one,
    but closed each stale one it passed over, every connection the polls had warmed. With a
    submit every so often, every batch query paid a new connection (and TLS handshake): 30 of
    30 in a trial. The stale ones stay pooled for the polls; the submit still goes on a new
    connection."""
    ports: dict[str, list[int]] = {"poll": [], "submit": []}
    both_polls_in = asyncio.Event()

    async def two_at_once() -> None:
        if len(ports["poll"]) % 2 == 0:
            both_polls_in.set()
        await both_polls_in.wait()  # two polls on the wire at once: two connections

    app = web.Application()
    app.router.add_post("/{tail:.*}", _port_recording_gateway(ports, two_at_once))
    creds = Credentials("wjhostile", unregistered_key())
    async with serve(app) as origin, open_transport(origin, creds) as transport:

        async def two_polls() -> None:
            both_polls_in.clear()
            await asyncio.gather(*(transport.post(INFO, ["K1"], kind="poll") for _ in range(2)))

        await two_polls()
        await asyncio.sleep(SUBMIT_IDLE_SECONDS * 3)  # the pooled connections are stale now
        await transport.post(GENERATIONS, _submit_body(), kind="submit")
        await two_polls()
    first, second = ports["poll"][:2], ports["poll"][2:]
    assert len(set(first)) == 2 and ports["submit"][0] not in first  # a new one for the submit
    assert set(second) <= {*first, *ports["submit"]}, (ports, "the polls opened new ones")


def _port_recording_gateway(
    ports: dict[str, list[int]], on_poll: Callable[[], Awaitable[None]] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A gateway noting the client port of each submit and poll in ``ports`` (which
    connection each call came on), awaiting ``on_poll`` before it answers a poll."""

    async def gateway(request: web.Request) -> web.Response:
        await request.read()
        transport = request.transport
        assert transport is not None
        port = transport.get_extra_info("peername")[1]
        if request.path.endswith(GENERATIONS):
            ports["submit"].append(port)
            return web.json_response({"code": "200", "message": "ok", "data": {"key": "K1"}})
        ports["poll"].append(port)
        if on_poll is not None:
            await on_poll()
        return web.json_response({"code": "200", "message": "ok", "data": {"list": []}})

    return gateway


async def test_a_connection_a_submit_passed_over_goes_back_still_stale() -> None:
    """A pooled connection a submit passes over goes back to the pool idle since when it was,
    not from the moment it went back: the next submit passes it over too (and reuses the one
    the first submit opened). Stamped afresh, the next submit took it, a connection idle for
    as long as the pause: the race with the server's idle timeout that the bound avoids."""
    ports: dict[str, list[int]] = {"poll": [], "submit": []}
    app = web.Application()
    app.router.add_post("/{tail:.*}", _port_recording_gateway(ports))
    creds = Credentials("wjhostile", unregistered_key())
    async with serve(app) as origin, open_transport(origin, creds) as transport:
        await transport.post(INFO, ["K1"], kind="poll")
        await asyncio.sleep(SUBMIT_IDLE_SECONDS * 3)  # the pooled connection is stale now
        for _ in range(2):
            await transport.post(GENERATIONS, _submit_body(), kind="submit")
    first, second = ports["submit"]
    assert first != ports["poll"][0]  # a new one for the first submit
    assert second == first, (ports, "the second submit took the stale connection")


@pytest.mark.parametrize(
    ("keep_alive", "reused"),
    [
        ("timeout=5, max=100", True),  # Apache's form: 2.5 s a submit may take it idle
        ("max=100,timeout=2", True),
        ("timeout=0", False),  # no promise: SUBMIT_IDLE_SECONDS bounds a submit's
        ("timeout=0.3", False),  # not a whole number of seconds: no promise read
        ("max=100", False),
        (None, False),
    ],
)
async def test_a_submit_reuses_a_connection_the_server_promised_to_keep_open(
    keep_alive: str | None, reused: bool
) -> None:
    """A server that says ``Keep-Alive: timeout=N`` keeps an idle connection N seconds: a
    submit after a pause (past SUBMIT_IDLE_SECONDS) takes it while it has been idle at most
    N / 2, without a new connection (and, on https, a TLS handshake); a server that promises
    nothing gets a new connection for it, as before."""
    ports: list[int] = []

    async def gateway(request: web.Request) -> web.Response:
        await request.read()
        transport = request.transport
        assert transport is not None
        ports.append(transport.get_extra_info("peername")[1])
        headers = {} if keep_alive is None else {"Keep-Alive": keep_alive}
        body = {"code": "200", "message": "ok", "data": {"key": f"K{len(ports)}"}}
        return web.json_response(body, headers=headers)

    app = web.Application()
    app.router.add_post("/{tail:.*}", gateway)
    creds = Credentials("wjhostile", unregistered_key())
    async with serve(app) as origin, open_transport(origin, creds) as transport:
        await transport.post(GENERATIONS, _submit_body(), kind="submit")
        await asyncio.sleep(SUBMIT_IDLE_SECONDS * 6)  # past a submit's bound, within N / 2
        await transport.post(GENERATIONS, _submit_body(), kind="submit")
    assert (ports[1] == ports[0]) is reused, (keep_alive, ports)


async def test_a_submit_passing_over_the_only_pooled_connection_does_not_wait_for_it() -> None:
    """With max_connections=1, the one pooled connection, stale for a submit, holds the only
    slot while the submit looks for another: it is closed to make room, not waited for (the
    submit would have waited out the connect timeout for a slot it held itself)."""
    served: list[str] = []

    async def gateway(request: web.Request) -> web.Response:
        await request.read()
        served.append(request.path)
        data: dict[str, Any] = {"list": []}
        if request.path.endswith(GENERATIONS):
            data = {"key": "K1"}
        return web.json_response({"code": "200", "message": "ok", "data": data})

    app = web.Application()
    app.router.add_post("/{tail:.*}", gateway)
    creds = Credentials("wjhostile", unregistered_key())
    limits = Limits(max_connections=1, max_response_bytes=1024 * 1024)
    async with serve(app) as origin, open_transport(origin, creds, limits=limits) as transport:
        await transport.post(INFO, ["K1"], kind="poll")
        await asyncio.sleep(SUBMIT_IDLE_SECONDS * 3)  # the pooled connection is stale now
        async with asyncio.timeout(5):
            assert await transport.post(GENERATIONS, _submit_body(), kind="submit") == {"key": "K1"}
            assert await transport.post(INFO, ["K1"], kind="poll") == {"list": []}
    assert len(served) == 3


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("garbled-gzip-429", RateLimitedError),
        ("garbled-deflate-429", RateLimitedError),
        ("garbled-gzip-407", RequestRefusedError),
        ("garbled-gzip-413", RequestRefusedError),
        ("garbled-deflate-502", SubmitUncertainError),
        ("garbled-gzip-200", SubmitUncertainError),
    ],
)
async def test_a_reply_whose_body_does_not_decode_is_read_by_its_status(
    mode: str, error: type[WujieError], tmp_path: Path
) -> None:
    """A refusal labelled gzip (or deflate) whose body does not decode (a proxy's page, a
    gateway's 429) was a ProtocolError, its status never looked at: a submit refused with 429,
    407 or 413 ended SubmitUncertainError ("may have been charged", never resent), and a 429
    was not retried. The status says what it was; a 5xx or a 200 stays uncertain."""
    status = int(mode.rsplit("-", 1)[1])
    async with recording_gateway() as gateway:
        async with _journaled_client(gateway, mode, tmp_path) as c:
            with pytest.raises(error) as raised:
                await c.images.submit(prompt="x", model="dall-e-2")
            uncertain = await c.uncertain_submits()
        tries = gateway.hits[mode]
    assert isinstance(raised.value, WujieError)
    if error is SubmitUncertainError:
        cause = raised.value.__cause__
        assert isinstance(cause, ServerError if status >= 500 else ProtocolError)
        assert len(uncertain) == 1 and tries == 1
        return
    assert getattr(raised.value, "http_status", None) == status
    assert uncertain == []
    assert tries == (INSTANT_RETRY.max_attempts if status == 429 else 1)


@pytest.mark.parametrize(
    ("mode", "error", "tries"),
    [
        ("garbled-gzip-429", RateLimitedError, 1),  # left to the poller (Retry-After)
        ("garbled-gzip-503", ServerError, 2),  # retried, as any 5xx
        ("garbled-gzip-200", ProtocolError, 2),
    ],
)
async def test_a_batch_call_whose_body_does_not_decode_is_read_by_its_status(
    mode: str, error: type[WujieError], tries: int
) -> None:
    async with recording_gateway() as gateway:
        creds = Credentials("wjhostile", unregistered_key())
        async with open_transport(gateway.origin, creds) as transport:
            with pytest.raises(error):
                await transport.post(f"/{mode}", ["K1"], kind="poll")
            # A 429 slows the polls' brake, as any 429 does.
            assert transport.counters.rate_limited == (1 if error is RateLimitedError else 0)
        assert gateway.hits[mode] == tries


def _deflated(raw: bytes) -> bytes:
    return zlib.compress(raw)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (["gzip, identity"], gzip.compress(_SUBMIT_REPLY)),
        (["identity, gzip"], gzip.compress(_SUBMIT_REPLY)),
        (["Identity , X-Gzip"], gzip.compress(_SUBMIT_REPLY)),
        (["gzip", "identity"], gzip.compress(_SUBMIT_REPLY)),  # two header lines, one list
        (["identity", "deflate"], _deflated(_SUBMIT_REPLY)),
        (["identity"], _SUBMIT_REPLY),
        # Applied in order: deflated, then gzipped (undone in the reverse order).
        (["deflate, gzip"], gzip.compress(_deflated(_SUBMIT_REPLY))),
        (["gzip", "gzip"], gzip.compress(gzip.compress(_SUBMIT_REPLY))),
    ],
    ids=lambda value: "+".join(value) if isinstance(value, list) else "body",
)
async def test_a_submit_answered_with_a_list_of_content_codings_is_read(
    headers: list[str], body: bytes
) -> None:
    """``Content-Encoding: gzip, identity`` (RFC 9110 allows a list, in one header or over
    several) was no coding the client knew: the body read as "not JSON", and the submit,
    accepted and paid, ended uncertain, its key unread. The list is read in order."""
    submits: list[int] = []

    async def submit(request: web.Request) -> web.Response:
        await request.read()
        submits.append(1)
        response = web.Response(body=body, content_type="application/json")
        for value in headers:
            response.headers.add("Content-Encoding", value)
        return response

    data = await _one_submit(submit)
    assert data["key"] == "K0001"
    assert submits == [1]


def test_a_list_of_content_codings_decodes_within_the_cap_and_says_what_failed() -> None:
    """A coding this client does not know, anywhere in the list, leaves the body as it came;
    the cap counts the decoded bytes; a body that is not what the list says is undecodable."""
    from wujie_async._body_decoding import body_decoder, content_codings

    def decoded(values: list[str], body: bytes, cap: int) -> bytes | WujieError:
        decoder = body_decoder(content_codings(values), cap, 200)
        for start in range(0, len(body), 7):
            problem = decoder.feed(body[start : start + 7])
            if problem is not None:
                return problem
        return decoder.finish()

    twice = gzip.compress(_deflated(_SUBMIT_REPLY))
    size = len(_SUBMIT_REPLY)
    assert decoded(["deflate, gzip"], twice, size) == _SUBMIT_REPLY
    assert isinstance(decoded(["deflate, gzip"], twice, size - 1), ResponseTooLargeError)
    assert decoded(["br, gzip"], twice, size) == twice  # unknown: as it came
    assert decoded(["gzip, " * 5], twice, size) == twice  # more codings than any reply has
    garbled = decoded(["gzip, gzip"], twice, size)  # inflates to deflate's bytes, not gzip's
    assert isinstance(garbled, ProtocolError) and "(gzip)" in str(garbled)


@pytest.mark.parametrize("reused", [True, False], ids=["pooled", "new-connection"])
async def test_a_batch_call_is_dated_from_when_its_connection_is_taken(reused: bool) -> None:
    """With every connection busy, a batch call waits for a slot (and may connect) before its
    request is written: ``on_wire(True)`` came only before that wait, and the call, the
    poller's schedule and its keys' replies, was dated from before it. It is told again once
    the connection is taken."""
    events: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()
    second_waits = asyncio.Event()

    async def gateway(request: web.Request) -> web.Response:
        [key] = await request.json()
        events.append(f"received {key}")
        if key == "A":
            first_in.set()
            await release.wait()
        response = web.json_response({"code": "200", "message": "ok", "data": {"list": []}})
        if not reused:
            response.force_close()  # the next call connects anew
        return response

    def told(key: str) -> Callable[[bool], None]:
        def on_wire(sending: bool) -> None:
            events.append(f"wire {key} {sending}")
            if key == "B":
                second_waits.set()

        return on_wire

    app = web.Application()
    app.router.add_post("/{tail:.*}", gateway)
    creds = Credentials("wjhostile", unregistered_key())
    limits = Limits(max_connections=1, max_response_bytes=1024 * 1024)
    async with serve(app) as origin, open_transport(origin, creds, limits=limits) as transport:
        first = asyncio.create_task(transport.post(INFO, ["A"], kind="poll", on_wire=told("A")))
        await first_in.wait()  # A holds the only connection
        second = asyncio.create_task(transport.post(INFO, ["B"], kind="poll", on_wire=told("B")))
        await second_waits.wait()  # B is on its way, and must wait for A's connection
        events.append("A released")
        release.set()
        async with asyncio.timeout(5):
            await asyncio.gather(first, second)
    last_told = max(index for index, event in enumerate(events) if event == "wire B True")
    assert events.index("A released") < last_told < events.index("received B"), events
