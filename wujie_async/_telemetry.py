"""The logging story of wujie_async, and its optional OpenTelemetry spans and metrics.

Logging: the ``wujie_async`` logger (and its children ``.download``, ``.fleet``) tells a run's
story at three levels (docs/guides/observability.md has examples):

* DEBUG: one line per HTTP exchange (method, path, status, duration, keys in a batch call, try
  number) and one per job state change (key, old and new status, asks so far, next ask);
* INFO: what an operator should see once: a client opened (with its limits) and closed (with
  its figures), a 429 brake engaging or releasing, a journal opened and the jobs resumed (if any), a
  fleet member's role changing;
* WARNING and up: what needs a look. A WARNING that can repeat per call or per job goes
  through :class:`RepeatedWarnings`: one line per kind a minute, with a count.

``WUJIE_LOG=debug|info|warning`` shows that log on stderr (as ``OPENAI_LOG`` does for
openai-python); the CLI's ``--verbose`` shows the DEBUG story.

OpenTelemetry (``pip install 'wujie-async[otel]'``): :class:`Telemetry` resolves the global
tracer and meter providers once, when its client opens. With neither set (or opentelemetry not
imported at all), ``Telemetry.otel`` is None and every call site skips its telemetry with that
one attribute check; nothing of opentelemetry is imported. Otherwise ``otel`` is an
``_otel.Recorder``, which makes the spans and records the metrics.

Nothing secret reaches a log record, a span or a metric: no private key, signature,
Authorization header, request body or image bytes is ever handed to them (only paths, keys,
models, counts, statuses, durations and error types; error texts pass through ``snippet``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._env import LOG, Environment
from ._errors import (
    JobCancelledError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    ModerationRejectedError,
    UnknownJobError,
    shown_key,
    some_and_more,
)
from ._jobs import status_name

if TYPE_CHECKING:
    from ._config import Limits, Timeouts
    from ._contract import JobStatus
    from ._jobs import ImageJob
    from ._otel import JobTrace, Recorder
    from ._stats import ClientStats

logger = logging.getLogger("wujie_async")

# How often one kind of repeated WARNING may be written (issue: 2,093 lines in 9 s before).
REPEAT_EVERY_S = 60.0
_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
}
# A gateway completion time further than this from now is not read as unix seconds.
LATENESS_PLAUSIBLE_S = 86_400.0
# The most job keys one line names (the close line's jobs left running, without a journal).
KEYS_SHOWN = 20
_HANDLER_NAME = "wujie_async.stderr"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --- repeated warnings ------------------------------------------------------------------------
@dataclass(slots=True)
class _Kind:
    opened: float  # when the last line of this kind was written
    held: int = 0  # occurrences since, not written
    first_held: tuple[Any, ...] | None = None  # the arguments of the first of them


class RepeatedWarnings:
    """WARNINGs that can repeat per call or per job: each kind at most one line per ``every`` s.

    A kind is a message's format string (each call site has its own). The first warning of a
    kind is written at once; those within the next ``every`` seconds are only counted; the next
    one after that is written with how many were held back. :meth:`flush` (at close) writes
    what is still held back: the first of them, with the count. Thread-safe (the journal's
    worker thread warns too).

    Args:
        log: the logger written to.
        every: seconds between two lines of one kind.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        log: logging.Logger = logger,
        *,
        every: float = REPEAT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._every = every
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def warning(
        self, msg: str, *args: Any, exc_info: bool = False, cause: str | None = None
    ) -> None:
        """Write ``msg % args`` as a WARNING, unless one of its kind was written lately.

        ``cause`` splits one call site's kind by what went wrong (an error's type), so that a
        new cause (credentials revoked in a storm of 5xx) is written, not counted away. It must
        take few values.
        """
        if not self._log.isEnabledFor(logging.WARNING):
            return
        key = msg if cause is None else f"{msg}\0{cause}"
        with self._lock:
            now = self._clock()
            kind = self._kinds.get(key)
            if kind is not None and now - kind.opened < self._every:
                kind.held += 1
                if kind.first_held is None:
                    kind.first_held = args
                return
            self._kinds[key] = _Kind(now)
        if kind is not None and kind.held:
            self._log.warning(
                msg + " (%d more like this in the last %.0f s were not logged)",
                *args,
                kind.held,
                now - kind.opened,
                exc_info=exc_info,
            )
        else:
            self._log.warning(msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Write what is held back: per kind, the first held warning and how many there were."""
        held: list[tuple[str, tuple[Any, ...], int, float]] = []
        with self._lock:
            now = self._clock()
            for key, kind in self._kinds.items():
                if kind.held:
                    msg = key.split("\0", 1)[0]  # the format, without its cause
                    held.append((msg, kind.first_held or (), kind.held, now - kind.opened))
                    kind.held, kind.first_held = 0, None
        for msg, args, count, seconds in held:
            self._log.warning(
                msg + " (the first of %d like this in the last %.0f s that were not logged)",
                *args,
                count,
                seconds,
            )


# --- where the log goes -----------------------------------------------------------------------
def log_level(environment: Environment | None = None) -> int | None:
    """The level ``WUJIE_LOG`` asks for (None: unset, or not one of debug, info, warning)."""
    value = (environment or Environment.read()).log
    if value is None:
        return None
    level = _LEVELS.get(value.strip().lower())
    if level is None:
        logger.warning("%s=%r is not one of debug, info, warning: ignored", LOG, value[:40])
    return level


def show_log(level: int) -> None:
    """Show the ``wujie_async`` log from ``level`` up on stderr.

    Sets the logger's level. When the root logger has no handler (a plain script), one stderr
    handler is added to ``wujie_async``; when it has one (the CLI, or an app that configured
    logging), the records go there as usual and no handler of ours is kept (no line twice).
    """
    log = logging.getLogger("wujie_async")
    log.setLevel(level)
    ours = [handler for handler in log.handlers if handler.get_name() == _HANDLER_NAME]
    if logging.getLogger().handlers:
        for handler in ours:
            log.removeHandler(handler)
        return
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(_FORMAT))
        # Checked at each record too: an app that configures logging after importing us (the
        # usual order) gets each line once, through its own handlers.
        handler.addFilter(lambda record: not logging.getLogger().handlers)
        log.addHandler(handler)


def show_log_from_env() -> None:
    """Apply ``WUJIE_LOG`` (the package does this once, when it is imported)."""
    level = log_level()
    if level is not None:
        show_log(level)


# --- what a job's end is called in telemetry ----------------------------------------------------
def ended_status(error: BaseException | None, status: int | None = None) -> str:
    """A job's end in one low-cardinality word: ``succeeded``, ``failed``, ``rejected``,
    ``ended_without_result``, ``timed_out``, ``unknown``, ``protocol_error`` or ``cancelled``.
    """
    if error is None:
        return "succeeded"
    if isinstance(error, ModerationRejectedError):
        return "rejected"
    if isinstance(error, JobFailedError):
        return "ended_without_result" if status == -1 else "failed"
    if isinstance(error, JobTimeoutError):
        return "timed_out"
    if isinstance(error, UnknownJobError):
        return "unknown"
    if isinstance(error, JobProtocolError):
        return "protocol_error"
    if isinstance(error, JobCancelledError):
        return "cancelled"
    return "failed"


# --- one client's telemetry -----------------------------------------------------------------
# Whether ``import opentelemetry`` failed once already: a failed import is not cached by Python,
# and looking for it again at every client's open would cost a search of sys.path each time.
_otel_missing = False


class Telemetry:
    """One client's (or downloader's) telemetry: its repeated-warnings gate and, while open,
    its OpenTelemetry recorder.

    Attributes:
        otel: the recorder of spans and metrics, or None (opentelemetry absent, or neither
            global provider set when :meth:`start` ran): call sites check this one attribute.
        warnings: the gate of this client's repeated WARNINGs.
    """

    __slots__ = ("_fleet_role", "otel", "warnings")

    def __init__(self) -> None:
        self.otel: Recorder | None = None
        self.warnings = RepeatedWarnings(logger)
        self._fleet_role: str | None = None

    def start(
        self,
        *,
        base_url: str | None = None,
        jobs_in_flight: Callable[[], int] | None = None,
        brake_rates: Callable[[], Iterable[tuple[str, float | None]]] | None = None,
        fleet_role: Callable[[], str | None] | None = None,
    ) -> None:
        """Resolve the global tracer and meter providers (once, as the client opens).

        Args:
            base_url: the gateway's base URL (for the HTTP spans' server attributes).
            jobs_in_flight: the jobs tracked now (read when metrics are collected).
            brake_rates: the 429 brakes' rates per kind of call (read when metrics are
                collected).
            fleet_role: this member's fleet role (read when metrics are collected).
        """
        global _otel_missing
        # A provider can only have been set by code that imported opentelemetry: if nothing
        # did, there is nothing to resolve (and nothing is imported here either).
        if _otel_missing or "opentelemetry" not in sys.modules:
            return
        try:
            from . import _otel
        except ImportError:
            _otel_missing = True
            return
        try:
            self.otel = _otel.Recorder.from_globals(
                base_url=base_url,
                jobs_in_flight=jobs_in_flight,
                brake_rates=brake_rates,
                fleet_role=fleet_role,
            )
        except Exception as exc:  # an opentelemetry too old, or a provider that fails: the
            # client works without telemetry rather than not at all
            logger.warning(
                "OpenTelemetry could not be set up (%s: %s); this client records no spans or "
                "metrics (wujie-async[otel] needs opentelemetry-api>=1.27)",
                type(exc).__name__,
                exc,
            )

    def stop(self) -> None:
        """Write the held-back warnings; stop reporting this client's gauges."""
        self.warnings.flush()
        if self.otel is not None:
            self.otel.close()

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Run the body with no current span: tasks started there (the poller's, a fleet's)
        do not make their spans children of whatever span opened the client."""
        if self.otel is None:
            yield
            return
        with self.otel.detached():
            yield

    # --- the story of a client --------------------------------------------------------------
    def client_opened(
        self,
        *,
        base_url: str,
        limits: Limits,
        timeouts: Timeouts,
        journal: object,
        fleet_member: str | None,
    ) -> None:
        """INFO: the client is open, with its limits and where its telemetry goes."""
        if not logger.isEnabledFor(logging.INFO):
            return
        otel = self.otel
        logger.info(
            "client opened: %s, %r, %r, journal %s%s; OpenTelemetry traces %s, metrics %s",
            base_url,
            limits,
            timeouts,
            journal,
            f", fleet member {fleet_member}" if fleet_member is not None else "",
            "on" if otel is not None and otel.tracer is not None else "off",
            "on" if otel is not None and otel.instruments is not None else "off",
        )

    def client_closed(
        self, stats: ClientStats, left: Sequence[str] = (), *, journal: bool = False
    ) -> None:
        """INFO: the client is closed, with what it did; ``left``: the keys of jobs still
        running at close (accepted, so paid for, and their results not collected). Without a
        journal the line names them (the first ``KEYS_SHOWN``): no other record keeps them."""
        uncollected = ""
        if left:
            if journal:
                kept = "the journal keeps their keys: resume() collects them"
            else:
                # Only the keys shown are cleaned; the rest are counted.
                shown = [*map(shown_key, left[:KEYS_SHOWN]), *left[KEYS_SHOWN:]]
                keys = some_and_more(shown, KEYS_SHOWN)
                kept = f"no journal, their keys: {keys}; images.attach(key) collects each"
            uncollected = (
                f"; {len(left)} job(s) still running were not collected ({kept}; "
                "aclose(drain=True) waits for jobs)"
            )
        # A submit that may have been accepted (its reply lost, or cancelled on the wire) may
        # have been charged: it is not told among those the gateway did not take.
        uncertain = stats.submits_uncertain
        raised = (
            f"{stats.submit_errors} raised ({stats.submit_errors - uncertain} not accepted, "
            f"{uncertain} uncertain: sent without a reply, they may have been accepted and "
            f"charged{'; uncertain_submits() lists them' if journal else ''})"
            if uncertain
            else f"{stats.submit_errors} raised (not accepted)"
        )
        logger.info(
            "client closed: %d submit(s) accepted, %s; "
            "%d job(s) succeeded, %d failed; "
            "%d batch calls (%.1f keys each), %d HTTP requests, %d retries, %d 429s%s",
            stats.submits,
            raised,
            stats.jobs_succeeded,
            stats.jobs_failed,
            stats.batch_calls,
            stats.mean_batch_fill,
            stats.http_calls,
            stats.retries,
            stats.rate_limited,
            uncollected,
        )

    # --- the story of a job --------------------------------------------------------------------
    def job_status(
        self,
        trace: JobTrace | None,
        key: str,
        before: JobStatus | int | None,
        job: ImageJob,
        asks: int,
        next_ask_in: float,
    ) -> None:
        """A running job's status changed: its DEBUG line and its span's event."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "job %s: %s -> %s after %d ask(s) (%.0f%%, next ask in %.2f s)",
                shown_key(key),
                status_name(before),
                job.status_name,
                asks,
                job.progress,
                next_ask_in,
            )
        if trace is not None and self.otel is not None:
            self.otel.job_status(trace, job.status_name, asks)

    def job_ended(
        self,
        trace: JobTrace | None,
        key: str,
        before: JobStatus | int | None,
        job: ImageJob,
        error: BaseException | None,
        asks: int,
    ) -> None:
        """A job ended (``error`` None: it succeeded): its DEBUG line, its span and metrics.

        Lateness is from the gateway's ``complete_time`` (unix seconds, when it reports one)
        to now, the moment the job's future resolved.
        """
        lateness = None
        done_at = job.gateway_complete_time
        if isinstance(done_at, int | float) and not isinstance(done_at, bool):
            lateness = time.time() - done_at
            if not -LATENESS_PLAUSIBLE_S < lateness < LATENESS_PLAUSIBLE_S:
                lateness = None  # not unix seconds after all (milliseconds?): not a figure
        ended = ended_status(error, job.status)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "job %s: %s -> %s after %d ask(s)%s%s",
                shown_key(key),
                status_name(before),
                ended,
                asks,
                "" if lateness is None else f", {lateness:.2f} s after the gateway completed it",
                "" if error is None else f": {type(error).__name__}",
            )
        if trace is not None and self.otel is not None:
            self.otel.job_ended(
                trace,
                key=key,
                status=ended,
                error=error,
                asks=asks,
                images=len(job.images),
                points=job.points_charged,
                lateness=lateness,
            )

    def fleet_role_changed(self, role: str, *, member: str = "") -> None:
        """The hook a fleet member calls when its role changes (``leader``, ``follower``,
        ``local``): one INFO line per change. (The ``wujie.fleet.role`` gauge reads the
        member's role itself, when metrics are collected.)"""
        before, self._fleet_role = self._fleet_role, role
        if role != before:
            logger.info(
                "fleet member %s: role %s -> %s", member or "(this client)", before or "none", role
            )


def brake_changed(kind: str, before: float | None, after: float | None) -> None:
    """Log a 429 brake's change: engaging and releasing at INFO, a further cut at DEBUG."""
    if before is None and after is not None:
        logger.info(
            "429 brake engaged for %s calls: %.1f requests/s (the gateway refused a sustained "
            "share of them)",
            kind,
            after,
        )
    elif after is None and before is not None:
        logger.info("429 brake released for %s calls", kind)
    elif after is not None and before is not None and after < before:
        logger.debug("429 brake for %s calls cut to %.1f requests/s", kind, after)


# WUJIE_LOG applies from the package's import on, as OPENAI_LOG does for openai-python.
show_log_from_env()
