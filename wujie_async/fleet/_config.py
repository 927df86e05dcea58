"""FleetConfig: a fleet's options, validated (``RedisFleet`` checks them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    """A fleet's options, validated (see :class:`RedisFleet` for each).

    Attributes:
        url: the Redis URL with its password hidden (the real one stays inside the pool).
        name: the fleet's name.
        member_timeout: seconds without a heartbeat after which a member is dead.
        lease_seconds: how long a shard's leader lease lasts without a renewal.
        shards: how many shards, each with its own leader.
        command_timeout: the deadline of one Redis command.
        unavailable_wait: how long a submit waits for an unreachable Redis.
        cluster: whether ``url`` is one node of a Redis Cluster.
    """

    url: str
    name: str
    member_timeout: float
    lease_seconds: float
    shards: int
    command_timeout: float
    unavailable_wait: float = 10.0
    cluster: bool = False

    @property
    def member_beat(self) -> float:
        """How often a member heartbeats: every second, or every third of ``member_timeout``."""
        return min(1.0, self.member_timeout / 3)
