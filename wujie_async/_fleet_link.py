"""What the client needs of fleet mode, without importing it (no Redis unless ``fleet=``).

``WujieClient(fleet=fleet)`` gets this member's :class:`FleetLink` from ``fleet.member()`` (a
``wujie_async.fleet.RedisFleet``) and only talks to it through these methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ._journal import SubmitJournal
from ._save_record import SaveJournal

if TYPE_CHECKING:
    from ._config import Limits, PollPolicy
    from ._jobs import ImageJob
    from ._journal import JournalEntry
    from ._poller import BatchPoller
    from ._ratelimit import Ready
    from ._stats import FleetStats
    from ._transport import Transport


class FleetJournal(SubmitJournal, SaveJournal, Protocol):
    """The fleet's journal: submits, and ``job.save()`` (a save cut off is resumed)."""


class FleetLink(Protocol):
    """One client's membership of a fleet."""

    @property
    def member_id(self) -> str:
        """This member's id, unique across the fleet."""
        ...

    @property
    def header_token(self) -> str:
        """A short random token sent as ``X-Wujie-Member`` (tells members apart in logs)."""
        ...

    @property
    def journal(self) -> FleetJournal:
        """The fleet's journal, writing as this member."""
        ...

    async def start(
        self,
        *,
        poller: BatchPoller,
        transport: Transport,
        poll: PollPolicy,
        limits: Limits,
        app_id: str,
    ) -> None:
        """Connect, join, and follow or lead (raises FleetUnavailableError; and
        FleetMismatchError when the fleet's members ask another gateway or app id)."""
        ...

    async def stop_polling(self) -> None:
        """Stop asking the gateway and reading reports (before the transport closes)."""
        ...

    async def aclose(self) -> None:
        """Leave the fleet (its jobs become claimable at once) and disconnect."""
        ...

    async def acquire(self, ready: Ready) -> None:
        """Wait for this submit's turn under the fleet-wide rate and 429 pause, awaiting
        ``ready`` (the journal's intent) shortly before the turn comes."""
        ...

    def tracked(self, job: ImageJob, first_delay: float | None) -> None:
        """The poller now tracks ``job``: the fleet's leader asks about it until it ends.

        ``first_delay``: seconds until the first ask (None: the poll policy's).
        """
        ...

    async def resumable(self) -> list[JournalEntry]:
        """The accepted submits this member should follow: dead members' (now this member's,
        each claimed by one member) and its own (a job that timed out, say); then the
        succeeded jobs whose save was cut off, its own and dead members' (claimed the same
        way), including any being saved in this process (the client leaves those out)."""
        ...

    def stats(self) -> FleetStats:
        """A snapshot of the fleet as this member sees it."""
        ...
