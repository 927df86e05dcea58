"""One attempt at an image over HTTP: redirects followed by hand (each hop checked against the
address rule), the body streamed into a temporary file within the policy's rate and size, its
format and end checked, the file committed under its final name.

:class:`ImageFetch` makes the attempt; :class:`RetryableError` says a failure is transient, and
``_download.Downloader`` decides whether to try again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anyio
from yarl import URL

from ._addresses import AddressRule, ForbiddenAddressError, check_url
from ._config import DownloadPolicy
from ._disk_steps import DiskSteps
from ._errors import (
    ClientStateError,
    InvalidRequestError,
    ProtocolError,
    TransportError,
    WujieError,
    snippet,
)
from ._file_names import EXT_FIELD
from ._image_formats import HEAD_BYTES, TAIL_BYTES, end_problem, sniff_format
from ._results import SavedImage

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 256 * 1024  # bytes handed to a worker thread per write
# Tries of an image that answers 404: a URL listed a moment ago may not be on its CDN yet (an
# upload or a replication still under way), while one that expired stays gone, so a 404 gets
# a few tries, not the whole retry budget.
NOT_FOUND_TRIES = 3


class RetryableError(Exception):
    """A transient download failure; ``error`` is raised if retries run out, or once
    ``tries`` attempts have been made (when given: a failure that is only maybe transient)."""

    def __init__(self, error: WujieError, *, tries: int | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.tries = tries


class Target:
    """Where one image goes: a path whose name may hold ``{ext}``, and the names already
    taken by the other images of the same save call (none may be written twice)."""

    __slots__ = ("claimed", "folder", "index", "name")

    def __init__(self, path: Path, index: int, claimed: dict[str, int] | None) -> None:
        self.folder = path.parent
        self.name = path.name
        self.index = index
        self.claimed = claimed

    def final(self, ext: str) -> Path:
        """The final path for an image of format ``ext``, claimed for this image.

        Raises:
            InvalidRequestError: another image of the same save call has that name.
        """
        name = self.name.replace(EXT_FIELD, ext)
        if self.claimed is not None:
            other = self.claimed.setdefault(name.casefold(), self.index)
            if other != self.index:
                raise InvalidRequestError(
                    [("name", f"images {other} and {self.index} would both be saved as {name!r}")]
                )
        return self.folder / name


def _join(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location))
    except ValueError:
        raise InvalidRequestError([("url", "a redirect gave an invalid URL")]) from None


def too_slow(what: str) -> TransportError:
    return TransportError(f"the image server was too slow: {what}", reached_server=True)


class ImageFetch:
    """One attempt at fetching an image into its file, by the download policy and the address
    rule (``fetch``)."""

    def __init__(
        self, policy: DownloadPolicy, rule: AddressRule, require_open: Callable[[], None]
    ) -> None:
        self._policy = policy
        self._rule = rule
        self._require_open = require_open  # raises ClientStateError once downloads closed

    async def fetch(
        self, session: aiohttp.ClientSession, url: str, target: Target, give_up_at: float
    ) -> SavedImage:
        """One attempt: follow redirects by hand (each hop checked), stream the image."""
        policy = self._policy
        current = URL(url)
        for hop in range(policy.max_redirects + 1):
            if hop:
                check_url(str(current), allow_http=policy.allow_http, rule=self._rule)
            if session.closed:  # aclose() ran meanwhile: aiohttp would raise a RuntimeError
                self._require_open()
                raise ClientStateError("the download session was closed")
            # The error text never includes the URL: a CDN's URL may carry a signed token. The
            # error is raised after the except block: `from None` alone would still keep
            # aiohttp's exception (which holds the request and its URL) as __context__.
            failure: Exception
            try:
                reply = await self._reply(session, current)
                async with reply:
                    if reply.status in _REDIRECT_STATUSES:
                        location = reply.headers.get("Location")
                        if not location:
                            raise ProtocolError(f"HTTP {reply.status} redirect without a Location")
                        current = _join(reply.url, location)
                        continue
                    if reply.status >= 500 or reply.status == 429:
                        raise RetryableError(
                            ProtocolError("image download refused", http_status=reply.status)
                        )
                    if reply.status == 404:  # not on the CDN yet, or expired: a few tries
                        raise RetryableError(
                            ProtocolError("image download refused", http_status=404),
                            tries=NOT_FOUND_TRIES,
                        )
                    if reply.status != 200:
                        raise ProtocolError("image download refused", http_status=reply.status)
                    steps = DiskSteps(give_up_at, policy.deadline)
                    return await self._stream_to_file(reply, target, steps)
            except aiohttp.ClientConnectorCertificateError:
                # Not transient: trying again until the deadline would only hide it behind
                # "too slow".
                failure = TransportError(
                    "image download refused: the image server's TLS certificate could not be "
                    "verified (not retried; check the image host, or this machine's CA "
                    "certificates)",
                    reached_server=True,
                )
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, ForbiddenAddressError):
                    failure = self._rule.refusal(exc.os_error.host, exc.os_error.address)
                else:
                    failure = RetryableError(
                        TransportError(
                            f"image download could not connect: {exc.os_error.strerror or 'error'}",
                            reached_server=False,
                        )
                    )
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Reset, disconnected, truncated body (ClientPayloadError), read timeout.
                failure = RetryableError(
                    TransportError(
                        f"image download failed: {self._why(exc)} ({type(exc).__name__})",
                        reached_server=True,
                    )
                )
            raise failure
        raise ProtocolError(f"image download redirected more than {policy.max_redirects} times")

    def _why(self, exc: TimeoutError | aiohttp.ClientError) -> str:
        """What went wrong, in words a user can act on: never aiohttp's own text, which
        quotes the URL (a CDN's URL may carry a signed token) and the server's bytes."""
        if isinstance(exc, aiohttp.ClientPayloadError):
            return (
                "the connection ended before the whole body arrived (fewer bytes than its "
                "Content-Length, or a broken chunked or compressed body)"
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return "the image server closed the connection before it replied"
        if isinstance(exc, aiohttp.ClientResponseError):
            # aiohttp's text is read only to choose these words, never shown: its HTTP parser
            # says "Data after `Connection: close`" when bytes follow a body whose length
            # was declared, which is a Content-Length short of the body.
            if str(exc.message).startswith("Data after"):
                return (
                    "the image server sent more bytes than its Content-Length declared (a "
                    "Content-Length that does not match the body)"
                )
            return (
                "the image server's reply could not be read as HTTP (more bytes than its "
                "Content-Length declared, or a malformed status line or header)"
            )
        if isinstance(exc, TimeoutError):
            return f"no data within {self._policy.read_timeout:g} s (DownloadPolicy.read_timeout)"
        if isinstance(exc, aiohttp.ClientOSError) and exc.strerror:
            return f"the connection failed ({exc.strerror})"
        return "the connection failed"

    async def _reply(self, session: aiohttp.ClientSession, url: URL) -> aiohttp.ClientResponse:
        """The reply's status line and headers, within ``read_timeout`` (a server that sends
        its headers a byte at a time never trips a socket's read timeout)."""
        wait = self._policy.read_timeout
        with anyio.move_on_after(wait):
            return await session.get(url, allow_redirects=False)
        raise RetryableError(too_slow(f"no reply within {wait:g} s"))

    async def _stream_to_file(
        self, reply: aiohttp.ClientResponse, target: Target, steps: DiskSteps
    ) -> SavedImage:
        policy = self._policy
        declared = reply.content_length
        if declared is not None and declared > policy.max_bytes:
            raise ProtocolError(f"image is larger than {policy.max_bytes} bytes")
        # The file steps on worker threads run to their end even when the task is cancelled
        # meanwhile (DiskSteps), so a cancel never leaves a temporary file nobody knows of:
        # each image is either complete under its final name or not there at all. Past the
        # save's deadline a step that has not returned is given up on (its thread cleans up).
        try:
            await steps.open(target.folder, f"wujie-{target.index}")
            size, digest, head, tail = await self._stream(reply, steps)
            # Content-Length counts the bytes on the wire: a compressed body decodes to more.
            encoded = _encoded(reply)
            if declared is not None and not encoded and size != declared:
                raise RetryableError(
                    TransportError(
                        f"image download was cut short: {size} of the {declared} bytes its "
                        "Content-Length declared",
                        reached_server=True,
                    )
                )
            kind = sniff_format(head)
            if kind is None:
                raise ProtocolError(
                    f"downloaded bytes are not a PNG, JPEG or WEBP image "
                    f"(Content-Type {_content_type(reply)})"
                )
            # Every image must reach its own end, whatever its length says: a compressed
            # stream cut short decodes without an error, a body may end with the connection,
            # and a Content-Length may itself be short (the server sends the rest after it,
            # which aiohttp never reads). Cut short like a body short of its length: retried.
            problem = end_problem(kind, head, tail, size)
            if problem is not None:
                came = _what_came(size, None if encoded else declared)
                raise RetryableError(
                    TransportError(
                        f"image download was cut short: {problem}, {came}", reached_server=True
                    )
                )
            path = target.final(kind)
            await steps.commit(path)
        except BaseException as exc:
            # The connection is not reused: a server that declared a length short of its body
            # may still send the rest, which the next request on it would read as its reply.
            reply.close()
            await steps.discard()
            if isinstance(exc, OSError):
                name_the_file(exc, steps.temp or target.folder)
            raise
        return SavedImage(target.index, path, size, digest)

    async def _stream(
        self, reply: aiohttp.ClientResponse, steps: DiskSteps
    ) -> tuple[int, str, bytes, bytes]:
        """Copy the body into the temporary file: (size, sha256, first bytes, last bytes). Every
        ``min_rate * rate_window`` bytes must arrive within ``rate_window`` seconds."""
        policy = self._policy
        window = policy.rate_window
        quantum = None if policy.min_rate is None else policy.min_rate * window
        digest = hashlib.sha256()
        size = 0
        head = tail = b""
        pending = bytearray()
        window_ends = anyio.current_time() + window if quantum is not None else math.inf
        window_bytes = 0
        while True:
            with anyio.CancelScope(deadline=window_ends) as scope:
                try:
                    chunk: bytes | None = await reply.content.read(_CHUNK)
                except aiohttp.ClientPayloadError:
                    # Raised below, out of this handler: aiohttp's exception (its text quotes
                    # the server's bytes) must not ride along as the error's __context__.
                    chunk = None
            if scope.cancelled_caught:
                raise RetryableError(
                    too_slow(
                        f"fewer than {quantum:.0f} bytes in {window:g} s "
                        f"(DownloadPolicy.min_rate is {policy.min_rate:g} bytes/s)"
                    )
                )
            if chunk is None:
                raise RetryableError(_broken_body(reply))
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise ProtocolError(f"image is larger than {policy.max_bytes} bytes")
            if len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
            tail = (tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
            digest.update(chunk)
            if quantum is not None:
                window_bytes += len(chunk)
                if window_bytes >= quantum:
                    window_bytes = 0
                    window_ends = anyio.current_time() + window
            pending += chunk
            if len(pending) >= _CHUNK:
                await steps.write(bytes(pending))
                pending.clear()
        if pending:
            await steps.write(bytes(pending))
        return size, digest.hexdigest(), head, tail


def _encoded(reply: aiohttp.ClientResponse) -> bool:
    """True when the body came compressed (its Content-Length counts the compressed bytes)."""
    return reply.headers.get("Content-Encoding", "identity").lower() != "identity"


def _what_came(size: int, declared: int | None) -> str:
    """How many bytes came before an image fell short of its end, and what that tells."""
    if declared is None:
        return f"after {size} bytes (the server sent only part of the image)"
    return (
        f"after the {size} bytes its Content-Length declared (the server declared a length "
        "short of the image, or sent only part of it)"
    )


def _broken_body(reply: aiohttp.ClientResponse) -> TransportError:
    """Why a body broke off (aiohttp's ClientPayloadError), from what its reply declared.
    How many bytes came is not said: aiohttp drops what it held when the connection ended."""
    if _encoded(reply):
        why = "its compressed body broke off, or could not be decoded"
    elif reply.content_length is not None:
        why = (
            f"the server closed the connection before sending the {reply.content_length} "
            "bytes its Content-Length declared (a Content-Length longer than the image, or a "
            "server that stopped part-way)"
        )
    else:
        why = "the connection ended inside its chunked body, before the last chunk"
    return TransportError(f"image download was cut short: {why}", reached_server=True)


def _content_type(reply: aiohttp.ClientResponse) -> str:
    """The reply's Content-Type for a message: the image server's text, cleaned and short."""
    value = reply.headers.get("Content-Type")
    return "none" if value is None else repr(snippet(value, limit=100))


def name_the_file(error: OSError, path: Path) -> None:
    """A disk's refusal (full, say) names the file it refused: ``[Errno 28] No space left on
    device`` alone said nothing of where."""
    if error.filename is None:
        error.filename = str(path)
