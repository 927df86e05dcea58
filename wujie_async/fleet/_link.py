"""What the fleet's building blocks run on: its options, its key names, and Redis commands.

Each block (limiter, membership, lease, registry, reports, journal) takes a :class:`RedisLink`,
which ``RedisFleet`` is, and never ``RedisFleet`` itself: no block imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("wujie_async.fleet needs redis-py: pip install 'wujie-async[fleet]'") from exc

from ._keys import FleetKeys

logger = logging.getLogger("wujie_async.fleet")
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    """A fleet's options, validated (see :class:`RedisFleet` for what each one does).

    Attributes:
        url: the Redis URL with its password hidden (the real one stays inside the pool).
        name: the fleet's name: every member of one fleet uses the same one.
        member_timeout: seconds without a heartbeat after which a member is dead.
        lease_seconds: how long a shard's leader lease lasts without a renewal.
        shards: how many shards (each with its own leader lease and key registry).
        command_timeout: the deadline of one Redis command (blocking reads add their wait).
        unavailable_wait: how long a submit waits for an unreachable Redis before it raises
            FleetUnavailableError, nothing sent.
        cluster: whether ``url`` is one node of a Redis Cluster.
        batch_wait: how long the leader lets a call that is not full wait for keys coming due.
    """

    url: str
    name: str
    member_timeout: float
    lease_seconds: float
    shards: int
    command_timeout: float
    unavailable_wait: float = 10.0
    cluster: bool = False
    batch_wait: float = 0.25

    @property
    def heartbeat_interval(self) -> float:
        """A member heartbeats three times per ``member_timeout``."""
        return self.member_timeout / 3


def refused_for_its_data(error: BaseException) -> bool:
    """A command refused for the key's data (the wrong type, a counter that is not an
    integer): that key is garbled, Redis works, and trying again will not help. redis-py
    prefixes the command, and ``RedisFleet.call`` the URL; the code stays in the text."""
    text = str(error)
    return "WRONGTYPE" in text or "not an integer" in text


class RedisLink(Protocol):
    """A started fleet's Redis, as a building block uses it."""

    @property
    def config(self) -> FleetConfig:
        """The fleet's options."""
        ...

    @property
    def keys(self) -> FleetKeys:
        """The fleet's Redis key names."""
        ...

    async def call(
        self,
        op: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        extra_wait: float = 0.0,
        once: bool = False,
    ) -> T:
        """Run ``op`` within the command deadline (raises FleetUnavailableError); ``once``:
        ``op`` is not asked again after a dropped connection (it is not idempotent)."""
        ...


# Lua: Redis server time in milliseconds, the fleet's one clock (machines' clocks do not
# matter). Scripts that need it start with this.
REDIS_MS = """
local function redis_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


class Script:
    """A Lua script of a fleet, run with EVALSHA through the link's deadline and errors."""

    __slots__ = ("_bound_to", "_link", "_lua", "_script")

    def __init__(self, link: RedisLink, lua: str) -> None:
        self._link = link
        self._lua = lua
        self._script: Any = None
        self._bound_to: aioredis.Redis | None = None

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """Run the script on ``keys`` with ``args``; its reply as redis-py decodes it."""

        async def run(redis: aioredis.Redis) -> Any:
            if self._bound_to is not redis:  # a restarted fleet has a new pool
                self._script = redis.register_script(self._lua)
                self._bound_to = redis
            return await self._script(keys=list(keys), args=list(args))

        return await self._link.call(run)

    async def load(self) -> None:
        """Load the script into Redis now: its next run is one EVALSHA, with no NOSCRIPT
        round trip (Redis forgets scripts when it restarts)."""
        lua = self._lua
        await self._link.call(lambda redis: redis.script_load(lua))


async def stop_task(task: asyncio.Task[Any], within: float) -> None:
    """Cancel one of the fleet's background tasks and wait for it, ``within`` seconds at most.

    A cancel that lands just as a redis-py command completes can be lost inside the client
    library, so the task is cancelled again every 0.1 s while it runs. A task still running at
    the deadline (only a bug gets there: its Redis command has a deadline of its own) is left
    behind with a WARNING rather than hanging ``aclose()``. ``asyncio.wait`` neither raises
    the task's error nor swallows the caller's own cancellation.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            logger.warning("fleet task %s did not stop when cancelled; left behind", task)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, left))


class FleetConnection(RedisLink, Protocol):
    """A fleet's Redis with its lifecycle: what a member needs to connect it when it starts."""

    @property
    def started(self) -> bool:
        """True while connected."""
        ...

    async def start(self) -> object:
        """Connect (raises FleetUnavailableError)."""
        ...

    async def aclose(self) -> None:
        """Disconnect."""
        ...
