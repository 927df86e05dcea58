"""Every Redis key name of a fleet, in one place, with the hash tags that keep Redis Cluster happy.

A script may only touch keys of one cluster slot, so keys one script uses together share a hash
tag (the part between ``{`` and ``}``):

- ``{wujie:<name>}`` (the fleet's tag): the rate limiter, the member list, the fleet's figures
  and the journal (claiming a dead member's jobs reads the member list and moves journal rows
  in one script);
- ``{wujie:<name>:s<i>}`` (one per shard): a shard's leader lease and its key registry, so the
  leader's read of the registry checks the lease in the same script;
- ``{wujie:<name>:m:<member>}`` (one per member): that member's report stream, so the streams
  of a large fleet spread over the cluster.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a fleet's name, or None when it can."""
    if not isinstance(value, str) or not _NAME.match(value):
        return "must be 1 to 64 characters of letters, digits, '_', '.', ':' or '-' (no braces)"
    return None


def shard_of(job_key: str, shards: int) -> int:
    """The shard of ``job_key``: the same in every process and machine (CRC-32)."""
    return zlib.crc32(job_key.encode()) % shards


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """The Redis key names of one fleet.

    Under the fleet's tag: ``rate_tat`` (GCRA's theoretical arrival time, microseconds of
    Redis time) and ``rate_pause`` (present while a 429 pauses the fleet; its TTL is the
    pause); ``members`` (sorted set: member -> last heartbeat, ms of Redis time) and
    ``member_info`` (hash: member -> host, pid); ``gateway`` (hash: the members' gateway's
    ``fingerprint``, a SHA-256 of base URL and app id, and its ``base_url``); ``stats``
    (hash: the leaders' figures); ``stepped_down`` (one per shard, sorted set: member -> ms
    of Redis time it stepped down as the shard's leader); the journal's keys, which its
    scripts build from ``journal_prefix``.

    Per shard: ``lease`` (``"<member>|<token>"`` with a TTL) and ``lease_counter`` (INCR:
    every new lease gets a larger token); ``registered`` (hash: ``"<owner> <job key>"`` ->
    what the leader needs to poll it), ``changes`` (sorted set: the same fields by the
    version of their last change) and ``version`` (INCR: the registry's versions).

    Per member: ``reports``, the stream of a leader's reports to it.
    """

    name: str

    @property
    def tag(self) -> str:
        return "{wujie:" + self.name + "}"

    @property
    def rate_tat(self) -> str:
        return f"{self.tag}:rate:tat"

    @property
    def rate_pause(self) -> str:
        return f"{self.tag}:rate:pause"

    @property
    def members(self) -> str:
        return f"{self.tag}:members"

    @property
    def member_info(self) -> str:
        return f"{self.tag}:member-info"

    @property
    def gateway(self) -> str:
        return f"{self.tag}:gateway"

    @property
    def kept_out(self) -> str:
        return f"{self.tag}:kept-out"

    @property
    def kept_out_gateway(self) -> str:
        return f"{self.tag}:kept-out-gateway"

    def stepped_down(self, shard: int) -> str:
        return f"{self.tag}:stepped-down:s{shard}"

    @property
    def stats(self) -> str:
        return f"{self.tag}:stats"

    @property
    def journal_prefix(self) -> str:
        return f"{self.tag}:journal:"

    def _shard(self, shard: int, what: str) -> str:
        return "{wujie:" + f"{self.name}:s{shard}" + "}:" + what

    def lease(self, shard: int) -> str:
        return self._shard(shard, "lease")

    def lease_counter(self, shard: int) -> str:
        return self._shard(shard, "lease:token")

    def registered(self, shard: int) -> str:
        return self._shard(shard, "keys")

    def changes(self, shard: int) -> str:
        return self._shard(shard, "changes")

    def version(self, shard: int) -> str:
        return self._shard(shard, "version")

    def reports(self, member: str) -> str:
        return "{wujie:" + f"{self.name}:m:{member}" + "}:reports"
