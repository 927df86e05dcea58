"""What the fleet's building blocks run on: its options, its Redis key names, and Redis commands.

Each block (limiter, membership, lease, registry, reports, journal) takes a :class:`RedisLink`,
which ``RedisFleet`` is, and never ``RedisFleet`` itself: no block imports it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, TypeVar

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("wujie_async.fleet needs redis-py: pip install 'wujie-async[fleet]'") from exc

logger = logging.getLogger("wujie_async.fleet")
T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a fleet's name, or None when it can."""
    if not isinstance(value, str) or not _NAME.match(value):
        return "must be 1 to 64 characters of letters, digits, '_', '.', ':' or '-' (no braces)"
    return None


def finite_number(value: object) -> TypeGuard[int | float]:
    """An int or float (not a bool: a config's True is a slip), and finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def shard_of(job_key: str, shards: int) -> int:
    """The shard of ``job_key``: the same in every process and machine (CRC-32)."""
    return zlib.crc32(job_key.encode()) % shards


class FleetKeys:
    """Every Redis key name of one fleet, with the hash tags that keep Redis Cluster happy.

    A script may only touch keys of one cluster slot, so keys one script uses together share a
    hash tag (the part between ``{`` and ``}``):

    - ``{wujie:<name>}`` (the fleet's tag): ``rate_tat`` (GCRA's theoretical arrival time,
      microseconds of Redis time) and ``rate_pause`` (present while a 429 pauses the fleet; its
      TTL is the pause); ``members`` (sorted set: member -> last heartbeat, ms of Redis time)
      and ``member_info`` (hash: member -> host, pid); ``gateway`` (hash: the members'
      gateway's ``fingerprint``, a SHA-256 of base URL and app id, and its ``base_url``);
      ``kept_out`` and ``kept_out_gateway`` (see ``_membership``); ``stats`` (hash: the
      leaders' figures); ``stepped_down`` (one per shard, sorted set: member -> ms of Redis
      time it stepped down as the shard's leader); the journal's keys, which its scripts build
      from ``journal_prefix``. Claiming a dead member's jobs reads the member list and moves
      journal rows in one script, so they share the tag.
    - ``{wujie:<name>:s<i>}`` (one per shard): ``lease`` (``"<member>|<token>"`` with a TTL)
      and ``lease_counter`` (INCR: every new lease gets a larger token); ``registered`` (hash:
      ``"<owner> <job key>"`` -> what the leader needs to poll it), ``changes`` (sorted set:
      the same fields by the version of their last change) and ``version`` (INCR: the
      registry's versions). The leader's read of the registry checks the lease in the same
      script.
    - ``{wujie:<name>:m:<member>}`` (one per member): ``reports``, the stream of a leader's
      reports to it, so the streams of a large fleet spread over the cluster.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tag = tag = "{wujie:" + name + "}"
        self.rate_tat = f"{tag}:rate:tat"
        self.rate_pause = f"{tag}:rate:pause"
        self.members = f"{tag}:members"
        self.member_info = f"{tag}:member-info"
        self.gateway = f"{tag}:gateway"
        self.kept_out = f"{tag}:kept-out"
        self.kept_out_gateway = f"{tag}:kept-out-gateway"
        self.stats = f"{tag}:stats"
        self.journal_prefix = f"{tag}:journal:"

    def stepped_down(self, shard: int) -> str:
        return f"{self.tag}:stepped-down:s{shard}"

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


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    """A fleet's options, validated: ``RedisFleet``'s arguments (its docstring says what each
    one does), the URL with its password hidden (the real one stays inside the pool)."""

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
    def config(self) -> FleetConfig: ...

    @property
    def keys(self) -> FleetKeys: ...

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
    def started(self) -> bool: ...

    async def start(self) -> object: ...

    async def aclose(self) -> None: ...
