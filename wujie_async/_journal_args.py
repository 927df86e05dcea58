"""The rules of what a caller passes to the journal's read calls and to ``refuse_keys``.

Checked before the journal (SQLite, or a fleet's in Redis) is asked: a wrong value there read
as "no filter" or "no row", silently. ``find_submit(None)`` returned the newest row whatever its
tag, so a queue consumer whose message had no id attached to another message's job and never
sent its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from ._errors import InvalidRequestError
from ._journal import ALL_STATES
from ._models import unencodable

_T = TypeVar("_T")

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


def checked_items(value: object, field: str, kind: type[_T], many: str, one: str) -> list[_T]:
    """``value`` as a list, once every item is a ``kind``: a bare str (or bytes) would be
    taken character by character, and anything else fail deep inside, saying nothing of which
    argument. ``many`` and ``one`` say what the argument and each item must be."""
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Iterable):
        raise InvalidRequestError([(field, f"must be {many}; got {type(value).__name__}")])
    listed = list(value)
    found = [
        (f"{field}[{index}]", f"must be {one}; got {type(item).__name__}")
        for index, item in enumerate(listed)
        if not isinstance(item, kind)
    ]
    if found:
        raise InvalidRequestError(found[:10])
    return listed


def checked_keys(keys: object) -> list[str]:
    """``refuse_keys``'s keys: a key that is no str can never be refused."""
    many = "an iterable of job keys (str), e.g. a list or a set"
    return checked_items(keys, "keys", str, many, "a job key (a str)")
