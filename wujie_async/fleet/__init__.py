"""Fleet mode: many processes and machines share one rate limit, one poller and one journal.

Needs the ``fleet`` extra (``pip install 'wujie-async[fleet]'``): this package imports
redis-py, and ``import wujie_async`` never imports this package.

Building blocks, each made from a started :class:`RedisFleet`:

- :class:`FleetLimiter` (``fleet.limiter(rate)``): one submit rate and one 429 pause for all.
- :class:`Membership` (``fleet.membership()``): member ids, heartbeats, who is dead.
- :class:`LeaderLease` (``fleet.lease(shard, member)``): a shard's fenced leader lease.
- :class:`KeyRegistry` (``fleet.registry()``): outstanding keys and their due times, by shard.
- :class:`ReportOutbox` / :class:`ReportInbox`: poll reports to each member, on a Redis stream.
- :class:`RedisJournal` (``fleet.journal(member)``): the SQLite journal's protocol in Redis,
  plus ``claim_dead`` to take over dead members' accepted keys.
"""

from ._errors import FleetUnavailableError, LeaseLostError
from ._fleet import FleetConfig, FleetDurability, RedisFleet
from ._journal import Claim, RedisJournal
from ._lease import LeaderLease
from ._limiter import FleetLimiter
from ._membership import Membership
from ._registry import DueBatch, DueKey, KeyRegistry
from ._reports import Report, ReportInbox, ReportOutbox

__all__ = [
    "Claim",
    "DueBatch",
    "DueKey",
    "FleetConfig",
    "FleetDurability",
    "FleetLimiter",
    "FleetUnavailableError",
    "KeyRegistry",
    "LeaderLease",
    "LeaseLostError",
    "Membership",
    "RedisFleet",
    "RedisJournal",
    "Report",
    "ReportInbox",
    "ReportOutbox",
]
