"""How a command's process ends: never held by a thread blocked in a system call.

aiohttp resolves names with ``getaddrinfo`` in a thread: asyncio's default executor, or
libuv's pool under uvloop. The client gives up on a name service that never answers
(``Timeouts.connect``), but the thread stays blocked in the C call, and closing the loop
(``asyncio.run`` shuts the default executor down waiting; uvloop's ``close`` waits for libuv's
requests) and the interpreter's exit (it joins ``ThreadPoolExecutor`` threads) waited for it:
a run whose gateway's name hangs printed its summary and then never exited, past any grace
period a supervisor gives, which then killed it (exit 137, not the run's code).

So the loop's default executor here runs daemon threads and its shutdown waits for none of
them, and once a command's coroutine has ended (its files closed, its summary printed),
closing the loop gets ``EXIT_GRACE_S``: past that, what is still running is abandoned as the
client abandoned it, and the process exits with the command's code, its output flushed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from queue import SimpleQueue
from typing import Any, TypeVar

_T = TypeVar("_T")
_Work = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(concurrent.futures.ThreadPoolExecutor):
    """At most ``max_workers`` daemon threads, started as work comes; ``shutdown`` never
    waits (a thread blocked in a system call must not hold the process).

    A ``ThreadPoolExecutor`` by type only (asyncio's ``set_default_executor`` takes no other):
    it runs none of its threads, which the interpreter's exit would join.
    """

    def __init__(self, max_workers: int = 32) -> None:
        super().__init__(max_workers)  # its fields only: its threads start in submit()
        self._work: SimpleQueue[_Work | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._started = 0
        self._max = max_workers
        self._closed = False

    def submit(
        self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and self._started < self._max:
                self._started += 1
                threading.Thread(
                    target=self._serve, name="wujie-async executor", daemon=True
                ).start()
        return future

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work and let idle threads end; wait for none (see the module)."""
        with self._lock:
            self._closed = True
            for _ in range(self._started):
                self._work.put(None)


# Once a command's coroutine has ended, how long closing its event loop may take before the
# process exits without waiting any more (a summary printed, nothing left to write).
EXIT_GRACE_S = 2.0


class ExitGuard:
    """Ends the process with the command's code if closing its loop hangs (see the module).

    Args:
        report: says an error the command ended with (as ``main`` does) and returns its exit
            code.
    """

    def __init__(self, report: Callable[[BaseException], int]) -> None:
        self._report = report
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def arm(self, code: int | None, error: BaseException | None) -> None:
        """The command's coroutine ended with ``code`` (or ``error``): closing starts now."""
        timer = threading.Timer(EXIT_GRACE_S, self._fire, (code, error))
        timer.daemon = True
        timer.name = "wujie-async exit guard"
        with self._lock:
            self._timer = timer
        timer.start()

    def disarm(self) -> None:
        """The loop closed in time: the command returns as usual."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _fire(self, code: int | None, error: BaseException | None) -> None:
        with self._lock:  # held to the end: disarm() can no longer win
            if self._timer is None:
                return
            if error is not None:
                code = self._report(error)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code if code is not None else 70)


def run_command(main: Coroutine[Any, Any, int], guard: ExitGuard | None) -> int:
    """Run a command's coroutine on a new event loop (uvloop's when installed); its exit code.
    ``guard``: the process's, when the command is its own (on the main thread): armed once
    ``main`` has ended, so a thread that holds the loop's close cannot hold the exit."""
    try:
        return _loop_runner()(_without_waiting_threads(main, guard))
    finally:
        if guard is not None:
            guard.disarm()


async def _without_waiting_threads(main: Coroutine[Any, Any, int], guard: ExitGuard | None) -> int:
    """``main`` on a loop whose default executor never holds the exit, and whose close gets
    a bounded time once ``main`` has ended (see ``_exit``): a name lookup that hangs must not
    keep a run that has printed its summary from ending."""
    asyncio.get_running_loop().set_default_executor(DaemonThreadPool())
    code: int | None = None
    error: BaseException | None = None
    try:
        code = await main
    except BaseException as exc:
        error = exc
        raise
    finally:
        if guard is not None:
            guard.arm(code, error)
    return code


def _loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    # The import is tried apart from the run: an error in the run must not chain under an
    # ImportError of an optional speed-up.
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return asyncio.run
    run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return run
