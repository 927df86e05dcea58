"""What the transport makes of failures: typed errors, retries that are safe, and no more."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from wujie_async import (
    AuthenticationError,
    Credentials,
    InsufficientBalanceError,
    Limits,
    PollPolicy,
    ProtocolError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    SubmitUncertainError,
    Timeouts,
    TransportError,
)
from wujie_async._auth import HeaderSigner
from wujie_async._poller import BatchPoller
from wujie_async._transport import Transport
from wujie_async.emulator import FaultConfig

from .conftest import INSTANT_RETRY, EmulatorFactory, make_client
from .hostile import hostile_gateway

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def open_transport(
    base_url: str, creds: Credentials, *, retry: RetryPolicy | None = None
) -> AsyncIterator[Transport]:
    transport = Transport(
        base_url=base_url,
        signer=HeaderSigner(creds),
        limits=Limits(max_response_bytes=1024 * 1024),
        timeouts=Timeouts(request=10),
        retry=retry or RetryPolicy(max_attempts=2, initial_wait=0),
    )
    await transport.open()
    try:
        yield transport
    finally:
        await transport.close()


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("huge-declared", "cap"),
        ("huge-chunked", "cap"),
        ("nested", "not JSON"),
        ("not-envelope", "envelope"),
        ("array", "envelope"),
        ("teapot", "HTTP 418"),
    ],
)
async def test_bad_replies_become_protocol_errors(
    emulator: EmulatorFactory, mode: str, says: str
) -> None:
    async with emulator() as emu, hostile_gateway() as base:
        async with open_transport(base, emu.credentials) as transport:
            with pytest.raises(ProtocolError) as info:
                await transport.post(f"/{mode}", [], kind="poll")
            assert says in str(info.value)
            assert transport.counters.http_calls == 2  # polls are retried, then give up
            with pytest.raises(SubmitUncertainError) as uncertain:
                await transport.post(f"/{mode}", {"prompt": "p"}, kind="submit")
            assert isinstance(uncertain.value.__cause__, ProtocolError)
            assert uncertain.value.request == {"prompt": "p"}


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
            assert poller._parse(data) == {}
            assert poller.counters.malformed_entries == 3
            with pytest.raises(ProtocolError, match="no list"):
                poller._parse(await transport.post("/no-list", [], kind="poll"))
            assert poller._parse(await transport.post("/null-list", [], kind="poll")) == {}
            bare = poller._parse(await transport.post("/bare-list", [], kind="poll"))
            assert bare["K"].status == 1
    async with emulator() as emu:
        async with make_client(emu) as client:
            client._transport.base_url = base  # the hostile server is gone: nothing listens
            with pytest.raises(TransportError) as refused:
                await client.images.submit(prompt="x", model="dall-e-2")
            assert not refused.value.reached_server
            assert not isinstance(refused.value, SubmitUncertainError)


async def test_connect_refused_submits_are_retried_then_raised(emulator: EmulatorFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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


async def test_retryable_refusals_are_retried(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(business_error=0.3, business_error_code="20010018", http_429=0.1)
    async with emulator(faults=faults) as emu, make_client(emu) as client:
        jobs = [await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(30)]
        stats = emu.stats()
        assert stats["submits_accepted"] == 30 == len({job.key for job in jobs})
        assert stats["faults"]["business_error"] > 0 and client.stats.retries > 0


async def test_retry_after_is_honoured(emulator: EmulatorFactory) -> None:
    retry = RetryPolicy(initial_wait=0, max_wait=5)
    async with emulator(faults=FaultConfig(burst_429=1, retry_after_s=1)) as emu:
        async with make_client(emu, retry=retry) as client:
            started = time.monotonic()
            await client.images.submit(prompt="x", model="dall-e-2")
            assert time.monotonic() - started >= 1.0
            assert client.stats.rate_limited == 1


async def test_auth_failure_is_typed_and_not_retried_forever(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        stranger = Credentials("wjemulator0001", unregistered_key())
        async with make_client(emu) as client:
            client._transport._signer = HeaderSigner(stranger)
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
        assert client.stats.retries >= sum(faults_seen.values())


def test_rate_limited_error_carries_retry_after() -> None:
    error = RateLimitedError("slow down", retry_after=2.0, http_status=429)
    assert error.retry_after == 2.0 and "HTTP 429" in str(error)
    assert isinstance(ServerError("x"), Exception)
