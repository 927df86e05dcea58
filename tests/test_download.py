"""Saving images: checked, bounded, retried, never half-written, never named from untrusted text."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from wujie_async import (
    ClientStateError,
    InvalidRequestError,
    ProtocolError,
    RetryPolicy,
    TransportError,
)
from wujie_async._addresses import address_allowed, check_url
from wujie_async._download import Downloader
from wujie_async._file_names import render_name
from wujie_async.emulator._png import render_png

from .helpers import png_size
from .hostile import _serve, file_server

pytestmark = pytest.mark.anyio

PNG = render_png("K", 0, 8, 8)
INSTANT = RetryPolicy(initial_wait=0.0, max_wait=0.0, max_attempts=4)


def test_only_https_or_loopback_http() -> None:
    check_url("https://cdn.example/a.png", allow_http=False)
    check_url("http://127.0.0.1:8080/a.png", allow_http=False)
    check_url("http://[::1]:8080/a.png", allow_http=False)
    check_url("http://localhost/a.png", allow_http=False)
    check_url("http://cdn.example/a.png", allow_http=True)
    for url in ("http://cdn.example/a.png", "ftp://cdn.example/a.png", "file:///etc/passwd"):
        with pytest.raises(InvalidRequestError) as info:
            check_url(url, allow_http=False)
        assert info.value.field == "url"


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # the cloud metadata service
        "[fe80::1]",
        "10.0.0.1",
        "172.16.3.4",
        "192.168.1.1",
        "100.64.0.1",
        "[fd00::1]",
        "224.0.0.1",
        "0.0.0.0",
        "[::]",
        "240.0.0.1",
        "[::ffff:169.254.169.254]",
    ],
)
def test_private_link_local_and_reserved_addresses_are_refused(host: str) -> None:
    for url in (f"https://{host}/a.png", f"http://{host}/a.png"):
        with pytest.raises(InvalidRequestError, match="refusing to download"):
            check_url(url, allow_http=True)
    check_url(f"https://{host}/a.png", allow_http=False, allow_private=True)


def test_public_and_loopback_addresses_are_allowed() -> None:
    for address in ("8.8.8.8", "2606:4700::1111", "127.0.0.1", "::1", "127.3.4.5"):
        assert address_allowed(address)
    assert not address_allowed("not an address")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def test_saves_checks_and_cleans_up(tmp_path: Path) -> None:
    with umask(0o022):
        async with file_server() as origin, Downloader(tmp_path, max_bytes=1024 * 1024) as saver:
            saved = await saver.save(f"{origin}/files/png", "ABC123", 0)
            assert saved.path == tmp_path / "ABC123-0.png" and png_size(saved.path.read_bytes())
            with pytest.raises(ProtocolError, match="not a PNG, JPEG or WEBP"):
                await saver.save(f"{origin}/files/html", "ABC123", 1)
            with pytest.raises(ProtocolError, match="larger than"):
                await saver.save(f"{origin}/files/huge", "ABC123", 2)
            with pytest.raises(ProtocolError, match="HTTP 404"):
                await saver.save(f"{origin}/files/missing", "ABC123", 3)
            with pytest.raises(InvalidRequestError):
                await saver.save(f"{origin}/files/png", "../../etc/passwd", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ABC123-0.png"]  # no half files
    # Created with the user's umask, like the manifest (not 0600).
    assert oct(saved.path.stat().st_mode & 0o777) == "0o644"


async def test_a_key_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    async with file_server() as origin, Downloader(tmp_path) as saver:
        with pytest.raises(InvalidRequestError, match="plain job key"):
            await saver.save(f"{origin}/files/png", "OKKEY\n", 0)
        with pytest.raises(InvalidRequestError, match="plain job key"):
            await saver.save_bytes(PNG, "OKKEY\n", 0)
    assert list(tmp_path.iterdir()) == []


# --- a loopback server that redirects, fails, cuts bodies short and counts ----------------------
@asynccontextmanager
async def tricky_server() -> AsyncIterator[tuple[str, Counter[str]]]:
    hits: Counter[str] = Counter()
    in_flight = [0, 0]  # now, most

    async def handle(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        hits[kind] += 1
        if kind == "to":  # /to?url=...: a 302 to anywhere
            raise web.HTTPFound(request.query["url"])
        if kind == "loop":
            raise web.HTTPFound("/loop")
        if kind == "flaky-5xx" and hits[kind] <= 2:
            return web.Response(status=503, text="busy")
        if kind == "flaky-cut" and hits[kind] == 1:
            response = web.StreamResponse(headers={"Content-Length": str(len(PNG) * 4)})
            await response.prepare(request)
            await response.write(PNG[:20])
            request.transport.close()  # type: ignore[union-attr]
            return response
        if kind == "slow":
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            await asyncio.sleep(0.05)
            in_flight[0] -= 1
        if kind == "always-5xx":
            return web.Response(status=502, text="bad gateway")
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{kind}", handle)
    async with _serve(app) as origin:
        hits["most-in-flight"] = 0
        yield origin, hits
        hits["most-in-flight"] = in_flight[1]


async def test_a_redirect_to_the_metadata_service_is_refused_and_nothing_is_fetched(
    tmp_path: Path,
) -> None:
    """Issue 9 item 7: the URL check ran on the first URL only, and the 302 was followed."""
    async with tricky_server() as (origin, hits), Downloader(tmp_path, retry=INSTANT) as saver:
        for target in (
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "http://[fe80::1]/x.png",
            "https://10.1.2.3/x.png",
            "http://cdn.example/x.png",  # plain http to a non-loopback host
            "file:///etc/passwd",
        ):
            with pytest.raises(InvalidRequestError, match="refusing to download"):
                await asyncio.wait_for(saver.save(f"{origin}/to?url={target}", "K1", 0), 5)
        assert hits["to"] == 5  # one request each, then refused: no retry, no second hop
        # An allowed hop is followed; the number of hops is bounded.
        saved = await saver.save(f"{origin}/to?url={origin}/png", "K1", 1)
        assert png_size(saved.path.read_bytes())
        with pytest.raises(ProtocolError, match="redirected more than 5 times"):
            await saver.save(f"{origin}/loop", "K1", 2)
        assert hits["loop"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K1-1.png"]


async def test_a_name_resolving_to_a_private_address_is_refused_at_connect(
    tmp_path: Path,
) -> None:
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip("this machine's host name does not resolve")
    if address_allowed(address):
        pytest.skip(f"this machine's host name resolves to {address}, not a private address")
    async with Downloader(tmp_path, retry=INSTANT) as saver:
        with pytest.raises(InvalidRequestError, match=r"refused address|refusing to download"):
            await saver.save(f"https://{name}/x.png", "K1", 0)


async def test_transient_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    async with tricky_server() as (origin, hits), Downloader(tmp_path, retry=INSTANT) as saver:
        await saver.save(f"{origin}/flaky-5xx", "K5", 0)
        assert hits["flaky-5xx"] == 3
        saved = await saver.save(f"{origin}/flaky-cut", "K5", 1)  # truncated once
        assert hits["flaky-cut"] == 2 and saved.bytes == len(PNG)
        with pytest.raises(ProtocolError, match="HTTP 502"):
            await saver.save(f"{origin}/always-5xx", "K5", 2)
        assert hits["always-5xx"] == INSTANT.max_attempts
        with pytest.raises(ProtocolError, match="HTTP 404"):  # a 4xx is not retried
            await saver.save(f"{origin}/files/nothing", "K5", 3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with Downloader(tmp_path, retry=INSTANT) as saver:
        with pytest.raises(TransportError, match="could not connect") as info:
            await saver.save(f"http://127.0.0.1:{closed_port}/x.png", "K5", 4)
        assert info.value.reached_server is False
        # No aiohttp exception (it holds the request and its URL) rides along in the chain.
        seen: list[BaseException] = []
        error: BaseException | None = info.value
        while error is not None and len(seen) < 10:
            seen.append(error)
            error = error.__cause__ or error.__context__
        assert not [e for e in seen if type(e).__module__.startswith("aiohttp")], seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K5-0.png", "K5-1.png"]


async def test_concurrency_is_bounded(tmp_path: Path) -> None:
    async with tricky_server() as (origin, hits):
        async with Downloader(tmp_path, concurrency=2) as saver:
            await asyncio.gather(*(saver.save(f"{origin}/slow", "K", i) for i in range(8)))
    assert 1 <= hits["most-in-flight"] <= 2
    assert len(list(tmp_path.iterdir())) == 8


async def test_b64_images_are_saved_like_url_images(tmp_path: Path) -> None:
    with umask(0o022):
        async with Downloader(tmp_path, max_bytes=4096) as saver:
            saved = await saver.save_b64(base64.b64encode(PNG).decode(), "KB", 0)
            data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
            again = await saver.save_b64(data_url, "KB", 1)
            raw = await saver.save_bytes(PNG, "KB", 2)
            with pytest.raises(ProtocolError, match="not a PNG"):
                await saver.save_bytes(b"<html>", "KB", 3)
            with pytest.raises(ProtocolError, match="larger than"):
                await saver.save_b64(base64.b64encode(PNG + b"\0" * 8192).decode(), "KB", 4)
            with pytest.raises(ProtocolError, match="not valid base64"):
                await saver.save_b64("not base64!", "KB", 5)
    assert saved.path.read_bytes() == PNG and saved.path.name == "KB-0.png"
    assert again.sha256 == saved.sha256 == raw.sha256 and raw.bytes == len(PNG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["KB-0.png", "KB-1.png", "KB-2.png"]
    assert oct(raw.path.stat().st_mode & 0o777) == "0o644"


async def test_the_name_template_is_checked_and_sanitised(tmp_path: Path) -> None:
    name = render_name(
        "{id}-{index}.{ext}", key="K", index=0, ext="png", id="../../etc/pass\nwd\x1b[2J", line=3
    )
    assert "/" not in name and "\n" not in name and "\x1b" not in name
    assert not name.startswith(".") and name.endswith("-0.png")
    assert render_name("{line:04d}-{key}.{ext}", key="K", index=1, ext="jpg", id=None, line=7) == (
        "0007-K.jpg"
    )
    with pytest.raises(InvalidRequestError, match=r"uses \{id\}"):
        render_name("{id}.{ext}", key="K", index=0, ext="png", id=None, line=None)
    for template in (
        "{key}/{index}.{ext}",
        "{nope}-{key}",
        "{key.__class__}",
        ".{key}",
        "{index}.{ext}",
        "{key!r}",
        "{key",
    ):
        with pytest.raises(InvalidRequestError) as info:
            Downloader(tmp_path, name=template)
        assert info.value.field == "name"
    async with Downloader(tmp_path, name="{id}-{index}.{ext}") as saver:
        saved = await saver.save_bytes(PNG, "KEY1", 0, id="row 7")
    assert saved.path == tmp_path / "row 7-0.png"


async def test_the_downloader_owns_its_session(tmp_path: Path) -> None:
    saver = Downloader(tmp_path)
    with pytest.raises(ClientStateError, match="async with"):
        await saver.save("https://cdn.example/x.png", "K", 0)
    async with file_server() as origin:
        async with saver:
            await saver.save(f"{origin}/files/png", "K", 0)
        await saver.aclose()  # idempotent
