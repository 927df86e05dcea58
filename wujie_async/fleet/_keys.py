"""Every Redis key name of a fleet, in one place, with the hash tags that keep Redis Cluster happy.

A script may only touch keys of one cluster slot, so keys that one script uses together share a
hash tag (the part between ``{`` and ``}``):

- ``{wujie:<name>}`` (the fleet tag): the rate limiter, the member list and the journal. Claiming
  a dead member's jobs reads the member list and moves journal rows in one atomic script.
- ``{wujie:<name>:s<i>}`` (one tag per shard): a shard's leader lease, its fencing counter and
  its key registry, so taking due keys can check the lease token in the same script.
- ``{wujie:<name>:m:<member>}`` (one tag per member): that member's report stream, so the
  streams of a large fleet spread over the cluster.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_NAME_RULE = "1 to 64 characters of letters, digits, '_', '.', ':' or '-' (no braces)"


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a fleet or member name, or None when it can."""
    if not isinstance(value, str) or not _NAME.match(value):
        return f"must be {_NAME_RULE}"
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

    # --- rate limiter (fleet tag) ------------------------------------------------------------
    @property
    def rate_tat(self) -> str:
        """GCRA's theoretical arrival time, in microseconds of Redis server time."""
        return f"{self.tag}:rate:tat"

    @property
    def rate_pause(self) -> str:
        """Present while the fleet is paused (a 429 with Retry-After); its TTL is the pause."""
        return f"{self.tag}:rate:pause"

    # --- membership (fleet tag) ----------------------------------------------------------------
    @property
    def members(self) -> str:
        """Sorted set: member id -> last heartbeat (Redis server time, milliseconds)."""
        return f"{self.tag}:members"

    @property
    def member_info(self) -> str:
        """Hash: member id -> JSON (host, pid, started)."""
        return f"{self.tag}:member-info"

    @property
    def stats(self) -> str:
        """Hash: fleet-wide counters (``batch_calls``, ``keys_polled``) kept by the leaders."""
        return f"{self.tag}:stats"

    @property
    def lessons(self) -> str:
        """Stream: what members' poll schedules learned from ended jobs (capped)."""
        return f"{self.tag}:lessons"

    # --- journal (fleet tag) -------------------------------------------------------------------
    @property
    def journal_prefix(self) -> str:
        """Prefix of every journal key; the journal's scripts build the rest from it."""
        return f"{self.tag}:journal:"

    # --- shards --------------------------------------------------------------------------------
    def shard_tag(self, shard: int) -> str:
        """The hash tag of one shard."""
        return "{wujie:" + f"{self.name}:s{shard}" + "}"

    def lease(self, shard: int) -> str:
        """The shard's leader lease: ``"<member>|<token>"`` with a TTL."""
        return f"{self.shard_tag(shard)}:lease"

    def lease_counter(self, shard: int) -> str:
        """The shard's fencing counter (INCR): every new lease gets a larger token."""
        return f"{self.shard_tag(shard)}:lease:token"

    def due(self, shard: int) -> str:
        """Sorted set: job key -> when it is next due for a poll (server time, milliseconds)."""
        return f"{self.shard_tag(shard)}:due"

    def owners(self, shard: int) -> str:
        """Hash: job key -> the member whose job it is (who gets its reports)."""
        return f"{self.shard_tag(shard)}:owners"

    # --- members' report streams ---------------------------------------------------------------
    def reports(self, member: str) -> str:
        """The stream of poll reports addressed to ``member``."""
        return "{wujie:" + f"{self.name}:m:{member}" + "}:reports"
