"""Which image format some bytes are, read from the bytes themselves (never from a file name, a
URL or a header): what a saved file's extension comes from, and what an inline edit image is
checked against before it is sent."""

from __future__ import annotations

from typing import Final

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_SIGNATURES: Final = {PNG_SIGNATURE: "png", b"\xff\xd8\xff": "jpg"}


def sniff_format(head: bytes) -> str | None:
    """``png``, ``jpg`` or ``webp`` from the first bytes of a file; None if neither."""
    for signature, name in _SIGNATURES.items():
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's header chunk; None if ``data`` has no such header."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# A PNG's last chunk: IEND, with no data, and the CRC of its name (the same in every PNG).
_IEND_CHUNK: Final = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END: Final = b"\xff\xd9"
# Bytes an encoder may pad a file with after its end (never image data after a JPEG's FF D9).
_PADDING: Final = b"\x00\xff"
# How many of a file's last bytes its end check reads: a PNG's IEND may sit this far back
# (padding or metadata after it); a JPEG's end marker may be followed by padding only.
TAIL_BYTES: Final = 8192


def end_problem(kind: str, head: bytes, tail: bytes, size: int) -> str | None:
    """What keeps an image of ``kind`` (first bytes ``head``, last bytes ``tail``, ``size``
    bytes in all) from reaching its own end, in words for an error; None if it does.

    A PNG must hold its IEND chunk among its last bytes (nothing like it occurs inside the
    data); a WebP must be as long as its RIFF header declares. A JPEG must end with its
    end-of-image marker, followed by nothing but padding: an EXIF thumbnail ends with FF D9
    too, a few KiB into the file, and a body cut short after it would otherwise look whole.
    What tells a body cut short that its length cannot (a compressed body, one that ends
    when the connection closes, a Content-Length short of the image). Bytes after an image's
    end (padding, or metadata some encoders append) are allowed: refusing them would refuse a
    whole, paid image."""
    if kind == "png" and _IEND_CHUNK not in tail:
        return "the PNG does not reach its end marker (an IEND chunk)"
    if kind == "jpg" and not tail.rstrip(_PADDING).endswith(_JPEG_END):
        # rstrip leaves FF D9 whole: D9 is not padding.
        return "the JPEG does not end with its end marker (FF D9)"
    if kind == "webp":
        declared = int.from_bytes(head[4:8], "little") + 8
        if size < declared:
            return f"the WebP's RIFF header declares {declared} bytes, not {size}"
    return None
