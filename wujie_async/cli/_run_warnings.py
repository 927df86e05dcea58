"""What a run's summary says of what went wrong beside its lines: what stopped the sending,
a journal that did not forget the rows the run superseded or did not commit its last
records, and the keys of jobs to keep that no record holds.

Apart from ``_summary`` because ``journal resend`` (``_journal_resend``) says the same
warnings after its own run: both take them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import some_and_more
from .._journal_worker import CLOSE_DEADLINE_S as JOURNAL_CLOSE_DEADLINE_S
from ._bulk_data import BulkResult
from ._common import shell_path
from ._journal_rows import numbered
from ._outcome import clean, fix_message
from ._stops import GatewayFailingError, OutputUnwritableError


def keys_held(records: list[dict[str, Any]]) -> list[str]:
    """The job keys rows hold, each once, in order."""
    return list(dict.fromkeys(r["key"] for r in records if isinstance(r.get("key"), str)))


def _unrecorded_keys(records: list[dict[str, Any]]) -> str:
    """What the summary says of rows the manifest could not take: the keys they held."""
    keys = keys_held(records)
    if not keys:
        return ""
    return f"\n{_keys_to_keep(keys, 'whose outcome the manifest could not record')}"


def _keys_to_keep(keys: list[str], which: str) -> str:
    """``N job(s) <which> (keep these keys; ...): K1, K2, ...`` (the first 20 shown)."""
    shown = some_and_more([clean(key) for key in keys], 20)
    return (
        f"{len(keys)} job(s) {which} (keep these keys; `wujie-async status KEY` fetches one): "
        f"{shown}"
    )


def stop_said(result: BulkResult, base_url: str, *, app_id_flag: bool) -> str | None:
    """What stopped the sending (a systemic error, a disk that refused or stopped answering)
    and the keys of the jobs whose rows the manifest could not take; None: nothing did."""
    if isinstance(result.systemic, OutputUnwritableError):
        said = result.systemic.said(keys_listed=bool(keys_held(result.unrecorded)))
        return said + _unrecorded_keys(result.unrecorded)
    if isinstance(result.systemic, GatewayFailingError):
        return str(result.systemic) + _unrecorded_keys(result.unrecorded)
    if result.systemic is not None:
        # The manifest may have refused rows after another error stopped the sending: its
        # keys are said all the same.
        return fix_message(result.systemic, base_url, app_id_flag=app_id_flag) + _unrecorded_keys(
            result.unrecorded
        )
    return None


def forget_failed_said(why: str, journal: Path | None, rows: list[int]) -> str:
    """The summary's warning for a journal that did not forget ``rows``, the rows a run
    superseded; its commands name ``journal`` (without it they would read OUT's default
    one). The rows go by their journal numbers: a line's number or id would name its new row
    too, which may be uncertain, the only record of a job that may have been charged."""
    named = f" --journal {shell_path(journal)}" if journal is not None else ""
    shown = " ".join(f"'{numbered(row)}'" for row in rows[:50])
    more = f" (and {len(rows) - 50} more: see `journal list`)" if len(rows) > 50 else ""
    return (
        f"warning: the journal did not forget the {len(rows)} old row(s) of the lines this "
        f"run sent again ({clean(why)}): they are still listed, and a later --retry-uncertain "
        f"would send them once more; drop them, and only them (not the lines' new rows), "
        f"with `wujie-async journal forget {shown} --yes{named}`{more}"
    )


def journal_left_said(journal: Path | None, keys: list[str]) -> str:
    """What the summary says of the records the journal had not committed when it closed."""
    return (
        f"warning: the journal {journal} took no write for {JOURNAL_CLOSE_DEADLINE_S:g} s at "
        "the end of the run (its disk stopped answering): "
        f"{_keys_to_keep(keys, 'whose records it may lack')}"
    )
