"""A fork server for ``python -m wujie_async`` in tests: the imports are paid once per worker.

Starting ``python -m wujie_async`` costs about half a second of CPU, most of it importing aiohttp,
pydantic, cryptography and rich; the CLI tests start about eighty of them. This server imports
the CLI once, then forks a child per request. Each child is a real process (its own pid, its own
stdin/stdout/stderr, environment, working directory, exit code and signals) that runs the same
entry point ``python -m wujie_async`` runs and leaves with ``sys.exit`` so atexit handlers run
(coverage saves a forked child's data there, in a data file of its own).

Usage: ``python tests/cli_zygote.py SOCKET_PATH``. It prints ``ready`` once it listens. A request
is one JSON line on a connection: ``{"argv": [...], "env": {...}, "cwd": ..., "stdin": PATH,
"stdout": PATH, "stderr": PATH}``. The reply is ``{"pid": N}`` at once, then ``{"status": S}``
when the child ends (negative S: killed by signal -S, as asyncio reports it). A connection that
closes before its child ended kills the child: no child outlives the test that asked for it.
The server ends when its stdin closes (its pytest worker ended) and kills what is left.

Single-threaded with ``selectors`` on purpose: forking a process that runs threads is unsafe.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

import wujie_async.cli  # noqa: F401  # what `python -m wujie_async` imports, emulator included

# Imported by every run once its event loop starts (anyio's backend, its worker threads' module)
# or it reads an input file (utf-8-sig): paid here once rather than in each child.
LATE_IMPORTS = (
    "anyio._backends._asyncio",
    "anyio.to_thread",
    "concurrent.futures.thread",
    "encodings.utf_8_sig",
)
POLL_S = 0.1  # a bound on a missed SIGCHLD wake-up: children are reaped at least this often


@dataclass(kw_only=True, slots=True)
class _Request:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdin: str
    stdout: str
    stderr: str


@dataclass(kw_only=True, slots=True)
class _Connection:
    sock: socket.socket
    buffer: bytes = b""
    pid: int | None = None
    replies: list[bytes] = field(default_factory=list)


def _request(line: bytes) -> _Request:
    raw: dict[str, Any] = json.loads(line)
    return _Request(
        argv=[str(arg) for arg in raw["argv"]],
        env={str(k): str(v) for k, v in raw["env"].items()},
        cwd=str(raw["cwd"]),
        stdin=str(raw["stdin"]),
        stdout=str(raw["stdout"]),
        stderr=str(raw["stderr"]),
    )


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def _text_stream(fd: int, *, unbuffered: bool, errors: str, mode: str) -> io.TextIOWrapper:
    # What the interpreter builds at startup: line buffered on a terminal, write-through under
    # PYTHONUNBUFFERED, block buffered otherwise.
    binary: Any = open(fd, mode + "b", buffering=0 if unbuffered else -1, closefd=False)
    return io.TextIOWrapper(
        binary,
        encoding="utf-8",
        errors=errors,
        line_buffering=os.isatty(fd) and mode == "w",
        write_through=unbuffered,
    )


def _run_child(request: _Request) -> NoReturn:
    """The forked child: become ``python -m wujie_async ARGV`` and exit with its code."""
    code: object = 1
    try:
        os.setpgrp()  # its own process group, as a shell job: a signal to the test's group skips it
        # The dispositions a fresh interpreter has (the server changed SIGCHLD only).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environ.update(request.env)
        time.tzset()  # TZ as the new environment says, as a fresh interpreter would read it
        for fd, path, flags in (
            (0, request.stdin, os.O_RDONLY),
            (1, request.stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, request.stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        unbuffered = bool(request.env.get("PYTHONUNBUFFERED"))
        sys.stdin = _text_stream(0, unbuffered=False, errors="strict", mode="r")
        sys.stdout = _text_stream(1, unbuffered=unbuffered, errors="strict", mode="w")
        sys.stderr = _text_stream(2, unbuffered=True, errors="backslashreplace", mode="w")
        sys.argv = ["-m", *request.argv]  # run_module puts the module's path in argv[0]
        runpy.run_module("wujie_async", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        # Python's own exit for an uncaught exception. (A real interpreter ends an uncaught
        # KeyboardInterrupt by SIGINT after its atexit handlers; the CLI catches it itself.)
        traceback.print_exc()
        code = 1
    # Leave as the interpreter would: atexit handlers (coverage's save) run, streams flush.
    sys.exit(code)


class Zygote:
    """The serve loop: accept requests, fork children, report their pids and exit statuses."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
        # SIGCHLD wakes the select through a self-pipe: a child's exit is reported at once.
        self.wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        self.wakeup_write = wakeup_write
        signal.set_wakeup_fd(wakeup_write)
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, "wakeup")
        self.children: dict[int, _Connection] = {}
        self.connections: list[_Connection] = []

    def serve(self) -> _Request | None:
        """Serve until stdin closes (None) or, in a forked child, return the child's request."""
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:
            for key, _ in self.selector.select(POLL_S):
                if key.data == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return None
                elif key.data == "wakeup":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_read, 4096)
                elif key.data == "accept":
                    self._accept()
                else:
                    request = self._read(key.data)
                    if request is not None:
                        return request
            self._reap()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        connection = _Connection(sock=sock)
        self.connections.append(connection)
        self.selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> _Request | None:
        try:
            chunk = connection.sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(connection)
            return None
        connection.buffer += chunk
        if b"\n" not in connection.buffer or connection.pid is not None:
            return None
        line, _, connection.buffer = connection.buffer.partition(b"\n")
        try:
            request = _request(line)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._send(connection, {"error": f"bad request: {exc!r}"})
            self._drop(connection)
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._close_in_child()
            return request
        # Its own process group from the start (the child sets it too): killpg never misses it.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        connection.pid = pid
        self.children[pid] = connection
        self._send(connection, {"pid": pid})
        return None

    def _close_in_child(self) -> None:
        # The child keeps none of the server's sockets: a test waiting for EOF must see it. The
        # wake-up fd goes first: a signal must never write into a closed (or reused) fd number.
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self.listener.close()
        for connection in self.connections:
            connection.sock.close()
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)

    def _send(self, connection: _Connection, message: dict[str, Any]) -> None:
        try:
            connection.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.remove(connection)
        self.selector.unregister(connection.sock)
        connection.sock.close()
        if connection.pid is not None and connection.pid in self.children:
            # Nobody waits for this child any more: it must not run on unobserved.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(connection.pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = self.children.pop(pid, None)
            if connection is not None and connection in self.connections:
                self._send(connection, {"status": _status(wait_status)})

    def close(self) -> None:
        """Kill every child still running, reap them, close the sockets."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()
        for connection in list(self.connections):
            self._drop(connection)
        self.selector.close()
        self.listener.close()


def main() -> None:
    """Serve on the socket path given; a forked child leaves through ``_run_child``."""
    path = sys.argv[1]
    for name in LATE_IMPORTS:
        importlib.import_module(name)
    if threading.active_count() > 1:
        # An import started a thread: forking now could copy a lock held by it, for ever held.
        sys.exit(f"cli_zygote: {threading.active_count()} threads after the imports; not forking")
    # The imported modules' objects go to the permanent generation: each child's full
    # collections skip them instead of walking (and so copying) every page of them.
    gc.collect()
    gc.freeze()
    zygote = Zygote(path)
    try:
        request = zygote.serve()
    except KeyboardInterrupt:
        request = None
    if request is not None:
        _run_child(request)  # in a forked child only; never returns
    zygote.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


if __name__ == "__main__":
    main()
