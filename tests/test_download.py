"""Saving images: checked, bounded, never half-written, never named from untrusted text."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from wujie_async import InvalidRequestError, ProtocolError
from wujie_async._download import Downloader, check_url

from .helpers import png_size
from .hostile import file_server

pytestmark = pytest.mark.anyio


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


async def test_saves_checks_and_cleans_up(tmp_path: Path) -> None:
    async with file_server() as origin, aiohttp.ClientSession() as http:
        saver = Downloader(http, tmp_path, max_bytes=1024 * 1024)
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
