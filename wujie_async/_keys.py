"""Job keys: what a usable key looks like, checked in a submit reply and in ``attach``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._errors import InvalidRequestError, ProtocolError, SubmitUncertainError, snippet

# A job key as the gateway may give it: 1 to 128 characters, none of them whitespace or a
# control character (C0, DEL, C1). Checked with fullmatch: `$` would let "KEY\n" through.
KEY = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,128}")
MAX_KEY_CHARS = 128


def check_key(key: object) -> str:
    """``key`` if it is a job key a user may attach.

    Raises:
        InvalidRequestError: it is not.
    """
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise InvalidRequestError(
            [
                (
                    "key",
                    f"must be a job key: 1 to {MAX_KEY_CHARS} characters, no whitespace "
                    "or control characters",
                )
            ]
        )
    return key


def usable_key(data: Any, body: dict[str, Any]) -> str:
    """The key of a submit reply, checked; anything else is a protocol error (maybe charged)."""
    key = data.get("key") if isinstance(data, dict) else None
    if isinstance(key, str) and KEY.fullmatch(key):
        return key
    if not isinstance(key, str):
        problem = "no key" if key is None else f"a key that is a {type(key).__name__}"
    elif not key:
        problem = "an empty key"
    elif len(key) > MAX_KEY_CHARS:
        problem = f"a key of {len(key)} characters (over {MAX_KEY_CHARS})"
    else:
        problem = "a key with whitespace or control characters"
    # The gateway said "200" but gave no usable key: the job may exist, unreachable.
    raise SubmitUncertainError(
        f"the submit reply has {problem}: {snippet(str(data)[:1000])}", request=body
    ) from ProtocolError(f"the submit reply has {problem}")


def is_job_key(key: object) -> bool:
    """True when ``key`` passes :func:`check_key`."""
    return isinstance(key, str) and KEY.fullmatch(key) is not None


def images_in(request: Mapping[str, Any]) -> int | None:
    """``n`` of a journaled request, if it is a usable count."""
    n = request.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
