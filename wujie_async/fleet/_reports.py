"""Report delivery: the leader's poll results, posted to each owning member on a Redis stream.

Each member has one stream. The leader appends (``XADD``) a report per job key it polled; the
member reads with ``XREAD BLOCK`` from the last id it has seen, with a bounded wait, and
deletes (``XDEL``) what it has applied. Reading by id cursor means no lost wake-ups: a report
added while nobody was blocked is still read next time, and a member that restarts its inbox
under the same id (or a member that claimed a dead one) re-reads whatever was not deleted.

Reports are facts from the gateway (the batch entry of a key), so applying one twice is
harmless; that is why posting them is not fenced by the lease.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fleet import RedisFleet


@dataclass(frozen=True, slots=True)
class Report:
    """One poll result for one job key.

    Attributes:
        job_key: the key the report is about.
        body: the batch entry as the gateway sent it (hostile: the reader validates it), or
            any JSON object the leader wants to tell (e.g. ``{"absent": true}``).
        id: the stream id, set on reports that were read (empty before posting).
    """

    job_key: str
    body: Mapping[str, Any]
    id: str = field(default="", compare=False)


class ReportOutbox:
    """Posts reports to their owners' streams (used by a leader)."""

    def __init__(self, fleet: RedisFleet) -> None:
        self._fleet = fleet

    async def post(self, reports: Iterable[tuple[str, Report]]) -> int:
        """Append each ``(owner, report)`` to the owner's stream in one pipelined round trip.

        Returns:
            How many reports were posted.
        """
        by_owner: dict[str, list[Report]] = defaultdict(list)
        for owner, report in reports:
            by_owner[owner].append(report)
        if not by_owner:
            return 0
        keys = self._fleet.keys

        async def send(redis: Any) -> int:
            async with redis.pipeline(transaction=False) as pipe:
                for owner, group in by_owner.items():
                    stream = keys.reports(owner)
                    for report in group:
                        pipe.xadd(stream, {"k": report.job_key, "b": json.dumps(report.body)})
                return len(await pipe.execute())

        return await self._fleet.call(send)


class ReportInbox:
    """One member's stream of reports (see the module docstring).

    Args:
        fleet: the started fleet.
        member_id: whose reports to read.
    """

    def __init__(self, fleet: RedisFleet, member_id: str) -> None:
        self._fleet = fleet
        self.member_id = member_id
        self._stream = fleet.keys.reports(member_id)
        self._last_id = "0"  # from the start: whatever an earlier reader left is re-read

    async def read(self, timeout: float, *, count: int = 500) -> list[Report]:
        """Reports not read yet, waiting at most ``timeout`` seconds for the first one.

        Returns:
            Up to ``count`` reports, oldest first; empty when none came within ``timeout``.
        """
        block = max(1, round(timeout * 1000)) if timeout > 0 else None
        stream, last = self._stream, self._last_id
        reply: Any = await self._fleet.call(
            lambda r: r.xread({stream: last}, count=count, block=block),
            extra_wait=max(0.0, timeout),
        )
        reports: list[Report] = []
        for _, entries in _stream_entries(reply):
            for entry_id, fields in entries:
                self._last_id = entry_id
                try:
                    body = json.loads(fields["b"])
                    key = fields["k"]
                except (KeyError, TypeError, ValueError, RecursionError):
                    continue  # not ours to read; skipped, left in place for a human
                if isinstance(body, dict) and isinstance(key, str):
                    reports.append(Report(key, body, entry_id))
        return reports

    async def ack(self, reports: Iterable[Report]) -> int:
        """Delete applied reports from the stream. Returns how many were deleted."""
        ids = [report.id for report in reports if report.id]
        if not ids:
            return 0
        stream = self._stream
        deleted: int = await self._fleet.call(lambda r: r.xdel(stream, *ids))
        return deleted

    async def pending(self) -> int:
        """How many reports the stream holds (read or not, but not acknowledged)."""
        stream = self._stream
        length: int = await self._fleet.call(lambda r: r.xlen(stream))
        return length

    async def drop(self) -> None:
        """Delete the whole stream (after a claimer has applied a dead member's reports)."""
        stream = self._stream
        await self._fleet.call(lambda r: r.delete(stream))


def _stream_entries(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """XREAD's reply as ``[(stream, [(id, fields), ...])]`` under RESP2 and RESP3 alike."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]} (or [[entries]])
        return [
            (name, value[0] if value and isinstance(value[0], list) else value)
            for name, value in reply.items()
        ]
    return [(name, entries) for name, entries in reply]
