"""A request's JSON body as aiohttp sends it: written in slices that let the event loop run
between them, and telling whether any of it was handed to the connection (``handed``).

aiohttp's own body for ``bytes`` (``BytesPayload``) writes all of it at once, and warns
(``ResourceWarning``) of any body over 1 MiB: under ``-W error`` (pytest's
``filterwarnings = error``) that warning was raised out of ``session.post`` before anything was
sent, and an inline edit image of 1-4 MB could never be submitted. Its advice, ``io.BytesIO``,
copies the body once more on the loop (30 ms for 25 MB): this writes the bytes it was given.

``handed`` is what tells a request that provably never left from one that may have: the
gateway cannot act on a request without its body, and no byte of it reaches the connection
before ``handed`` is set.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

# Bytes written before the loop may run again: aiohttp's own slice for its streamed bodies.
SLICE_BYTES: Final = 2**16


class RequestBody(Payload):
    """One request's body (``application/json``), made afresh for each attempt: ``bytes``, or
    the pieces of a large one (``_slices.json_pieces``), written one at a time.

    Attributes:
        handed: True once a write of the body to the connection has begun.
    """

    _autoclose = True  # bytes in memory: nothing to close

    def __init__(self, data: bytes | list[bytes]) -> None:
        super().__init__(data, content_type="application/json")
        self._size = len(data) if isinstance(data, bytes) else sum(map(len, data))
        self.handed = False

    def _bytes(self) -> bytes:
        value: bytes | list[bytes] = self._value
        return value if isinstance(value, bytes) else b"".join(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._bytes().decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._bytes()

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        # (content_length is this body's own size: aiohttp sends it as the Content-Length.)
        self.handed = True  # before the first byte can leave
        value: bytes | list[bytes] = self._value
        if isinstance(value, bytes) and len(value) <= SLICE_BYTES:
            await writer.write(value)  # the common body: one write, as aiohttp's own does
            return
        pieces = [value] if isinstance(value, bytes) else value
        first = True
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), SLICE_BYTES):
                if not first:
                    await asyncio.sleep(0)  # the loop runs between slices (write() drains)
                first = False
                await writer.write(view[start : start + SLICE_BYTES])
