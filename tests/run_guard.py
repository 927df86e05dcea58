"""No test run can hang, and no test run leaves processes behind.

pytest-timeout fails a test that runs past its timeout, but it cannot end a teardown that hangs
after that, a process stuck in C code, or one that never finishes exiting. And a test that fails
half-way may leave its child processes (an emulator, a redis-server, a fleet member) running:
they hold the run's stdout and stderr, so whoever reads the run's output waits for them for ever.

- Each test gets a hard deadline (its timeout plus a margin) from faulthandler's watchdog, a C
  thread that needs no GIL: past it, every thread's stack is printed and the process exits.
  Under xdist the controller reports the crashed worker's test as failed and starts another.
- The run's own end (xdist workers' exit, the coverage report) gets a deadline too.
- At the end of its session every process kills what is left of its child processes, naming them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import TextIO

import pytest

HARD_DEADLINE_MARGIN_S = 60.0  # beyond a test's timeout: time for its teardown after it fires
SHUTDOWN_DEADLINE_S = 300.0  # from the end of the session to the end of the process

_watchdog_stream: TextIO | None = None
_test_deadline: float | None = None


def _arm_watchdog(seconds: float) -> None:
    if _watchdog_stream is not None:
        faulthandler.dump_traceback_later(max(seconds, 1.0), exit=True, file=_watchdog_stream)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not _is_xdist_worker(config) and bool(getattr(config.option, "numprocesses", 0))


def _child_processes(root: int) -> list[tuple[int, str]]:
    """Every live descendant of ``root`` as (pid, command line), read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[tuple[int, str]] = []
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        found.append((pid, command.decode(errors="replace").strip()[:200]))
    return found


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog_stream
    # The real stderr, duplicated before anything is captured (xdist workers inherit theirs).
    _watchdog_stream = os.fdopen(os.dup(sys.__stderr__.fileno() if sys.__stderr__ else 2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None]:
    global _test_deadline
    timeout = float(item.config.getini("timeout") or 0)
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        timeout = float(marker.args[0])
    if timeout <= 0:
        yield
        return
    _test_deadline = time.monotonic() + timeout + HARD_DEADLINE_MARGIN_S
    _arm_watchdog(_test_deadline - time.monotonic())
    try:
        yield
    finally:
        _test_deadline = None
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(trylast=True)
def pytest_exception_interact() -> None:
    # pytest's faulthandler plugin cancels every watchdog when a test fails: arm ours again, so a
    # teardown that hangs after a failure (a timeout, say) is still ended.
    if _test_deadline is not None:
        _arm_watchdog(_test_deadline - time.monotonic())


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _is_xdist_worker(session.config):
        # The controller (or a run without xdist): its workers' exit and the coverage report.
        # Not in a worker: an idle worker waits for the controller as long as others run tests.
        _arm_watchdog(SHUTDOWN_DEADLINE_S)
    if _is_xdist_controller(session.config) or not Path("/proc").is_dir():
        return  # a controller's children are its workers, which clean up after their tests
    for pid, command in _child_processes(os.getpid()):
        sys.stderr.write(f"run_guard: killing a process a test left running: {pid} {command}\n")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _watchdog_stream
    # Closed, not left to the interpreter's exit (which would print a ResourceWarning whenever
    # a test changed the warning filters, as opentelemetry's SDK does).
    faulthandler.cancel_dump_traceback_later()
    if _watchdog_stream is not None:
        _watchdog_stream.close()
        _watchdog_stream = None
