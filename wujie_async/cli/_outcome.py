"""How each input line ended, in words a user can act on, and the manifest that records it.

Every line ends in exactly one outcome:

- ``saved``: all its images are on disk (one manifest line per image).
- ``failed``: the gateway ran the job and said it failed (or it timed out, or an image could not
  be saved).
- ``moderated``: the gateway's moderation rejected the job.
- ``rejected``: the gateway refused the submit before accepting it (nothing was charged).
- ``uncertain``: the submit may have been accepted (and charged), or was accepted and its reports
  could not be read; it is never resent silently.
- ``not_sent``: the line was never sent (the run stopped first, or a systemic error refused it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

from .. import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
    EndpointNotFoundError,
    IncompleteJobError,
    InsufficientBalanceError,
    JobCancelledError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    ModerationRejectedError,
    RateLimitedError,
    RequestRefusedError,
    SubmitUncertainError,
    TransportError,
    UnexpectedRedirectError,
    UnknownJobError,
    WujieError,
    snippet,
)
from .._budget import Budget, Kind, kind_of
from .._config import price_key_problem
from .._keys import images_in

Status = Literal["saved", "failed", "moderated", "rejected", "uncertain", "not_sent"]
STATUSES: Final[tuple[Status, ...]] = (
    "saved",
    "failed",
    "moderated",
    "rejected",
    "uncertain",
    "not_sent",
)


def clean(text: object) -> str:
    """Server (or any foreign) text as one printable line: no escape codes, no controls."""
    return snippet(str(text))


def is_systemic(exc: BaseException) -> bool:
    """True for errors that are not about one line (credentials, base URL, balance, network):
    the run stops sending. The library classifies them (``WujieError.systemic``)."""
    return isinstance(exc, WujieError) and exc.systemic


def fix_message(exc: BaseException, base_url: str, *, app_id_flag: bool) -> str:
    """The one line that says what stopped the run and what to change."""
    where = "--app-id" if app_id_flag else "WUJIE_APP_ID"
    if isinstance(exc, AuthenticationError):
        status = exc.http_status
        return (
            f"stopped: the gateway refused the credentials (HTTP {status}: {clean(exc.message)}); "
            f"check {where} and WUJIE_PRIVATE_KEY (or --private-key-file), and the clock"
        )
    if isinstance(exc, InsufficientBalanceError):
        return (
            "stopped: the account is out of points (code 20110010, insufficient balance); "
            "top up the balance, then re-run the same command"
        )
    if isinstance(exc, EndpointNotFoundError):
        return (
            f"stopped: {clean(exc.url or base_url)} answered HTTP {exc.http_status} (no such API "
            "route); check --base-url / WUJIE_BASE_URL, which must end in /wj-open/v1"
        )
    if isinstance(exc, RequestRefusedError):
        return (
            f"stopped: a proxy before the gateway refused the requests (HTTP {exc.http_status}: "
            "it asks for credentials of its own); check the network path to --base-url / "
            "WUJIE_BASE_URL"
        )
    if isinstance(exc, UnexpectedRedirectError):
        return (
            f"stopped: {clean(base_url)} answered with a redirect (to "
            f"{clean(exc.location) or 'somewhere unsaid'}), which is never followed; check "
            "--base-url / WUJIE_BASE_URL (https, ending in /wj-open/v1)"
        )
    if isinstance(exc, TransportError) and not exc.reached_server:
        # It says it all: "could not connect to URL: why; check the base URL ... and the
        # network" (wrapped again, the URL and the fix were said twice).
        return f"stopped: {clean(exc)}"
    return (
        f"stopped: cannot connect to {clean(base_url)} ({clean(exc)}); "
        "check --base-url / WUJIE_BASE_URL and the network"
    )


def classify(exc: BaseException) -> tuple[Status, str, str]:
    """(status, error_code, one-line error) of a line that ended with ``exc``."""
    message = clean(exc) or type(exc).__name__
    if isinstance(exc, ModerationRejectedError):
        return "moderated", str(exc.fail_code or "moderated"), message
    if isinstance(exc, JobFailedError):
        return "failed", clean(exc.fail_code) if exc.fail_code is not None else "failed", message
    if isinstance(exc, JobTimeoutError):
        return "failed", "timeout", message
    if isinstance(exc, UnknownJobError):
        # The gateway handed out this key: a job it listed and then forgot, or one it never
        # listed (its listing lags, say), may have run and been charged. Like a submit without
        # a reply it is never resent unasked (--retry-uncertain resends it); a plain re-run
        # asks about its key again. As "failed", --retry-failed resent it: paid twice if it ran.
        if not exc.was_listed:
            message += " (its key was handed out: it may have run and been charged; not resent)"
        return "uncertain", "unknown_job", message
    if isinstance(exc, JobCancelledError):
        return "failed", "cancelled", message
    if isinstance(exc, JobProtocolError):
        # The gateway accepted it (it has a key) and then said of it what could not be read:
        # it may have run and been charged. Not "rejected" (nothing charged), which
        # --retry-failed resends: that paid twice for jobs that had succeeded.
        return (
            "uncertain",
            "protocol_error",
            message + " (it was accepted, and may have run and been charged; not resent)",
        )
    if isinstance(exc, IncompleteJobError):
        return (
            "failed",
            "incomplete",
            clean(
                f"job {exc.job_key}: the gateway reported it done with {exc.landed} of "
                f"{exc.expected} image(s)"
            ),
        )
    if isinstance(exc, BudgetExceededError) and exc.unpriced:
        return (
            "not_sent",
            "unpriced",
            (
                f"not sent: the gateway did not report what a {exc.model} job cost, so "
                f"--max-points {exc.max_points:g} cannot be held; give its price with "
                f"--point-price {exc.model}=POINTS (points per image) and re-run"
            ),
        )
    if isinstance(exc, BudgetExceededError):
        return (
            "not_sent",
            "budget",
            (
                f"not sent: over the points budget (--max-points {exc.max_points:g}; "
                f"{exc.spent:g} spent, {exc.reserved:g} held for jobs in flight); "
                "re-run with a larger --max-points to send it"
            ),
        )
    if isinstance(exc, SubmitUncertainError):
        return "uncertain", "uncertain", message + " (it may have been charged; not resent)"
    if is_systemic(exc):  # the gateway never accepted it (the library promises so): not sent
        return "not_sent", _code(exc), message
    if isinstance(exc, RateLimitedError):
        # Refused for the rate, after the client's own retries: the gateway made no job, and
        # the line is not the gateway's verdict on the request: a plain re-run sends it.
        return "not_sent", _code(exc), message + " (refused for the rate: a re-run sends it)"
    if isinstance(exc, APIError):
        return "rejected", _code(exc), message
    if isinstance(exc, TransportError):
        return "failed", "download", message
    return "failed", "error", message


def _code(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        if exc.code is not None and exc.code != str(exc.http_status):
            return clean(exc.code)
        if exc.http_status is not None:
            return f"http_{exc.http_status}"
        return "api"
    if isinstance(exc, TransportError):
        return "connect" if not exc.reached_server else "transport"
    return "error"


# The error_code of a line whose job another gateway accepted (another base URL or app id
# than the run's): never asked of this one, never resent (see _plan.elsewhere_outcome).
OTHER_GATEWAY: Final = "other_gateway"


@dataclass(slots=True)
class LineOutcome:
    """How one input line ended."""

    status: Status
    line: int
    row_id: str | None
    key: str | None = None
    error_code: str | None = None
    error: str | None = None
    # An image that could not be saved and never will be by a re-run as it stands (too large
    # for the cap, bytes that are not an image): what is wrong, in words (see
    # _image_problems.lasting_problem).
    lasting: str | None = None
    # A line whose job another gateway accepted (another base URL or app id than this run's):
    # the base URL that took it (see _plan.elsewhere_outcome), never asked of this one.
    base_url: str | None = None


# What ``input`` says for records of commands that read no input file.
COMMAND_SOURCES: Final = frozenset({"generate", "edit", "status", "resume", "resend"})


class Manifest:
    """``manifest.jsonl``: one line per saved image, one per line that ended without images.

    Append-only: a re-run adds lines, and a line's final outcome is its last record. Every
    record says which input it belongs to (``input``: the input file's absolute path, or the
    command that wrote it), so the runs of two inputs are never mistaken for one another.
    """

    def __init__(self, handle: BinaryIO, *, source: str) -> None:
        self._handle = handle  # unbuffered: a failed write leaves nothing behind to retry
        self._source = source
        self._torn = False  # a write the disk cut short left part of a line
        self.written: list[dict[str, Any]] = []  # this run's rows, while its file stands

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, straight to the file (a crash loses at most the line being
        written). A line the disk cut short is ended before the next, which stays readable.

        Raises:
            ManifestGoneError: the file was deleted while the run wrote it (its folder
                removed): this run's rows are in ``written``, this one included.
            OSError: the disk refused it (full, say); nothing of it was kept, or a torn part.
        """
        record = {**record, "input": self._source}
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        ending = b"\n" if self._torn else b""
        data = ending + data
        written = 0
        try:
            while written < len(data):
                written += self._handle.write(data[written:]) or 0
        except OSError:
            if written > len(ending):  # part of the row went in: take it out again
                try:
                    # Appended last, by the one writer (the out-folder lock): the row's part
                    # is the file's last ``written - len(ending)`` bytes.
                    fd = self._handle.fileno()
                    os.ftruncate(fd, os.fstat(fd).st_size - (written - len(ending)))
                    self._torn = False
                except OSError:
                    self._torn = True
            elif written:
                self._torn = False  # the torn line was ended, nothing of this row went in
            raise
        self._torn = False
        self.written.append(record)
        if os.fstat(self._handle.fileno()).st_nlink == 0:
            # Written to a file no name leads to any more: the run's rows, and the keys of
            # the jobs it paid for, would be gone with it (a run that went on into a deleted
            # folder said "saved 40" and named a manifest that did not exist).
            raise ManifestGoneError(
                errno.ENOENT,
                "the manifest was deleted while this run wrote it (its folder removed?)",
            )

    def close(self) -> None:
        """Close the file. Every row was written straight to it, so a close that fails (a
        full disk) has nothing left to lose, and the run has reported it already."""
        with contextlib.suppress(OSError):
            self._handle.close()


class ManifestGoneError(OSError):
    """The manifest's file was deleted while a run wrote it."""


def other_inputs(records: Iterable[dict[str, Any]], source: str) -> list[str]:
    """Input files other than ``source`` whose bulk runs wrote ``records``."""
    found = {r.get("input") for r in records}
    return sorted(
        name
        for name in found
        if isinstance(name, str) and name != source and name not in COMMAND_SOURCES
    )


def run_source(records: Iterable[dict[str, Any]], fallback: str) -> str:
    """The input a command that continues a run (``resume``, ``journal resend``) writes for:
    the one input file the manifest holds, else ``fallback``."""
    inputs = other_inputs(records, fallback)
    return inputs[0] if len(inputs) == 1 else fallback


# What ``input`` says for records of commands that continued a folder's journaled run when
# its manifest named no input yet (a run killed outright before its first row).
CONTINUED_SOURCES: Final = frozenset({"resume", "resend"})


def of_source(records: Iterable[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The records of ``source`` (records from before inputs were recorded count as its own,
    and so do those ``resume`` or ``journal resend`` wrote for the folder's one input without
    knowing its name: else a re-run would collect their jobs again and count their points
    twice)."""
    return [
        r
        for r in records
        if r.get("input", source) == source or r.get("input") in CONTINUED_SOURCES
    ]


def base_record(
    status: Status, line: int, row_id: str | None, body: dict[str, Any], tag: str | None = None
) -> dict[str, Any]:
    """The fields every manifest line has (``tag``: how re-runs recognise the row)."""
    record: dict[str, Any] = {"status": status, "line": line}
    if row_id is not None:
        record["id"] = row_id
    if tag is not None:
        record["tag"] = tag
    record["model"] = body.get("model")
    record["size"] = body.get("size")
    record["prompt"] = body.get("prompt")
    record["n"] = body.get("n")
    return record


def recorded_request(record: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The request a manifest row was written for, as far as rows tell it (the fields of
    ``body`` they do not record are taken from it)."""
    recorded = dict(body)
    for name in ("model", "size", "prompt", "n"):
        if name in record:
            if record[name] is None:
                recorded.pop(name, None)
            else:
                recorded[name] = record[name]
    return recorded


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every readable record of a manifest (a torn last line is skipped)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return manifest_records(raw)


def manifest_records(raw: bytes) -> list[dict[str, Any]]:
    """Every readable record of a manifest's bytes (a torn line is skipped)."""
    records = []
    # Rows end at "\n" only (JSON escapes it in strings); not ``splitlines()``, which also
    # splits at U+2028 or U+0085 in a prompt, losing that row: its line would be paid again.
    # Each line is decoded on its own: one the disk cut short inside a character is no UTF-8,
    # and decoded whole, the file failed every run of the folder.
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError among them
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def open_manifest(path: Path) -> BinaryIO:
    """The manifest, open for appending rows, unbuffered (blocking: call it on a worker thread).

    A torn last line (a crash mid-write) is ended first, so the next row starts on a line of
    its own: written onto the torn one, both would be unreadable, and the run's own row lost.

    Created ``0600``, and an existing one (an older run's, ``0644``) is tightened to its
    owner, as the journal is: it holds the prompts, keys and paths of the run.

    Raises:
        OSError: the file cannot be opened or written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "ab", buffering=0)
    try:
        _restrict(fd, path)
        with path.open("rb") as raw:
            torn = raw.seek(0, 2) > 0 and raw.seek(-1, 2) >= 0 and raw.read(1) != b"\n"
        if torn:
            handle.write(b"\n")
    except BaseException:
        handle.close()
        raise
    return handle


def _restrict(fd: int, path: Path) -> None:
    """Take group/other access away from the open manifest ``fd``, unless ``path`` is a
    symbolic link: its name is ours, not the user's, and a link planted there would have its
    target's mode changed (the journal's ``-wal`` is treated so)."""
    with contextlib.suppress(OSError):
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077 and not path.is_symlink():
            os.fchmod(fd, mode & 0o700)


def _points_of(record: dict[str, Any]) -> float | None:
    """The points a manifest row says its job was charged, when it says (and makes sense)."""
    points = record.get("points")
    if isinstance(points, int | float) and not isinstance(points, bool) and points >= 0:
        return points
    return None


def points_spent(records: Iterable[dict[str, Any]]) -> float:
    """The points the manifest's rows say were charged."""
    return sum((points for record in records if (points := _points_of(record)) is not None), 0.0)


def uncertain_unpriced(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float] | None,
) -> set[Kind]:
    """The kinds of the lines an earlier run left ``uncertain`` that have no known price.

    Such a line may have been charged, and :func:`uncertain_cost` can count it at nothing:
    a re-run that sent another job of its kind to learn the price would spend past the
    budget by it, once per re-run while replies are lost. The library's budget refuses that
    within a run (the kind is unpriced until ``point_prices`` gives one); so does a re-run.
    """
    pricing = Budget(math.inf, prices)
    kinds: set[Kind] = set()
    for body in _uncertain_bodies(records, bodies):
        kind = kind_of(body, images_in(body) or 1)
        if pricing.estimate(kind) is None:
            kinds.add(kind)
    return kinds


def line_outcome(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row that says how a line ended, of its rows (oldest first; at least one): its
    last, unless ``not_sent`` rows follow an ``uncertain`` one. A line resent with
    ``--retry-uncertain`` that the budget (or a stop) kept from being sent is still
    uncertain: it may have been charged, and a plain re-run must neither send it nor stop
    holding its price."""
    for record in reversed(rows):
        if record.get("status") != "not_sent":
            return record if record.get("status") == "uncertain" else rows[-1]
    return rows[-1]


def lines_ended(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tagged line's :func:`line_outcome`, by tag."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        tag = record.get("tag")
        if isinstance(tag, str):
            rows.setdefault(tag, []).append(record)
    return {tag: line_outcome(mine) for tag, mine in rows.items()}


def _uncertain_bodies(
    records: Iterable[dict[str, Any]], bodies: Mapping[str, Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The request bodies of the lines that ended ``uncertain`` (see :func:`line_outcome`)."""
    return [
        body
        for tag, record in lines_ended(records).items()
        if record.get("status") == "uncertain" and (body := bodies.get(tag)) is not None
    ]


def uncertain_cost(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float] | None,
) -> float:
    """The most the lines an earlier run left ``uncertain`` may have been charged.

    A line whose last row is ``uncertain`` (its submit may have been accepted: no key came
    back) is counted at its request's price (``prices``: the user's and what earlier runs were
    charged, by kind); a kind with no known price counts nothing (the budget's guide says
    so). ``bodies``: this run's request bodies by row tag.
    """
    return priced_at(_uncertain_bodies(records, bodies), prices or {}).points


def prices_charged(
    records: Iterable[dict[str, Any]], bodies: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """Points per image earlier runs were charged, as ``Limits.point_prices`` keys.

    ``bodies``: this run's request bodies by row tag; a saved row whose tag is among them
    gives its job's cost (on one row of the job) for the kind of that request,
    ``model/size/quality`` ("auto" where not given, as the budget reads a kind). Only jobs
    that saved images count (a failed job often costs nothing: that is no price), and a cost
    of 0 is none either; the most a kind cost wins.
    """
    prices: dict[str, float] = {}
    for record in records:
        points, body = _points_of(record), bodies.get(str(record.get("tag")))
        if record.get("status") != "saved" or body is None or points is None:
            continue
        learn_price(prices, body, points)
    return prices


def with_learned_prices(
    given: Mapping[str, float] | None, learned: Mapping[str, float]
) -> dict[str, float]:
    """The user's ``--point-price`` table, and what earlier runs were charged (``learned``,
    from :func:`prices_charged`) for the models the user gave no price for: the user's word
    wins for every kind of a model it names."""
    prices = dict(given or {})
    priced = {key.split("/", 1)[0] for key in prices}
    prices.update(
        (key, price) for key, price in learned.items() if key.split("/", 1)[0] not in priced
    )
    return prices


def learn_price(prices: dict[str, float], body: Mapping[str, Any], points: float) -> None:
    """Put what a job of ``body`` that saved its images cost (``points``) in ``prices``, per
    image, as a ``Limits.point_prices`` key (see :func:`prices_charged`): the most wins."""
    n = body.get("n") or 1
    # A job that saved its images at 0 points was not free: its gateway said 0 before the
    # cost was settled. Taken as a price, it let a re-run's lines go uncounted.
    if not math.isfinite(points) or points <= 0 or not isinstance(n, int) or n < 1:
        return
    model, size, quality, _ = kind_of(body, n)
    key = f"{model}/{size}/{quality}"
    if price_key_problem(key) is not None:
        return  # an unknown model's odd size (not WxH): Limits would refuse the key
    prices[key] = max(prices.get(key, 0.0), points / n)


@dataclass(frozen=True, slots=True)
class Unreported:
    """Jobs that ended without the gateway reporting their cost, counted at their kind's price.

    ``points``: what the ``priced`` ones cost at it; ``unpriced``: jobs whose kind has no
    known price (nothing counts them)."""

    points: float = 0.0
    priced: int = 0
    unpriced: int = 0

    @property
    def jobs(self) -> int:
        """Every such job, priced or not."""
        return self.priced + self.unpriced


def priced_at(requests: Iterable[Mapping[str, Any]], prices: Mapping[str, float]) -> Unreported:
    """What jobs of these requests cost at ``prices`` (as ``Limits.point_prices``)."""
    pricing = Budget(math.inf, prices)
    points, priced, unpriced = 0.0, 0, 0
    for body in requests:
        n = images_in(body) or 1
        model = body.get("model")
        estimate = pricing.estimate(kind_of(body, n)) if isinstance(model, str) else None
        if estimate is None:
            unpriced += 1
        else:
            points += estimate
            priced += 1
    return Unreported(points, priced, unpriced)


def unreported_cost(
    records: Iterable[dict[str, Any]],
    bodies: Mapping[str, Mapping[str, Any]],
    prices: Mapping[str, float],
) -> Unreported:
    """Earlier runs' jobs that saved every image while no manifest row records their cost (the
    gateway did not report it), at their kind's price (``prices``: the user's and what earlier
    runs were charged, by kind).

    A job is the request its rows record (model, size, n; the rest from ``bodies``, this run's
    request bodies by row tag). A job with an image not saved yet is left out: the re-run
    collects it, and its budget holds the job's cost itself.
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if isinstance(key := record.get("key"), str):
            rows.setdefault(key, []).append(record)
    requests: list[dict[str, Any]] = []
    for mine in rows.values():
        saved = [record for record in mine if record.get("status") == "saved"]
        if not saved or any(_points_of(record) is not None for record in mine):
            continue
        first = saved[0]
        body = recorded_request(first, dict(bodies.get(str(first.get("tag"))) or {}))
        if len({record.get("index") for record in saved}) >= (images_in(body) or 1):
            requests.append(body)
    return priced_at(requests, prices)


def saved_indexes(records: Iterable[dict[str, Any]]) -> dict[str, set[int]]:
    """Image indexes already saved, per job key."""
    saved: dict[str, set[int]] = {}
    for record in records:
        key, index = record.get("key"), record.get("index")
        if record.get("status", "saved") == "saved" and isinstance(key, str):
            if isinstance(index, int):
                saved.setdefault(key, set()).add(index)
    return saved


def count(outcomes: Iterable[LineOutcome]) -> Counter[str]:
    """Outcomes counted by status, every status present (zero when none)."""
    counts: Counter[str] = Counter(dict.fromkeys(STATUSES, 0))
    counts.update(outcome.status for outcome in outcomes)
    return counts
