"""SharedLessons: every member's poll schedule learns from every member's jobs.

A member's schedule learns, per model, how far real job ends fall from the gateway's
estimates, and whether the estimate is a typical figure (see ``wujie_async._schedule``). Alone,
a member with a trickle of jobs learns slowly and polls its first jobs poorly. In a fleet each
member appends what its own jobs taught (``Lesson``s) to one capped stream, and reads the
others': the fleet learns as fast as one process doing all its jobs would. A member that
joins reads the stream's recent history first, so a restarted worker starts out learned.

Entries are other processes' writes, so each is checked like a reply: a malformed entry (or
lesson) is skipped, never fatal, and what one read can hold is bounded (entries per read,
bytes and lessons per entry). A ``lessons`` key of the wrong type is logged and read as empty,
not taken for Redis being away.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._schedule import ERROR_BOUNDS, Lesson
from ._fleet import raise_failures, refused_for_its_data

if TYPE_CHECKING:
    from ._fleet import RedisFleet

logger = logging.getLogger("wujie_async.fleet")

# Entries kept in the stream: enough history for a joining member, bounded memory in Redis.
_STREAM_CAP = 1_000
# Entries one read takes; a full read is followed by another at once (``Exchange.more``).
_READ_COUNT = 50
# Entries a joining member reads first: the recent history.
_HISTORY_COUNT = 200
# One entry: at most this many lessons (a sender splits larger batches), in at most this many
# bytes of JSON (a lesson is about 40).
_LESSONS_PER_ENTRY = 200
_ENTRY_BYTES = 64 * 1024
_MODEL_CHARS = 128
_LONGEST_S = 7 * 24 * 3600.0


class Exchange:
    """What one :meth:`SharedLessons.exchange` read.

    Attributes:
        entries: the other members' lessons, one list per stream entry, oldest first.
        more: the read was full: more entries may be waiting.
    """

    __slots__ = ("entries", "more")

    def __init__(self, entries: list[list[Lesson]], more: bool) -> None:
        self.entries = entries
        self.more = more


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
        self._warned = False

    async def exchange(self, outgoing: Sequence[Lesson]) -> Exchange:
        """Append ``outgoing`` (if any) and read the other members' lessons not read yet.

        The first call reads the stream's recent history (its last ``_HISTORY_COUNT`` entries).

        Raises:
            FleetUnavailableError: Redis is away. ``outgoing`` may or may not have been
                appended (a reply lost on the way): sent again, it counts twice, which only
                weighs those jobs a little more.
        """
        stream, member, last = self._stream, self._member_id, self._last_id
        payloads = [
            json.dumps([_encode(lesson) for lesson in outgoing[i : i + _LESSONS_PER_ENTRY]])
            for i in range(0, len(outgoing), _LESSONS_PER_ENTRY)
        ]

        async def send(redis: Any) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                if last is None:
                    pipe.xrevrange(stream, count=_HISTORY_COUNT)
                else:
                    pipe.xrange(stream, min=f"({last}", count=_READ_COUNT)
                for payload in payloads:
                    fields = {"m": member, "l": payload}
                    pipe.xadd(stream, fields, maxlen=_STREAM_CAP, approximate=True)
                # A command refused comes back as its error: WRONGTYPE (the key holds another
                # type) is read as "no lessons"; any other error is Redis failing.
                result: list[Any] = await pipe.execute(raise_on_error=False)
            raise_failures(result)  # Redis failing: the member keeps its lessons
            return result

        reply = await self._fleet.call(send)
        refused = [item for item in reply if refused_for_its_data(item)]
        if refused:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "fleet %s: its lessons key %s is unusable (%s); poll schedules are learned "
                    "per member until it is deleted",
                    self._fleet.config.name,
                    stream,
                    str(refused[0])[:200],
                )
            return Exchange([], more=False)
        read = reply[0] if isinstance(reply[0], list) else []
        if last is None:
            read = read[::-1]  # XREVRANGE: newest first
        learned: list[list[Lesson]] = []
        for entry in read:
            entry_id, lessons = _read_entry(entry, member)
            if entry_id is not None:
                self._last_id = entry_id
            if lessons:
                learned.append(lessons)
        if self._last_id is None:
            self._last_id = "0-0"  # an empty stream: read it from its start (ours are skipped)
        return Exchange(learned, more=last is not None and len(read) >= _READ_COUNT)


def _encode(lesson: Lesson) -> list[Any]:
    return [lesson.model, lesson.span, lesson.duration, lesson.error]


def _read_entry(entry: object, member: str) -> tuple[str | None, list[Lesson]]:
    """(entry id, the lessons in it): nothing from an entry of ours or a malformed one."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        return None, []
    entry_id: object = entry[0]
    fields: object = entry[1]
    if not isinstance(entry_id, str):
        return None, []
    if not isinstance(fields, dict) or fields.get("m") == member:
        return entry_id, []
    raw = fields.get("l")
    if not isinstance(raw, str) or len(raw) > _ENTRY_BYTES:
        return entry_id, []
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return entry_id, []
    if not isinstance(items, list):
        return entry_id, []
    lessons = []
    for item in items[:_LESSONS_PER_ENTRY]:
        lesson = _decode(item)
        if lesson is not None:
            lessons.append(lesson)
    return entry_id, lessons


def _decode(item: object) -> Lesson | None:
    """One lesson from another process, or None when anything about it is off."""
    if not isinstance(item, list) or len(item) != 4:
        return None
    model, span, duration, error = item
    if model is not None and not (isinstance(model, str) and 0 < len(model) <= _MODEL_CHARS):
        return None
    bounds = ((0.0, _LONGEST_S), (0.0, _LONGEST_S), ERROR_BOUNDS)
    checked: list[float | None] = []
    for value, (low, high) in zip((span, duration, error), bounds, strict=True):
        if value is None:
            checked.append(None)
            continue
        number = _number(value)
        if number is None or not low <= number <= high:
            return None
        checked.append(number)
    if checked == [None, None, None]:
        return None
    return Lesson(model, span=checked[0], duration=checked[1], error=checked[2])


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None (a bool, a string, NaN, an integer too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


__all__ = ["Exchange", "SharedLessons"]
