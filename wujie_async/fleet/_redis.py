"""The fleet's Redis connection: one pool, a deadline on every command, and Redis' errors
translated in this one place (also for Lua scripts).

The fleet's building blocks take a :class:`RedisLink`, the little they need of a connection,
and import nothing of each other: a block can be read, and tested, on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from .._errors import ClientStateError
from ._errors import FleetUnavailableError

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisClusterException, RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("wujie_async.fleet needs redis-py: pip install 'wujie-async[fleet]'") from exc

logger = logging.getLogger("wujie_async.fleet")
T = TypeVar("T")
RETRY = 0.25  # how often a wait for an unreachable Redis tries again


# A Lua script (EVALSHA, loaded on first use): run on (keys, args), its reply as redis-py gives.
Script = Callable[[Sequence[str], Sequence[str | int | float]], Awaitable[Any]]


class RedisLink(Protocol):
    """What a building block needs of the fleet's Redis (:class:`RedisConnection` is one)."""

    @property
    def command_timeout(self) -> float:
        """The deadline of one command, in seconds."""
        ...

    async def call(
        self, op: Callable[[aioredis.Redis], Awaitable[T]], *, extra_wait: float = 0.0
    ) -> T:
        """Run ``op`` with a deadline (raises FleetUnavailableError)."""
        ...

    def script(self, lua: str) -> Script:
        """A Lua script, run through :meth:`call`."""
        ...


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable Redis URL>"
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class RedisConnection:
    """One pool to the fleet's Redis (a Redis Cluster with ``cluster=True``)."""

    def __init__(self, url: str, *, cluster: bool, command_timeout: float) -> None:
        self.url = redact(url)
        self._real_url = url
        self._cluster = cluster
        self._timeout = command_timeout
        self._redis: aioredis.Redis | None = None

    @property
    def command_timeout(self) -> float:
        """The deadline of one command, in seconds."""
        return self._timeout

    @property
    def opened(self) -> bool:
        """True between :meth:`open` and :meth:`aclose`."""
        return self._redis is not None

    async def open(self) -> None:
        """Connect and check that Redis answers (raises FleetUnavailableError)."""
        if self._cluster:
            # RedisCluster offers every command and script call the fleet makes, routed by
            # key; typed as Redis so that one set of call sites serves both.
            redis = cast(
                "aioredis.Redis",
                aioredis.RedisCluster.from_url(
                    self._real_url, decode_responses=True, socket_connect_timeout=self._timeout
                ),
            )
        else:
            redis = aioredis.from_url(
                self._real_url, decode_responses=True, socket_connect_timeout=self._timeout
            )
        self._redis = redis
        try:
            await self.call(lambda r: r.ping())
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the pool (idempotent)."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

    async def call(
        self, op: Callable[[aioredis.Redis], Awaitable[T]], *, extra_wait: float = 0.0
    ) -> T:
        """Run ``op`` on the pool with a deadline of ``command_timeout + extra_wait``.

        Raises:
            FleetUnavailableError: Redis is unreachable, failed, or missed the deadline.
            ClientStateError: the connection is not open.
        """
        redis = self._redis
        if redis is None:
            raise ClientStateError(
                f"the fleet's Redis at {self.url} is not started (use `async with` or start())"
            )
        try:
            async with asyncio.timeout(self._timeout + extra_wait):
                return await op(redis)
        except TimeoutError:
            raise FleetUnavailableError(
                f"Redis at {self.url} did not answer within {self._timeout + extra_wait:g}s",
                url=self.url,
            ) from None
        except (RedisError, RedisClusterException, OSError) as exc:
            # `from None`: redis-py's exceptions can carry the connection (and its password).
            raise FleetUnavailableError(
                f"Redis at {self.url} failed: {type(exc).__name__}: {exc}", url=self.url
            ) from None

    def script(self, lua: str) -> Script:
        """A Lua script, run through :meth:`call`."""
        pool: aioredis.Redis | None = None  # registered per pool: a reopened one is new
        registered: Any = None

        async def run(keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
            async def on(redis: aioredis.Redis) -> Any:
                nonlocal pool, registered
                if pool is not redis:
                    pool, registered = redis, redis.register_script(lua)
                return await registered(keys=list(keys), args=list(args))

            return await self.call(on)

        return run


def stream_entries(reply: Any) -> list[tuple[str, Any]]:
    """XREAD's reply for one stream as ``[(id, fields), ...]`` under RESP2 and RESP3 alike."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]} (or [[entries]])
        [value] = reply.values()
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(reply[0][1])


async def retry_while_away(
    attempt: Callable[[], Awaitable[T]],
    *,
    wait: float,
    what: str,
    after_waiting: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """``attempt()``, tried again while Redis is away, for up to ``wait`` seconds; then, if it
    had to wait, ``after_waiting()``.

    Raises:
        FleetUnavailableError: Redis stayed away that long (the message starts with ``what``).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    waited = False
    while True:
        try:
            done = await attempt()
            break
        except FleetUnavailableError as exc:
            waited = True
            if loop.time() >= deadline:
                raise FleetUnavailableError(
                    f"{what}: fleet Redis unavailable for {wait:g}s ({exc})", url=exc.url
                ) from None
            await asyncio.sleep(min(RETRY, max(0.0, deadline - loop.time())))
    if waited and after_waiting is not None:
        await after_waiting()  # outside the loop: its failure must not write twice
    return done


async def stop_task(task: asyncio.Task[Any], *, within: float) -> None:
    """Cancel one of the fleet's background tasks and wait for it, ``within`` seconds at most.

    A cancel that lands just as a redis-py command completes can be lost inside the client
    library, so the task is cancelled again every 0.1 s while it runs. A task still running at
    the deadline (its commands have deadlines of their own: only a bug gets here) is left
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
