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
# How many of a file's first bytes its end check reads: the segments (JPEG) and chunks (PNG)
# they hold must fit in the file; one that runs past its end says the file was cut there.
HEAD_BYTES: Final = 65536


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
    if kind == "png":
        if _IEND_CHUNK not in tail:
            return "the PNG does not reach its end marker (an IEND chunk)"
        return _png_cut(head, size)
    if kind == "jpg":
        if not tail.rstrip(_PADDING).endswith(_JPEG_END):
            # rstrip leaves FF D9 whole: D9 is not padding.
            return "the JPEG does not end with its end marker (FF D9)"
        return _jpeg_cut(head, size)
    if kind == "webp":
        declared = int.from_bytes(head[4:8], "little") + 8
        if size < declared:
            return f"the WebP's RIFF header declares {declared} bytes, not {size}"
    return None


def _png_cut(head: bytes, size: int) -> str | None:
    """A chunk among ``head`` (a PNG's first bytes) that runs past the file's ``size``: an end
    marker after it was not the image's own (a body cut inside a chunk, then an IEND)."""
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(head):
        length = int.from_bytes(head[at : at + 4], "big")
        name = head[at + 4 : at + 8]
        if at + 12 + length > size:
            shown = name.decode("ascii", "replace") if name.isalpha() else "a"
            return f"the PNG is cut short: its {shown} chunk declares {length} bytes not there"
        if name == b"IEND":
            return None
        at += 12 + length
    return None


def _jpeg_cut(head: bytes, size: int) -> str | None:
    """A segment among ``head`` (a JPEG's first bytes, up to its scan) that runs past the
    file's ``size``: an end marker seen last was a thumbnail's (EXIF's ends with FF D9 too)."""
    at = 2  # after the start-of-image marker
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None  # not at a marker: nothing more to tell from here
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            if marker == 0xD9:
                return None
            at += 2
            continue
        length = int.from_bytes(head[at + 2 : at + 4], "big")
        if at + 2 + length > size:
            return f"the JPEG is cut short: a segment declares {length} bytes not there"
        if marker == 0xDA:  # start of scan: the image data follows
            return None
        at += 2 + length
    return None
