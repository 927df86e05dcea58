"""SharedLessons: every member's poll schedule learns from every member's jobs.

A member's schedule learns, per model, how far real job ends fall from the gateway's
estimates, and whether the estimate is a typical figure (see ``wujie_async._schedule``). Alone,
a member with a trickle of jobs learns slowly and polls its first jobs poorly. In a fleet each
member appends what its own jobs taught (``Lesson``s) to one capped stream, and reads the
others': the fleet learns as fast as one process doing all its jobs would. A member that
joins reads the stream's recent history first, so a restarted worker starts out learned.

Entries are other processes' writes, so each is checked like a reply: a malformed entry (or
lesson) is skipped, never fatal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._schedule import Lesson

if TYPE_CHECKING:
    from ._fleet import RedisFleet

# Entries kept in the stream (each holds a member's lessons of about one flush interval):
# enough history for a joining member, bounded memory in Redis.
_STREAM_CAP = 1_000
# How many recent entries a joining member reads.
_HISTORY = 200
# An entry larger than this is not a member's (lessons are a few dozen bytes each).
_ENTRY_BYTES = 256 * 1024
_MODEL_CHARS = 128
_LONGEST_S = 7 * 24 * 3600.0


class SharedLessons:
    """The fleet's stream of schedule lessons, as one member reads and writes it.

    Args:
        fleet: the started fleet.
        member_id: the member writing (its own entries are not read back).
    """

    def __init__(self, fleet: RedisFleet, member_id: str) -> None:
        self._fleet = fleet
        self._member_id = member_id
        self._stream = fleet.keys.lessons
        self._last_id: str | None = None  # None: the history is not read yet

    async def exchange(self, outgoing: Sequence[Lesson]) -> list[Lesson]:
        """Append ``outgoing`` (if any) and return the other members' lessons not read yet.

        The first call returns the stream's recent history (up to ``_HISTORY`` entries).

        Raises:
            FleetUnavailableError: Redis is away (nothing was appended).
        """
        stream, member, last = self._stream, self._member_id, self._last_id
        payload = json.dumps([_encode(lesson) for lesson in outgoing]) if outgoing else None

        async def send(redis: Any) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                if last is None:
                    pipe.xrevrange(stream, count=_HISTORY)
                else:
                    pipe.xrange(stream, min=f"({last}", count=_HISTORY)
                if payload is not None:
                    pipe.xadd(
                        stream, {"m": member, "l": payload}, maxlen=_STREAM_CAP, approximate=True
                    )
                result: list[Any] = await pipe.execute()
                return result

        reply = await self._fleet.call(send)
        entries = list(reply[0] or [])
        if last is None:
            entries.reverse()  # XREVRANGE: newest first
        learned: list[Lesson] = []
        for entry_id, fields in entries:
            self._last_id = entry_id
            if isinstance(fields, dict) and fields.get("m") != member:
                learned.extend(_decode_entry(fields.get("l")))
        if self._last_id is None:
            self._last_id = "0-0"  # an empty stream: read it from its start (ours are skipped)
        return learned


def _encode(lesson: Lesson) -> list[Any]:
    return [lesson.model, lesson.span, lesson.duration, lesson.error]


def _decode_entry(raw: object) -> list[Lesson]:
    if not isinstance(raw, str) or len(raw) > _ENTRY_BYTES:
        return []
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return []
    if not isinstance(items, list):
        return []
    lessons = []
    for item in items:
        lesson = _decode(item)
        if lesson is not None:
            lessons.append(lesson)
    return lessons


def _decode(item: object) -> Lesson | None:
    """One lesson from another process, or None when anything about it is off."""
    if not isinstance(item, list) or len(item) != 4:
        return None
    model, span, duration, error = item
    if model is not None and not (isinstance(model, str) and 0 < len(model) <= _MODEL_CHARS):
        return None
    checked: list[float | None] = []
    for value, low, high in (
        (span, 0.0, _LONGEST_S),
        (duration, 0.0, _LONGEST_S),
        (error, -1.0, 10.0),
    ):
        if value is None:
            checked.append(None)
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low <= value <= high
        ):
            checked.append(float(value))
        else:
            return None
    if checked == [None, None, None]:
        return None
    return Lesson(model, span=checked[0], duration=checked[1], error=checked[2])


__all__ = ["SharedLessons"]
