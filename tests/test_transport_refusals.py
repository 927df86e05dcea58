"""Exchanges that fail in a way the first failure already decides: a TLS certificate that
cannot be verified (tried once, not once per attempt)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from wujie_async import (
    RetryPolicy,
    SubmitUncertainError,
    TransportError,
    WujieClient,
)
from wujie_async._transport import _failure_reason

from .conftest import INSTANT_RETRY, open_transport
from .helpers import INFO
from .hostile import throwaway_credentials
from .test_download import self_signed_context

pytestmark = pytest.mark.anyio

RETRY = RetryPolicy(max_attempts=4, initial_wait=0.0, max_wait=0.05)


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
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gateway.connections += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            with contextlib.suppress(OSError):  # ssl.SSLError too: the client's alert
                if cut_handshake:
                    await reader.read(1)
                    writer.transport.abort()
                else:
                    await writer.start_tls(context)  # the client refuses the certificate
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway.base_url = f"https://127.0.0.1:{port}/wj-open/v1"
    try:
        yield gateway
    finally:
        server.close()
        await server.wait_closed()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


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
    said = _failure_reason(aiohttp.ClientConnectorSSLError(key, verify))
    assert said.startswith("ClientConnectorSSLError: the gateway's TLS certificate could not be")
    assert "self-signed certificate" in said, said
    cut = _failure_reason(aiohttp.ClientConnectorSSLError(key, eof))
    assert cut == "ClientConnectorSSLError: TLS failed (UNEXPECTED_EOF_WHILE_READING)", cut
