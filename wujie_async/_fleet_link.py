"""What the client needs of fleet mode, without importing it (no Redis unless ``fleet=``).

``WujieClient(fleet=RedisFleet(...))`` makes a ``wujie_async.fleet.FleetMember``, which
satisfies :class:`FleetLink`; the client only talks to it through these methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._config import Limits, PollPolicy
    from ._journal import JournalEntry, SubmitJournal
    from ._poller import BatchPoller
    from ._transport import Transport


@dataclass(frozen=True, slots=True)
class FleetStats:
    """This member's view of its fleet (part of ``client.stats``).

    Attributes:
        role: ``leader`` (it polls for the fleet), ``follower`` (a leader polls for it) or
            ``local`` (Redis is away: it polls its own keys).
        size: live members, this one included (as of the last refresh, about every second).
        rate: the fleet-wide submit rate (None: no rate set).
        batch_calls: batch calls the fleet's leaders have sent.
        keys_polled: keys those calls asked about.
        leader_calls: batch calls this member sent as a leader.
        leader_keys: keys those calls asked about.
        lessons_learned: lessons this member's poll schedule took from other members' jobs.
    """

    role: str
    size: int
    rate: float | None
    batch_calls: int
    keys_polled: int
    leader_calls: int
    leader_keys: int
    lessons_learned: int = 0


class FleetLink(Protocol):
    """One client's membership of a fleet (see ``wujie_async.fleet.FleetMember``)."""

    @property
    def member_id(self) -> str:
        """This member's id, unique across the fleet."""
        ...

    @property
    def header_token(self) -> str:
        """A short random token sent as ``X-Wujie-Member`` (tells members apart in logs)."""
        ...

    @property
    def journal(self) -> SubmitJournal:
        """The fleet's journal, writing as this member."""
        ...

    async def start(
        self, *, poller: BatchPoller, transport: Transport, poll: PollPolicy, limits: Limits
    ) -> None:
        """Connect, join, and start leading/following (raises FleetUnavailableError)."""
        ...

    async def stop_polling(self) -> None:
        """Stop asking the gateway and reading reports (before the transport closes)."""
        ...

    async def aclose(self) -> None:
        """Leave the fleet (its jobs become claimable at once) and disconnect."""
        ...

    async def acquire(self) -> None:
        """Wait for this submit's turn under the fleet-wide rate and 429 pause."""
        ...

    def tracked(self, key: str) -> None:
        """The poller now tracks ``key``: register it (and its due time) with the fleet."""
        ...

    def ended(self, key: str) -> None:
        """``key``'s job ended here: the fleet stops polling it."""
        ...

    async def claim_dead(self) -> list[JournalEntry]:
        """The accepted submits of dead members, now this member's (each to one member)."""
        ...

    def stats(self) -> FleetStats:
        """A snapshot of the fleet as this member sees it."""
        ...
