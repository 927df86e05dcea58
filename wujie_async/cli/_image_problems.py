"""What an image that could not be saved means: its problem in the command line's words,
whether a re-run would be refused the same way, whether its disk refused it (then every later
image would be), and which of a line's problems it reports."""

from __future__ import annotations

import asyncio
import errno
from typing import TypeGuard

from .. import ProtocolError
from ._outcome import clean

# The library's option names in its messages, as the command line spells them.
_FLAG_NAMES = (
    ("allow_private_addresses=True", "--allow-private-addresses"),
    ("allow_http=True", "--allow-http"),
    ("DownloadPolicy.deadline", "--download-timeout"),
    ("DownloadPolicy.min_rate", "--min-download-rate"),
)


def describe(exc: BaseException) -> str:
    text = clean(exc)
    for option, flag in _FLAG_NAMES:
        text = text.replace(option, flag)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# What the downloader says of an image a re-run would refuse the same way, and what is
# wrong with it, in the summary's words.
TOO_LARGE, NOT_AN_IMAGE = "too large", "not an image"
_LASTING = (
    ("is larger than", TOO_LARGE),
    ("not a PNG, JPEG or WEBP image", NOT_AN_IMAGE),
    ("is not valid base64", NOT_AN_IMAGE),
    ("has neither a URL nor b64_json", NOT_AN_IMAGE),
)


def lasting_problem(problem: BaseException | None) -> str | None:
    """``TOO_LARGE`` or ``NOT_AN_IMAGE`` for an image that could not be saved and that a
    re-run would refuse the same way (the bytes the gateway lists do not change); None for a
    failure a re-run may get past (a network error, a slow or failing image server)."""
    if not isinstance(problem, ProtocolError) or problem.http_status is not None:
        return None
    text = str(problem)
    return next((what for said, what in _LASTING if said in text), None)


def disk_refused(problem: BaseException) -> TypeGuard[OSError]:
    return isinstance(problem, OSError) and problem.errno in _DISK_REFUSALS


def precedence(problem: BaseException) -> int:
    """Which of a line's image problems it reports (the lowest; the first in image order
    among equals): a cancel, then a disk that refuses (it stops the run: every later image
    would be paid for and refused the same way), then any other."""
    if isinstance(problem, asyncio.CancelledError):
        return 0
    return 1 if disk_refused(problem) else 2


# What an image's server answers for a URL that is gone for good (the job having ended: a
# temporary URL listed while it ran may answer so until its final listing comes).
GONE = frozenset({404, 410})

# What a disk (not one file) refuses: every later write to the output folder would fail too.
_DISK_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
