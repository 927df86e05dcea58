"""The client's own connection pool: no request is written on a connection the server closed.

A submit whose reply never came cannot be resent, even when the likeliest cause is harmless
(a server closing an idle pooled connection as the submit was written on it): so that cause is
avoided before the write instead (``PoolConnector`` says how). Name resolution is bounded by
``Timeouts.connect`` (``TimedResolver``). The transport says, around each request
(``CONNECTING``), what kind of connection it may take.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import math
import re
import select
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

import aiohttp
import aiohttp.abc

IDLE_CONNECTION_SECONDS = 4.0
# A submit goes on a pooled connection only if it has been idle at most this long (else on a
# new one): see PoolConnector.
SUBMIT_IDLE_SECONDS = 0.05


# What our connector is told of the request it takes a connection for, set by
# Transport._exchange around each request: how long the pooled connection it takes may have
# been idle (None: aiohttp's own bound, IDLE_CONNECTION_SECONDS), and whom to tell
# (``on_wire(True)``) once the connection is taken (a batch call's; None: nobody).
_ConnectRule = tuple[float | None, Callable[[bool], None] | None]
ANY_CONNECTION: _ConnectRule = (None, None)
SUBMIT_CONNECTION: _ConnectRule = (SUBMIT_IDLE_SECONDS, None)
CONNECTING: contextvars.ContextVar[_ConnectRule] = contextvars.ContextVar(
    "wujie_async_connecting", default=ANY_CONNECTION
)


class PoolConnector(aiohttp.TCPConnector):
    """aiohttp's connector, which writes no request on a pooled connection the server has
    closed, and a submit on none idle longer than ``SUBMIT_IDLE_SECONDS``.

    A server closes a keep-alive connection after an idle timeout of its own (gunicorn: 2 s,
    uvicorn: 5 s, nginx: 75 s, some proxies far less), without warning. A request written on
    it as it closes is never read, and the client sees the connection end with no reply at
    all (EOF or a reset). A gateway that read the submit and died looks exactly the same: so
    such a submit can NEVER be resent (it may have been accepted, and paid for); it stays
    ``SubmitUncertainError``. Telling the two apart after the fact would take the peer's FIN
    having arrived before our write, which the kernel does not tell us once it has happened.
    So the race is avoided before the write instead:

    * any request: a pooled connection that is readable while idle (the server's FIN, or a
      stray reply such as a 408, already here while aiohttp's loop has not yet seen it) is
      closed, and the next one taken (what urllib3 does at checkout); nothing was written;
    * a submit: a pooled connection idle longer than ``SUBMIT_IDLE_SECONDS`` (or, where the
      gateway's replies say ``Keep-Alive: timeout=N``, longer than half those N seconds,
      which leaves the server's timer a wide margin) is passed over (left in the pool for
      the polls, idle since when it was), and another (or a new one) taken. A server's idle
      timer runs from its last reply, so only a server timing connections out within that
      much of a reply (far shorter than any server's default), or breaking its promise, could
      close one under a submit. A new connection costs a handshake; a submit after a pause
      pays it, a burst of submits reuses the connections it warms.
      Batch queries are read-only: the poller's take any pooled connection (a failed one is
      asked again).

    A batch query's ``on_wire(True)`` is called here too, once its connection is taken (the
    request is written next): a call is dated from then, not from before it waited for a
    connection slot and connected.

    A caller's own session keeps its own connector: neither check applies to it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Every connection handed out once (a connection handed out again is a pooled one).
        self._known: weakref.WeakKeyDictionary[Any, _Pooled] = weakref.WeakKeyDictionary()
        # How long idle a submit may still take a pooled connection: half the gateway's own
        # Keep-Alive timeout (0: it said none, and SUBMIT_IDLE_SECONDS bounds a submit's).
        self._promised = 0.0

    def heard_keep_alive(self, header: str) -> None:
        """The gateway's ``Keep-Alive`` header on a reply: a ``timeout=N`` there lets a
        submit take a pooled connection idle up to ``N / 2`` seconds (within aiohttp's own
        bound), where the server has promised it stays open. (Per pool, not per connection:
        this pool's connections all go to the gateway, and by the time a reply's headers are
        read its connection may be back in the pool already.)"""
        self._promised = _keep_alive_promise(header)

    def _release(self, key: Any, protocol: Any, *args: Any, **kwargs: Any) -> None:
        # aiohttp's own (private) hook, as a connection goes back to the pool. Were it renamed,
        # no reused connection would have a known idle time: a submit would take new ones.
        known = self._known.get(protocol)
        if known is not None:
            known.idle_since = time.monotonic()
        super()._release(key, protocol, *args, **kwargs)

    async def connect(
        self, req: Any, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.connector.Connection:
        max_idle, on_wire = CONNECTING.get()
        # Pooled connections sound but idle too long for a submit, and since when each was
        # idle: kept out of the pool while it looks for another (each is taken once), then put
        # back for the polls (closed, a submit after a pause took every pooled connection from
        # the polls).
        aside: list[tuple[aiohttp.connector.Connection, _Pooled, float]] = []
        try:
            while True:
                if aside and self.limit and len(self._acquired) >= self.limit:
                    # Those set aside hold every slot: one is closed to make room.
                    aside.pop()[0].close()
                conn = await super().connect(req, traces, timeout)
                protocol = conn.protocol
                known = None if protocol is None else self._known.get(protocol)
                if known is None:
                    if protocol is not None:
                        self._known[protocol] = _Pooled(protocol)
                    if on_wire is not None:
                        on_wire(True)  # the request is written next
                    return conn  # a new connection
                since = known.idle_since
                idle = math.inf if since is None else time.monotonic() - since
                # aiohttp's own idle clock restarts when a connection set aside goes back:
                # its bound is kept on this one.
                too_old = since is not None and idle > IDLE_CONNECTION_SECONDS
                if not too_old and not _closed_by_peer(protocol, known.fd):
                    if max_idle is None or idle <= max_idle or idle <= self._promised:
                        if on_wire is not None:
                            on_wire(True)
                        return conn
                    if since is not None:
                        aside.append((conn, known, since))
                        continue
                conn.close()  # nothing was written on it; the next pooled one, or a new one
        finally:
            for stale, known, since in aside:
                stale.release()  # back to the pool (see _release), ...
                known.idle_since = since  # ... idle since when it was


class _Pooled:
    """What the pool knows of a connection it handed out: when it last went back to the pool
    (None: not yet; each return overwrites it), and its socket's file descriptor (None: it
    has none to look at; -1: it could not be read), read once, when it is new."""

    __slots__ = ("fd", "idle_since")

    def __init__(self, protocol: Any) -> None:
        self.idle_since: float | None = None
        self.fd: int | None = None
        transport = protocol.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is not None:
            try:
                self.fd = sock.fileno()
            except (OSError, ValueError):
                self.fd = -1


_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*([0-9]{1,6})(?![0-9.])", re.I)


def _keep_alive_promise(header: str) -> float:
    """Seconds a submit may take a connection idle, by the server's ``Keep-Alive`` header:
    half its ``timeout=N`` (Apache: ``timeout=5, max=100``), at most aiohttp's own bound;
    0 for a header without a whole number of seconds of at least 1."""
    found = _KEEP_ALIVE_TIMEOUT.search(header[:200])
    seconds = 0 if found is None else int(found.group(1))
    return min(seconds / 2, IDLE_CONNECTION_SECONDS) if seconds >= 1 else 0.0


_POLL = hasattr(select, "poll")


def _closed_by_peer(protocol: Any, fd: int | None) -> bool:
    """Whether an idle pooled connection has something to read (the server's FIN, or bytes no
    request asked for): either way no request may go on it. (An open transport's socket is
    the one it had when new: ``fd`` is still its own.)"""
    transport = protocol.transport
    if transport is None or transport.is_closing():
        return True
    if fd is None:
        return False
    try:
        if _POLL:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class TimedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's default resolver, bounded by ``Timeouts.connect``.

    Only the TCP connect has a deadline of its own in aiohttp: a name service that never
    answers ran into ``Timeouts.request``, which reads as a reply that never came, a submit
    that "may have been charged". Past ``seconds`` it is a failure to connect: nothing was
    sent (retried, and systemic). The resolving thread is left to finish on its own.
    """

    def __init__(self, seconds: float) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._seconds = seconds

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        try:
            async with asyncio.timeout(self._seconds):
                return await self._inner.resolve(host, port, family)
        except TimeoutError:
            # An OSError with no errno would be taken for aiohttp's own timeout: this one has
            # one, so aiohttp reports it as a name-resolution failure (nothing was sent).
            raise OSError(
                errno.ETIMEDOUT,
                f"resolving {host} took over {self._seconds:g} s (Timeouts.connect)",
            ) from None

    async def close(self) -> None:
        await self._inner.close()
