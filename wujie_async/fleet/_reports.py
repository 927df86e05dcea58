"""Reports: what a leader tells a member, on that member's Redis stream.

After each batch call the leader appends one :class:`Reply` per owner of keys in the call: the
keys it asked about and the gateway's raw entries for them. The owner checks the entries as it
checks its own replies (the leader does not judge for it). When the leader gives up on a key for
a reason no entry shows (the gateway kept not listing it; its entry was unreadable or too
large), it appends an :class:`Ending`; when its term starts, an :class:`Announce`. A member
reads by cursor (``XREAD BLOCK`` from the last id seen: nothing is lost to a missed wake-up)
and deletes what it applied. Reports are facts, harmless to apply twice: posting needs no fence.

A stream holds at most about 10,000 reports and expires when nobody has posted to it for a
while: a dead member's stream does not outlive it for long.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _contract
from ._keys import FleetKeys
from ._redis import RedisLink, stream_entries

_KEPT = 10_000
_KEY_CHARS = 200


@dataclass(frozen=True, slots=True)
class Reply:
    """A batch reply, for the keys of one owner.

    Attributes:
        asked: the owner's keys the call asked about (absent from ``entries``: not listed).
        entries: the gateway's raw entries for them (hostile: the owner checks them).
        id: the stream id, once read.
    """

    asked: tuple[str, ...]
    entries: list[Any]
    id: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Ending:
    """The leader gave up on ``key``.

    Attributes:
        key: the job key.
        unknown: True when the gateway kept not listing it, False when its entry was
            unreadable or too large.
        message: why, in the leader's words (to be shown through ``snippet``).
        id: the stream id, once read.
    """

    key: str
    unknown: bool
    message: str
    id: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Announce:
    """A new leader of ``shard`` asks for every key the member follows there."""

    shard: int
    id: str = field(default="", compare=False)


Report = Reply | Ending | Announce


class ReportOutbox:
    """Posts reports to their owners' streams (used by a leader)."""

    def __init__(self, redis: RedisLink, keys: FleetKeys, *, expire_after: float) -> None:
        self._redis = redis
        self._keys = keys
        self._expire_ms = round(expire_after * 1000)

    async def post(self, reports: Sequence[tuple[str, Report]]) -> None:
        """Append each ``(owner, report)`` to the owner's stream, in one round trip."""
        if not reports:
            return

        async def send(redis: Any) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for owner, report in reports:
                    stream = self._keys.reports(owner)
                    pipe.xadd(stream, {"r": _encode(report)}, maxlen=_KEPT, approximate=True)
                    pipe.pexpire(stream, self._expire_ms)
                await pipe.execute()

        await self._redis.call(send)


class ReportInbox:
    """One member's stream of reports (see the module docstring)."""

    def __init__(self, redis: RedisLink, keys: FleetKeys, member_id: str, max_bytes: int) -> None:
        self._redis = redis
        self._stream = keys.reports(member_id)
        self._max_bytes = max_bytes
        self._last_id = "0"

    def rewind(self) -> None:
        """Read from the stream's start again (Redis may have restarted: ids start over)."""
        self._last_id = "0"

    async def read(self, timeout: float) -> list[Report]:
        """Reports not read yet, waiting at most ``timeout`` seconds for the first one.

        An entry that is not a report (another process's writes) is skipped and left in place.
        """
        stream, last = self._stream, self._last_id
        reply: Any = await self._redis.call(
            lambda r: r.xread({stream: last}, count=200, block=max(1, round(timeout * 1000))),
            extra_wait=timeout,
        )
        reports: list[Report] = []
        for entry_id, fields in stream_entries(reply):
            self._last_id = entry_id
            raw = fields.get("r") if isinstance(fields, dict) else None
            fits = isinstance(raw, str) and len(raw) <= self._max_bytes
            report = _decode(raw, entry_id) if fits and isinstance(raw, str) else None
            if report is not None:
                reports.append(report)
        return reports

    async def ack(self, reports: Iterable[Report]) -> None:
        """Delete applied reports from the stream."""
        ids = [report.id for report in reports if report.id]
        if ids:
            stream = self._stream
            await self._redis.call(lambda r: r.xdel(stream, *ids))


def _encode(report: Report) -> str:
    if isinstance(report, Reply):
        return json.dumps({"asked": report.asked, "entries": report.entries})
    if isinstance(report, Announce):
        return json.dumps({"announce": report.shard})
    return json.dumps({"ended": report.key, "unknown": report.unknown, "message": report.message})


def _decode(raw: str, entry_id: str) -> Report | None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    asked, entries = body.get("asked"), body.get("entries")
    if isinstance(asked, list) and isinstance(entries, list):
        if len(asked) > _contract.MAX_KEYS_PER_BATCH or not all(
            isinstance(key, str) and len(key) <= _KEY_CHARS for key in asked
        ):
            return None
        return Reply(tuple(asked), entries, entry_id)
    key, unknown, message = body.get("ended"), body.get("unknown"), body.get("message")
    if isinstance(key, str) and len(key) <= _KEY_CHARS and isinstance(unknown, bool):
        return Ending(key, unknown, message if isinstance(message, str) else "", entry_id)
    shard = body.get("announce")
    if isinstance(shard, int) and not isinstance(shard, bool):
        return Announce(shard, entry_id)
    return None
