"""Saving images: checked, bounded, retried, never half-written, never named from untrusted text."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wujie_async import (
    ClientStateError,
    DownloadPolicy,
    GeneratedImage,
    ImageResult,
    InvalidRequestError,
    ProtocolError,
    RetryPolicy,
    TransportError,
)
from wujie_async._addresses import AddressRule, check_url
from wujie_async._download import Downloader
from wujie_async._file_names import check_template, render_name
from wujie_async._image_formats import HEAD_BYTES, TAIL_BYTES, end_problem
from wujie_async._save_folder import check_job_template
from wujie_async.emulator._png import render_png

from .helpers import png_size
from .hostile import _serve, file_server

pytestmark = pytest.mark.anyio

PNG = render_png("K", 0, 8, 8)
INSTANT = RetryPolicy(initial_wait=0.0, max_wait=0.0, max_attempts=4)
PUBLIC = AddressRule()  # a gateway on a public address: public image hosts only
LOOPBACK = AddressRule.for_gateway("http://127.0.0.1:8000/wj-open/v1")  # like the emulator's


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def local_downloader(**policy: Any) -> Downloader:
    """A downloader as a client on a loopback gateway has (the test servers are there too)."""
    return Downloader(DownloadPolicy(**policy), retry=INSTANT, addresses=LOOPBACK)


def at(url: str, index: int = 0) -> GeneratedImage:
    return GeneratedImage(index, url)


def inline(text: str, index: int = 0) -> GeneratedImage:
    return GeneratedImage(index, None, text)


def names(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


def test_only_https_or_loopback_http() -> None:
    check_url("https://cdn.example/a.png", allow_http=False, rule=PUBLIC)
    check_url("http://127.0.0.1:8080/a.png", allow_http=False, rule=LOOPBACK)
    check_url("http://[::1]:8080/a.png", allow_http=False, rule=LOOPBACK)
    check_url("http://localhost/a.png", allow_http=False, rule=PUBLIC)  # resolved when connecting
    check_url("http://cdn.example/a.png", allow_http=True, rule=PUBLIC)
    for url in ("http://cdn.example/a.png", "ftp://cdn.example/a.png", "file:///etc/passwd"):
        with pytest.raises(InvalidRequestError) as info:
            check_url(url, allow_http=False, rule=PUBLIC)
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
    for rule in (PUBLIC, LOOPBACK):
        for url in (f"https://{host}/a.png", f"http://{host}/a.png"):
            with pytest.raises(InvalidRequestError, match="refusing to download"):
                check_url(url, allow_http=True, rule=rule)
    check_url(f"https://{host}/a.png", allow_http=False, rule=AddressRule.everything())


def test_public_addresses_are_allowed_and_loopback_only_for_a_loopback_gateway() -> None:
    for address in ("8.8.8.8", "2606:4700::1111"):
        assert PUBLIC.allows(address) and LOOPBACK.allows(address)
    for address in ("127.0.0.1", "::1", "127.3.4.5", "::ffff:127.0.0.1"):
        assert LOOPBACK.allows(address) and not PUBLIC.allows(address)
    assert not PUBLIC.allows("not an address") and not LOOPBACK.allows("localhost")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def test_saves_checks_and_cleans_up(tmp_path: Path) -> None:
    with umask(0o022):
        async with file_server() as origin, local_downloader(max_bytes=1024 * 1024) as saver:
            saved = await saver.save(at(f"{origin}/files/png"), tmp_path / "ABC123-0.{ext}")
            assert saved.path == tmp_path / "ABC123-0.png" and png_size(saved.path.read_bytes())
            assert saved.index == 0 and saved.bytes == len(saved.path.read_bytes())
            with pytest.raises(ProtocolError, match="not a PNG, JPEG or WEBP"):
                await saver.save(at(f"{origin}/files/html", 1), tmp_path / "ABC123-1.{ext}")
            with pytest.raises(ProtocolError, match="larger than"):
                await saver.save(at(f"{origin}/files/huge", 2), tmp_path / "ABC123-2.{ext}")
            with pytest.raises(ProtocolError, match="HTTP 404"):
                await saver.save(at(f"{origin}/files/missing", 3), tmp_path / "ABC123-3.{ext}")
    assert names(tmp_path) == ["ABC123-0.png"]  # no half files, no temporary files
    # Created with the user's umask, like the manifest (not 0600).
    assert oct(saved.path.stat().st_mode & 0o777) == "0o644"


async def test_an_image_servers_content_type_reaches_the_error_clean_and_short(
    tmp_path: Path,
) -> None:
    """A reply that is no image names its Content-Type, the image server's text: it went
    into the error as sent (markup, a bidi override, 8 KB of it), where every other server
    text goes through snippet()."""
    content_type = "text/html; <script>alert(1)</script>\u202e[bold red]x" + "y" * 8000

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>no image</html>", headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/page", handle)
    async with _serve(app) as origin, local_downloader() as saver:
        with pytest.raises(ProtocolError, match="not a PNG, JPEG or WEBP") as info:
            await saver.save(at(f"{origin}/page"), tmp_path / "K-0.{ext}")
    message = str(info.value)
    assert "<script>" not in message and "alert" not in message, message[:300]
    assert "\u202e" not in message and len(message) < 500, message[:300]
    assert "text/html;" in message  # still says what came


async def test_a_key_that_is_no_plain_name_is_saved_under_a_safe_one(tmp_path: Path) -> None:
    """The contract says nothing of a key's form, and a paid job is saved whatever its key:
    a key with a path, a newline, a '%' or CJK gets a safe name in the folder (its plain
    characters and a digest of the whole key), never a path out of it; a plain key is kept."""

    async def finished(key: str) -> ImageResult:
        return ImageResult(key, 4, (inline(base64.b64encode(PNG).decode()),))

    # The last but one: a plain key spelled as the old safe name of "../../etc/passwd" (its
    # plain characters, '-', a digest), which took that name over.
    evil = "______etc_passwd-" + hashlib.sha256(b"../../etc/passwd").hexdigest()[:16]
    keys = ("OKKEY\n", "../../etc/passwd", "a/b", "50%-off?#x", "画像" * 60, evil, "PLAIN-key_1")
    async with local_downloader() as saver:
        saved = [
            (await saver.save_job(finished(key), tmp_path, "{key}-{index}.{ext}"))[0]
            for key in keys
        ]
    assert all(item.path.parent == tmp_path for item in saved)
    assert len({item.path.name for item in saved}) == len(keys)  # two keys never share one
    assert saved[-1].path.name == "PLAIN-key_1-0.png"
    assert saved[1].path.name.startswith("______etc_passwd~")
    assert saved[-2].path.name == f"{evil}-0.png"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(s.path.name for s in saved)


# --- a loopback server that redirects, fails, cuts bodies short and counts ----------------------
JPEG = b"\xff\xd8\xff\xe0" + bytes(100) + b"\xff\xd9"
WEBP = b"RIFF" + (20).to_bytes(4, "little") + b"WEBPVP8 " + bytes(12)
# A PNG that compresses well: 4 KiB of blank text in a chunk before its IEND.
ROOMY_PNG = PNG[:-12] + png_chunk(b"tEXt", b"Comment\x00" + b" " * 4096) + PNG[-12:]
# A JPEG whose EXIF segment holds a thumbnail, itself a JPEG ending with FF D9, a few hundred
# bytes before the image's own end marker.
THUMBNAIL = b"\xff\xd8\xff\xdb" + bytes(64) + b"\xff\xd9"
EXIF = b"Exif\x00\x00" + THUMBNAIL
EXIF_JPEG = (
    b"\xff\xd8\xff\xe1" + (len(EXIF) + 2).to_bytes(2, "big") + EXIF + b"\xff\xda" + bytes(300)
)
EXIF_JPEG += b"\xff\xd9"
# Each format whole, and how many bytes from its end to leave out: its end marker (a PNG's
# IEND chunk, a JPEG's end-of-image marker, the last bytes a WebP's RIFF length counts).
CUT_IMAGES = {
    "cut-png": (PNG, 12),
    "cut-jpg": (JPEG, 2),
    "cut-webp": (WEBP, 3),
    "cut-exif-jpg": (EXIF_JPEG, 100),  # cut in its scan data, the thumbnail's end kept
}
# What a cut image of each kind is said to lack.
MISSING_END = {
    "png": "the PNG does not reach its end marker (an IEND chunk)",
    "jpg": "the JPEG does not end with its end marker (FF D9)",
    "webp": f"the WebP's RIFF header declares {len(WEBP)} bytes, not {len(WEBP) - 3}",
}


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
        if kind == "always-cut":  # a Content-Length longer than the body ever sent
            response = web.StreamResponse(headers={"Content-Length": str(len(PNG) * 4)})
            await response.prepare(request)
            await response.write(PNG[:20])
            request.transport.close()  # type: ignore[union-attr]
            return response
        if kind in CUT_IMAGES or (kind.endswith("-once") and kind[:-5] in CUT_IMAGES):
            # An image without its end, sent with a Content-Length that matches what is sent
            # (a server that declares a short length and sends the rest after it looks the
            # same to the client: it reads no further than the length).
            whole, cut = CUT_IMAGES[kind.removesuffix("-once")]
            body = whole if kind.endswith("-once") and hits[kind] > 1 else whole[:-cut]
            return web.Response(body=body, content_type="application/octet-stream")
        if kind == "slow":
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            await asyncio.sleep(0.05)
            in_flight[0] -= 1
        if kind == "always-5xx":
            return web.Response(status=502, text="bad gateway")
        if kind in ("gzip", "gzip-cut"):  # Content-Length counts the compressed bytes
            packed = gzip.compress(ROOMY_PNG)  # compresses well: decodes to more
            if kind == "gzip-cut" and hits[kind] == 1:  # a stream cut short, its length right
                packed = packed[: len(packed) // 2]
            headers = {"Content-Encoding": "gzip", "Content-Type": "image/png"}
            return web.Response(body=packed, headers=headers)
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
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        for target in (
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "http://[fe80::1]/x.png",
            "https://10.1.2.3/x.png",
            "http://cdn.example/x.png",  # plain http to a non-loopback host
            "file:///etc/passwd",
        ):
            with pytest.raises(InvalidRequestError, match="refusing to download"):
                await asyncio.wait_for(
                    saver.save(at(f"{origin}/to?url={target}"), tmp_path / "K1-0.{ext}"), 5
                )
        assert hits["to"] == 5  # one request each, then refused: no retry, no second hop
        # An allowed hop is followed; the number of hops is bounded.
        saved = await saver.save(at(f"{origin}/to?url={origin}/png", 1), tmp_path / "K1-1.{ext}")
        assert png_size(saved.path.read_bytes())
        with pytest.raises(ProtocolError, match="redirected more than 5 times"):
            await saver.save(at(f"{origin}/loop", 2), tmp_path / "K1-2.{ext}")
        assert hits["loop"] == 6
    assert names(tmp_path) == ["K1-1.png"]


@pytest.mark.parametrize("host", ["127.1", "0", "2130706433", "0x7f.0.0.1"])
async def test_a_url_aiohttp_will_not_fetch_is_refused_at_once(
    tmp_path: Path, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``http://127.1`` (``0``, ``2130706433``, ``0x7f.0.0.1``): an IPv4 address in shorthand,
    which aiohttp refuses (InvalidUrlClientError) and older releases connect to. It was retried
    as if transient, every try alike, and ended as "the connection failed" (or "too slow"). The
    address check refuses it at once, first URL or redirect, naming the host and the problem,
    never the URL's path (a CDN's token)."""
    caplog.set_level(logging.DEBUG, logger="wujie_async.download")
    async with tricky_server() as (origin, hits), local_downloader(allow_http=True) as saver:
        port = origin.rsplit(":", 1)[1]
        url = f"http://{host}:{port}/signed-TOKEN42/a.png"  # the test server's port
        for index, listed in enumerate((url, f"{origin}/to?url={url}")):  # first URL, redirect
            with pytest.raises(InvalidRequestError) as info:
                await asyncio.wait_for(
                    saver.save(at(listed, index), tmp_path / "K-{index}.png"), 10
                )
            assert info.value.field == "url" and "TOKEN42" not in str(info.value)
            assert f"refusing to download from {host}: " in info.value.rule, info.value.rule
            assert "canonical IPv4 address" in info.value.rule and "not retried" in info.value.rule
    assert hits["to"] == 1  # the redirect was asked once: no second try
    assert "try 2" not in caplog.text
    assert names(tmp_path) == []


async def test_a_name_resolving_to_a_local_address_is_refused_at_connect(tmp_path: Path) -> None:
    """The resolver checks every address a name gives, as it connects: ``localhost`` (and this
    machine's own name, which resolves to loopback or a private address) is refused for a
    gateway on a public address, and nothing is fetched."""
    async with file_server() as origin:
        port = origin.rsplit(":", 1)[1]
        hosts = ["localhost", socket.gethostname()]
        plain_http = DownloadPolicy(allow_http=True)  # the address is what is refused
        async with Downloader(plain_http, retry=INSTANT, addresses=PUBLIC) as saver:
            for host in hosts:
                with pytest.raises(InvalidRequestError, match="refusing to download") as info:
                    await saver.save(at(f"http://{host}:{port}/files/png"), tmp_path / "x.{ext}")
                assert "allow_private_addresses=True" in info.value.rule
        # The same name is fetched for a gateway on loopback: the refusal was the rule's.
        async with local_downloader() as saver:
            await saver.save(at(f"http://localhost:{port}/files/png"), tmp_path / "x.{ext}")
    assert names(tmp_path) == ["x.png"]


async def test_transient_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        await saver.save(at(f"{origin}/flaky-5xx"), tmp_path / "K5-0.{ext}")
        assert hits["flaky-5xx"] == 3
        saved = await saver.save(at(f"{origin}/flaky-cut", 1), tmp_path / "K5-1.{ext}")
        assert hits["flaky-cut"] == 2 and saved.bytes == len(PNG)  # truncated once
        with pytest.raises(ProtocolError, match="HTTP 502"):
            await saver.save(at(f"{origin}/always-5xx", 2), tmp_path / "K5-2.{ext}")
        assert hits["always-5xx"] == INSTANT.max_attempts
        with pytest.raises(ProtocolError, match="HTTP 404"):  # a 4xx is not retried
            await saver.save(at(f"{origin}/files/nothing", 3), tmp_path / "K5-3.{ext}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with local_downloader() as saver:
        with pytest.raises(TransportError, match="could not connect") as info:
            await saver.save(at(f"http://127.0.0.1:{closed_port}/x.png"), tmp_path / "x.{ext}")
        assert info.value.reached_server is False
        # No aiohttp exception (it holds the request and its URL) rides along in the chain.
        seen: list[BaseException] = []
        error: BaseException | None = info.value
        while error is not None and len(seen) < 10:
            seen.append(error)
            error = error.__cause__ or error.__context__
        assert not [e for e in seen if type(e).__module__.startswith("aiohttp")], seen
    assert names(tmp_path) == ["K5-0.png", "K5-1.png"]


async def test_a_compressed_image_is_saved_whole(tmp_path: Path) -> None:
    """A server may send an image gzip-encoded: its Content-Length is the compressed size,
    so the decoded body is longer than declared and is not "cut short"."""
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        saved = await saver.save(at(f"{origin}/gzip"), tmp_path / "GZ-0.{ext}")
    body = ROOMY_PNG
    assert hits["gzip"] == 1  # no retry either
    assert saved.path.read_bytes() == body and saved.bytes == len(body)
    assert saved.sha256 == hashlib.sha256(body).hexdigest()


async def test_a_compressed_image_cut_short_is_fetched_again(tmp_path: Path) -> None:
    """A gzip stream cut short decodes without an error, and its Content-Length (of the
    compressed bytes) says nothing of the image: the image must reach its own end marker."""
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        saved = await saver.save(at(f"{origin}/gzip-cut"), tmp_path / "GZ-0.{ext}")
    body = ROOMY_PNG
    assert hits["gzip-cut"] == 2
    assert saved.path.read_bytes() == body and saved.sha256 == hashlib.sha256(body).hexdigest()


def end_of(kind: str, data: bytes) -> str | None:
    return end_problem(kind, data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data))


def test_an_image_must_reach_its_own_end_marker() -> None:
    """Not merely hold an end marker near its end: a JPEG cut after its EXIF thumbnail (whose
    own FF D9 sat in the last bytes looked at) passed as whole. Padding after an image's end
    is still accepted: refusing it would refuse a whole, paid image."""
    for kind, whole in (("png", PNG), ("jpg", JPEG), ("jpg", EXIF_JPEG), ("webp", WEBP)):
        assert end_of(kind, whole) is None, kind
        assert end_of(kind, whole[: len(whole) - 3]) is not None, kind
        assert end_of(kind, whole + bytes(4)) is None, kind  # padding after the end
    assert end_of("png", PNG + b"metadata after IEND") is None
    assert end_of("jpg", EXIF_JPEG[:-100]) == MISSING_END["jpg"]
    assert end_of("jpg", JPEG + b"\xff\xff") is None
    assert end_of("jpg", JPEG + b"scan data") == MISSING_END["jpg"]
    assert end_of("webp", WEBP[:-4]) == (
        f"the WebP's RIFF header declares {len(WEBP)} bytes, not {len(WEBP) - 4}"
    )


def test_an_image_cut_right_after_an_end_marker_inside_it_is_cut() -> None:
    # Cut exactly at the end of an EXIF thumbnail (its FF D9 the last bytes), or inside a PNG
    # chunk followed by an IEND: the end looked right, and the file was saved as whole. Its
    # first segments (JPEG) and chunks (PNG) must fit in the file.
    exif_cut = b"\xff\xd8\xff\xe1" + (2000).to_bytes(2, "big") + EXIF
    assert exif_cut.endswith(b"\xff\xd9")
    assert end_of("jpg", exif_cut) == (
        "the JPEG is cut short: a segment declares 2000 bytes not there"
    )
    fake_iend = PNG[:33] + (5000).to_bytes(4, "big") + b"IDAT" + bytes(50) + PNG[-12:]
    assert end_of("png", fake_iend) == (
        "the PNG is cut short: its IDAT chunk declares 5000 bytes not there"
    )
    for kind, whole in (("png", PNG), ("png", ROOMY_PNG), ("jpg", JPEG), ("jpg", EXIF_JPEG)):
        assert end_of(kind, whole) is None, kind


def self_signed_context(folder: Path) -> ssl.SSLContext:
    """A server TLS context for 127.0.0.1 whose certificate no CA vouches for."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def test_an_unverifiable_certificate_is_not_retried(tmp_path: Path) -> None:
    """TLS verification is on, and its failure is final: not retried until the deadline and
    then reported as "too slow"."""
    hits: Counter[str] = Counter()

    async def image(request: web.Request) -> web.Response:
        hits["image"] += 1  # never reached: the handshake fails first
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/a.png", image)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = self_signed_context(tmp_path)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with local_downloader(deadline=5) as saver:
            with pytest.raises(TransportError, match="certificate could not be verified") as info:
                await saver.save(at(f"https://127.0.0.1:{port}/a.png"), tmp_path / "K.{ext}")
    finally:
        await runner.cleanup()
    assert "too slow" not in str(info.value) and hits["image"] == 0
    assert not list(tmp_path.glob("K.*"))


async def test_concurrency_is_bounded(tmp_path: Path) -> None:
    async with tricky_server() as (origin, hits):
        async with local_downloader(concurrency=2) as saver:
            await asyncio.gather(
                *(
                    saver.save(at(f"{origin}/slow", i), tmp_path / f"K-{i}.{{ext}}")
                    for i in range(8)
                )
            )
    assert 1 <= hits["most-in-flight"] <= 2
    assert len(list(tmp_path.iterdir())) == 8


async def test_b64_images_are_saved_like_url_images(tmp_path: Path) -> None:
    with umask(0o022):
        async with local_downloader(max_bytes=4096) as saver:
            encoded = base64.b64encode(PNG).decode()
            saved = await saver.save(inline(encoded), tmp_path / "KB-0.{ext}")
            data_url = "data:image/png;base64," + encoded
            again = await saver.save(inline(data_url, 1), tmp_path / "KB-1.{ext}")
            with pytest.raises(ProtocolError, match="not a PNG"):
                html = base64.b64encode(b"<html>").decode()
                await saver.save(inline(html, 3), tmp_path / "KB-3.{ext}")
            with pytest.raises(ProtocolError, match="larger than"):
                big = base64.b64encode(PNG + b"\0" * 8192).decode()
                await saver.save(inline(big, 4), tmp_path / "KB-4.{ext}")
            with pytest.raises(ProtocolError, match="not valid base64"):
                await saver.save(inline("not base64!", 5), tmp_path / "KB-5.{ext}")
            with pytest.raises(ProtocolError, match="neither a URL nor b64_json"):
                await saver.save(GeneratedImage(6, None), tmp_path / "KB-6.{ext}")
    assert saved.path.read_bytes() == PNG and saved.path.name == "KB-0.png"
    assert again.sha256 == saved.sha256 == hashlib.sha256(PNG).hexdigest()
    assert saved.bytes == len(PNG) and again.index == 1
    assert names(tmp_path) == ["KB-0.png", "KB-1.png"]
    assert oct(again.path.stat().st_mode & 0o777) == "0o644"


async def test_the_name_template_is_checked_and_sanitised(tmp_path: Path) -> None:
    name = render_name(
        "{id}-{index}.{ext}", key="K", index=0, ext="png", id="../../etc/pass\nwd\x1b[2J", line=3
    )
    assert "/" not in name and "\n" not in name and "\x1b" not in name
    assert not name.startswith(".") and name.endswith("-0.png")
    # A leading dash would be an option to a shell command given a glob (rm *): a key or an id
    # starting with one never starts a name, and the key still gets a name of its own.
    dashed = render_name("{key}-{index}.{ext}", key="-rf", index=0, ext="png", id=None, line=1)
    plain = render_name("{key}-{index}.{ext}", key="_rf", index=0, ext="png", id=None, line=1)
    assert not dashed.startswith("-") and dashed != plain == "_rf-0.png"
    assert render_name("{id}.{ext}", key="K", index=0, ext="png", id="--all", line=1) == "_-all.png"
    check_template("{line:04d}-{key}-{index:3}.{ext}")  # a width pads a number: allowed
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
        "{id}-{key}-{index}.{ext}",  # the command line's row fields: a job has none
        "{line}-{key}.{ext}",
        "{key:.4}-{index}.{ext}",  # cut short, two jobs' keys could give one name
        "{key:>40}-{index}.{ext}",
        "{key}-{index:x}.{ext}",
        "{key}-{index}.{ext:.1}",
    ):
        with pytest.raises(InvalidRequestError) as info:
            check_job_template(template)
        assert info.value.field == "name"


async def test_the_downloader_owns_its_session(tmp_path: Path) -> None:
    saver = local_downloader()
    async with file_server() as origin:
        async with saver:
            await saver.save(at(f"{origin}/files/png"), tmp_path / "K-0.{ext}")
        await saver.aclose()  # idempotent
        with pytest.raises(ClientStateError, match="closed"):
            await saver.save(at(f"{origin}/files/png"), tmp_path / "K-1.{ext}")
    assert names(tmp_path) == ["K-0.png"]


@pytest.mark.parametrize("kind", ["png", "jpg", "webp"])
async def test_an_image_without_its_end_is_never_saved_whatever_its_length_says(
    tmp_path: Path, kind: str
) -> None:
    """A Content-Length that matches the bytes sent says nothing of whether they are the
    whole image (a server may declare a short length and send the rest after it): the end
    marker is checked on every image, not only when no length can tell. Before, the cut image
    was saved, with the sha256 of the cut bytes."""
    whole, cut = CUT_IMAGES[f"cut-{kind}"]
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        saved = await saver.save(at(f"{origin}/cut-{kind}-once"), tmp_path / "once.{ext}")
        assert hits[f"cut-{kind}-once"] == 2  # the cut body was fetched again
        assert saved.path.read_bytes() == whole
        assert saved.sha256 == hashlib.sha256(whole).hexdigest()
        with pytest.raises(TransportError) as info:
            await saver.save(at(f"{origin}/cut-{kind}"), tmp_path / "always.{ext}")
    assert str(info.value) == (
        f"image 0: image download was cut short: {MISSING_END[kind]}, after the {len(whole) - cut} "
        "bytes its Content-Length declared (the server declared a length short of the image, "
        "or sent only part of it)"
    )
    assert hits[f"cut-{kind}"] == INSTANT.max_attempts  # retried like a body short of its length
    assert names(tmp_path) == [f"once.{kind}"]


async def test_a_jpeg_cut_after_its_exif_thumbnail_is_fetched_again(tmp_path: Path) -> None:
    """The thumbnail's FF D9 sat among the last bytes of the cut JPEG, which was saved as
    whole; it must end with its own."""
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        saved = await saver.save(at(f"{origin}/cut-exif-jpg-once"), tmp_path / "x.{ext}")
    assert hits["cut-exif-jpg-once"] == 2
    assert saved.path.read_bytes() == EXIF_JPEG
    assert saved.sha256 == hashlib.sha256(EXIF_JPEG).hexdigest()


async def test_an_inline_image_without_its_end_is_not_saved(tmp_path: Path) -> None:
    cut = base64.b64encode(PNG[:-12]).decode()
    async with local_downloader() as saver:
        with pytest.raises(ProtocolError) as info:
            await saver.save(inline(cut), tmp_path / "x.{ext}")
    assert str(info.value) == (
        "image 0: b64_json image is cut short: the PNG does not reach its end marker (an IEND "
        f"chunk), after {len(PNG) - 12} bytes (the gateway listed only part of the image)"
    )
    assert names(tmp_path) == []


def aiohttp_errors_in(error: BaseException) -> list[BaseException]:
    """aiohttp's exceptions among ``error``'s causes and contexts (they quote the URL)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return [e for e in seen if type(e).__module__.startswith("aiohttp")]


async def test_a_body_shorter_than_its_length_says_why_it_failed(tmp_path: Path) -> None:
    async with tricky_server() as (origin, hits), local_downloader() as saver:
        with pytest.raises(TransportError) as info:
            await saver.save(at(f"{origin}/always-cut"), tmp_path / "x.{ext}")
    assert hits["always-cut"] == INSTANT.max_attempts
    assert str(info.value) == (
        "image 0: image download was cut short: the server closed the connection before "
        f"sending the {len(PNG) * 4} bytes its Content-Length declared (a Content-Length "
        "longer than the image, or a server that stopped part-way)"
    )
    assert info.value.reached_server and not aiohttp_errors_in(info.value)
    assert names(tmp_path) == []


@asynccontextmanager
async def wrong_length_server(wrong_by: int) -> AsyncIterator[tuple[str, Counter[str]]]:
    """An image server that sends the whole PNG in one write under a Content-Length
    ``wrong_by`` bytes off it, then closes the connection."""
    hits: Counter[str] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        hits["image"] += 1
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(PNG) + wrong_by}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + PNG)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", hits
    finally:
        server.close()
        await server.wait_closed()


async def test_the_rest_of_a_short_length_body_is_not_read_as_the_next_reply(
    tmp_path: Path,
) -> None:
    """A kept-alive server declares a length 12 bytes short of the PNG (its IEND chunk) and
    sends those 12 bytes only when the next request comes on the same connection, before that
    request's reply. The failed try's connection is closed, so the retry asks on a fresh one
    and gets the image. (With aiohttp 3.14 the connection was not reused before either; the
    downloader now closes it itself rather than rely on that.)"""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        leftover = b""
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                first = len(connections) == 1 and not leftover  # the first request of all
                body = PNG[:-12] if first else PNG
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                writer.write(leftover + head.encode() + body)
                await writer.drain()
                leftover = PNG[-12:] if first else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with local_downloader() as saver:
            saved = await saver.save(at(f"{origin}/a.png"), tmp_path / "x.{ext}")
    finally:
        server.close()
        await server.wait_closed()
    assert saved.path.read_bytes() == PNG
    assert len(connections) == 2  # the retry came on a new connection


@pytest.mark.parametrize("wrong_by", [-20, 20])
async def test_a_wrong_content_length_says_so(tmp_path: Path, wrong_by: int) -> None:
    """Before, these read only "image download failed: ClientResponseError" (a length 20
    bytes short of the body) and "... ClientPayloadError" (20 bytes past it)."""
    async with wrong_length_server(wrong_by) as (origin, hits), local_downloader() as saver:
        with pytest.raises(TransportError) as info:
            await saver.save(at(f"{origin}/a.png"), tmp_path / "x.{ext}")
    declared = len(PNG) + wrong_by
    if wrong_by > 0:
        said = {
            "image download was cut short: the server closed the connection before sending "
            f"the {declared} bytes its Content-Length declared (a Content-Length longer than "
            "the image, or a server that stopped part-way)"
        }
    else:
        said = {
            # aiohttp's C parser refuses the bytes past the length ...
            "image download failed: the image server sent more bytes than its Content-Length "
            "declared (a Content-Length that does not match the body) (ClientResponseError)",
            # ... its Python one stops reading at the length: the PNG has no end.
            f"image download was cut short: {MISSING_END['png']}, after the {declared} bytes "
            "its Content-Length declared (the server declared a length short of the image, or "
            "sent only part of it)",
        }
    assert str(info.value).removeprefix("image 0: ") in said  # a save names its image
    assert hits["image"] == INSTANT.max_attempts  # retried, as any body cut short
    assert info.value.reached_server and not aiohttp_errors_in(info.value)
    assert names(tmp_path) == []


async def test_the_deadline_ends_retries_and_names_the_last_failure(tmp_path: Path) -> None:
    patient = RetryPolicy(initial_wait=0.05, max_wait=0.05, max_attempts=1000, max_elapsed=60)
    policy = DownloadPolicy(deadline=0.3)
    async with (
        tricky_server() as (origin, hits),
        Downloader(policy, retry=patient, addresses=LOOPBACK) as saver,
    ):
        with pytest.raises(TransportError, match=r"not saved within 0\.3 s") as info:
            await saver.save(at(f"{origin}/always-5xx"), tmp_path / "x.{ext}")
        assert "the last try: image download refused | HTTP 502" in str(info.value)
        assert str(info.value).count("HTTP 502") == 1
        assert 2 <= hits["always-5xx"] < 1000
    assert names(tmp_path) == []
