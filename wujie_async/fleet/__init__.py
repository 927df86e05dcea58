"""Fleet mode: many processes and machines share one submit rate, one poller and one journal.

Needs the ``fleet`` extra (``pip install 'wujie-async[fleet]'``): this package imports
redis-py, and ``import wujie_async`` never imports this package. Use it as
``WujieClient(fleet=RedisFleet(url, name=...))``; ``client.stats.fleet`` (a
``wujie_async.FleetStats``) tells how the fleet is doing.
"""

from ._errors import FleetMismatchError, FleetUnavailableError
from ._fleet import FleetDurability, RedisFleet
from ._link import FleetConfig

__all__ = [
    "FleetConfig",
    "FleetDurability",
    "FleetMismatchError",
    "FleetUnavailableError",
    "RedisFleet",
]
