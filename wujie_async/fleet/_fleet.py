"""RedisFleet: the fleet's options and its one Redis connection pool.

It validates the options before anything touches the network, connects (a typed
:class:`FleetUnavailableError` naming the URL when Redis cannot be reached), checks how durable
Redis is (AOF) and warns when a restart could lose the fleet's journal, and runs every Redis
command of the fleet with a deadline, translating Redis' errors in this one place. Each client
gets its part in the fleet from :meth:`RedisFleet.member`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .._errors import ClientStateError, InvalidRequestError
from ._errors import FleetUnavailableError
from ._link import FleetConfig, FleetKeys, finite_number, name_problem
from ._member import FleetMember

try:
    import redis.asyncio as aioredis
    from redis.asyncio.connection import (
        URL_QUERY_ARGUMENT_PARSERS,
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
        parse_url,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisClusterException, RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("wujie_async.fleet needs redis-py: pip install 'wujie-async[fleet]'") from exc

if TYPE_CHECKING:
    from .._fleet_link import FleetLink

logger = logging.getLogger("wujie_async.fleet")
T = TypeVar("T")
_SCHEMES = ("redis", "rediss", "unix")
_RECUT_PAUSE = 0.05  # seconds between asks on connections that Redis took and then cut
_DROP_WAIT = 1.0  # seconds closing the idle connections may take after a lost one
_FROZEN = 1.0  # seconds past its deadline that a timer fires only in a process that stood still
_TICK = 0.25  # the stall watch's beat: a beat _FROZEN late says the process stood still


def _cut_after_taken(error: BaseException) -> bool:
    """A connection Redis took and then cut (a CLIENT KILL), not one it refused, could not be
    reached on (redis-py: "Error 111 connecting to ..."), or turned away for its credentials
    (AuthenticationError, a subclass): Redis is there."""
    return type(error) is RedisConnectionError and "connecting to" not in str(error)


class _StallWatch:
    """Notes when this process last stood still: its loop ran no callback for ``_FROZEN`` s
    (a CPU-bound handler, a blocking call, a SIGSTOP). A deadline that fires just after such
    a stall is the process's fault, not Redis's, even when it fires only a little late (a
    stall about as long as the deadline)."""

    __slots__ = ("_beat", "_last", "stood_still_until")

    def __init__(self) -> None:
        self._beat: asyncio.TimerHandle | None = None
        self._last = 0.0
        self.stood_still_until = float("-inf")  # loop time at which the last stall ended

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._beat = loop.call_later(_TICK, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if now - self._last > _TICK + _FROZEN:
            self.stood_still_until = now
        self._last = now
        self._beat = loop.call_later(_TICK, self._tick, loop)

    def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None


def _url_problem(url: object) -> str | None:
    """What is wrong with ``url`` as a fleet's Redis URL (None: nothing). Never quotes it.

    A password with ``#``, ``?`` or ``/`` not percent-encoded cuts the URL short there: what
    follows is read as a fragment, query or path, the password's first part as a port. redis-py
    then fails quoting that part ("Port could not be cast to integer value as '<password>'"),
    or, for a part that is a number, connects elsewhere; and the rest of the password would
    be shown where the URL is.
    """
    if not isinstance(url, str):
        return "must be a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (it raises for a port that is not a number)
    except ValueError:
        parts = None
    if parts is not None and parts.scheme not in _SCHEMES:
        return "must be a redis://, rediss:// or unix:// URL"
    # An '@' in the path, or in a query option's name, is a password's: the URL was cut
    # short before it. In a query option's value it is the value's own (``?password=p@ss``,
    # redis-py's form for ``unix://``).
    names = [pair.split("=", 1)[0] for pair in parts.query.split("&")] if parts else []
    if parts is None or parts.fragment or "@" in parts.path or any("@" in n for n in names):
        return (
            "cannot be read as a Redis URL (a password with '#', '?' or '/' must be "
            "percent-encoded: %23, %3F, %2F)"
        )
    if parts.scheme != "unix" and not _is_db_path(parts.path):
        # redis-py reads the path as the database number and, unable to, drops it unread:
        # redis://host/x and redis://host/1x used database 0 without a word.
        return "has a path that is not a database number (redis://host:6379/0, or no path)"
    return _query_problem(url, parts.scheme)


def _is_db_path(path: str) -> bool:
    """``path`` (of a redis:// or rediss:// URL) is none, or ``/`` and a database number."""
    number = unquote(path).removeprefix("/")
    return number == "" or (number.isascii() and number.isdigit())


def _query_problem(url: str, scheme: str) -> str | None:
    """What is wrong with the query options of ``url`` (None: nothing). Never quotes them.

    redis-py passes a query parameter it has no parser for to the connection as a keyword,
    and one no connection takes failed only on connecting, in a raw ``TypeError``; a value
    it cannot read failed there in a ``ValueError``. Neither names are quoted here: a
    mistyped URL may have a secret where a name goes.
    """
    try:
        options = parse_url(url)
    except ValueError:
        return "has a query option whose value redis-py cannot read (db=0, timeout=5, ...)"
    accepted = _accepted_options(scheme)
    # An option without a value redis-py drops unread; it is refused all the same (a typo).
    given = set(options) | {name for name, _ in parse_qsl(urlsplit(url).query, True)}
    unknown = [name for name in given if name not in accepted]
    if unknown:
        return (
            f"has {len(unknown)} query option(s) redis-py does not take (it takes db, "
            "socket_timeout, protocol, client_name, ...: see redis-py's from_url)"
        )
    return None


def _accepted_options(scheme: str) -> frozenset[str]:
    """The names redis-py's URL parsing may hand on for ``scheme``: its parsed options and
    every keyword the connection class (and its bases) or the pool takes."""
    connection: type = {
        "unix": UnixDomainSocketConnection,
        "rediss": SSLConnection,
    }.get(scheme, Connection)
    names = set(URL_QUERY_ARGUMENT_PARSERS) | {"max_connections", "connection_class"}
    for cls in connection.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        names.update(
            name
            for name, param in inspect.signature(init).parameters.items()
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
        )
    return frozenset(names)


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs: the
    ``user:password@`` form, any other user part (``redis://PASSWORD@host`` puts a password
    where the user name goes; redis-py reads it as one, and it is hidden all the same), and
    the ``?password=`` query (redis-py's form for ``unix://``)."""
    parts = urlsplit(url)  # _url_problem let it through: its port is a number
    port = f":{parts.port}" if parts.port else ""
    if "@" in parts.netloc:
        host = parts.hostname or ""
        # The user name is shown only beside a password: alone (or beside an empty one,
        # "PASSWORD:@"), it may well be the password itself.
        user = f"{parts.username}:***" if parts.password else "***"
        netloc = f"{user}@{f'[{host}]' if ':' in host else host}{port}"
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = [
            (name, "***" if name.lower() == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    # Put together by hand: urlunsplit drops the "//" of an empty host (unix:///path).
    text = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return (
        text
        + (f"?{parts.query}" if parts.query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


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
        url: ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``); a
            password's ``#``, ``?`` and ``/`` percent-encoded (``%23``, ``%3F``, ``%2F``);
            the path, if any, a database number.
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
        batch_wait: how long the leader lets a batch call that is not full wait for more of
            the fleet's keys to come due (it waits only while one does). Longer: fewer, fuller
            calls, a result seen up to that much later; 0: every call goes out at once, topped
            up with keys due soon.

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
        batch_wait: float = 0.25,
    ) -> None:
        problems: list[tuple[str, str]] = []
        if (url_problem := _url_problem(url)) is not None:
            problems.append(("url", url_problem))
        if (problem := name_problem(name)) is not None:
            problems.append(("name", problem))
        for field, value in (
            ("member_timeout", member_timeout),
            ("lease_seconds", lease_seconds),
            ("command_timeout", command_timeout),
            ("unavailable_wait", unavailable_wait),
        ):
            if not _seconds(value):
                problems.append((field, "must be a positive finite number of seconds"))
        if not _seconds(batch_wait, zero=True):
            problems.append(("batch_wait", "must be 0 or a positive finite number of seconds"))
        if not isinstance(cluster, bool):
            problems.append(("cluster", "must be True or False"))
        elif cluster and url_problem is None and urlsplit(url).scheme == "unix":
            # (Only a URL that passed: another one may not parse, and its ValueError would
            # leave the URL, password and all, in this frame's locals.)
            problems.append(("url", "a Redis Cluster is reached by redis:// or rediss://"))
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 1024:
            problems.append(("shards", "must be an integer from 1 to 1024"))
        if problems:
            # The URL leaves this frame's locals before the error does: its traceback keeps
            # them, and an error reporter that records locals (Sentry, capture_locals=True)
            # would store the Redis password in it.
            url = ""
            raise InvalidRequestError(problems)
        self._config = FleetConfig(
            url=redact(url),
            name=name,
            member_timeout=float(member_timeout),
            lease_seconds=float(lease_seconds),
            shards=shards,
            command_timeout=float(command_timeout),
            unavailable_wait=float(unavailable_wait),
            cluster=cluster,
            batch_wait=float(batch_wait),
        )
        self._keys = FleetKeys(name)
        self.durability: FleetDurability | None = None
        self._url = url
        self._redis: aioredis.Redis | None = None
        self._stalls = _StallWatch()
        self._unwinding: set[asyncio.Future[Any]] = set()  # commands let go of past a deadline

    def __repr__(self) -> str:
        config: FleetConfig | None = getattr(self, "_config", None)
        if config is None:
            # Half made (its constructor refused an option): an error reporter that records
            # locals shows the frame's self, and a repr that raised broke its whole report.
            return "RedisFleet(state='not constructed')"
        return f"RedisFleet({config.url!r}, name={config.name!r})"

    @property
    def config(self) -> FleetConfig:
        """The fleet's options, validated."""
        return self._config

    @property
    def keys(self) -> FleetKeys:
        """The fleet's Redis key names."""
        return self._keys

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`aclose`."""
        return self._redis is not None

    def member(self) -> FleetLink:
        """A new member of this fleet, for one client (``WujieClient(fleet=...)`` asks for it)."""
        return FleetMember(self)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> FleetDurability:
        """Connect, check that Redis answers, and check its durability.

        Raises:
            FleetUnavailableError: Redis did not answer within ``command_timeout``.
        """
        if self._redis is not None:
            raise ClientStateError(f"{self!r} is already started")
        # RedisCluster offers every command and script call the fleet makes, routed by key;
        # typed as Redis so that one set of call sites serves both.
        connect: Callable[..., Any] = (
            aioredis.RedisCluster.from_url if self._config.cluster else aioredis.from_url
        )
        # No read timeout of redis-py's own (5 s since redis-py 6): every command has the
        # fleet's deadline (``call``), which tells a process that stood still from a Redis that
        # did not answer. redis-py's timer fired on waking from a stall of 5 s or more and was
        # taken for Redis failing. A ``socket_timeout`` in the URL still applies.
        redis = cast(
            "aioredis.Redis",
            connect(
                self._url,
                decode_responses=True,
                socket_connect_timeout=self._config.command_timeout,
                socket_timeout=None,
            ),
        )
        self._redis = redis
        self._stalls.start()
        try:
            await self.call(lambda r: r.ping())
            self.durability = await self._check_durability()
        except BaseException:
            self._redis = None
            self._stalls.stop()
            await redis.aclose()
            raise
        return self.durability

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        redis, self._redis = self._redis, None
        self._stalls.stop()
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

    async def call(
        self,
        op: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        extra_wait: float = 0.0,
        once: bool = False,
    ) -> T:
        """Run ``op`` on the pool with a deadline of ``command_timeout + extra_wait``; ``once``:
        ``op`` is not asked again after a dropped connection (it is not idempotent: a counter's
        increment, a stream's entry). Why and when a command is asked again, or waited for once
        more after the process stood still: the comments below, and :meth:`_within`.

        Raises:
            FleetUnavailableError: Redis is unreachable, failed, or missed the deadline.
            ClientStateError: the fleet is not started.
        """
        redis = self._redis
        if redis is None:
            raise ClientStateError(f"{self!r} is not started (use `async with` or start())")
        wait = self._config.command_timeout + extra_wait
        try:
            try:
                return await self._within(op(redis), wait)
            except TimeoutError:
                # Missed the deadline (a stall already had its second wait): Redis is slow or
                # away, not one connection dropped. (A TimeoutError is an OSError: taken for a
                # dropped one, it was sent again, and Redis judged away after twice the wait.)
                raise
            except (RedisConnectionError, OSError):
                # One connection dropped (a CLIENT KILL, a proxy's idle timeout): asked once
                # more on a fresh one before Redis is judged away (at a CLIENT KILL every
                # member went local for a moment, and sent batch calls of its own). A Redis
                # that is away refuses the new connection at once. Every write but those made
                # ``once`` is idempotent (its Lua checks a token, an owner or a state first).
                if once:
                    raise
                await self._drop_idle_connections(redis)
            async with asyncio.timeout(wait):
                while True:
                    try:
                        return await op(redis)
                    except RedisConnectionError as exc:
                        if not _cut_after_taken(exc):
                            raise
                    # Redis took the fresh connection and it was cut again (CLIENT KILL in a
                    # loop: a blocking read, a second long, was cut at every kill and the
                    # member went local, a poller more): asked again until the deadline.
                    await asyncio.sleep(_RECUT_PAUSE)
                    await self._drop_idle_connections(redis)
        except TimeoutError:
            why = f"did not answer within {wait:g}s"
            lost = True
        except (RedisError, RedisClusterException, OSError) as exc:
            refusal = _write_refusal(exc)
            said = f"refuses writes ({refusal})" if refusal else "failed"
            why = f"{said}: {type(exc).__name__}: {exc}"
            lost = isinstance(exc, RedisConnectionError | OSError)
        if lost:
            await self._drop_idle_connections(redis)
        # Raised outside the except blocks: redis-py's exceptions can carry the connection (and
        # its password), and none rides along in __context__.
        raise FleetUnavailableError(f"Redis at {self._config.url} {why}", url=self._config.url)

    async def _within(self, command: Awaitable[T], wait: float) -> T:
        """``command``'s reply, within ``wait`` seconds; raises TimeoutError past them.

        A deadline that fires well past its time, or just after the loop stood still, finds
        this process frozen (SIGSTOP, a blocked loop), not Redis slow: the reply may be waiting
        unread. The same command is then given ``wait`` more seconds, not cancelled and asked
        again (a frozen member woke up blaming Redis, went local and sent a batch call of its
        own; asking again sent a ``once`` command, a report or an increment, twice).
        """
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(command)
        began = loop.time()
        deadline, extended = began + wait, False
        try:
            while True:
                await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
                if task.done():
                    return task.result()
                now = loop.time()
                stalled = now >= deadline + _FROZEN or self._stalls.stood_still_until > began
                if extended or not stalled:
                    raise TimeoutError
                deadline, extended = now + wait, True
        finally:
            if not task.done():
                # Let go of at once (a caller's own cancel is not held up): its connection
                # goes back to the pool, or is dropped, as the command unwinds.
                task.cancel()
                self._unwinding.add(task)
                task.add_done_callback(self._unwound)
            elif not task.cancelled():
                # Failed in the loop turn its caller was cancelled in (a member going local
                # as Redis dies): read, or asyncio logs it as never retrieved, at ERROR.
                task.exception()

    def _unwound(self, task: asyncio.Future[Any]) -> None:
        self._unwinding.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure after the deadline is no news

    @staticmethod
    async def _drop_idle_connections(redis: aioredis.Redis) -> None:
        """After a lost connection, the pool's idle ones are likely dead too (Redis restarted):
        closed at once, so the next commands connect afresh rather than fail one by one."""
        pool = getattr(redis, "connection_pool", None)  # a cluster client keeps one per node
        if pool is not None:
            with contextlib.suppress(Exception):  # a close that stalls is given up, not awaited
                async with asyncio.timeout(_DROP_WAIT):
                    await pool.disconnect(inuse_connections=False)

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
        url = self._config.url
        warnings = [
            text
            for text in (
                _persistence_warning(url, appendonly, appendfsync),
                _eviction_warning(url, eviction),
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


def _write_refusal(error: BaseException) -> str | None:
    """What to do about a Redis that answers but refuses writes, or None for other failures.

    Such a Redis is as good as away for the fleet (no intent can be written, so no submit is
    sent), but the fix is on the Redis side, so the error says which.
    """
    if isinstance(error, OutOfMemoryError):
        return "out of memory: free memory or raise `maxmemory`"
    if isinstance(error, ReadOnlyError):
        return "a read-only replica: point the fleet at the primary"
    if "MISCONF" in str(error):
        return "it cannot persist to disk: check its disk and its log"
    return None


_ADVICE = "set `appendonly yes` and `appendfsync everysec` (or `always`) in redis.conf"


def _persistence_warning(url: str, appendonly: bool | None, appendfsync: str | None) -> str | None:
    """The warning to log for this persistence setup, or None when it is durable."""
    if appendonly is None:
        return (
            f"fleet Redis at {url}: cannot read its persistence settings (CONFIG and INFO "
            f"refused); if AOF is off, a Redis restart loses accepted job keys: {_ADVICE}"
        )
    if not appendonly:
        return (
            f"fleet Redis at {url} has AOF off (appendonly no): a Redis restart loses the "
            f"fleet journal's accepted job keys; {_ADVICE}"
        )
    if appendfsync == "no":
        return (
            f"fleet Redis at {url} has appendfsync no: a machine crash can lose the last "
            f"~30 s of journal writes; {_ADVICE}"
        )
    return None


def _eviction_warning(url: str, policy: str | None) -> str | None:
    """The warning for a ``maxmemory-policy`` that may evict journal rows, or None."""
    if policy is None or not policy.startswith("allkeys"):
        return None  # noeviction, or volatile-*: journal rows have no TTL and are never evicted
    return (
        f"fleet Redis at {url} has maxmemory-policy {policy}: when memory runs out Redis may "
        "evict journal rows (accepted job keys); use `noeviction` (or a volatile-* policy)"
    )


def _seconds(value: object, *, zero: bool = False) -> bool:
    """A finite number of seconds, above 0 (or 0 itself with ``zero``)."""
    return finite_number(value) and (value > 0 or (zero and value == 0))
