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


# How far from a file's end its closing marker may sit: some files carry padding or metadata
# after it. A body cut short has no marker at all (these bytes never occur inside the data).
TAIL_BYTES: Final = 8192


def ends_complete(kind: str, head: bytes, tail: bytes, size: int) -> bool:
    """Whether an image of ``kind`` whose first bytes are ``head`` and last bytes ``tail``
    (``size`` bytes in all) reaches its own end: a PNG's IEND chunk, a JPEG's end-of-image
    marker, a WebP's RIFF length. What tells a body cut short when its length cannot (a
    compressed body, or one that ends when the connection closes)."""
    if kind == "png":
        return b"IEND\xaeB`\x82" in tail[-TAIL_BYTES:]
    if kind == "jpg":
        return b"\xff\xd9" in tail[-TAIL_BYTES:]
    if kind == "webp":
        return size >= int.from_bytes(head[4:8], "little") + 8
    return True
