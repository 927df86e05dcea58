"""What members and leaders tell each other through Redis: the key registry (member to
leader) and the report streams (leader to member).

KeyRegistry: the fleet's outstanding keys, who owns each, and what a leader needs to ask. Per
shard (CRC-32 of the job key), under the shard's hash tag, a hash maps ``"<owner> <job key>"``
to a :class:`KeyInfo`, and a sorted set holds the same fields scored by the version of their
last change (an INCR counter). A key with two owners (attached by two members, or claimed from
a member that was only frozen) has two fields; its reports go to both. Members add their keys
and remove them when their jobs end. A leader reads the whole shard when it starts leading,
then the changes after the last version it read. A removed field stays in the sorted set until
a leader has read it; that read deletes it, fenced by the leader's lease.

Reports: a leader appends one entry per batch call and owner to the owner's stream: the keys
it asked about and the gateway's raw entries for them (the owner reads them as a reply of its
own: hostile until checked), or the keys whose job its poller ended without a terminal entry
(unknown, malformed, too large, past the deadline), each with the error's kind and message.
The owner reads from the last id it saw (no wake-up is lost, a restarted reader re-reads what
was not deleted), applies, and deletes what it applied. A stream nobody reads expires (a
member dead and never claimed).

Fields, infos and reports are other processes' writes: one that does not parse is skipped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import JobProtocolError, JobTimeoutError, UnknownJobError
from ._errors import LeaseLostError
from ._link import RedisLink, Script, finite_number, shard_of

# KEYS: registered, changes, version. ARGV: field1, info1, ... (an empty info removes).
_WRITE = """
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[i])
end
return #ARGV / 2
"""
# KEYS: lease, registered, changes, version. ARGV: fence, after ('' = everything), limit.
# Reply: false when the fence is stale, else {version read, field1, info1, ...} ('' = removed).
_READ = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local reply = {0}
if ARGV[2] == '' then
  reply[1] = tonumber(redis.call('GET', KEYS[4]) or '0')
  for _, item in ipairs(redis.call('HGETALL', KEYS[2])) do reply[#reply + 1] = item end
  for _, field in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if redis.call('HEXISTS', KEYS[2], field) == 0 then redis.call('ZREM', KEYS[3], field) end
  end
  return reply
end
reply[1] = tonumber(ARGV[2])
local rows = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf', 'WITHSCORES',
                        'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #rows, 2 do
  local info = redis.call('HGET', KEYS[2], rows[i])
  if not info then
    info = ''
    redis.call('ZREM', KEYS[3], rows[i])
  end
  reply[1] = tonumber(rows[i + 1])
  reply[#reply + 1] = rows[i]
  reply[#reply + 1] = info
end
return reply
"""
_MODEL_CHARS = 128
READ_LIMIT = 2000  # changes one read returns at most (a full read: more may be waiting)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a leader needs to poll a key, in unix time (member clocks, within their skew).

    Attributes:
        submitted: when the owner started tracking it.
        first_delay: seconds from then to the first ask (None: the leader's poll policy's).
        deadline: when the owner gives the job up.
        model: the request's model (None: unknown); the schedule learns per model.
    """

    submitted: float
    first_delay: float | None
    deadline: float
    model: str | None

    def encode(self) -> str:
        return json.dumps([self.submitted, self.first_delay, self.deadline, self.model])

    @staticmethod
    def decode(raw: object) -> KeyInfo | None:
        """The info in ``raw`` (another process's write), or None when anything is off."""
        try:
            submitted, first_delay, deadline, model = json.loads(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError, RecursionError):
            return None
        if not (finite_number(submitted) and finite_number(deadline)):
            return None
        if first_delay is not None and not (finite_number(first_delay) and first_delay >= 0):
            return None
        if model is not None and not (isinstance(model, str) and len(model) <= _MODEL_CHARS):
            return None
        return KeyInfo(float(submitted), first_delay, float(deadline), model)


@dataclass(frozen=True, slots=True)
class Change:
    """One field of the registry as a leader reads it.

    Attributes:
        owner: the member whose job it is.
        job_key: the gateway's key.
        info: what to poll it with; None: this owner removed it.
    """

    owner: str
    job_key: str
    info: KeyInfo | None


class KeyRegistry:
    """The fleet's registry of outstanding keys (see the module docstring)."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._write = Script(link, _WRITE)
        self._read = Script(link, _READ)

    async def write(self, entries: Iterable[tuple[str, str, KeyInfo | None]]) -> None:
        """Add (with its info) or remove (None) each ``(owner, job key, info)``, in order."""
        keys, shards = self._link.keys, self._link.config.shards
        by_shard: dict[int, list[str]] = defaultdict(list)
        for owner, job_key, info in entries:
            encoded = info.encode() if info is not None else ""
            by_shard[shard_of(job_key, shards)] += [f"{owner} {job_key}", encoded]
        for shard, args in by_shard.items():
            await self._write(
                (keys.registered(shard), keys.changes(shard), keys.version(shard)), args
            )

    async def read(
        self, shard: int, fence: str, after: int | None, *, limit: int = READ_LIMIT
    ) -> tuple[int, list[Change]]:
        """As ``shard``'s leader: every field (``after`` None), or the changes after a version.

        Returns:
            The version read up to (the next ``after``), and the fields, oldest change first;
            with ``after``, at most ``limit`` of them (a full read: more may be waiting).

        Raises:
            LeaseLostError: ``fence`` is not the shard's lease any more.
        """
        keys = self._link.keys
        reply: Any = await self._read(
            (keys.lease(shard), keys.registered(shard), keys.changes(shard), keys.version(shard)),
            (fence, "" if after is None else after, limit),
        )
        if not reply:
            raise LeaseLostError(f"shard {shard}: the lease is not {fence!r} any more", shard=shard)
        changes = []
        for i in range(1, len(reply) - 1, 2):
            owner, _, job_key = str(reply[i]).partition(" ")
            info = KeyInfo.decode(reply[i + 1]) if reply[i + 1] else None
            if owner and job_key and (info is not None or not reply[i + 1]):
                changes.append(Change(owner, job_key, info))
        return int(reply[0]), changes


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


# The errors of a shadow that its owners learn from the leader (a report's ``ended``, by class
# name), as a terminal entry they read themselves would end their job.
VERDICTS: dict[str, type[UnknownJobError | JobProtocolError | JobTimeoutError]] = {
    cls.__name__: cls for cls in (UnknownJobError, JobProtocolError, JobTimeoutError)
}


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
