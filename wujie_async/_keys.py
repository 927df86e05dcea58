"""Job keys: what a usable key looks like, checked in a submit reply and in ``attach``."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from ._errors import InvalidRequestError, ProtocolError, SubmitUncertainError, snippet

# A job key as the gateway may give it: 1 to 128 characters, none of them whitespace, a
# separator or an invisible character: no control (C0, DEL, C1), no format character (bidi
# overrides and marks, zero-width ones, the BOM: a key that reads one way and is another), no
# surrogate, private-use or unassigned one. Keys are printable ASCII in practice (the fast
# path); checked with fullmatch: `$` would let "KEY\n" through.
_ASCII_KEY = re.compile(r"[!-~]{1,128}")
MAX_KEY_CHARS = 128


def _is_key(key: str) -> bool:
    if _ASCII_KEY.fullmatch(key):
        return True
    return 0 < len(key) <= MAX_KEY_CHARS and all(
        unicodedata.category(char)[0] not in "CZ" and not char.isspace() for char in key
    )


def check_key(key: object) -> str:
    """``key`` if it is a job key a user may attach.

    Raises:
        InvalidRequestError: it is not.
    """
    if not isinstance(key, str) or not _is_key(key):
        raise InvalidRequestError(
            [
                (
                    "key",
                    f"must be a job key: 1 to {MAX_KEY_CHARS} characters, no whitespace, "
                    "control or invisible (format) characters",
                )
            ]
        )
    return key


def usable_key(data: Any, body: dict[str, Any]) -> str:
    """The key of a submit reply, checked; anything else is a protocol error (maybe charged)."""
    key = data.get("key") if isinstance(data, dict) else None
    if isinstance(key, str) and _is_key(key):
        return key
    if not isinstance(key, str):
        problem = "no key" if key is None else f"a key that is a {type(key).__name__}"
    elif not key:
        problem = "an empty key"
    elif len(key) > MAX_KEY_CHARS:
        problem = f"a key of {len(key)} characters (over {MAX_KEY_CHARS})"
    else:
        problem = "a key with whitespace, control or invisible (format) characters"
    # The gateway said "200" but gave no usable key: the job may exist, unreachable.
    error = SubmitUncertainError(
        f"the submit reply has {problem}: {snippet(str(data)[:1000])}", request=body
    )
    # The reply may quote the request's signature (snippet() left it out of the message): the
    # locals of this frame, which the error's traceback keeps, must not hold it either.
    data = key = None
    raise error from ProtocolError(f"the submit reply has {problem}")


def is_job_key(key: object) -> bool:
    """True when ``key`` passes :func:`check_key`."""
    return isinstance(key, str) and _is_key(key)


def images_in(request: Mapping[str, Any]) -> int | None:
    """``n`` of a journaled request, if it is a usable count."""
    n = request.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
