"""The fleet's errors, subclasses of the package's tree (see ``wujie_async._errors``)::

ClientStateError
├── FleetUnavailableError   Redis cannot be reached or stopped answering (names the URL)
└── FleetMismatchError      the fleet's live members use another gateway or app id
WujieError
└── LeaseLostError          this member no longer holds a shard's lease: stop acting for it
"""

from __future__ import annotations

from .._errors import ClientStateError, WujieError


class FleetUnavailableError(ClientStateError):
    """The fleet's Redis cannot be reached, or a command missed its deadline.

    Attributes:
        url: the Redis URL, with any password replaced by ``***``.
    """

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


class FleetMismatchError(ClientStateError):
    """This client's gateway (base URL and app id) is not the one the fleet's live members
    use: its leader would ask its own gateway about their keys (and they about its), which
    does not know them. Raised when the client opens, before anything is submitted; and
    by ``resume()`` of a member refused on joining again (it opened while Redis had lost
    the fleet, and members that were there before came back: it stays out and polls its
    own keys).

    Attributes:
        base_url: this client's base URL.
        fleet_base_url: the base URL of the fleet's members (the app ids are never shown).
    """

    def __init__(self, message: str, *, base_url: str, fleet_base_url: str) -> None:
        self.base_url = base_url
        self.fleet_base_url = fleet_base_url
        super().__init__(message)


class LeaseLostError(WujieError):
    """This member does not (or may no longer) hold the lease of ``shard``.

    Raised before acting when the lease's remaining validity is too short, and when a fenced
    Redis write finds another holder's token. The member must stop polling for that shard.

    Attributes:
        shard: the shard whose lease is gone.
    """

    def __init__(self, message: str, *, shard: int) -> None:
        self.shard = shard
        super().__init__(message)
