"""RedisFleet: options, connection errors, deadlines, the durability check, import isolation."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wujie_async import ClientStateError, InvalidRequestError
from wujie_async.fleet import FleetUnavailableError, RedisFleet
from wujie_async.fleet._limiter import FleetLimiter
from wujie_async.fleet._link import stop_task

from .fleet_support import any_redis, fleet_name, free_port, own_redis
from .helpers import eventually, reported_locals

pytestmark = pytest.mark.anyio


@pytest.mark.long
def test_importing_the_package_does_not_import_redis() -> None:
    code = "import wujie_async, sys; assert 'redis' not in sys.modules, 'redis was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_fleet_package_shows_what_users_touch() -> None:
    import wujie_async.fleet as fleet

    assert fleet.__all__ == [
        "FleetConfig",
        "FleetDurability",
        "FleetMismatchError",
        "FleetUnavailableError",
        "RedisFleet",
    ]
    assert all(getattr(fleet, name).__doc__ for name in fleet.__all__)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "http://localhost"}, "url"),
        ({"name": "a{b}"}, "name"),
        ({"name": ""}, "name"),
        ({"member_timeout": 0}, "member_timeout"),
        ({"lease_seconds": float("nan")}, "lease_seconds"),
        ({"shards": 0}, "shards"),
        ({"shards": True}, "shards"),
        ({"batch_wait": -0.1}, "batch_wait"),
        ({"batch_wait": False}, "batch_wait"),
    ],
)
def test_bad_options_fail_before_any_connection(kwargs: dict[str, object], field: str) -> None:
    options: dict[str, object] = {"url": "redis://127.0.0.1:1/0", "name": "ok"} | kwargs
    with pytest.raises(InvalidRequestError) as caught:
        RedisFleet(**options)  # type: ignore[arg-type]
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("redis://:s3cret-pw@127.0.0.1:70000/0", {}),  # the URL itself refused
        ("redis://:s3cret-pw@127.0.0.1:6379/0?socket_timeout=x", {}),
        ("redis://:s3cret-pw@127.0.0.1:6379/0", {"shards": 0}),  # another option refused
        ("redis://:s3cret-pw@127.0.0.1:6379/0", {"name": ""}),
        # Unparsable (an unclosed IPv6 bracket) with cluster=True: the cluster check parsed
        # it again and raised a bare ValueError, the URL in the constructor's locals.
        ("redis://:s3cret-pw@[::1:6379/0", {"cluster": True}),
    ],
)
def test_a_refused_fleet_is_reported_with_its_locals_and_without_its_password(
    url: str, kwargs: dict[str, Any]
) -> None:
    """An error reporter that records locals (Sentry; ``capture_locals=True``) shows each
    frame's ``self``: the half-made fleet's repr raised AttributeError, which broke every such
    report, and the constructor's frame kept the URL, password and all."""
    options: dict[str, Any] = {"name": "x"} | kwargs
    with pytest.raises(InvalidRequestError) as caught:
        RedisFleet(url, **options)
    seen = reported_locals(caught.value)
    assert any(line.startswith("_fleet.py:__init__:self ") for line in seen)
    assert [line for line in seen if "s3cret-pw" in line] == []


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:s3cr#et@127.0.0.1:6379/0",  # redis-py: "Port ... as 's3cr'"
        "redis://app:s3cr?et@127.0.0.1:6379/0",
        "redis://app:s3cr/et@127.0.0.1:6379/0",
        "redis://app:1234#s3cret@127.0.0.1:6379/0",  # port 1234 of host "app"; "#s3cret@..." shown
        "redis://:1234?s3cret@127.0.0.1:6379/0",
    ],
)
def test_a_password_that_cuts_the_url_short_is_refused_without_quoting_it(url: str) -> None:
    # A password with '#', '?' or '/' not percent-encoded: the URL ends there, and its first
    # part is read as a port. It was refused only on connecting, by redis-py, in a ValueError
    # quoting that part of the password (or, a number, taken as a port, with the rest of the
    # password shown in every repr and log line).
    with pytest.raises(InvalidRequestError) as caught:
        RedisFleet(url, name="x")
    assert caught.value.field == "url"
    assert "%23" in str(caught.value)  # says what to do
    for part in ("s3cr", "1234", "et@"):
        assert part not in str(caught.value) and part not in repr(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@127.0.0.1:6379/0?s3cret=1",  # a query option redis-py has no use for
        "redis://127.0.0.1:6379/0?s3cret",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none&s3cret=1",
        "unix:///tmp/redis.sock?db=s3cret",  # a value redis-py cannot read
    ],
)
def test_an_unknown_query_option_is_refused_before_connecting(url: str) -> None:
    # It was handed to the connection as a keyword, and failed only on connecting, in a raw
    # TypeError ("unexpected keyword argument 's3cret'").
    with pytest.raises(InvalidRequestError) as caught:
        RedisFleet(url, name="x")
    assert caught.value.field == "url"
    assert "s3cret" not in str(caught.value) and "s3cret" not in repr(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?socket_timeout=5&client_name=app&protocol=3",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem",
        "unix:///tmp/redis.sock?db=2&password=pw",
        # An '@' in a value is the value's (it was refused as a password cutting the URL).
        "unix:///tmp/redis.sock?db=2&password=p@ss",
        "redis://127.0.0.1:6379/0?client_name=app@host",
    ],
)
def test_query_options_redis_py_takes_are_accepted(url: str) -> None:
    RedisFleet(url, name="x")


async def test_unreachable_redis_names_the_url_without_its_password() -> None:
    port = free_port()  # nothing listens there
    fleet = RedisFleet(f"redis://:s3cret@127.0.0.1:{port}/0", name="x", command_timeout=2)
    with pytest.raises(FleetUnavailableError) as caught:
        await fleet.start()
    error = caught.value
    assert f"127.0.0.1:{port}" in str(error) and error.url.endswith(f":{port}/0")
    assert isinstance(error, ClientStateError)
    assert error.__context__ is None  # no redis-py exception (or connection) rides along
    chain: BaseException | None = error
    while chain is not None:
        assert "s3cret" not in str(chain) and "s3cret" not in repr(chain)
        chain = chain.__cause__ or chain.__context__
    assert "s3cret" not in repr(fleet)


async def test_use_before_start_is_a_state_error() -> None:
    fleet = RedisFleet("redis://127.0.0.1:1/0", name="x")
    with pytest.raises(ClientStateError, match="not started"):
        await FleetLimiter(fleet, 10).acquire()


@pytest.mark.long
async def test_a_stalled_redis_misses_the_command_deadline(tmp_path: Path) -> None:
    async with own_redis(tmp_path) as server:
        async with RedisFleet(server.url, name=fleet_name(), command_timeout=0.3) as fleet:
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                started = asyncio.get_running_loop().time()
                with pytest.raises(FleetUnavailableError, match=r"did not answer within 0\.3s"):
                    await FleetLimiter(fleet, 10).acquire()
                assert asyncio.get_running_loop().time() - started < 1.0
            finally:
                server.process.send_signal(signal.SIGCONT)


@pytest.mark.long
@pytest.mark.parametrize(
    ("deadline", "frozen_for"),
    [
        # The process stands still (a SIGSTOP, a blocked loop) far past the deadline of a
        # command Redis answered at once: on waking, the deadline fires first.
        pytest.param(0.3, 2.0, id="far-past-the-deadline"),
        # A CPU-bound handler blocks the loop for about a command's deadline (a member's read
        # of its reports is always out, with a deadline of 6 s): the deadline fires only a
        # little late (0.25 s here), so its lateness alone does not tell.
        pytest.param(2.0, 2.2, id="about-the-deadline"),
        # A stall past redis-py's own read timeout (5 s by default in redis-py 6+), with the
        # fleet's default deadline: redis-py's timer fired on waking, its TimeoutError was
        # taken for Redis failing ("Timeout reading from ..."), and a member whose own code
        # blocked its loop for 5-7 s went local and sent a batch call of its own.
        pytest.param(5.0, 5.6, id="past-redis-pys-read-timeout"),
    ],
)
async def test_a_loop_that_stood_still_does_not_blame_redis(
    tmp_path: Path, deadline: float, frozen_for: float
) -> None:
    # A member said "Redis did not answer", went local and polled its own keys (at every
    # stall of 5 to 7 s with the defaults); the command is asked once more instead.
    async with (
        any_redis(tmp_path) as url,
        RedisFleet(url, name=fleet_name(), command_timeout=deadline) as fleet,
    ):
        loop = asyncio.get_running_loop()
        assert await fleet.call(lambda redis: redis.ping())  # connected
        frozen: list[bool] = []

        async def frozen_while_out(redis: Any) -> Any:
            # Redis answers after 0.1 s; the loop stands still from 0.05 s on (once).
            if not frozen:
                frozen.append(True)
                loop.call_later(0.05, time.sleep, frozen_for)
            return await redis.blpop([f"{fleet_name()}-empty"], timeout=0.1)

        assert await fleet.call(frozen_while_out) is None


@pytest.mark.long
async def test_a_command_made_once_is_sent_once_across_a_stall(tmp_path: Path) -> None:
    # A stream entry (a leader's report) or a counter's increment (the fleet's figures) whose
    # deadline fired just after the loop stood still was sent again: a report twice, the
    # figures counted twice. It is waited for instead, and its one reply read.
    async with (
        any_redis(tmp_path) as url,
        RedisFleet(url, name=fleet_name(), command_timeout=0.5) as fleet,
    ):
        loop = asyncio.get_running_loop()
        counter = f"{fleet_name()}-counter"
        sends: list[bool] = []

        async def increment(redis: Any) -> Any:
            # Redis answers after 0.2 s (a busy script); the loop stands still from 0.05 s
            # to well past the deadline.
            sends.append(True)
            if len(sends) == 1:
                loop.call_later(0.05, time.sleep, 1.8)
            return await redis.eval(_SLOW_INCR, 1, counter)

        assert await fleet.call(increment, once=True) == 1
        assert len(sends) == 1
        assert await fleet.call(lambda redis: redis.get(counter)) == "1"


# INCR, then hold the reply 0.2 s (Redis time), as a busy Redis would.
_SLOW_INCR = """
local value = redis.call('INCR', KEYS[1])
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
repeat
  t = redis.call('TIME')
until tonumber(t[1]) * 1000000 + tonumber(t[2]) - start >= 200000
return value
"""


async def test_a_dropped_connection_is_not_redis_away(tmp_path: Path) -> None:
    # CLIENT KILL (or a proxy's idle timeout) closes the fleet's connections: the next command
    # is asked again on a fresh one. Every member went local for a moment and sent batch
    # calls of its own.
    import redis.asyncio as aioredis

    async with (
        own_redis(tmp_path) as server,  # CLIENT KILL would cut other tests' connections too
        RedisFleet(server.url, name=fleet_name(), command_timeout=2.0) as fleet,
    ):
        url = server.url
        empty = f"{fleet_name()}-empty"
        # A blocking read on the wire (as a member's read of its reports is) when it happens.
        waiting = asyncio.ensure_future(
            fleet.call(lambda redis: redis.blpop([empty], timeout=1), extra_wait=1.0)
        )
        admin: Any = aioredis.Redis.from_url(url)
        try:

            async def blocked() -> bool:
                clients = await admin.client_list()
                return any(client.get("cmd") == "blpop" for client in clients)

            await eventually(blocked, what="the read on the wire")
            killed = await admin.execute_command(
                "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
            )
            assert int(killed) >= 1
        finally:
            await admin.aclose()
        assert await waiting is None  # asked again on a new connection, not "Redis is away"


async def test_a_write_that_is_not_idempotent_is_not_asked_again(tmp_path: Path) -> None:
    # A command whose connection drops may have run: a counter's increment or a stream's
    # entry asked again would count twice (the fleet's figures, a report delivered twice).
    from redis.exceptions import ConnectionError as RedisConnectionError

    async with (
        any_redis(tmp_path) as url,
        RedisFleet(url, name=fleet_name(), command_timeout=2.0) as fleet,
    ):
        tries: list[bool] = []

        async def dropped(redis: Any) -> Any:
            tries.append(True)
            if len(tries) == 1:
                raise RedisConnectionError("Connection closed by server.")
            return await redis.ping()

        assert await fleet.call(dropped)  # idempotent: asked again on a fresh connection
        assert len(tries) == 2
        tries.clear()
        with pytest.raises(FleetUnavailableError):
            await fleet.call(dropped, once=True)
        assert len(tries) == 1


async def test_a_command_past_its_deadline_is_not_asked_again(tmp_path: Path) -> None:
    # Redis that does not answer within the deadline is away: the member goes local then.
    # A TimeoutError is an OSError, and was taken for a dropped connection: the command was
    # sent again on a fresh one, and Redis judged away only after twice the deadline.
    async with (
        any_redis(tmp_path) as url,
        RedisFleet(url, name=fleet_name(), command_timeout=0.3) as fleet,
    ):
        tries: list[bool] = []

        async def slow(redis: Any) -> Any:
            tries.append(True)
            return await redis.blpop([f"{fleet_name()}:never"], timeout=5)  # no reply in time

        with pytest.raises(FleetUnavailableError):
            await fleet.call(slow)
        assert len(tries) == 1


async def test_aof_off_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with own_redis(tmp_path, appendonly=False) as server:
        with caplog.at_level(logging.WARNING, logger="wujie_async.fleet"):
            async with RedisFleet(server.url, name=fleet_name()) as fleet:
                assert fleet.durability is not None
                assert fleet.durability.appendonly is False
    assert any("appendonly no" in r.getMessage() for r in caplog.records)


async def test_aof_on_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with own_redis(tmp_path, appendonly=True) as server:
        with caplog.at_level(logging.WARNING, logger="wujie_async.fleet"):
            async with RedisFleet(server.url, name=fleet_name()) as fleet:
                assert fleet.durability is not None
                assert fleet.durability.appendonly is True
                assert fleet.durability.appendfsync == "everysec"
                assert fleet.durability.warning is None
                assert fleet.durability.maxmemory_policy == "noeviction"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_disabled_config_command_falls_back_to_info(tmp_path: Path) -> None:
    async with own_redis(
        tmp_path, appendonly=True, extra=("--rename-command", "CONFIG", '""')
    ) as server:
        async with RedisFleet(server.url, name=fleet_name()) as fleet:
            assert fleet.durability is not None
            assert fleet.durability.appendonly is True  # read from INFO persistence
            assert fleet.durability.appendfsync is None


async def test_start_twice_and_close_twice(tmp_path: Path) -> None:
    async with any_redis(tmp_path) as url:
        fleet = RedisFleet(url, name=fleet_name())
        await fleet.start()
        with pytest.raises(ClientStateError, match="already started"):
            await fleet.start()
        await fleet.aclose()
        await fleet.aclose()


async def test_an_evicting_redis_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = ("--maxmemory-policy", "allkeys-lru")
    async with own_redis(tmp_path, appendonly=True, extra=extra) as server:
        with caplog.at_level(logging.WARNING, logger="wujie_async.fleet"):
            async with RedisFleet(server.url, name=fleet_name()) as fleet:
                assert fleet.durability is not None
                assert fleet.durability.maxmemory_policy == "allkeys-lru"
    assert any("evict journal rows" in r.getMessage() for r in caplog.records)


async def stubborn(release: asyncio.Event) -> None:
    """A task that swallows every cancel until ``release`` is set."""
    while not release.is_set():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            continue


@pytest.mark.long
async def test_stopping_a_task_that_swallows_its_cancel_ends_within_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Shutdown must not hang on a background task that ignores cancellation (a bug, or a
    # cancel lost inside a client library): it is left behind, with a WARNING.
    release = asyncio.Event()
    task = asyncio.create_task(stubborn(release))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, "wujie_async.fleet"):
        await stop_task(task, 1.2)
    assert loop.time() - started < 3.0
    assert "did not stop" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()


async def test_stopping_a_task_does_not_swallow_the_callers_own_cancel() -> None:
    release = asyncio.Event()
    task = asyncio.create_task(stubborn(release))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task, 30.0))
    await asyncio.sleep(0.05)
    stopper.cancel()  # the caller is cancelled while it waits (30 s deadline)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, timeout=2.0)
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()


async def test_a_command_that_fails_as_its_caller_is_cancelled_leaves_no_unread_error(
    tmp_path: Path,
) -> None:
    # A member going local cancels its fleet tasks just as their commands fail (Redis killed):
    # a command that failed in the same loop turn as its caller's cancel kept its error
    # unread, and asyncio logged "Task exception was never retrieved" at ERROR, with a
    # traceback, in the middle of an outage the fleet handles.
    from redis.exceptions import ConnectionError as RedisConnectionError

    loop = asyncio.get_running_loop()
    unread: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unread.append(context))
    try:
        async with (
            any_redis(tmp_path) as url,
            RedisFleet(url, name=fleet_name(), command_timeout=2.0) as fleet,
        ):
            go = asyncio.Event()
            started = asyncio.Event()

            async def fails_on_cue(redis: Any) -> Any:
                started.set()
                await go.wait()
                raise RedisConnectionError("Connection reset by peer")

            caller = asyncio.ensure_future(fleet.call(fails_on_cue, once=True))
            await started.wait()
            go.set()  # the command fails in the next loop turn...
            caller.cancel()  # ...the one its caller is cancelled in
            with pytest.raises(asyncio.CancelledError):
                await caller
            del caller
            await asyncio.sleep(0)
            import gc

            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not unread, unread
