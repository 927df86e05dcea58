"""What a run does with each line (:class:`Plan`), and the pieces the plans share.

The plans themselves: a re-run on a journal and ``resume`` (``_rerun_plan``), a re-run without
one (``_manifest_plan``, the manifest's rows decide), and ``status`` (``plan_status``, here).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import (
    ImageJob,
    InvalidRequestError,
    JournalEntry,
    WujieClient,
)
from .._budget import Kind, kind_of
from .._gateway_identity import GatewayIdentity, shown_base_url
from .._keys import images_in
from ._bulk_data import Row
from ._common import UsageError
from ._input import line_tag
from ._outcome import (
    OTHER_GATEWAY,
    LineOutcome,
    clean,
)
from ._single import not_a_key

_REPR = re.compile(r"^[A-Za-z_]\w*\((['\"])(.*?)(\1\))?$", re.DOTALL)
OPEN_STATES = ("failed", "moderated", "rejected", "uncertain")
# Lines whose job was paid and may still give its images (it ran on past the deadline or the
# stop, or succeeded but an image could not be saved): a re-run collects them by key.
COLLECTED_AGAIN = ("timeout", "interrupted", "download", "gone")
# Uncertain lines whose job the gateway accepted (it has a key) and then reported only in ways
# that could not be read, or never listed or forgot: the job may have succeeded since (or the
# gateway answers readably now). A plain re-run asks about the key again (asking costs
# nothing; it is no resend) and collects the images if the job is listed done.
RECHECKED = ("protocol_error", "unknown_job")


@dataclass(slots=True)
class Plan:
    """What this run does with each line."""

    send: list[Row] = field(default_factory=list)
    collect: list[tuple[Row, ImageJob]] = field(default_factory=list)
    settled: list[LineOutcome] = field(default_factory=list)
    skipped: int = 0
    moved: int = 0  # lines recognised by their request at another line than recorded
    changed: int = 0  # id rows whose request differs from the job the journal holds
    # Jobs of rows no longer in the input (edited or removed since) collected all the same,
    # and running ones the journal holds that no row of this input's manifest names.
    orphans: int = 0
    unclaimed: int = 0
    # Settled lines whose outcome the manifest lacks (a run killed before writing it).
    unrecorded: list[tuple[Row, LineOutcome]] = field(default_factory=list)
    unusable: list[int] = field(default_factory=list)  # journal rows whose key is not usable
    # Journal rows of uncertain lines resent (--retry-uncertain), by the line's row id (else
    # its number): once its new submit is out, the old row is superseded and forgotten (as
    # journal resend does, see sent_lines).
    superseded: dict[str | int, int] = field(default_factory=dict)
    # Every key the journal holds: no new submit of this run may be given one of them.
    journal_keys: set[str] = field(default_factory=set)
    # Keys of uncertain lines asked about again (see RECHECKED): their cost is held as the
    # uncertain lines' (never counted twice), and a line that still cannot be told ends
    # uncertain again, never failed (BulkRun(rechecked=...)).
    rechecked: set[str] = field(default_factory=set)


def of_another_gateway(client: WujieClient) -> Callable[[JournalEntry], bool]:
    """Whether a journal row's submit went to another gateway than ``client``'s (another base
    URL or app id). A row that records none (written before rows did) is taken as this one's."""
    return GatewayIdentity.of(client.base_url, client.credentials.app_id).elsewhere


def elsewhere_outcome(entry: JournalEntry, row: Row) -> LineOutcome:
    """A line whose job another gateway accepted: left to a run on that gateway."""
    shown = shown_base_url(entry.base_url or "") or "(not recorded)"
    return LineOutcome(
        "uncertain",
        row.line,
        row.row_id,
        entry.job_key,
        OTHER_GATEWAY,
        f"accepted (paid) by another gateway, base URL {shown} (or another app id): not "
        "collected from this one, and not sent again; collect it with a run on that gateway",
        base_url=shown,
    )


def known_keys(records: Iterable[dict[str, Any]], entries: Iterable[JournalEntry] = ()) -> set[str]:
    """Every job key the manifest's ``records`` and the journal's ``entries`` hold: keys of
    earlier jobs that no new submit may be given (``WujieClient.refuse_keys``)."""
    keys = {key for record in records if isinstance(key := record.get("key"), str)}
    return keys | {entry.job_key for entry in entries if entry.job_key}


def readable_error(error: str) -> str:
    """A journaled error as words: rows may hold ``Class('message')``; keep the message.

    A cancelled submit is journaled as ``CancelledError(...)`` whose text says nothing to a
    user (``Cancelled via cancel scope 7f79...``): it is said in words instead.
    """
    if error.startswith("CancelledError("):
        return "interrupted while the submit was under way: it may have been accepted (and charged)"
    found = _REPR.match(error)
    return clean(found.group(2) if found else error)


def line_of(entry: JournalEntry, lines: Mapping[str, int] | None = None) -> tuple[int, str | None]:
    """The input line and row id a journal row's tag names. An id row's tag holds no line:
    ``lines`` (the manifest's line of each id, see :func:`lines_by_id`) gives it, else 0."""
    tag = entry.tag or ""
    if tag.startswith("id:"):
        row_id = tag[3:]
        return (lines or {}).get(row_id, 0), row_id
    parsed = line_tag(tag)
    return (parsed[0] if parsed is not None else 0), None


def sent_lines(outcomes: Iterable[LineOutcome]) -> set[str | int]:
    """The lines a run sent (each by its row id, else its number): every outcome but
    ``not_sent``. A journal row such a line was resent for is superseded by the new submit."""
    return {o.row_id or o.line for o in outcomes if o.status != "not_sent"}


def lines_by_id(records: list[dict[str, Any]]) -> dict[str, int]:
    """The latest input line the manifest gives each row id."""
    return {
        record["id"]: record["line"]
        for record in records
        if isinstance(record.get("id"), str) and as_int(record.get("line")) > 0
    }


def held(record: dict[str, Any], body: dict[str, Any], unpriced: Collection[Kind]) -> bool:
    """Whether the budget holds the cost of an uncertain line asked about again already: it
    counts what uncertain lines may have cost (``uncertain_cost``) at their kind's price. A
    line of a kind with no known price (``unpriced``) is counted at nothing there, so its job
    is charged to the budget when collected (what it cost, once it is known), as any job
    collected is: never twice, never not at all."""
    if record.get("status") != "uncertain":
        return False
    return kind_of(body, images_in(body) or 1) not in unpriced


def legacy_unknown(record: dict[str, Any]) -> bool:
    """A row of a job whose key the gateway handed out and then never listed, written
    ``failed`` by a version before such jobs ended ``uncertain``: it may have run and been
    charged all the same, so it is asked about again, never resent by ``--retry-failed``
    (its cost is not held as an uncertain line's: the collect counts it)."""
    return record.get("status") == "failed" and record.get("error_code") == "unknown_job"


def as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def attach_key(
    client: WujieClient,
    key: str,
    row: Row,
    n: int,
    job_timeout: float | None,
    charged: frozenset[str],
    *,
    held: bool = False,
    submitted_at: float | None = None,
) -> ImageJob | None:
    try:
        return _attach_charged(
            client, key, row.body, n, job_timeout, charged, held=held, submitted_at=submitted_at
        )
    except InvalidRequestError:
        return None


def told_long_ago(client: WujieClient) -> float:
    """A time an uncertain line's job (see RECHECKED) was surely submitted by, as its
    manifest row tells (a manifest keeps no submit times): the row says the gateway listed
    the key and then forgot it, or left it out of its replies, or listed it only unreadably,
    for a whole grace after the submit, before the row was written. Past that moment after
    a submit, a key never listed on the re-ask ends after a few seconds of replies
    (``attach(submitted_at=...)``), not after the whole grace again: it stays uncertain."""
    return time.time() - client.poll_policy.unknown_key_grace


def _attach_charged(
    client: WujieClient,
    key: str,
    request: dict[str, Any],
    n: int,
    job_timeout: float | None,
    charged: frozenset[str],
    *,
    held: bool = False,
    submitted_at: float | None = None,
) -> ImageJob:
    """The job of an earlier run's key. Its cost counts against the budget (if any) unless
    ``charged`` says a manifest row records it, the request names no model to price it by, or
    ``held``: an uncertain line's, whose cost the budget holds already (``uncertain_cost``).

    Raises:
        InvalidRequestError: the key (or ``n``) is not usable.
    """
    return client.images.attach(
        key,
        job_timeout=job_timeout,
        n=n,
        request=request,
        charge_budget=not held and key not in charged and isinstance(request.get("model"), str),
        submitted_at=submitted_at,
    )


def attach_row(
    client: WujieClient,
    entry: JournalEntry,
    plan: Plan,
    n: int,
    job_timeout: float | None,
    charged: frozenset[str],
    *,
    held: bool = False,
    submitted_at: float | None = None,
) -> ImageJob | None:
    """The job of a journaled key (see :func:`_attach_charged`), or None (noted in ``plan``)
    when the key is not usable: one damaged row never stops the others."""
    try:
        return _attach_charged(
            client,
            entry.job_key or "",
            entry.request,
            n,
            job_timeout,
            charged,
            held=held,
            submitted_at=submitted_at,
        )
    except InvalidRequestError:
        plan.unusable.append(entry.id)
        return None


def unusable_key(entry: JournalEntry, row: Row) -> LineOutcome:
    return LineOutcome(
        "failed",
        row.line,
        row.row_id,
        None,
        "journal",
        f"journal row {entry.id} holds a job key that is not usable "
        f"({clean(entry.job_key)[:40]!r}); its job cannot be followed (see the gateway's console)",
    )


def plan_status(
    client: WujieClient,
    keys: list[str],
    *,
    job_timeout: float | None,
) -> Plan:
    """``status --wait``: collect the jobs of these keys (numbered 1.. in the order given).

    Images an earlier run saved (the manifest says which) are not fetched again.
    """
    plan = Plan()
    for number, key in enumerate(keys, start=1):
        try:
            job = client.images.attach(key, job_timeout=job_timeout)
        except InvalidRequestError:
            raise UsageError(not_a_key(key)) from None
        plan.collect.append((Row(number, None, None, {}), job))
    return plan
