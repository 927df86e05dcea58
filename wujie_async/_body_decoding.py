"""A reply's body, decoded from its content codings (gzip, deflate) as it streams in, capped.

The transport asks for the codings this module reads (``ACCEPT_ENCODING``) and leaves
aiohttp's own decoding off: replies are decoded here (``BodyDecoder`` says why), their
decoded size counted against ``Limits.max_response_bytes`` as they inflate.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

from ._errors import ProtocolError, ResponseTooLargeError, WujieError


def content_codings(values: Iterable[str]) -> list[str]:
    """The content codings of a reply, in the order they were applied: RFC 9110 allows a list
    (``gzip, identity``), in one ``Content-Encoding`` header or over several. ``identity``
    (no coding) is left out."""
    return [
        coding
        for value in values
        for coding in (part.strip().lower() for part in value.split(","))
        if coding and coding != "identity"
    ]


def body_decoder(codings: list[str], cap: int, status: int) -> BodyDecoder:
    """A decoder for a body coded with ``codings``, in that order: the last one applied is
    undone first. A list with a coding this client does not decode (or more codings than
    ``_MAX_CODINGS``) is left as it came (it reads as not JSON)."""
    if not codings or len(codings) > _MAX_CODINGS or not _DECODED.issuperset(codings):
        return BodyDecoder(", ".join(codings), cap, status)
    decoder: BodyDecoder | None = None
    for coding in codings:
        decoder = BodyDecoder(coding, cap, status, then=decoder)
    assert decoder is not None
    return decoder


# The content codings this client asks for and decodes itself (aiohttp's own decoding is off,
# so a server that says brotli or zstd is not invited to: no such reply is ever readable).
ACCEPT_ENCODING = "gzip, deflate"
_DECODED = frozenset({"gzip", "x-gzip", "deflate"})
# A body coded more times than this is no reply of this gateway's (each coding undone holds a
# zlib window): it is left as it came.
_MAX_CODINGS = 4
_WHITESPACE = b" \t\r\n"
_GZIP_MAGIC = b"\x1f\x8b"
# A gzip body of more members than this is no reply of this gateway's (aiohttp stops at as many).
_MAX_GZIP_MEMBERS = 1024


class BodyDecoder:
    """A reply body decoded from its ``Content-Encoding`` as it streams in, its decoded size
    capped.

    Done here rather than by aiohttp, because aiohttp's decoding loses the body of a reply it
    cannot inflate: a proxy that labels an uncompressed JSON body ``gzip`` (the body as it came
    is the gateway's answer) made a submit's reply "Can not decode content-encoding", an
    uncertain submit whose paid job's key was in the body. A body labelled gzip or deflate
    whose first byte past whitespace is ``{`` (which no gzip or zlib stream starts with) is
    read as it is. ``x-gzip`` is gzip's old name, which RFC 9110 says to read as gzip (and
    aiohttp left compressed). A gzip body may be several members one after another (each is
    inflated, the cap counting them all). Any other coding is left as it came (it reads as
    not JSON). A body coded twice (``deflate, gzip``) is decoded by two, the first (``then``)
    taking what the second decodes.
    """

    def __init__(
        self, encoding: str, cap: int, status: int, *, then: BodyDecoder | None = None
    ) -> None:
        self._cap = cap
        self._then = then  # the decoder of the coding applied before this one, if any
        self._status = status
        self._chunks: list[bytes] = []
        self._size = 0
        self._inflater: Any = None  # zlib's decompressobj, once the body is known compressed
        self._encoding = encoding
        # Undecided until the first byte past whitespace: plain, or compressed.
        self._deciding = encoding in _DECODED
        self._held = b""  # whitespace (and a first byte) seen while undecided
        self._gzip = False
        self._members = 1  # gzip members begun
        self._next_member = b""  # the first byte of a next member's header
        self._trailing = False  # past the last member: the rest is not read
        self._undecodable = False

    @property
    def undecodable(self) -> bool:
        """Whether the body failed to decode as its Content-Encoding says (not over the cap)."""
        return self._undecodable or (self._then is not None and self._then.undecodable)

    def feed(self, chunk: bytes) -> WujieError | None:
        """Take the next raw chunk; an error if the body cannot be read within the cap."""
        if self._deciding:
            chunk = self._held + chunk
            start = len(chunk) - len(chunk.lstrip(_WHITESPACE))
            if len(chunk) - start < 2:
                # Only whitespace yet, or one byte: a zlib header takes two to tell (a first
                # chunk of one byte, b"x", was taken for raw deflate, and the reply lost).
                self._held = chunk
                return self._too_large() if len(chunk) > self._cap else None
            self._held = b""
            self._deciding = False
            if chunk[start : start + 1] != b"{":  # compressed, as it says
                self._gzip = self._encoding != "deflate"
                zlib_header = chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
                wbits = (
                    16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS if zlib_header else -15
                )
                self._inflater = zlib.decompressobj(wbits)
        if self._inflater is None:
            return self._keep(chunk)
        return self._inflate(chunk)

    def _inflate(self, data: bytes) -> WujieError | None:
        """Inflate the next compressed bytes. A gzip body may be several members one after
        another (RFC 1952; aiohttp read them all): each is inflated in turn. Bytes after the
        last member that start no new one are trailing bytes, not read."""
        while data and not self._trailing:
            inflater = self._inflater
            if inflater.eof:  # a member has ended: another, or trailing bytes
                data = self._next_member + data
                self._next_member = b""
                if not self._gzip or data[:2] != _GZIP_MAGIC[: len(data[:2])]:
                    self._trailing = True
                    return None
                if len(data) < 2:
                    self._next_member = data  # one byte of a gzip header: hold it
                    return None
                self._members += 1
                if self._members > _MAX_GZIP_MEMBERS:
                    return self._not_decodable()
                inflater = self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                inflated = inflater.decompress(data, self._cap + 1 - self._size)
            except zlib.error:
                return self._not_decodable()
            if inflater.unconsumed_tail:
                return self._too_large()  # more to inflate than the cap leaves room for
            problem = self._keep(inflated)
            if problem is not None:
                return problem
            data = inflater.unused_data if inflater.eof else b""
        return None

    def finish(self) -> bytes | WujieError:
        """The whole decoded body, once the stream has ended."""
        inflater = self._inflater
        if self._held:  # undecided: whitespace, or one byte
            held, self._held = self._held, b""
            problem = self._keep(held)
            if problem is not None:
                return problem
        elif inflater is not None:
            try:
                problem = self._keep(inflater.flush())
            except zlib.error:
                return self._not_decodable()
            if problem is not None:
                return problem
            if not inflater.eof:
                return self._not_decodable()  # cut short
        if self._then is not None:
            return self._then.finish()
        return b"".join(self._chunks)

    def _keep(self, data: bytes) -> WujieError | None:
        self._size += len(data)
        if self._size > self._cap:
            return self._too_large()
        if self._then is not None:
            return self._then.feed(data) if data else None
        self._chunks.append(data)
        return None

    def _too_large(self) -> ResponseTooLargeError:
        cap = self._cap
        return ResponseTooLargeError(
            f"the reply exceeds the {cap}-byte cap (Limits.max_response_bytes) once decoded",
            limit=cap,
            http_status=self._status,
        )

    def _not_decodable(self) -> ProtocolError:
        self._undecodable = True
        return ProtocolError(
            f"the reply's body does not decode as its Content-Encoding ({self._encoding}) says",
            http_status=self._status,
        )
