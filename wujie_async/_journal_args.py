"""The rules of what a caller passes to the journal's read calls and to ``refuse_keys``.

Checked before the journal (SQLite, or a fleet's in Redis) is asked: a wrong value there read
as "no filter" or "no row", silently. ``find_submit(None)`` returned the newest row whatever its
tag, so a queue consumer whose message had no id attached to another message's job and never
sent its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._errors import InvalidRequestError
from ._journal import ALL_STATES
from ._models import unencodable

# The rule submit(tag=...) applies (``Images._send``): any str it can store, "" included.
TAG_RULE = "must be a string, the tag= a submit was given"


def check_states(states: tuple[Any, ...]) -> None:
    """Refuse a state that is not a journal state, naming its place among the arguments."""
    found = [
        (f"states[{index}]", f"must be one of {', '.join(ALL_STATES)}; got {repr(state)[:40]}")
        for index, state in enumerate(states)
        if state not in ALL_STATES
    ]
    if found:
        raise InvalidRequestError(found)


def check_tag(tag: object, *, optional: bool) -> None:
    """Refuse a tag no submit could have been given (``optional``: None means any tag)."""
    if tag is None and optional:
        return
    if not isinstance(tag, str):
        raise InvalidRequestError([("tag", TAG_RULE + (" (or None)" if optional else ""))])
    if found := unencodable({"tag": tag}):
        raise InvalidRequestError(found)


def checked_keys(keys: object) -> list[str]:
    """``keys`` as a list, once every one is a str: a bare str (or bytes) would be taken
    character by character, and a key that is no str can never be refused."""
    rule = "must be an iterable of job keys (str), e.g. a list or a set"
    if isinstance(keys, str | bytes | bytearray) or not isinstance(keys, Iterable):
        raise InvalidRequestError([("keys", f"{rule}; got {type(keys).__name__}")])
    listed = list(keys)
    found = [
        (f"keys[{index}]", f"must be a job key (a str); got {type(key).__name__}")
        for index, key in enumerate(listed)
        if not isinstance(key, str)
    ]
    if found:
        raise InvalidRequestError(found[:10])
    return listed
