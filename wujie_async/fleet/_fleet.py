"""RedisFleet: the fleet's configuration and its one Redis connection pool.

It validates the options before anything touches the network, connects (a typed
:class:`FleetUnavailableError` naming the URL when Redis cannot be reached), checks at start-up
how durable Redis is (AOF) and warns when a Redis restart could lose the fleet's journal, and
runs every Redis command of the fleet with a deadline, translating Redis' errors in this one
place. The building blocks (limiter, membership, lease, registry, reports, journal) are made
from it with its factory methods and share its pool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from .._errors import ClientStateError, InvalidRequestError
from ._errors import FleetUnavailableError
from ._keys import FleetKeys, name_problem

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisClusterException, RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("wujie_async.fleet needs redis-py: pip install 'wujie-async[fleet]'") from exc

if TYPE_CHECKING:
    from ._journal import RedisJournal
    from ._lease import LeaderLease
    from ._lessons import SharedLessons
    from ._limiter import FleetLimiter
    from ._membership import Membership
    from ._registry import KeyRegistry
    from ._reports import ReportInbox, ReportOutbox

logger = logging.getLogger("wujie_async.fleet")
T = TypeVar("T")


def refused_for_its_data(item: object) -> bool:
    """True for a command's error that says the key's data is not what the fleet wrote (the
    wrong type, or a counter that is not an integer): Redis works, that key does not. Any
    other error is Redis failing.

    redis-py prefixes a pipeline command's error with the command; the code stays inside.
    """
    text = str(item) if isinstance(item, ResponseError) else ""
    return "WRONGTYPE" in text or "not an integer" in text


def raise_failures(results: list[Any]) -> None:
    """Raise the first error in a pipeline's ``raise_on_error=False`` results that is Redis
    failing (``call`` turns it into FleetUnavailableError); leave data refusals in place."""
    for item in results:
        if isinstance(item, BaseException) and not refused_for_its_data(item):
            if isinstance(item, RedisError):
                raise item
            raise RedisError(type(item).__name__)


_SCHEMES = ("redis", "rediss", "unix")


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    """A fleet's options, validated.

    Attributes:
        url: the Redis URL with its password hidden (the real one stays inside the pool).
        name: the fleet's name: every member of one fleet uses the same one.
        member_timeout: seconds without a heartbeat after which a member is dead.
        lease_seconds: how long a shard's leader lease lasts without a renewal.
        shards: how many shards (each with its own leader lease and key registry).
        command_timeout: the deadline of one Redis command (blocking reads add their wait).
        unavailable_wait: how long a submit waits for an unreachable Redis (its rate slot,
            its journal intent) before it raises FleetUnavailableError, nothing sent.
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
    def heartbeat_interval(self) -> float:
        """A member heartbeats three times per ``member_timeout``."""
        return self.member_timeout / 3


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetDurability:
    """What Redis said about its persistence at start-up (None: it would not say).

    Attributes:
        appendonly: whether the append-only file (AOF) is on.
        appendfsync: ``always``, ``everysec`` or ``no``.
        maxmemory_policy: what Redis evicts when memory runs out (``allkeys-*`` is unsafe).
        warning: the warning(s) that were logged, or None when the setup is durable.
    """

    appendonly: bool | None
    appendfsync: str | None
    maxmemory_policy: str | None
    warning: str | None


class RedisFleet:
    """A fleet of wujie_async clients sharing one Redis.

    Args:
        url: ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``).
        name: the fleet's name; members with the same name share limits, poller and journal.
        member_timeout: seconds without a heartbeat after which a member counts as dead and
            its jobs may be claimed; members heartbeat every third of it.
        lease_seconds: the validity of a shard's leader lease; a dead leader is replaced
            within about this long.
        shards: how many independent leader leases and key registries the keys are split over.
        command_timeout: deadline of one Redis command.
        unavailable_wait: how long a submit waits for Redis to come back (for its fleet-wide
            rate slot and its journal intent) before raising ``FleetUnavailableError``; nothing
            is sent meanwhile.
        cluster: ``url`` is one node of a Redis Cluster (``redis://`` or ``rediss://``): the
            fleet connects with redis-py's ``RedisCluster``, which finds the other nodes.
            Every script's keys share one hash tag, so each runs on one node; the fleet's
            own keys spread over the cluster by tag (the fleet's, one per shard, one per
            member's report stream). The durability check reads the node it lands on.

    Raises:
        InvalidRequestError: an option breaks its rule (nothing is contacted).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        member_timeout: float = 30.0,
        lease_seconds: float = 5.0,
        shards: int = 1,
        command_timeout: float = 5.0,
        unavailable_wait: float = 10.0,
        cluster: bool = False,
    ) -> None:
        problems: list[tuple[str, str]] = []
        if not isinstance(url, str) or urlsplit(url).scheme not in _SCHEMES:
            problems.append(("url", "must be a redis://, rediss:// or unix:// URL"))
        if (problem := name_problem(name)) is not None:
            problems.append(("name", problem))
        for field, value in (
            ("member_timeout", member_timeout),
            ("lease_seconds", lease_seconds),
            ("command_timeout", command_timeout),
            ("unavailable_wait", unavailable_wait),
        ):
            if not _positive(value):
                problems.append((field, "must be a positive finite number of seconds"))
        if not isinstance(cluster, bool):
            problems.append(("cluster", "must be True or False"))
        elif cluster and isinstance(url, str) and urlsplit(url).scheme == "unix":
            problems.append(("url", "a Redis Cluster is reached by redis:// or rediss://"))
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 1024:
            problems.append(("shards", "must be an integer from 1 to 1024"))
        if problems:
            raise InvalidRequestError(problems)
        self.config = FleetConfig(
            url=redact(url),
            name=name,
            member_timeout=float(member_timeout),
            lease_seconds=float(lease_seconds),
            shards=shards,
            command_timeout=float(command_timeout),
            unavailable_wait=float(unavailable_wait),
            cluster=cluster,
        )
        self.keys = FleetKeys(name)
        self.durability: FleetDurability | None = None
        self._url = url
        self._redis: aioredis.Redis | None = None

    def __repr__(self) -> str:
        return f"RedisFleet({self.config.url!r}, name={self.config.name!r})"

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`aclose`."""
        return self._redis is not None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> FleetDurability:
        """Connect, check that Redis answers, and check its durability.

        Raises:
            FleetUnavailableError: Redis did not answer within ``command_timeout``.
        """
        if self._redis is not None:
            raise ClientStateError(f"{self!r} is already started")
        timeout = self.config.command_timeout
        redis: aioredis.Redis
        if self.config.cluster:
            # RedisCluster offers every command and script call the fleet makes, routed by
            # key; typed as Redis so that one set of call sites serves both.
            redis = cast(
                "aioredis.Redis",
                aioredis.RedisCluster.from_url(
                    self._url, decode_responses=True, socket_connect_timeout=timeout
                ),
            )
        else:
            redis = aioredis.from_url(
                self._url, decode_responses=True, socket_connect_timeout=timeout
            )
        self._redis = redis
        try:
            await self.call(lambda r: r.ping())
            self.durability = await self._check_durability()
        except BaseException:
            self._redis = None
            await redis.aclose()
            raise
        return self.durability

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

    async def __aenter__(self) -> RedisFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- running commands ----------------------------------------------------------------------
    async def call(
        self, op: Callable[[aioredis.Redis], Awaitable[T]], *, extra_wait: float = 0.0
    ) -> T:
        """Run ``op`` on the pool with a deadline of ``command_timeout + extra_wait``.

        Raises:
            FleetUnavailableError: Redis is unreachable, failed, or missed the deadline.
            ClientStateError: the fleet is not started.
        """
        redis = self._redis
        if redis is None:
            raise ClientStateError(f"{self!r} is not started (use `async with` or start())")
        try:
            async with asyncio.timeout(self.config.command_timeout + extra_wait):
                return await op(redis)
        except TimeoutError:
            raise FleetUnavailableError(
                f"Redis at {self.config.url} did not answer within "
                f"{self.config.command_timeout + extra_wait:g}s",
                url=self.config.url,
            ) from None
        except (RedisError, RedisClusterException, OSError) as exc:
            # `from None`: redis-py's exceptions can carry the connection (and its password).
            raise FleetUnavailableError(
                f"Redis at {self.config.url} failed: {type(exc).__name__}: {exc}",
                url=self.config.url,
            ) from None

    def script(self, lua: str) -> FleetScript:
        """A Lua script of this fleet, run with EVALSHA (loaded on first use)."""
        return FleetScript(self, lua)

    async def stop_task(self, task: asyncio.Task[Any]) -> None:
        """Cancel one of the fleet's background tasks and wait for it, within a deadline.

        A cancel that lands just as a redis-py command completes can be lost inside the client
        library, so the task is cancelled again every 0.1 s while it runs. Every wait has a
        deadline, shutdown included: a task still running after ``command_timeout`` plus a
        second (its Redis command has a deadline of its own, so only a bug gets here) is left
        behind with a WARNING rather than hanging ``aclose()``. ``asyncio.wait`` neither raises
        the task's error nor swallows the caller's own cancellation.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.command_timeout + 1.0
        while not task.done():
            left = deadline - loop.time()
            if left <= 0:
                logger.warning("fleet task %s did not stop when cancelled; left behind", task)
                return
            task.cancel()
            await asyncio.wait({task}, timeout=min(0.1, left))

    # --- factories -----------------------------------------------------------------------------
    def new_member_id(self) -> str:
        """A member id unique across machines: host, pid and a random suffix."""
        host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
        return f"{host[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def limiter(self, rate: float) -> FleetLimiter:
        """The fleet-wide limiter of ``rate`` acquisitions per second (see FleetLimiter)."""
        from ._limiter import FleetLimiter

        return FleetLimiter(self, rate)

    def membership(self, member_id: str | None = None) -> Membership:
        """This process's membership (a new member id unless one is given)."""
        from ._membership import Membership

        return Membership(self, member_id or self.new_member_id())

    def lease(self, shard: int, member_id: str) -> LeaderLease:
        """The leader lease of ``shard`` as seen by ``member_id``."""
        from ._lease import LeaderLease

        return LeaderLease(self, shard, member_id)

    def registry(self) -> KeyRegistry:
        """The fleet's registry of outstanding keys and their due times."""
        from ._registry import KeyRegistry

        return KeyRegistry(self)

    def outbox(self) -> ReportOutbox:
        """Where a leader posts poll reports to members."""
        from ._reports import ReportOutbox

        return ReportOutbox(self)

    def inbox(self, member_id: str) -> ReportInbox:
        """The report stream of ``member_id``, read by that member."""
        from ._reports import ReportInbox

        return ReportInbox(self, member_id)

    def lessons(self, member_id: str) -> SharedLessons:
        """The fleet's shared poll-schedule lessons, read and written as ``member_id``."""
        from ._lessons import SharedLessons

        return SharedLessons(self, member_id)

    def journal(self, member_id: str) -> RedisJournal:
        """The fleet's journal, writing as ``member_id``."""
        from ._journal import RedisJournal

        return RedisJournal(self, member_id)

    # --- durability ----------------------------------------------------------------------------
    async def _check_durability(self) -> FleetDurability:
        appendonly: bool | None = None
        appendfsync: str | None = None
        eviction: str | None = None
        try:
            config = await self.call(lambda r: r.config_get("append*"))
            if "appendonly" in config:
                appendonly = str(config["appendonly"]).lower() == "yes"
            appendfsync = config.get("appendfsync")
            eviction = (await self.call(lambda r: r.config_get("maxmemory-policy"))).get(
                "maxmemory-policy"
            )
        except FleetUnavailableError:
            # CONFIG is often renamed or disabled (managed Redis); INFO still tells AOF on/off.
            try:
                info = await self.call(lambda r: r.info("persistence"))
                if "aof_enabled" in info:
                    appendonly = bool(int(info["aof_enabled"]))
            except FleetUnavailableError:
                pass
        warnings = [
            text
            for text in (
                durability_warning(self.config.url, appendonly, appendfsync),
                eviction_warning(self.config.url, eviction),
            )
            if text is not None
        ]
        for text in warnings:
            logger.warning("%s", text)
        return FleetDurability(
            appendonly=appendonly,
            appendfsync=appendfsync,
            maxmemory_policy=eviction,
            warning=" ".join(warnings) or None,
        )


def durability_warning(url: str, appendonly: bool | None, appendfsync: str | None) -> str | None:
    """The warning to log for this persistence setup, or None when it is durable."""
    advice = "set `appendonly yes` and `appendfsync everysec` (or `always`) in redis.conf"
    if appendonly is None:
        return (
            f"fleet Redis at {url}: cannot read its persistence settings (CONFIG and INFO "
            f"refused); if AOF is off, a Redis restart loses accepted job keys: {advice}"
        )
    if not appendonly:
        return (
            f"fleet Redis at {url} has AOF off (appendonly no): a Redis restart loses the "
            f"fleet journal's accepted job keys and the key registry; {advice}"
        )
    if appendfsync == "no":
        return (
            f"fleet Redis at {url} has appendfsync no: a machine crash can lose the last "
            f"~30 s of journal writes; {advice}"
        )
    return None


def eviction_warning(url: str, policy: str | None) -> str | None:
    """The warning for a ``maxmemory-policy`` that may evict journal rows, or None."""
    if policy is None or not policy.startswith("allkeys"):
        return None  # noeviction, or volatile-*: journal rows have no TTL and are never evicted
    return (
        f"fleet Redis at {url} has maxmemory-policy {policy}: when memory runs out Redis may "
        "evict journal rows (accepted job keys); use `noeviction` (or a volatile-* policy)"
    )


class FleetScript:
    """A Lua script run through the fleet's deadline and error translation."""

    __slots__ = ("_bound_to", "_fleet", "_lua", "_script")

    def __init__(self, fleet: RedisFleet, lua: str) -> None:
        self._fleet = fleet
        self._lua = lua
        self._script: Any = None
        self._bound_to: aioredis.Redis | None = None

    async def __call__(
        self, keys: Sequence[str], args: Sequence[str | int | float], *, extra_wait: float = 0.0
    ) -> Any:
        """Run the script on ``keys`` with ``args``; its reply as redis-py decodes it."""

        async def run(redis: aioredis.Redis) -> Any:
            if self._bound_to is not redis:  # a restarted fleet has a new pool
                self._script = redis.register_script(self._lua)
                self._bound_to = redis
            return await self._script(keys=list(keys), args=list(args))

        return await self._fleet.call(run, extra_wait=extra_wait)


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


__all__ = ["FleetConfig", "FleetDurability", "RedisFleet", "redact"]
