"""Saving images to disk: bounded, streamed, checked, never half-written.

File names come from the job key and image index only (never from prompts or URLs), the bytes
must carry a PNG/JPEG/WEBP signature, and a file appears under its final name only once it is
complete (written to a temporary name in the same folder, then renamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from ._errors import InvalidRequestError, ProtocolError, TransportError

_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpg",
}
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True, slots=True)
class SavedImage:
    """One image on disk."""

    path: Path
    sha256: str
    bytes: int


def sniff_format(head: bytes) -> str | None:
    """``png``, ``jpg`` or ``webp`` from the first bytes of a file; None if neither."""
    for signature, name in _SIGNATURES.items():
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_http: bool) -> None:
    """Refuse URLs we will not fetch: not http(s), or plain http to a non-loopback host."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (
        parts.scheme == "http" and (allow_http or is_loopback(parts.hostname or ""))
    ):
        return
    raise InvalidRequestError(
        [
            (
                "url",
                f"refusing to download {parts.scheme}://{parts.hostname}: https only "
                "(plain http is allowed for loopback, or with allow_http)",
            )
        ]
    )


class Downloader:
    """Saves image URLs into ``folder`` with bounded concurrency."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        folder: Path,
        *,
        concurrency: int = 16,
        max_bytes: int = 64 * 1024 * 1024,
        allow_http: bool = False,
    ) -> None:
        self._session = session
        self._folder = folder
        self._slots = asyncio.Semaphore(concurrency)
        self._max_bytes = max_bytes
        self._allow_http = allow_http
        folder.mkdir(parents=True, exist_ok=True)

    async def save(self, url: str, key: str, index: int) -> SavedImage:
        """Download ``url`` as ``<key>-<index>.<ext>``.

        Raises:
            InvalidRequestError: the URL or key is not one we accept.
            ProtocolError: the reply is not an image, or too large.
            TransportError: the download failed.
        """
        check_url(url, allow_http=self._allow_http)
        if not _KEY_RE.match(key):
            raise InvalidRequestError(
                [("key", "not a plain job key; refusing to use it in a file name")]
            )
        async with self._slots:
            try:
                async with self._session.get(url) as reply:
                    if reply.status != 200:
                        raise ProtocolError(
                            f"image download got HTTP {reply.status}", http_status=reply.status
                        )
                    return await self._stream_to_file(reply, key, index)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise TransportError(
                    f"image download failed: {type(exc).__name__}", reached_server=True
                ) from None

    async def _stream_to_file(
        self, reply: aiohttp.ClientResponse, key: str, index: int
    ) -> SavedImage:
        digest = hashlib.sha256()
        size = 0
        head = b""
        fd, temp_name = tempfile.mkstemp(
            prefix=f".{key}-{index}.", suffix=".part", dir=self._folder
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in reply.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise ProtocolError(f"image is larger than {self._max_bytes} bytes")
                    if len(head) < 16:
                        head += chunk[: 16 - len(head)]
                    digest.update(chunk)
                    handle.write(chunk)
            kind = sniff_format(head)
            if kind is None:
                raise ProtocolError(
                    f"downloaded bytes are not a PNG, JPEG or WEBP image "
                    f"(Content-Type {reply.headers.get('Content-Type')!r})"
                )
            path = self._folder / f"{key}-{index}.{kind}"
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp_name)
            raise
        return SavedImage(path=path, sha256=digest.hexdigest(), bytes=size)
