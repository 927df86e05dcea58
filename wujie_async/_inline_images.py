"""Images sent inline (``b64_json``): the text decoded on a worker thread, within the size cap,
and the bytes checked as a whole PNG, JPEG or WEBP image."""

from __future__ import annotations

import base64
import binascii
from typing import Final

from ._errors import ProtocolError
from ._image_formats import HEAD_BYTES, TAIL_BYTES, end_problem, sniff_format

# Line breaks and spaces a base64 encoder may wrap its text with (MIME's 76-column lines, as
# Java's MIME encoder and the base64 tool write them).
_B64_WRAPPING: Final = str.maketrans("", "", " \t\r\n")
_URL_SAFE: Final = str.maketrans("-_", "+/")


def b64_chars(limit: int) -> int:
    """The most characters of (padded) base64 that ``limit`` bytes take."""
    return (limit + 2) // 3 * 4


def decode_inline(text: str, limit: int) -> tuple[bytes, str]:
    """Decoded ``b64_json`` bytes and their format (runs on a worker thread).

    Base64 wrapped in lines, in the URL-safe alphabet or without its padding is read as such:
    the image is paid for and its bytes are here (a gateway re-encoding OpenAI's image with
    its platform's encoder). Anything else that is not base64 is refused, and the bytes must
    still be a whole PNG, JPEG or WEBP image.
    """
    text = text.translate(_B64_WRAPPING)
    if "-" in text or "_" in text:
        text = text.translate(_URL_SAFE)
    text += "=" * (-len(text) % 4)
    if len(text) > b64_chars(limit):  # the cap, before a byte is decoded
        raise ProtocolError(f"image is larger than {limit} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("b64_json is not valid base64") from None
    if len(data) > limit:
        raise ProtocolError(f"image is larger than {limit} bytes")
    kind = sniff_format(data[:16])
    if kind is None:
        raise ProtocolError("image bytes are not a PNG, JPEG or WEBP image")
    problem = end_problem(kind, data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data))
    if problem is not None:
        raise ProtocolError(
            f"b64_json image is cut short: {problem}, after {len(data)} bytes (the gateway "
            "listed only part of the image)"
        )
    return data, kind
