"""Saving images to disk: bounded, streamed, checked, retried, never half-written.

The downloader owns its own HTTP session and timeouts (image downloads never take a connection
or a slot from the API's pool). Where it may connect is ``_addresses``'s rule, checked on every
hop; redirects are followed by hand, at most ``max_redirects`` of them, each one checked again.
File names come from ``_file_names``. The bytes must carry a PNG/JPEG/WEBP signature; a file
appears under its final name only once complete: written under a temporary name in the same
folder with the user's umask, fsynced, then renamed. Writes and fsyncs run on worker threads,
never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

import aiohttp
import anyio
import backoff
from yarl import URL

from ._addresses import CheckingResolver, ForbiddenAddressError, check_url, refused_address
from ._config import RetryPolicy
from ._errors import (
    ClientStateError,
    InvalidRequestError,
    ProtocolError,
    TransportError,
    WujieError,
)
from ._file_names import DEFAULT_NAME, check_key, check_template, render_name
from ._telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger("wujie_async.download")

_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpg",
}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 256 * 1024


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


class _RetryableError(Exception):
    """A transient download failure; ``error`` is raised if retries run out."""

    def __init__(self, error: WujieError) -> None:
        super().__init__(str(error))
        self.error = error


def _join(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location))
    except ValueError:
        raise InvalidRequestError([("url", "a redirect gave an invalid URL")]) from None


class Downloader:
    """Saves images into ``folder`` with bounded concurrency, on a session of its own.

    Example::

        async with Downloader(Path("out"), name="{id}-{index}.{ext}") as downloader:
            saved = await downloader.save(url, job.key, 0, id="row-7")
            saved = await downloader.save_b64(image.b64_json, job.key, 1)

    Args:
        folder: where images go (created if missing).
        concurrency: downloads (and connections) at once.
        max_bytes: larger images are refused.
        allow_http: allow plain http to non-loopback hosts (off: https only).
        allow_private: allow link-local, private and reserved addresses (off).
        max_redirects: redirects followed per download, each checked; 0 follows none.
        retry: backoff for transient failures (connect errors, 5xx, 429, truncated bodies,
            timeouts); the same rules as API calls.
        connect_timeout: seconds to connect.
        read_timeout: seconds of silence allowed while reading.
        total_timeout: seconds per attempt, all included.
        name: the file-name template; fields ``{key}``, ``{index}``, ``{ext}``, ``{id}``,
            ``{line}`` (sanitised: no path separators, no control characters, no leading dot).
    """

    def __init__(
        self,
        folder: Path,
        *,
        concurrency: int = 16,
        max_bytes: int = 64 * 1024 * 1024,
        allow_http: bool = False,
        allow_private: bool = False,
        max_redirects: int = 5,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        total_timeout: float = 300.0,
        name: str = DEFAULT_NAME,
    ) -> None:
        check_template(name)
        if concurrency < 1 or max_bytes < 1 or max_redirects < 0:
            raise InvalidRequestError(
                [("Downloader", "concurrency and max_bytes must be >= 1, max_redirects >= 0")]
            )
        self._folder = folder
        self._concurrency = concurrency
        self._slots = anyio.Semaphore(concurrency)
        self._max_bytes = max_bytes
        self._allow_http = allow_http
        self._allow_private = allow_private
        self._max_redirects = max_redirects
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout, connect=connect_timeout, sock_read=read_timeout
        )
        self._template = name
        self._session: aiohttp.ClientSession | None = None
        self._telemetry = Telemetry()  # a span and metrics per image, once opened

    async def __aenter__(self) -> Self:
        self._telemetry.start()
        await anyio.to_thread.run_sync(lambda: self._folder.mkdir(parents=True, exist_ok=True))
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, resolver=CheckingResolver(allow_private=self._allow_private)
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, trust_env=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def save(
        self, url: str, key: str, index: int, *, id: str | None = None, line: int | None = None
    ) -> SavedImage:
        """Download ``url`` into the folder under the template's name.

        Raises:
            InvalidRequestError: the URL (or a redirect's target), key or name is refused.
            ProtocolError: the reply is not an image, too large, or not 200 (after retries
                for 5xx and 429), or redirects too often.
            TransportError: the download failed after its retries.
            ClientStateError: used outside ``async with``.
        """
        check_key(key)
        check_url(url, allow_http=self._allow_http, allow_private=self._allow_private)
        session = self._require_session()
        return await self._observed(
            key, index, URL(url).host, lambda: self._save_url(session, url, key, index, id, line)
        )

    async def _save_url(
        self,
        session: aiohttp.ClientSession,
        url: str,
        key: str,
        index: int,
        id: str | None,
        line: int | None,
    ) -> SavedImage:
        async with self._slots:
            return await self._retrying(lambda: self._download(session, url, key, index, id, line))

    async def save_bytes(
        self, data: bytes, key: str, index: int, *, id: str | None = None, line: int | None = None
    ) -> SavedImage:
        """Save image bytes (e.g. a decoded ``b64_json``) exactly as a download is saved.

        Raises:
            InvalidRequestError: the key or name is refused.
            ProtocolError: not a PNG/JPEG/WEBP image, or larger than ``max_bytes``.
        """
        check_key(key)
        if len(data) > self._max_bytes:
            raise ProtocolError(f"image is larger than {self._max_bytes} bytes")
        kind = sniff_format(data[:16])
        if kind is None:
            raise ProtocolError("image bytes are not a PNG, JPEG or WEBP image")
        path = self._folder / render_name(
            self._template, key=key, index=index, ext=kind, id=id, line=line
        )
        return await self._observed(key, index, None, lambda: self._write_bytes(data, path))

    async def _write_bytes(self, data: bytes, path: Path) -> SavedImage:
        async with self._slots:
            await anyio.to_thread.run_sync(self._write_whole, data, path)
        return SavedImage(path=path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    async def _observed(
        self, key: str, index: int, host: str | None, save: Callable[[], Awaitable[SavedImage]]
    ) -> SavedImage:
        """``save()``, with its span, metrics and DEBUG line when any of them is on (the one
        place downloads are observed: every way of saving an image comes through here)."""
        otel = self._telemetry.otel
        if otel is None and not logger.isEnabledFor(logging.DEBUG):
            return await save()
        span = otel.download_started(key, index, host) if otel is not None else None
        started = time.perf_counter()
        try:
            saved = await save()
        except BaseException as exc:
            self._saved(span, key, index, started, None, exc)
            raise
        self._saved(span, key, index, started, saved.bytes, None)
        return saved

    def _saved(
        self,
        span: Span | None,
        key: str,
        index: int,
        started: float,
        size: int | None,
        error: BaseException | None,
    ) -> None:
        seconds = time.perf_counter() - started
        logger.debug(
            "image %s #%d: %s in %.0f ms",
            key,
            index,
            f"{size} bytes saved" if error is None else f"not saved ({type(error).__name__})",
            seconds * 1e3,
        )
        if (otel := self._telemetry.otel) is not None:
            otel.download_ended(span, seconds=seconds, size=size, error=error)

    async def save_b64(
        self, text: str, key: str, index: int, *, id: str | None = None, line: int | None = None
    ) -> SavedImage:
        """Decode a ``b64_json`` image (size-capped before decoding) and save it.

        Raises:
            ProtocolError: not base64, larger than ``max_bytes``, or not an image.
            InvalidRequestError: the key or name is refused.
        """
        if text.startswith("data:"):
            text = text.partition(",")[2]
        if len(text) > (self._max_bytes + 2) // 3 * 4 + 4:
            raise ProtocolError(f"image is larger than {self._max_bytes} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("b64_json is not valid base64") from None
        return await self.save_bytes(data, key, index, id=id, line=line)

    # --- internals ------------------------------------------------------------------------------
    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ClientStateError("use the Downloader in `async with` (it owns a session)")
        return self._session

    async def _retrying(self, attempt: Callable[[], Awaitable[SavedImage]]) -> SavedImage:
        policy = self._retry

        def log_retry(details: Any) -> None:
            logger.debug(
                "image download: %s; try %d in %.2f s",
                details["exception"],
                details["tries"] + 1,
                details["wait"],
            )

        async def once() -> SavedImage:  # backoff wants a coroutine function to await
            return await attempt()

        retrying = backoff.on_exception(
            backoff.expo,
            _RetryableError,
            max_tries=policy.max_attempts,
            max_time=policy.max_elapsed,
            jitter=backoff.full_jitter,
            on_backoff=log_retry,
            logger=None,
            factor=policy.initial_wait,
            max_value=policy.max_wait,
        )(once)
        try:
            return await retrying()
        except _RetryableError as exc:
            raise exc.error from None

    async def _download(
        self,
        session: aiohttp.ClientSession,
        url: str,
        key: str,
        index: int,
        id: str | None,
        line: int | None,
    ) -> SavedImage:
        current = URL(url)
        for hop in range(self._max_redirects + 1):
            if hop:
                check_url(
                    str(current), allow_http=self._allow_http, allow_private=self._allow_private
                )
            # The error text never includes the URL: a CDN's URL may carry a signed token. The
            # error is raised after the except block: `from None` alone would still keep
            # aiohttp's exception (which holds the request and its URL) as __context__.
            failure: Exception
            try:
                async with session.get(current, allow_redirects=False) as reply:
                    if reply.status in _REDIRECT_STATUSES:
                        location = reply.headers.get("Location")
                        if not location:
                            raise ProtocolError(f"HTTP {reply.status} redirect without a Location")
                        current = _join(reply.url, location)
                        continue
                    if reply.status >= 500 or reply.status == 429:
                        raise _RetryableError(
                            ProtocolError(
                                f"image download got HTTP {reply.status}", http_status=reply.status
                            )
                        )
                    if reply.status != 200:
                        raise ProtocolError(
                            f"image download got HTTP {reply.status}", http_status=reply.status
                        )
                    return await self._stream_to_file(reply, key, index, id, line)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, ForbiddenAddressError):
                    failure = refused_address(exc.os_error.host, exc.os_error.address)
                else:
                    failure = _RetryableError(
                        TransportError(
                            f"image download could not connect: {exc.os_error.strerror or 'error'}",
                            reached_server=False,
                        )
                    )
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Reset, disconnected, truncated body (ClientPayloadError), read timeout.
                failure = _RetryableError(
                    TransportError(
                        f"image download failed: {type(exc).__name__}", reached_server=True
                    )
                )
            raise failure
        raise ProtocolError(f"image download redirected more than {self._max_redirects} times")

    async def _stream_to_file(
        self,
        reply: aiohttp.ClientResponse,
        key: str,
        index: int,
        id: str | None,
        line: int | None,
    ) -> SavedImage:
        declared = reply.content_length
        if declared is not None and declared > self._max_bytes:
            raise ProtocolError(f"image is larger than {self._max_bytes} bytes")
        digest = hashlib.sha256()
        size = 0
        head = b""
        handle, temp = await anyio.to_thread.run_sync(self._open_temp, f"{key}-{index}")
        try:
            async for chunk in reply.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > self._max_bytes:
                    raise ProtocolError(f"image is larger than {self._max_bytes} bytes")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                digest.update(chunk)
                await anyio.to_thread.run_sync(handle.write, chunk)
            if declared is not None and size != declared:
                raise _RetryableError(
                    TransportError("image download was cut short", reached_server=True)
                )
            kind = sniff_format(head)
            if kind is None:
                raise ProtocolError(
                    f"downloaded bytes are not a PNG, JPEG or WEBP image "
                    f"(Content-Type {reply.headers.get('Content-Type')!r})"
                )
            path = self._folder / render_name(
                self._template, key=key, index=index, ext=kind, id=id, line=line
            )
            await anyio.to_thread.run_sync(self._commit, handle, temp, path)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._discard, handle, temp)
            raise
        return SavedImage(path=path, sha256=digest.hexdigest(), bytes=size)

    # --- file operations (run on worker threads) -----------------------------------------------
    def _open_temp(self, stem: str) -> tuple[IO[bytes], Path]:
        # O_EXCL + O_NOFOLLOW: a new file, never through a link; mode 0o666 & ~umask, like the
        # manifest (mkstemp would force 0600).
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_CLOEXEC", 0)
        temp = self._folder / f".{stem}.{secrets.token_hex(6)}.part"
        fd = os.open(temp, flags, 0o666)
        return os.fdopen(fd, "wb"), temp

    def _commit(self, handle: IO[bytes], temp: Path, path: Path) -> None:
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temp, path)
        self._sync_folder()

    def _sync_folder(self) -> None:
        # The rename is durable once the folder's entry is on disk too.
        with contextlib.suppress(OSError):
            fd = os.open(self._folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _discard(handle: IO[bytes], temp: Path) -> None:
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)

    def _write_whole(self, data: bytes, path: Path) -> None:
        handle, temp = self._open_temp(path.stem)
        try:
            handle.write(data)
            self._commit(handle, temp, path)
        except BaseException:
            self._discard(handle, temp)
            raise
