"""RedisFleet: a fleet's options and its one Redis connection.

It validates the options before anything touches the network, connects (a typed
:class:`FleetUnavailableError` naming the URL when Redis cannot be reached), checks at start-up
how durable Redis is and warns when a restart could lose the fleet's journal, and makes each
client's :class:`FleetMember` (``WujieClient(fleet=...)`` asks :meth:`RedisFleet.member`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._errors import ClientStateError, InvalidRequestError
from ._config import FleetConfig
from ._errors import FleetUnavailableError
from ._keys import FleetKeys, name_problem
from ._redis import RedisConnection, logger, redact

if TYPE_CHECKING:
    from .._fleet_link import FleetLink


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
    """A fleet of wujie_async clients sharing one Redis: pass it as ``WujieClient(fleet=...)``.

    Args:
        url: ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``).
        name: the fleet's name; members with the same name share limits, poller and journal.
        member_timeout: seconds without a heartbeat after which a member counts as dead and
            its jobs may be claimed.
        lease_seconds: the validity of a shard's leader lease; a dead leader is replaced
            within about this long.
        shards: how many leaders the keys are split over (by CRC-32 of the job key).
        command_timeout: deadline of one Redis command.
        unavailable_wait: how long a submit waits for Redis to come back (for its fleet-wide
            rate slot and its journal intent) before raising ``FleetUnavailableError``;
            nothing is sent meanwhile.
        cluster: ``url`` is one node of a Redis Cluster (``redis://`` or ``rediss://``): the
            fleet connects with redis-py's ``RedisCluster``, which finds the other nodes.

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
        scheme = urlsplit(url).scheme if isinstance(url, str) else None
        if scheme not in ("redis", "rediss", "unix"):
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
        elif cluster and scheme == "unix":
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
        #: The connection the fleet's building blocks run their commands on (opened by start).
        self.connection = RedisConnection(
            url, cluster=cluster, command_timeout=self.config.command_timeout
        )

    def __repr__(self) -> str:
        return f"RedisFleet({self.config.url!r}, name={self.config.name!r})"

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`aclose`."""
        return self.connection.opened

    def member(self) -> FleetLink:
        """A new member of this fleet, for one client: what ``WujieClient(fleet=...)`` uses.

        The member starts the fleet's connection when its client opens, unless it is started
        already, and then closes it with its client.
        """
        from ._member import FleetMember  # the roles import redis-py; only members need them

        return FleetMember(self)

    async def start(self) -> FleetDurability:
        """Connect, check that Redis answers, and check its durability.

        Raises:
            FleetUnavailableError: Redis did not answer within ``command_timeout``.
            ClientStateError: already started.
        """
        if self.started:
            raise ClientStateError(f"{self!r} is already started")
        await self.connection.open()
        try:
            self.durability = await _check_durability(self.connection)
        except BaseException:
            await self.aclose()
            raise
        return self.durability

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        await self.connection.aclose()

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


async def _check_durability(redis: RedisConnection) -> FleetDurability:
    """Read the persistence settings (``CONFIG GET``, else ``INFO persistence``: managed Redis
    services often disable CONFIG) and log a WARNING for each unsafe one."""
    appendonly: bool | None = None
    appendfsync: str | None = None
    eviction: str | None = None
    try:
        config = await redis.call(lambda r: r.config_get("append*"))
        if "appendonly" in config:
            appendonly = str(config["appendonly"]).lower() == "yes"
        appendfsync = config.get("appendfsync")
        policy = await redis.call(lambda r: r.config_get("maxmemory-policy"))
        eviction = policy.get("maxmemory-policy")
    except FleetUnavailableError:
        try:
            info = await redis.call(lambda r: r.info("persistence"))
            if "aof_enabled" in info:
                appendonly = bool(int(info["aof_enabled"]))
        except FleetUnavailableError:
            pass
    url = redis.url
    advice = "set `appendonly yes` and `appendfsync everysec` (or `always`) in redis.conf"
    warnings = []
    if appendonly is None:
        warnings.append(
            f"fleet Redis at {url}: cannot read its persistence settings (CONFIG and INFO "
            f"refused); if AOF is off, a Redis restart loses accepted job keys: {advice}"
        )
    elif not appendonly:
        warnings.append(
            f"fleet Redis at {url} has AOF off (appendonly no): a Redis restart loses the "
            f"fleet journal's accepted job keys; {advice}"
        )
    elif appendfsync == "no":
        warnings.append(
            f"fleet Redis at {url} has appendfsync no: a machine crash can lose the last "
            f"~30 s of journal writes; {advice}"
        )
    if eviction is not None and eviction.startswith("allkeys"):
        # noeviction, or volatile-*: journal rows have no TTL and are never evicted
        warnings.append(
            f"fleet Redis at {url} has maxmemory-policy {eviction}: when memory runs out Redis "
            "may evict journal rows (accepted job keys); use `noeviction` (or a volatile-* one)"
        )
    for text in warnings:
        logger.warning("%s", text)
    return FleetDurability(
        appendonly=appendonly,
        appendfsync=appendfsync,
        maxmemory_policy=eviction,
        warning=" ".join(warnings) or None,
    )


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
