"""Reports: what a leader learned about a member's keys, on that member's Redis stream.

A leader appends one entry per batch call and owner: the keys it asked about and the gateway's
raw entries for them (the owner reads them as a reply of its own: hostile until checked), or
the keys whose job its poller ended without a terminal entry (unknown, malformed, too large,
past the deadline), each with the error's kind and message. The owner reads from the last id it
saw (no wake-up is lost, a restarted reader re-reads what was not deleted), applies, and
deletes what it applied. A stream nobody reads expires (a member dead and never claimed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._link import RedisLink


@dataclass(frozen=True, slots=True)
class Report:
    """One leader's report to one member.

    Attributes:
        keys: the keys a batch call asked about.
        data: the gateway's raw entries for them (not checked yet).
        ended: keys whose job the leader's poller ended -> (error class name, message).
        id: the stream id, once read.
    """

    keys: list[str] = field(default_factory=list)
    data: list[Any] = field(default_factory=list)
    ended: dict[str, tuple[str, str]] = field(default_factory=dict)
    id: str = field(default="", compare=False)

    def encode(self) -> str:
        """The stream entry's body."""
        return json.dumps({"k": self.keys, "d": self.data, "x": self.ended})

    @staticmethod
    def decode(entry_id: str, raw: object) -> Report | None:
        """The report in ``raw`` (another process's write), or None when its shape is off."""
        try:
            body = json.loads(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError, RecursionError):
            return None
        if not isinstance(body, dict):
            return None
        keys, data, ended = body.get("k"), body.get("d"), body.get("x")
        if not (isinstance(keys, list) and isinstance(data, list) and isinstance(ended, dict)):
            return None
        checked_ended = {
            key: (str(why[0])[:64], str(why[1])[:500])
            for key, why in ended.items()
            if isinstance(why, list) and len(why) == 2
        }
        return Report([k for k in keys if isinstance(k, str)], data, checked_ended, entry_id)


async def post_reports(link: RedisLink, reports: Mapping[str, Iterable[Report]]) -> None:
    """Append each member's reports to its stream, in one pipelined round trip."""
    if not reports:
        return
    expire_ms = round(max(60.0, 10 * link.config.member_timeout) * 1000)

    async def send(redis: Any) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for member, group in reports.items():
                stream = link.keys.reports(member)
                for report in group:
                    pipe.xadd(stream, {"b": report.encode()})
                pipe.pexpire(stream, expire_ms)
            await pipe.execute()

    await link.call(send, once=True)  # a stream entry twice would be a report twice


class Inbox:
    """One member's stream of reports."""

    def __init__(self, link: RedisLink, member_id: str) -> None:
        self._link = link
        self._stream = link.keys.reports(member_id)
        self._last_id = "0"  # from the start: whatever an earlier reader left is read again

    async def read(self, timeout: float) -> list[Report]:
        """Reports not read yet, waiting at most ``timeout`` seconds for the first one."""
        block = max(1, round(timeout * 1000))
        stream, last = self._stream, self._last_id
        reply: Any = await self._link.call(
            lambda r: r.xread({stream: last}, count=100, block=block), extra_wait=timeout
        )
        reports: list[Report] = []
        for entry_id, fields in _entries(reply):
            self._last_id = entry_id
            report = Report.decode(entry_id, fields.get("b") if isinstance(fields, dict) else None)
            if report is not None:
                reports.append(report)
        return reports

    async def ack(self, reports: Iterable[Report]) -> None:
        """Delete applied reports from the stream."""
        ids = [report.id for report in reports if report.id]
        if ids:
            stream = self._stream
            await self._link.call(lambda r: r.xdel(stream, *ids))

    async def drop(self) -> None:
        """Delete the whole stream (its member is gone)."""
        stream = self._stream
        await self._link.call(lambda r: r.delete(stream))


def _entries(reply: Any) -> list[tuple[str, Any]]:
    """XREAD's entries as ``[(id, fields), ...]`` under RESP2 and RESP3 alike."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]} (or [[entries]])
        streams = [
            value[0] if value and isinstance(value[0], list) else value for value in reply.values()
        ]
    else:
        streams = [entries for _name, entries in reply]
    return [(entry_id, fields) for entries in streams for entry_id, fields in entries]
