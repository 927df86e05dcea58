"""Batch calls the gateway refused for the credentials (HTTP 401 or 403), as the client's log
says them: a run that only collects stops on them as a run that sends stops on a refused submit.

``resume``, or a re-run whose lines were all sent, sends nothing: it only asks the gateway about
its jobs. With credentials the gateway refuses (another account's key), every batch call
failed, and the jobs waited out their whole deadline (902 s), then ended "timed out", exit 1.
The client counts the failed calls (``client.stats.batch_errors``) but not why they failed; its
WARNING ``batch query of N keys failed: ...`` says why, in the error's own words, which begin
``authentication refused`` (401) or ``access forbidden`` (403) for ``AuthenticationError``.
That WARNING is the seam (see the package docstring): its first one stops the run. The
client's gate on repeated WARNINGs writes a new cause at once, even amid other failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Final

from .. import AuthenticationError

# The client's WARNING for a batch call that failed after its retries, and how the text of
# an AuthenticationError begins, by HTTP status.
_BATCH_FAILED: Final = "batch query of %d keys failed: "
_REFUSED: Final = {"authentication refused": 401, "access forbidden": 403}


def _refusal(record: logging.LogRecord) -> AuthenticationError | None:
    """The refusal a log record tells of: a batch call refused for the credentials."""
    if not (isinstance(record.msg, str) and record.msg.startswith(_BATCH_FAILED)):
        return None
    args = record.args if isinstance(record.args, tuple) else ()
    said = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    for words, status in _REFUSED.items():
        if said.startswith(words):
            message = said.split(" | HTTP ", 1)[0]
            return AuthenticationError(message, http_status=status)
    return None


class _Watch(logging.Handler):
    def __init__(self, refused: Callable[[AuthenticationError], None]) -> None:
        super().__init__()
        self._refused = refused
        self._loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        refusal = _refusal(record)
        if refusal is not None:
            # Told on the loop, whichever thread logged (the poller logs on the loop).
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                self._loop.call_soon_threadsafe(self._refused, refusal)


@contextlib.contextmanager
def watching_refusals(refused: Callable[[AuthenticationError], None]) -> Iterator[None]:
    """Within the block, ``refused`` is called (on the loop) for each batch call the gateway
    refused for the credentials."""
    log = logging.getLogger("wujie_async")
    watch = _Watch(refused)
    log.addHandler(watch)
    try:
        yield
    finally:
        log.removeHandler(watch)
