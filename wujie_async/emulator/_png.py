"""Small, real, deterministic PNG images for emulated jobs.

Each image is a two-way gradient whose colours come from a hash of (key, index), so the same job
always yields the same bytes. Images are DOWNSCALED by ``DOWNSCALE`` from the requested size
(a 1024x1024 request gives a 128x128 PNG) to keep the emulator fast; the aspect ratio is kept.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

DOWNSCALE = 8
"""The emulator's images are this many times smaller on each side than the size asked for
(a "1024x1024" job serves a 128x128 PNG): real PNGs, cheap to make and to download."""
SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def render_png(key: str, index: int, width: int, height: int) -> bytes:
    """An RGB PNG of ``width`` x ``height`` (already downscaled) for image ``index`` of ``key``."""
    seed = hashlib.sha256(f"{key}:{index}".encode()).digest()
    red_start, green_start, blue = seed[0], seed[1], seed[2]
    row = bytearray(3 * width)
    row[0::3] = bytes((red_start + 255 * x // max(width - 1, 1)) % 256 for x in range(width))
    row[2::3] = bytes([blue]) * width
    raw = bytearray()
    for y in range(height):
        row[1::3] = bytes([(green_start + 255 * y // max(height - 1, 1)) % 256]) * width
        raw += b"\x00"  # filter type: none
        raw += row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(raw), 6))
        + _chunk(b"IEND", b"")
    )


def downscaled(width: int, height: int) -> tuple[int, int]:
    """The served size for a requested size."""
    return max(1, width // DOWNSCALE), max(1, height // DOWNSCALE)
