"""Fleet mode: many processes and machines share one submit rate, one poller and one journal.

Needs the ``fleet`` extra (``pip install 'wujie-async[fleet]'``): this package imports
redis-py, and ``import wujie_async`` never imports this package. Pass a :class:`RedisFleet` to
``WujieClient(fleet=...)``; ``client.stats.fleet`` (a ``wujie_async.FleetStats``) shows it.
"""

from ._config import FleetConfig
from ._errors import FleetUnavailableError, LeaseLostError
from ._fleet import FleetDurability, RedisFleet

__all__ = [
    "FleetConfig",
    "FleetDurability",
    "FleetUnavailableError",
    "LeaseLostError",
    "RedisFleet",
]
