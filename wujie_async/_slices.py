"""Megabytes of text (an edit's inline images) decoded and encoded a slice at a time.

Decoding a 25 MB base64 image or encoding it into a JSON body is one C call that holds the
GIL throughout (100 ms and more): run on a worker thread, it stalled the event loop's thread
all the same. Here each call takes one slice, and the thread lets the loop's thread run
between slices (``time.sleep(0)`` hands the GIL over: waiting for the interpreter's switch
interval instead left the loop 10-30 ms stalls). On the loop itself (a small request), the
same functions run in one go: a few slices at most.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any, Final

# Characters per slice: a multiple of 4 (whole base64 quanta), about a millisecond of work.
SLICE_CHARS: Final = 256 * 1024
_B64_PADDING: Final = "="

# The request encoder's own options (see _transport): the sliced body is byte for byte the same.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _let_loop_run() -> None:
    time.sleep(0)  # releases the GIL: a thread waiting for it (the event loop's) takes it


def b64_size(text: str, start: int) -> int | None:
    """The bytes that the base64 in ``text[start:]`` decodes to, from its length and padding
    alone (nothing decoded); None when its length is no whole number of quanta."""
    chars = len(text) - start
    if chars % 4:
        return None
    padding = 2 if text.endswith("==") else 1 if text.endswith(_B64_PADDING) else 0
    return chars // 4 * 3 - min(padding, chars)


def b64_ends(text: str, start: int, head: int, tail: int) -> tuple[bytes, bytes, int] | None:
    """The first ``head`` and last ``tail`` bytes that the base64 in ``text[start:]`` decodes
    to, and how many there are in all; None when it is not strict base64 (a character outside
    the alphabet, a line break, padding before its end, a length that is no whole number of
    quanta). Every slice is decoded (that checks it), but only the ends are kept."""
    if b64_size(text, start) is None:
        return None
    end = len(text)
    first = b""
    last = bytearray()
    size = 0
    for at in range(start, end, SLICE_CHARS):
        piece = text[at : at + SLICE_CHARS]
        if at + SLICE_CHARS < end and _B64_PADDING in piece:
            return None  # padding is only ever at the very end
        try:
            data = base64.b64decode(piece, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(first) < head:
            first += data[: head - len(first)]
        last += data
        del last[: max(0, len(last) - tail)]
        size += len(data)
        _let_loop_run()
    return first, bytes(last), size


def json_pieces(body: dict[str, Any]) -> list[bytes]:
    """``body`` (a request: a JSON object with text keys) as UTF-8 JSON in pieces, joined
    byte for byte what the request encoder writes of it; a long text (an inline image) is
    encoded a slice at a time, in pieces of at most ``SLICE_CHARS`` characters."""
    pieces: list[bytes] = [b"{"]
    for index, (name, value) in enumerate(body.items()):
        pieces.append(b"," if index else b"")
        pieces.append(_ENCODER.encode(name).encode() + b":")
        if isinstance(value, list):
            pieces.append(b"[")
            for position, item in enumerate(value):
                if position:
                    pieces.append(b",")
                _value_pieces(item, pieces)
            pieces.append(b"]")
        else:
            _value_pieces(value, pieces)
    pieces.append(b"}")
    return [piece for piece in pieces if piece]


def _value_pieces(value: object, pieces: list[bytes]) -> None:
    if not isinstance(value, str) or len(value) <= SLICE_CHARS:
        pieces.append(_ENCODER.encode(value).encode())
        return
    # JSON escapes each character on its own, and a str slice never splits one: a text's
    # slices, each encoded and stripped of its quotes, are the text encoded.
    pieces.append(b'"')
    for at in range(0, len(value), SLICE_CHARS):
        pieces.append(_ENCODER.encode(value[at : at + SLICE_CHARS])[1:-1].encode())
        _let_loop_run()
    pieces.append(b'"')


# An edit whose body holds more text than this has its images checked, and its body encoded
# to JSON, on a worker thread (``_images``, ``_transport``): decoding and encoding run at about
# 200 MB/s, so a 25 MB inline image held the loop 100-160 ms for each; a thread's handoff
# costs about what this much costs on the loop (a millisecond).
OFF_LOOP_CHARS: Final = 256 * 1024


def text_chars(body: object) -> int:
    """About how many characters of text ``body`` (a JSON object) holds: its strings and the
    strings of its lists, not deeper. Enough to tell a body carrying inline images from the
    rest in a few steps (an ``extra_body`` nesting large text deeper is encoded on the loop)."""
    if not isinstance(body, dict):
        return 0
    total = 0
    for value in body.values():
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(item) for item in value if isinstance(item, str))
    return total
