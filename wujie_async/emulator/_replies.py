"""What the emulated gateway answers with: the platform's envelope, an early complete answer
(``Refused``: auth, rate limit, a bad body, an injected fault), a proxy's HTML error page and
an image sent inline.

Apart from ``_app`` (which decides what to answer) because these build the answers only.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any, Final

from aiohttp import web

from . import _png

HTML_PAGE: Final = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@functools.lru_cache(maxsize=1024)
def inline_png(key: str, index: int, size: tuple[int, int]) -> str:
    """Image ``index`` of a job, base64 (``image_delivery="b64_json"``): the very bytes its
    file would serve, made once per image while it is listed again and again."""
    width, height = _png.downscaled(*size)
    return base64.b64encode(_png.render_png(key, index, width, height)).decode("ascii")


class Refused(Exception):
    """An early, complete answer to a request (auth failure, rate limit, bad body)."""

    def __init__(self, response: web.StreamResponse, *, dropped: bool = False) -> None:
        self.response = response
        self.dropped = dropped


def envelope(
    code: str, message: str, data: Any = None, *, status: int = 200, headers: Any = None
) -> web.Response:
    """A reply in the platform's envelope."""
    body = json.dumps({"code": code, "message": message, "data": data}, separators=(",", ":"))
    return web.Response(
        body=body.encode(), status=status, content_type="application/json", headers=headers
    )
