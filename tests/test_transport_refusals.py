"""Exchanges that fail in a way the first failure already decides: a TLS certificate that
cannot be verified (tried once, not once per attempt), and a 4xx reply whose body cannot be
read (cut short, over the size cap), which its status line alone says was refused."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from wujie_async import (
    AuthenticationError,
    EndpointNotFoundError,
    JobTimeoutError,
    Limits,
    PollPolicy,
    RateLimitedError,
    RequestRefusedError,
    RetryPolicy,
    SubmitUncertainError,
    Timeouts,
    TransportError,
    WujieClient,
    WujieError,
)
from wujie_async._failures import failure_reason
from wujie_async._transport import Transport

from .conftest import INSTANT_RETRY, open_transport
from .helpers import GENERATIONS, INFO
from .hostile import throwaway_credentials
from .test_download import self_signed_context

pytestmark = pytest.mark.anyio

CAP = 64 * 1024  # the tests' Limits.max_response_bytes
RETRY = RetryPolicy(max_attempts=4, initial_wait=0.0, max_wait=0.05)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _serving(handle: Handler) -> AsyncIterator[int]:
    """Serve ``handle`` on 127.0.0.1; yields the port. Each connection's writer is closed when
    its handler ends, and handlers still running at the end are cancelled: no socket left
    open."""
    handlers: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handle(reader, writer)
        finally:  # cancelled too, at the server's end
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


# --- TLS -----------------------------------------------------------------------------------------
@dataclass
class _TlsGateway:
    """A server on 127.0.0.1 that begins TLS on each connection; ``connections`` counts the
    TCP connections it accepted (each one a handshake begun)."""

    base_url: str = ""
    connections: int = 0


@asynccontextmanager
async def _tls_gateway(folder: Path, *, cut_handshake: bool = False) -> AsyncIterator[_TlsGateway]:
    """A TLS gateway whose certificate no CA vouches for; with ``cut_handshake``, each
    connection is dropped as the client's hello arrives (the network cutting a handshake)."""
    context = self_signed_context(folder)
    gateway = _TlsGateway()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gateway.connections += 1
        with contextlib.suppress(OSError):  # ssl.SSLError too: the client's alert
            if cut_handshake:
                await reader.read(1)
                writer.transport.abort()
            else:
                await writer.start_tls(context)  # the client refuses the certificate

    async with _serving(handle) as port:
        gateway.base_url = f"https://127.0.0.1:{port}/wj-open/v1"
        yield gateway


async def test_an_unverifiable_certificate_is_tried_once_not_once_per_attempt(
    tmp_path: Path,
) -> None:
    """A gateway whose certificate cannot be verified (a corporate proxy's, the wrong host)
    was retried RetryPolicy.max_attempts times, a new handshake each, though nothing will
    change within a run. It fails at once, as the connect failure it is: nothing was sent."""
    creds = throwaway_credentials()
    async with _tls_gateway(tmp_path) as gateway:
        journal = tmp_path / "journal.sqlite"
        client = WujieClient(creds, base_url=gateway.base_url, retry=INSTANT_RETRY, journal=journal)
        async with client:
            with pytest.raises(TransportError) as submitted:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert await client.uncertain_submits() == []
            [row] = await client.journal_entries()
        assert gateway.connections == 1
        async with open_transport(gateway.base_url, creds, retry=RETRY) as transport:
            with pytest.raises(TransportError) as polled:
                await transport.post(INFO, ["K1"], kind="poll")
            assert transport.counters.http_calls == 1
        assert gateway.connections == 2
    error = submitted.value
    assert not isinstance(error, SubmitUncertainError)
    assert error.reached_server is False and error.systemic and error.lasting
    assert row.state == "unsent"  # never reached the gateway: nothing charged
    for raised in (error, polled.value):
        text = str(raised)
        assert "ClientConnectorCertificateError" in text, text
        assert "certificate could not be verified" in text, text
        assert "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text, text


async def test_the_poller_asks_a_gateway_whose_certificate_fails_every_max_interval(
    tmp_path: Path,
) -> None:
    """Each poll of such a gateway is a handshake that ends the same way: the poller asks
    again after PollPolicy.max_interval, not every min_interval, until the job's deadline."""
    policy = PollPolicy(first_poll_delay=0.05, min_interval=0.05, max_interval=5.0)
    async with _tls_gateway(tmp_path) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.base_url,
            retry=INSTANT_RETRY,
            poll=policy,
            timeouts=Timeouts(job=1.5),
        )
        async with client:
            job = client.images.attach("K1")
            with pytest.raises(JobTimeoutError):
                await job  # its deadline: 1.5 s, thirty min_intervals
        # The first ask, and none again within max_interval (every min_interval: ~30).
        assert gateway.connections == 1


async def test_a_tls_handshake_cut_by_the_network_is_still_retried(tmp_path: Path) -> None:
    creds = throwaway_credentials()
    async with _tls_gateway(tmp_path, cut_handshake=True) as gateway:
        async with open_transport(gateway.base_url, creds, retry=RETRY) as transport:
            with pytest.raises(TransportError) as polled:
                await transport.post(INFO, ["K1"], kind="poll")
        assert gateway.connections == RETRY.max_attempts
    assert polled.value.reached_server is False and not polled.value.lasting
    assert "certificate" not in str(polled.value)


def test_a_certificate_refusal_worded_as_an_ssl_error_is_one_too() -> None:
    """aiohttp wraps a verification failure as ClientConnectorCertificateError where it makes
    the connection itself; one that reaches us as a plain TLS error (ClientConnectorSSLError
    holding an SSLCertVerificationError) is worded, and treated, the same."""
    key = ConnectionKey("gate.test", 443, True, True, None, None, None)
    # As the ssl module makes them (it sets these attributes from the SSL library's error).
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    verify.reason, verify.verify_message = "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    eof.reason = "UNEXPECTED_EOF_WHILE_READING"
    said = failure_reason(aiohttp.ClientConnectorSSLError(key, verify))
    assert said.startswith("ClientConnectorSSLError: the gateway's TLS certificate could not be")
    assert "self-signed certificate" in said, said
    cut = failure_reason(aiohttp.ClientConnectorSSLError(key, eof))
    assert cut == "ClientConnectorSSLError: TLS failed (UNEXPECTED_EOF_WHILE_READING)", cut


# --- 4xx replies whose body cannot be read -------------------------------------------------------
# How the gateway answers one request: it writes to the connection, which is closed after.
Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class _RawGateway:
    """A gateway on real sockets answering its n-th request with ``answers[n]``; ``asked`` is
    the path of each request, in order."""

    origin: str = ""
    asked: list[str] = field(default_factory=list)


@asynccontextmanager
async def _raw_gateway(*answers: Answer) -> AsyncIterator[_RawGateway]:
    gateway = _RawGateway()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            await reader.readexactly(length)
            gateway.asked.append(lines[0].split(" ")[1])
            await answers[len(gateway.asked) - 1](writer)

    async with _serving(handle) as port:
        gateway.origin = f"http://127.0.0.1:{port}"
        yield gateway


def _head(status: int, length: int | None, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever", "Content-Type: application/json", *headers]
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    lines.append(framing)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def cut(status: int, *headers: str) -> Answer:
    """A reply whose body stops at a tenth of its Content-Length; the connection closes."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(status, 1000, *headers) + b'{"code":"' + b"<b>x</b>" * 10)
        await writer.drain()

    return answer


def over_cap(status: int, *headers: str) -> Answer:
    """A reply whose Content-Length is over the cap (its body comes as the client reads)."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(status, 4 * CAP, *headers))
        for _ in range(4 * CAP // 1024):
            writer.write(b"<b>x</b>" * 128)
            await writer.drain()

    return answer


def chunked_over_cap(status: int, *headers: str) -> Answer:
    """A chunked reply that streams past the cap: no length says so beforehand."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(status, None, *headers))
        for _ in range(4 * CAP // 1024):
            writer.write(b"400\r\n" + b"<b>x</b>" * 128 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return answer


def stalled(status: int, *headers: str) -> Answer:
    """A reply whose body stops at a tenth of its Content-Length, the connection left open."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        await cut(status, *headers)(writer)
        await asyncio.Event().wait()  # until the gateway stops

    return answer


def accepted(key: str) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        body = b'{"code":"200","message":"success","data":{"key":"' + key.encode() + b'"}}'
        writer.write(_head(200, len(body), "Connection: close") + body)
        await writer.drain()

    return answer


def _client(origin: str, tmp_path: Path) -> WujieClient:
    return WujieClient(
        throwaway_credentials(),
        base_url=origin,
        retry=INSTANT_RETRY,
        limits=Limits(max_response_bytes=CAP),
        journal=tmp_path / "journal.sqlite",
    )


def _transport(origin: str) -> contextlib.AbstractAsyncContextManager[Transport]:
    limits = Limits(max_response_bytes=CAP)
    return open_transport(origin, throwaway_credentials(), retry=RETRY, limits=limits)


@pytest.mark.parametrize("unreadable", [cut, over_cap, chunked_over_cap])
async def test_a_429_whose_body_cannot_be_read_is_retried_and_charged_once(
    unreadable: Callable[..., Answer], tmp_path: Path
) -> None:
    """A 429 whose body was cut short (or over the cap) ended SubmitUncertainError: "may have
    been charged", never resent, though the status line said the gateway refused it."""
    async with _raw_gateway(unreadable(429, "Retry-After: 0"), accepted("K0001")) as gateway:
        async with _client(gateway.origin, tmp_path) as client:
            job = await client.images.submit(prompt="x", model="dall-e-2")
            assert job.key == "K0001"
            rows = await client.journal_entries()
            stats = client.stats
    assert gateway.asked == [GENERATIONS, GENERATIONS]  # the 429, then the one that was accepted
    assert [row.state for row in rows] == ["accepted"]
    assert stats.retries == 1 and stats.rate_limited == 1  # the submit brake heard the 429


@pytest.mark.parametrize(
    ("status", "unreadable", "error", "tries"),
    [
        (400, cut, RequestRefusedError, 1),
        (400, over_cap, RequestRefusedError, 1),
        (400, chunked_over_cap, RequestRefusedError, 1),
        (413, cut, RequestRefusedError, 1),
        (404, over_cap, EndpointNotFoundError, 1),
        (403, cut, AuthenticationError, 1),
        (401, cut, AuthenticationError, 2),  # re-signed once, as any 401
    ],
)
async def test_a_4xx_whose_body_cannot_be_read_is_the_refusal_its_status_says(
    status: int,
    unreadable: Callable[..., Answer],
    error: type[WujieError],
    tries: int,
    tmp_path: Path,
) -> None:
    """A 400 whose body was over the cap (or cut short) was a SubmitUncertainError: journaled
    uncertain, held on the budget, never resent, for a request the gateway refused."""
    answers = [unreadable(status)] * tries
    async with _raw_gateway(*answers) as gateway:
        async with _client(gateway.origin, tmp_path) as client:
            with pytest.raises(error) as refused:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert await client.uncertain_submits() == []
            [row] = await client.journal_entries()
    assert len(gateway.asked) == tries
    assert not isinstance(refused.value, SubmitUncertainError)
    assert row.state == "rejected"
    assert getattr(refused.value, "http_status", None) == status
    text = str(refused.value)
    assert "the reply's body could not be read" in text, text
    assert "<" not in text and "x</b>" not in text and len(text) < 800, text


async def test_a_4xx_whose_body_never_comes_whole_is_refused_at_the_request_timeout(
    tmp_path: Path,
) -> None:
    async with _raw_gateway(stalled(400)) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.origin,
            retry=INSTANT_RETRY,
            timeouts=Timeouts(request=0.5),
            journal=tmp_path / "journal.sqlite",
        )
        async with client:
            with pytest.raises(RequestRefusedError) as refused:
                await client.images.submit(prompt="x", model="dall-e-2")
            [row] = await client.journal_entries()
    assert row.state == "rejected" and gateway.asked == [GENERATIONS]
    assert "not whole within 0.5 s (Timeouts.request)" in str(refused.value), refused.value


@pytest.mark.parametrize("status", [500, 503, 200])
@pytest.mark.parametrize("unreadable", [cut, over_cap])
async def test_a_5xx_or_2xx_whose_body_cannot_be_read_stays_uncertain(
    status: int, unreadable: Callable[..., Answer], tmp_path: Path
) -> None:
    """The server may have done the work before its reply broke: never resent."""
    async with _raw_gateway(unreadable(status)) as gateway:
        async with _client(gateway.origin, tmp_path) as client:
            with pytest.raises(SubmitUncertainError):
                await client.images.submit(prompt="x", model="dall-e-2")
            assert len(await client.uncertain_submits()) == 1
    assert gateway.asked == [GENERATIONS]


async def test_a_batch_call_answered_4xx_with_an_unreadable_body_is_read_by_its_status() -> None:
    """The same rule for batch queries: a 429 is left to the poller with its Retry-After (it
    was a ResponseTooLargeError, which the poller answers by splitting the call, or a lost
    reply, retried at once), a 400 is a refusal; a 503 cut short is retried, as before."""
    async with _raw_gateway(over_cap(429, "Retry-After: 7"), cut(400)) as gateway:
        async with _transport(gateway.origin) as transport:
            with pytest.raises(RateLimitedError) as limited:
                await transport.post(INFO, ["K1"], kind="poll")
            assert limited.value.retry_after == 7.0
            assert transport.counters.rate_limited == 1
            with pytest.raises(RequestRefusedError):
                await transport.post(INFO, ["K1"], kind="poll")
    assert gateway.asked == [INFO, INFO]  # neither was asked again
    async with _raw_gateway(*[cut(503)] * RETRY.max_attempts) as gateway:
        async with _transport(gateway.origin) as transport:
            with pytest.raises(TransportError):
                await transport.post(INFO, ["K1"], kind="poll")
    assert len(gateway.asked) == RETRY.max_attempts


# --- 4xx replies too complex to read -------------------------------------------------------------
COMPLEX_CAP = 4 * 1024 * 1024  # room for a reply of over a million JSON containers


def too_complex(status: int, shape: str, *headers: str) -> Answer:
    """A reply under the cap that no JSON reader takes: over a million objects and arrays
    (``flood``), or nested deeper than the reader follows (``deep``)."""
    if shape == "flood":
        body = b'{"code":"x","message":"slow down","data":[' + b"[]," * 1_100_000 + b"[]]}"
    else:
        body = b"[" * 200_000 + b"]" * 200_000

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(status, len(body), *headers) + body)
        await writer.drain()

    return answer


@pytest.mark.parametrize("shape", ["flood", "deep"])
async def test_a_4xx_too_complex_to_read_is_the_refusal_its_status_says(
    shape: str, tmp_path: Path
) -> None:
    """A 429 (or 400) whose body held over a million JSON containers, or nested too deep, was
    a ReplyTooComplexError: a submit ended SubmitUncertainError ("may have been charged",
    never resent) and a batch query was split in halves, though the status line said the
    gateway refused it. It is read by its status, as a 4xx over the size cap is."""
    answers = [
        too_complex(429, shape, "Retry-After: 0"),
        accepted("K0001"),
        too_complex(400, shape),
    ]
    async with _raw_gateway(*answers) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.origin,
            retry=INSTANT_RETRY,
            limits=Limits(max_response_bytes=COMPLEX_CAP),
            journal=tmp_path / "journal.sqlite",
        )
        async with client:
            job = await client.images.submit(prompt="x", model="dall-e-2")
            assert job.key == "K0001"
            with pytest.raises(RequestRefusedError) as refused:
                await client.images.submit(prompt="y", model="dall-e-2")
            rows = await client.journal_entries()
            stats = client.stats
    assert gateway.asked == [GENERATIONS] * 3  # the 429, the accepted submit, the 400
    assert [row.state for row in rows] == ["accepted", "rejected"]
    assert stats.retries == 1 and stats.rate_limited == 1
    assert not isinstance(refused.value, SubmitUncertainError)
    assert "the reply's body could not be read" in str(refused.value), refused.value
    limits = Limits(max_response_bytes=COMPLEX_CAP)
    async with _raw_gateway(too_complex(429, shape, "Retry-After: 7")) as gateway:
        creds = throwaway_credentials()
        async with open_transport(gateway.origin, creds, retry=RETRY, limits=limits) as transport:
            with pytest.raises(RateLimitedError) as limited:
                await transport.post(INFO, ["K1"], kind="poll")
            assert limited.value.retry_after == 7.0
    assert gateway.asked == [INFO]
