"""What a hostile network or gateway must never get: replayable requests, secrets, a terminal."""

from __future__ import annotations

import asyncio
import base64
import functools
import html
import json
import logging
import os
import socket
import sys
import time
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import wujie_async
from wujie_async import (
    APIError,
    BusinessError,
    ClientStateError,
    Credentials,
    DownloadPolicy,
    InvalidRequestError,
    JobFailedError,
    Limits,
    RetryPolicy,
    SubmitUncertainError,
    Timeouts,
    WujieClient,
    WujieError,
    snippet,
)
from wujie_async._addresses import AddressRule
from wujie_async._auth import HeaderSigner
from wujie_async._redaction import remember_signature
from wujie_async._transport import Transport

from .cli_helpers import cli
from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .helpers import GENERATIONS, INFO, error_chain, eventually, reported_locals
from .hostile import (
    ESCAPES,
    gzip_bomb,
    image_server,
    recording_gateway,
    scripted_gateway,
    throwaway_credentials,
)
from .test_cli_progress import private_address

pytestmark = pytest.mark.anyio

NO_RETRY = RetryPolicy(max_attempts=2, initial_wait=0)


@functools.cache
def credentials() -> Credentials:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return Credentials("wjsecurity", pem)


# --- base URL rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "http://gate.example.com/wj-open/v1",
        "http://10.0.0.5:8080/wj-open/v1",
        "http://[2001:db8::1]/wj-open/v1",
        "http://127.0.0.1.nip.io/wj-open/v1",  # a name, even one that looks like loopback
    ],
)
def test_plain_http_to_a_non_loopback_host_is_refused(base_url: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        WujieClient(credentials(), base_url=base_url)
    assert info.value.field == "base_url"
    assert "loopback" in info.value.rule and "allow_insecure_http" in info.value.rule


def test_the_insecure_opt_in_works_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wujie_async"):
        client = WujieClient(
            credentials(), base_url="http://gate.example.com/wj-open/v1/", allow_insecure_http=True
        )
    assert client.base_url == "http://gate.example.com/wj-open/v1"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "INSECURE" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:8080/wj-open/v1",
        "http://127.9.9.9/wj-open/v1",
        "http://[::1]:8080/wj-open/v1",
        "http://localhost:8080/wj-open/v1",
        "https://gate.wujieai.net/wj-open/v1",
    ],
)
def test_loopback_http_and_https_need_no_opt_in(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wujie_async"):
        WujieClient(credentials(), base_url=base_url)
    assert not caplog.records


@pytest.mark.parametrize(
    "base_url",
    [
        "https://alice:s3cret-pw@gate.example.com/wj-open/v1",
        "https://:s3cret-pw@gate.example.com/wj-open/v1",
        "http://alice:s3cret-pw@127.0.0.1:8080/wj-open/v1",
    ],
)
def test_credentials_in_the_base_url_are_refused_without_showing_them(base_url: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        WujieClient(credentials(), base_url=base_url, allow_insecure_http=True)
    assert info.value.field == "base_url" and "user:password@" in info.value.rule
    assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in repr(info.value)
    assert info.value.__context__ is None  # nothing else rides along


@pytest.mark.parametrize(
    ("base_url", "from_env"),
    [
        ("https://alice:s3cret-pw@gate.example.com/wj-open/v1", False),
        ("https://alice:s3cret-pw@gate.example.com/wj-open/v1", True),  # WUJIE_BASE_URL
        ("http://alice:s3cret-pw@gate.example.com/wj-open/v1", False),  # refused for http
        ("https://gate.example.com/wj-open/v1?token=s3cret-pw", False),
        ("https://alice:s3cret-pw@gate.example.com/wj-open/v1\n", False),
    ],
)
def test_a_refused_base_url_is_kept_by_no_frame_of_its_error(
    base_url: str, from_env: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message never repeated it, but the constructor's and the check's frames kept it as
    a local, which an error reporter that records locals (Sentry) stores."""
    monkeypatch.setenv("WUJIE_BASE_URL", base_url)
    with pytest.raises(InvalidRequestError) as info:
        WujieClient(credentials(), base_url=None if from_env else base_url)
    assert info.value.field == "base_url"
    seen = reported_locals(info.value)
    assert any(line.startswith("_client.py:__init__:") for line in seen)  # they are recorded
    assert [line for line in seen if "s3cret-pw" in line] == []


@pytest.mark.parametrize(
    "base_url",
    ["https://[::1/wj-open/v1", "https://gate.example.com:port/x", "ftp://gate.example.com", ""],
)
def test_malformed_base_urls_are_typed_errors(base_url: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        WujieClient(credentials(), base_url=base_url or "https://")
    assert info.value.field == "base_url"


@pytest.mark.parametrize(
    ("base_url", "named"),
    [
        ("https://gate.example.com/wj-open/v1?x=1", "query"),  # paths went after "?x=1"
        ("https://gate.example.com/wj-open/v1?", "query"),
        ("https://gate.example.com/wj-open/v1#frag", "fragment"),  # paths went nowhere
        ("https://gate.example.com\n/wj-open/v1", "control"),  # urlsplit drops the newline
        ("https://gate.example.com/wj-open/v1\n", "control"),
        ("https://gate.example.com/wj-\topen/v1", "control"),
        ("https://gate.example.com/wj-open/v1\x00", "control"),
        ("https://gate.example.com/wj-open/v1\x7f", "control"),
        (" https://gate.example.com/wj-open/v1", "space"),  # urlsplit drops a leading space
        ("https://gate.example.com/wj-open/v1 ", "space"),
    ],
)
def test_a_base_url_that_would_send_requests_elsewhere_is_refused(
    base_url: str, named: str
) -> None:
    """Each of these was taken, and requests went to another path than the URL reads."""
    with pytest.raises(InvalidRequestError) as info:
        WujieClient(credentials(), base_url=base_url)
    assert info.value.field == "base_url" and named in info.value.rule
    assert "gate.example.com" not in str(info.value)  # never repeated: it may hold a password


def test_an_empty_base_url_is_refused_not_taken_for_the_production_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``base_url=""`` (``--base-url "$STAGING_URL"`` with the variable unset) was replaced by
    the production gateway: paid jobs sent where the caller did not ask."""
    monkeypatch.delenv("WUJIE_BASE_URL", raising=False)
    with pytest.raises(InvalidRequestError) as info:
        WujieClient(credentials(), base_url="")
    assert info.value.field == "base_url" and "empty" in info.value.rule
    assert WujieClient(credentials()).base_url.startswith("https://")  # left out: the default


async def test_the_cli_refuses_an_empty_base_url(tmp_path: Path) -> None:
    env = {"WUJIE_APP_ID": "app", "WUJIE_PRIVATE_KEY": credentials().private_key}
    code, _, err = await cli("generate", "a fox", "--no-wait", "--base-url", "", env=env)
    assert code == 2 and "--base-url / WUJIE_BASE_URL: is empty" in err, err


# --- the signed header is never reachable from an error --------------------------------------


def _reachable(error: BaseException, *, frames: bool = True) -> Iterator[str]:
    """Text of everything reachable from ``error`` that could hold the header.

    Follows ``__cause__``/``__context__``, ``args``, attributes, any ``request_info`` (aiohttp
    keeps the request headers there) and (``frames``) the locals of our own frames in each
    traceback.
    """
    stack: list[Any] = [error]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, str | bytes):
            yield item.decode("utf-8", "replace") if isinstance(item, bytes) else item
            continue
        if isinstance(item, int | float | bool):
            continue
        yield repr(item)
        if isinstance(item, BaseException):
            yield str(item)
            stack += [item.__cause__, item.__context__, *item.args, *vars(item).values()]
            if frames:
                stack += _our_frame_locals(item.__traceback__)
        elif isinstance(item, Mapping):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            stack += list(item)
        for name in ("request_info", "headers", "history"):
            stack.append(getattr(item, name, None))


_PACKAGE_DIR = str(Path(wujie_async.__file__).resolve().parent) + os.sep


def _our_frame_locals(tb: TracebackType | None) -> list[Any]:
    found: list[Any] = []
    while tb is not None:
        frame = tb.tb_frame
        # The package's own files only: a clone may sit in a folder named wujie_async too,
        # and this test's frame (which holds the secrets it looks for) must not count.
        if os.path.realpath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            # Only values that are themselves text or containers: ``self`` holds the signer
            # (whose job is to keep the header), which is not what an error should carry.
            found += [
                value
                for value in frame.f_locals.values()
                if isinstance(value, str | bytes | Mapping | list | tuple | BaseException)
                or hasattr(value, "request_info")
            ]
        tb = tb.tb_next
    return found


def test_a_damaged_key_is_not_kept_by_its_error_or_its_frames() -> None:
    # Truncated, one character changed, junk around it: the key's text is mostly still good,
    # and the error's traceback kept the frame that parsed it, locals and all (an error
    # reporter that records locals stored it).
    pem = throwaway_credentials().private_key
    body = "".join(pem.splitlines()[1:-1])
    der = body[:700] + ("A" if body[700] != "A" else "B") + body[701:]
    damaged = [pem[: len(pem) // 2], body[: len(body) - 40], der, "junk " + body]
    pieces = [body[i : i + 24] for i in range(0, len(body) - 24, 24)]
    for key in damaged:
        with pytest.raises(InvalidRequestError) as info:
            Credentials("app", key)
        said = "\n".join(_reachable(info.value))
        assert not [piece for piece in pieces if piece in said], key[:40]


@pytest.mark.parametrize("variable", ["WUJIE_PRIVATE_KEY", "WUJIE_PRIVATE_KEY_FILE"])
def test_a_damaged_key_read_from_the_environment_is_not_kept_by_the_frames(
    variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The caller passed no key: the library read it, and its frames (Credentials.from_env,
    # the client's constructor) kept it as locals. Each frame's locals also show as reprs.
    pem = throwaway_credentials().private_key
    damaged = pem[:-60]
    monkeypatch.setenv("WUJIE_APP_ID", "app")
    monkeypatch.delenv("WUJIE_PRIVATE_KEY", raising=False)
    if variable == "WUJIE_PRIVATE_KEY":
        monkeypatch.setenv(variable, damaged)
    else:
        key_file = tmp_path / "key.pem"
        key_file.write_text(damaged)
        monkeypatch.setenv(variable, str(key_file))
    body = "".join(pem.splitlines()[1:-1])
    pieces = [body[i : i + 24] for i in range(0, len(body) - 60, 24)]
    with pytest.raises(InvalidRequestError) as info:
        WujieClient()
    said = "\n".join(_reachable(info.value))
    assert not [piece for piece in pieces if piece in said]
    tb = info.value.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if os.path.realpath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            for value in frame.f_locals.values():
                assert not any(piece in repr(value) for piece in pieces)
        tb = tb.tb_next


def _secrets(creds: Credentials, seen_by_server: list[str]) -> list[str]:
    """The header markers to look for: every signature made around now, and what was sent."""
    now = int(time.time())
    signs = [json.loads(creds.header_at(t))["sign"] for t in range(now - 30, now + 5)]
    sent = [json.loads(header)["sign"] for header in seen_by_server if header]
    return ["secretKeyVersion", *signs, *sent]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("mode", "what"),
    [
        (None, "Connection refused"),
        ("unauthorized", "WUJIE_APP_ID"),
        ("server-error", "HTTP 503"),
        pytest.param("slow", "Timeouts.request", marks=pytest.mark.long),  # waits out a timeout
        ("html-200", "not JSON"),
        ("redirect-self", "redirect"),
        ("not-found-html", "does not exist"),
        ("gzip-bomb", "cap"),
    ],
)
@pytest.mark.parametrize("kind", ["submit", "poll"])
async def test_no_error_chain_reaches_the_signed_header(
    mode: str | None, what: str, kind: str
) -> None:
    creds = credentials()
    gzip_bomb()  # built now, not within the short request timeout
    async with recording_gateway() as gateway:
        origin = gateway.origin if mode is not None else f"http://127.0.0.1:{_free_port()}"
        base_url = f"{origin}/{mode or 'x'}"
        timeouts = Timeouts(request=0.2)
        limits = Limits(max_response_bytes=64 * 1024)
        with pytest.raises(WujieError) as info:
            if kind == "submit":
                client = WujieClient(
                    creds, base_url=base_url, retry=NO_RETRY, timeouts=timeouts, limits=limits
                )
                async with client:
                    await client.images.submit(prompt="x", model="dall-e-2")
            else:
                transport = Transport(
                    base_url=base_url,
                    signer=HeaderSigner(creds),
                    limits=limits,
                    timeouts=timeouts,
                    retry=NO_RETRY,
                )
                await transport.open()
                try:
                    await transport.post(INFO, ["K" * 32], kind="poll")
                finally:
                    await transport.close()
        secrets = _secrets(creds, gateway.authorizations)
        texts = list(_reachable(info.value))
        assert any(what in text for text in texts), (what, str(info.value))
        for text in texts:
            for secret in secrets:
                assert secret not in text, f"the signed header is reachable: {text[:200]!r}"
        # Every frame the error's traceback keeps, aiohttp's too (the submit's coroutines are
        # returned, not awaited, on the hot path: no aiohttp frame comes back with them).
        for function, text in _every_frame_local(info.value):
            for secret in secrets:
                assert secret not in text, f"{function} keeps the signed header: {text[:200]!r}"
        if mode is None:
            assert "Connection refused" in str(info.value)  # the OS reason is kept


def _every_frame_local(error: BaseException) -> Iterator[tuple[str, str]]:
    """(function, repr of a local) for every frame of ``error``'s traceback and its chain,
    aiohttp's too: an error tracker that records frame locals records them all (but this
    test file's own, which hold the secrets looked for)."""
    for item in error_chain(error):
        tb = item.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename != __file__:
                for value in tb.tb_frame.f_locals.values():
                    yield tb.tb_frame.f_code.co_name, repr(value)
            tb = tb.tb_next


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
async def test_a_submit_cancelled_on_the_wire_keeps_no_signature_in_its_traceback(
    level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A request handler whose browser went away cancels its submit on the wire: the
    CancelledError it gets (which a framework may log with its frames' locals) keeps no frame
    whose locals hold the signed header (aiohttp's request frame has it in ``headers``).
    Observed (DEBUG) and on the hot path (WARNING: the attempt's coroutine returned, not
    awaited, by Transport._post_once)."""
    caplog.set_level(level, logger="wujie_async")
    creds = credentials()
    async with recording_gateway() as gateway:
        async with WujieClient(creds, base_url=f"{gateway.origin}/slow") as client:
            submit = asyncio.ensure_future(client.images.submit(prompt="x", model="dall-e-2"))
            await eventually(lambda: gateway.hits["slow"] == 1)
            submit.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await submit
        secrets = _secrets(creds, gateway.authorizations)
    found = list(_every_frame_local(info.value))
    assert found  # the frames were looked at
    for function, text in found:
        for secret in secrets:
            assert secret not in text, f"{function} keeps the signed header: {text[:200]!r}"


async def test_a_session_closed_under_the_client_is_a_typed_error_with_no_signature(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An app's shutdown closes its own aiohttp session before the client: a submit raised
    aiohttp's RuntimeError, and the poller logged it with a traceback, both keeping aiohttp's
    request frame (its ``headers`` local holds the signed header). Now a ClientStateError
    (still a RuntimeError) and a WARNING without a traceback."""
    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with emulator() as emu:
        session = aiohttp.ClientSession()
        async with make_client(emu, session=session) as client:
            await client.images.submit(prompt="x", model="dall-e-2")  # the poller asks about it
            await session.close()
            with pytest.raises(ClientStateError, match="session given to the client") as closed:
                await client.images.submit(prompt="x", model="dall-e-2")
            await eventually(
                lambda: any("batch query of 1 keys failed" in r.message for r in caplog.records)
            )
    secrets = _secrets(emu.credentials, [])
    for function, text in _every_frame_local(closed.value):
        for secret in secrets:
            assert secret not in text, f"{function} keeps the signed header: {text[:200]!r}"
    logged = [record.exc_info for record in caplog.records if record.exc_info]
    assert not logged, logged  # a typed failure: no traceback logged


async def test_an_error_raised_inside_aiohttp_keeps_none_of_its_frames(
    emulator: EmulatorFactory,
) -> None:
    """A caller's session whose tracing hook fails: the hook's error is raised inside
    aiohttp's request frame, whose locals hold the signed header. It reaches the caller as it
    was raised (type, message) with a note, without aiohttp's frames."""

    async def failing_hook(*_: Any) -> None:
        raise LookupError("the app's tracing hook failed")

    tracing = aiohttp.TraceConfig()
    tracing.on_request_start.append(failing_hook)
    async with emulator() as emu, aiohttp.ClientSession(trace_configs=[tracing]) as session:
        async with make_client(emu, session=session) as client:
            with pytest.raises(LookupError, match="tracing hook failed") as failed:
                await client.images.submit(prompt="x", model="dall-e-2")
    secrets = _secrets(emu.credentials, [])
    for function, text in _every_frame_local(failed.value):
        for secret in secrets:
            assert secret not in text, f"{function} keeps the signed header: {text[:200]!r}"
    assert any("left out" in note for note in getattr(failed.value, "__notes__", []))


@pytest.mark.parametrize(
    "mode",
    [
        "echo-business",
        "echo-401",
        "echo-html-502",
        "echo-entities",
        "echo-wrapped",
        "echo-percent",
        "echo-hex",
        "echo-object",
    ],
)
@pytest.mark.parametrize("kind", ["submit", "poll"])
@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
async def test_a_header_the_server_echoes_back_is_left_out_of_errors_and_logs(
    mode: str, kind: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    # At DEBUG an attempt is observed (Transport._post_once_waited); else it takes the hot
    # path, a plain call returning the exchange's coroutine: both checked.
    caplog.set_level(level, logger="wujie_async")
    creds = credentials()
    async with recording_gateway() as gateway:
        transport = Transport(
            base_url=f"{gateway.origin}/{mode}",
            signer=HeaderSigner(creds),
            limits=Limits(),
            timeouts=Timeouts(request=5),
            retry=NO_RETRY,
        )
        await transport.open()
        try:
            with pytest.raises(WujieError) as info:
                if kind == "submit":
                    await transport.post(GENERATIONS, {"prompt": "x"}, kind="submit")
                else:
                    await transport.post(INFO, ["K" * 32], kind="poll")
        finally:
            await transport.close()
    signs = [json.loads(header)["sign"] for header in gateway.authorizations]
    assert signs and all(len(sign) == 344 for sign in signs)
    # Nothing reachable from the error leaves it in: messages, reprs, attributes, the chain,
    # the locals of the package's frames its traceback keeps (an error reporter records
    # them), and the logs.
    texts = [*_reachable(info.value), caplog.text]
    if mode in ("echo-entities", "echo-wrapped", "echo-hex"):
        # Re-encoded on the way (no long run left): what quotes the signature is left out whole.
        assert any("it quotes this client's request signature" in text for text in texts)
    elif mode == "echo-object":
        assert any("Authorization" in text for text in texts)  # the rest is kept
    else:
        assert any("headers: Authorization" in text for text in texts)  # the rest is kept
    _assert_no_signature(texts, signs)


def _assert_no_signature(texts: list[str], signs: list[str]) -> None:
    """No text quotes a piece of a signature: base64, hex, HTML- or URL-encoded, wrapped."""
    for text in texts:
        for sign in signs:
            pieces = {sign[start : start + 24] for start in range(0, len(sign) - 24, 8)}
            digits = base64.b64decode(sign).hex()
            pieces |= {digits[start : start + 24] for start in range(0, len(digits) - 24, 8)}
            for seen in (text, html.unescape(text), urllib.parse.unquote(text), text.lower()):
                letters = "".join(seen.split())
                assert not any(piece in letters for piece in pieces), f"signature: {text[:300]!r}"


@pytest.mark.parametrize("mode", ["echo-200-data", "echo-200-key", "echo-200-reused"])
@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])
async def test_a_submit_reply_quoting_the_header_is_kept_by_no_frame_of_its_error(
    mode: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A "success" whose data quotes the request's signature (no key, a key around it, or a
    key in use beside it): the message left it out, but the locals of the frames the error's
    traceback keeps (the reply in the submit's, the key check's) held it whole, for an error
    reporter to store. Observed (DEBUG) and on the hot path (WARNING)."""
    caplog.set_level(level, logger="wujie_async")
    async with recording_gateway() as gateway:
        client = WujieClient(credentials(), base_url=f"{gateway.origin}/{mode}", retry=NO_RETRY)
        async with client:
            first = None
            if mode == "echo-200-reused":
                first = await client.images.submit(prompt="first", model="dall-e-2")
            with pytest.raises(SubmitUncertainError) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
            if first is not None:
                first.cancel()
    signs = [json.loads(header)["sign"] for header in gateway.authorizations]
    assert signs
    _assert_no_signature([*_reachable(info.value), caplog.text], signs)


# --- server text never drives the terminal ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "\x1b]0;PWNED\x07",  # set the window title (OSC, BEL-terminated)
        "\x1b]0;PWNED\x1b\\",  # the same, ST-terminated
        "\x1b[2J",  # clear the screen
        "\x1b[1;31mred\x1b[0m",  # colours
        "\x9b2J",  # the 8-bit CSI
        "\x00\x07\x08\x7f\x85",  # NUL, BEL, BS, DEL, NEL
        "a\u202eb",  # a bidi override
        "a\u2066b\u2069",  # a bidi isolate
        "a\u200e\u200f\u061cb",  # bidi marks (LRM, RLM, ALM)
        "a\u200bb\ufeff",  # zero-width space, BOM
        "a" + "".join(chr(0xE0000 + ord(c)) for c in "PWNED run rm") + "b",  # tag characters
        "a\u00ad\u180e\ufff9b\ufe0f\U000e0101",  # soft hyphen, MVS, annotation, selectors
    ],
)
def test_snippet_strips_every_control_character(text: str) -> None:
    cleaned = snippet(f"before {text} after")
    assert cleaned.startswith("before ") and cleaned.endswith(" after")
    assert "PWNED" not in cleaned and "2J" not in cleaned and "31m" not in cleaned
    assert all(ch.isprintable() for ch in cleaned), repr(cleaned)
    assert all(unicodedata.category(ch) != "Cf" for ch in cleaned), repr(cleaned)


def test_snippet_removes_every_format_character_python_knows() -> None:
    hidden = "".join(
        chr(cp) for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"
    )
    assert len(hidden) > 150
    assert snippet(f"a{hidden}b", limit=10_000) == "ab"


def test_a_short_plain_text_quoting_a_signature_is_still_left_out() -> None:
    """Plain short ASCII text takes snippet's quick way (nothing to clean): the signature
    rule still holds on it, for a piece of the base64 and of the hex (either case)."""
    sign = base64.b64encode(os.urandom(256)).decode()
    remember_signature(sign)
    letters = "".join(ch for ch in sign if ch.isalnum())
    hexed = base64.b64decode(sign).hex()
    for quoted in (letters[40:60], hexed[10:40], hexed[10:40].upper()):
        text = f"job failed: {quoted}"
        assert text.isascii() and text.isprintable() and len(text) < 128
        assert "it quotes this client's request signature" in snippet(text), quoted
        assert "it quotes this client's request signature" in snippet(f"<b>{text}</b>")
    assert snippet("job failed: an ordinary reason") == "job failed: an ordinary reason"


def test_snippet_folds_whitespace_and_stays_short() -> None:
    assert snippet("a\n\n\tb\r\nc  d") == "a b c d"
    assert snippet(b"x" * 10_000).endswith("...") and len(snippet(b"x" * 10_000)) == 303
    assert snippet(b"\xff\xfeok") == "\ufffd\ufffdok"


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("escapes-business", BusinessError),
        ("escapes-5xx", APIError),
        ("markup-business", BusinessError),
    ],
)
async def test_server_text_in_errors_is_stripped(mode: str, error: type[APIError]) -> None:
    async with recording_gateway() as gateway:
        base = f"{gateway.origin}/{mode}"
        async with WujieClient(credentials(), base_url=base, retry=NO_RETRY) as client:
            with pytest.raises(WujieError) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
    chain: list[BaseException] = [info.value]
    if info.value.__cause__ is not None:
        chain.append(info.value.__cause__)
    api_errors = [e for e in chain if isinstance(e, error)]
    assert api_errors, chain
    for item in chain:
        for text in (str(item), getattr(item, "body", ""), getattr(item, "message", "")):
            assert "\x1b" not in text and "\x07" not in text and "PWNED" not in text, repr(text)
            assert "<" not in text and "alert" not in text, repr(text)  # no markup either
    assert "red" in str(api_errors[0]) + api_errors[0].body


def test_snippet_removes_html_markup_but_not_angle_brackets_in_words() -> None:
    page = "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1><hr><center>nginx</center>"
    assert snippet(page + "<!-- id 7 --></body></html>") == "502 Bad Gateway nginx"
    assert snippet("<style>p{}</style><p onclick=x()>hi</p>") == "hi"
    assert snippet("<widget data-x='1'>blocked") == "blocked"  # any tag with an attribute
    assert snippet("field <prompt> is required; n <= 10") == "field <prompt> is required; n <= 10"
    assert snippet("size < 4MB/png > 2") == "size < 4MB/png > 2"


@pytest.mark.parametrize(
    "markup",
    [
        "<svg/onload=alert(1)>",  # attributes after a "/", as browsers read them
        "<img/src=x/onerror=alert(1)>",
        "<body/onload=alert(1)>",
        "<iframe/src=javascript:alert(1)>",
        "<x-widget/onclick=alert(1)>",
        "<\x00script>alert(1)</script>",  # split by a control or an invisible character,
        "<scr\u200bipt>alert(1)</scr\u200bipt>",  # which used to go after the markup
        "<\u200bimg src=x onerror=alert(1)>",
        "<scr\x7fipt>alert(1)",
        "<img src=x onerror=alert(1)//<b>>",  # markup inside a tag rejoined it once removed
        "<img src=x onerror=alert(1)// <x>",  # a "<" inside a tag is part of it
        "<svg/onload=alert(1)//",  # left open: the page's own next ">" closes it
        "<x " * 20 + "<svg/onload=alert(1)//",  # the same, after many a "<"
    ],
)
def test_snippet_leaves_no_tag_a_browser_would_run(markup: str) -> None:
    for text in (f"before {markup} after", f"before {markup}"):
        cleaned = snippet(text)
        assert "<" not in cleaned and "alert" not in cleaned, repr(cleaned)
        assert cleaned.startswith("before")


def test_job_failure_messages_are_stripped() -> None:
    error = JobFailedError(job_key="K", fail_code=1, fail_message=f"boom {ESCAPES}\nnext line")
    assert "\x1b" not in str(error) and "\n" not in str(error) and "PWNED" not in str(error)
    assert error.fail_message is not None and "\x1b" in error.fail_message  # kept as sent


# --- where image URLs may point (issue 17 item 8) ----------------------------------------------


class _GatewayNames(AbstractResolver):
    """The name service of the API calls' session in these tests: ``gateway.test`` is
    127.0.0.1, where the test's gateway listens.

    So the client sees what it sees for any gateway on the internet, a base URL with a name,
    while its API calls reach the test's gateway. The session is the user's own (``session=``,
    a public option); the client's downloads never use it (they have their own pool and
    resolver), so they see ``gateway.test`` nowhere.
    """

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != "gateway.test":
            raise OSError(f"{host}: unknown to this test")
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@asynccontextmanager
async def client_of_named_gateway(origin: str, **options: Any) -> AsyncIterator[WujieClient]:
    """A client whose base URL is ``http://gateway.test:PORT``: not loopback, as far as it
    can tell, though the gateway at ``origin`` listens on 127.0.0.1."""
    port = origin.rsplit(":", 1)[1]
    connector = aiohttp.TCPConnector(resolver=_GatewayNames())
    async with aiohttp.ClientSession(connector=connector) as session:
        client = WujieClient(
            throwaway_credentials(),
            base_url=f"http://gateway.test:{port}",
            allow_insecure_http=True,  # plain http to a name: the test has no TLS
            session=session,
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
            **options,
        )
        async with client:
            yield client


def test_what_image_hosts_a_base_url_allows() -> None:
    cases = {
        "http://127.0.0.1:8000/wj-open/v1": {"public", "loopback"},
        "http://localhost:8000/wj-open/v1": {"public", "loopback"},
        "http://[::1]:8000/wj-open/v1": {"public", "loopback"},
        "https://10.0.0.5/wj-open/v1": {"public", "private"},
        "https://192.168.1.20/wj-open/v1": {"public", "private"},
        "https://[fd00::5]/wj-open/v1": {"public", "private"},
        "https://gate.wujieai.net/wj-open/v1": {"public"},
        "https://gateway.internal/wj-open/v1": {"public"},  # a name: where it resolves can change
        "https://8.8.8.8/wj-open/v1": {"public"},
        "https://169.254.169.254/wj-open/v1": {"public"},
    }
    for base_url, allowed in cases.items():
        assert AddressRule.for_gateway(base_url).allowed == allowed, base_url
        opted_in = AddressRule.for_gateway(base_url, allow_private_addresses=True)
        assert opted_in.allowed == {"public", "loopback", "private", "special"}
    with pytest.raises(InvalidRequestError, match="allow_private_addresses"):
        WujieClient(credentials(), allow_private_addresses="yes")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_gateway_not_on_loopback_cannot_aim_downloads_at_this_machine(
    tmp_path: Path,
) -> None:
    """A hostile gateway lists image URLs on this machine's loopback: by address, by name, and
    through a redirect. Nothing is fetched from it, and nothing is written."""
    async with image_server() as local:
        port = local.origin.rsplit(":", 1)[1]
        urls = [
            local.url("admin/reset"),
            f"http://localhost:{port}/admin/delete",
            local.url(f"to?url={local.url('admin/redirected')}"),
            # Spellings that parse as a name but that aiohttp connects to as 127.0.0.1.
            f"http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/admin/fullwidth",
            f"http://127\u30020\u30020\u30021:{port}/admin/ideographic-dots",
        ]
        listed = [{"url": url} for url in urls]
        script = lambda keys: [{"key": k, "status": 4, "images": listed} for k in keys]  # noqa: E731
        async with (
            scripted_gateway(script) as gateway,
            client_of_named_gateway(gateway.base_url) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2", n=len(urls))
            with pytest.raises(InvalidRequestError, match="refusing to download") as info:
                await job.save(tmp_path)
            for image in job.images:
                with pytest.raises(InvalidRequestError, match="refusing to download"):
                    await client.download(image, tmp_path / "x.png")
        assert "allow_private_addresses=True" in info.value.rule
        assert "base URL is not on loopback" in info.value.rule
        assert sum(local.hits.values()) == 0, local.hits
        assert list(tmp_path.iterdir()) == []

        # The user's opt-in lets them through, and the same gateway's images are saved.
        async with (
            scripted_gateway(script) as gateway,
            client_of_named_gateway(gateway.base_url, allow_private_addresses=True) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2", n=len(urls))
            saved = await job.save(tmp_path)
        assert len(saved) == 5 and local.hits["admin"] == 5 and local.hits["to"] == 1


@pytest.mark.anyio
async def test_a_gateway_on_a_private_address_gets_private_images_but_never_loopback(
    tmp_path: Path,
) -> None:
    """The redirect case: an image host allowed for this gateway redirects to this machine's
    loopback; the hop is refused. Needs an address of this machine that is private."""
    host = private_address()
    if host is None:
        pytest.skip("this machine has no private (non-loopback, non-public) address")
    async with image_server(also_on=host) as images:
        assert images.other_origin is not None
        listed = [
            {"url": f"{images.other_origin}/png"},
            {"url": f"{images.other_origin}/to?url={images.url('admin/reset')}"},
        ]
        script = lambda keys: [{"key": k, "status": 4, "images": listed} for k in keys]  # noqa: E731
        async with scripted_gateway(script, host=host) as gateway:
            client = WujieClient(
                throwaway_credentials(),
                base_url=gateway.base_url,
                allow_insecure_http=True,
                downloads=DownloadPolicy(allow_http=True),  # the test's servers have no TLS
                poll=FAST_POLL,
                retry=INSTANT_RETRY,
            )
            async with client:
                job = await client.images.submit(prompt="p", model="dall-e-2", n=2)
                result = await job
                first = await client.download(result.images[0], tmp_path / "first.{ext}")
                with pytest.raises(InvalidRequestError, match="refusing to download") as info:
                    await client.download(result.images[1], tmp_path / "second.{ext}")
        assert "a loopback address" in info.value.rule
        assert images.hits["to"] == 1 and images.hits["admin"] == 0
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name] == ["first.png"]
