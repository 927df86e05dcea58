"""Every Redis key name of a fleet, in one place, with the hash tags that keep Redis Cluster happy.

A script may only touch keys of one cluster slot, so keys that one script uses together share a
hash tag (the part between ``{`` and ``}``):

- ``{wujie:<name>}`` (the fleet tag): the rate limiter, the member list, the fleet's figures and
  the journal (claiming a dead member's jobs reads the member list and moves journal rows in
  one atomic script);
- ``{wujie:<name>:s<i>}`` (one per shard): a shard's leader lease and its log of keys;
- ``{wujie:<name>:m:<member>}`` (one per member): that member's report stream.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a fleet name, or None when it can."""
    if not isinstance(value, str) or not _NAME.match(value):
        return "must be 1 to 64 characters of letters, digits, '_', '.', ':' or '-' (no braces)"
    return None


def shard_of(job_key: str, shards: int) -> int:
    """The shard that owns ``job_key``: stable across processes and machines (CRC-32)."""
    return zlib.crc32(job_key.encode()) % shards


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """The Redis key names of one fleet."""

    name: str

    @property
    def tag(self) -> str:
        """The fleet-wide hash tag."""
        return "{wujie:" + self.name + "}"

    @property
    def rate_tat(self) -> str:
        """The rate limiter's theoretical arrival time (microseconds of Redis time)."""
        return f"{self.tag}:rate:tat"

    @property
    def rate_pause(self) -> str:
        """Present while the fleet is paused (a 429 with Retry-After); its TTL is the pause."""
        return f"{self.tag}:rate:pause"

    @property
    def members(self) -> str:
        """Sorted set: member id -> last heartbeat (Redis time, milliseconds)."""
        return f"{self.tag}:members"

    @property
    def stats(self) -> str:
        """Hash: fleet-wide counters (``batch_calls``, ``keys_polled``) kept by the leaders."""
        return f"{self.tag}:stats"

    @property
    def journal_prefix(self) -> str:
        """Prefix of every journal key; the journal's scripts build the rest from it."""
        return f"{self.tag}:journal:"

    def shard_tag(self, shard: int) -> str:
        """The hash tag of one shard."""
        return "{wujie:" + f"{self.name}:s{shard}" + "}"

    def lease(self, shard: int) -> str:
        """The shard's leader lease: ``"<member>|<token>"`` with a TTL."""
        return f"{self.shard_tag(shard)}:lease"

    def lease_counter(self, shard: int) -> str:
        """The shard's token counter (INCR): every new lease gets a larger token."""
        return f"{self.shard_tag(shard)}:lease:token"

    def keys_log(self, shard: int) -> str:
        """Stream: which member follows which key of the shard, and leaders' terms."""
        return f"{self.shard_tag(shard)}:keys"

    def reports(self, member: str) -> str:
        """The stream of poll reports addressed to ``member``."""
        return "{wujie:" + f"{self.name}:m:{member}" + "}:reports"
