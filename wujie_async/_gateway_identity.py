"""Which gateway a client asks: its base URL, and a fingerprint of base URL and app id.

A job key means something to one gateway and one account only: another gateway (staging for
production, a changed ``WUJIE_BASE_URL``) or another app id does not list it. The journal
records each submit's gateway so that ``resume()`` asks only the gateway that accepted it; a
fleet checks every member's gateway against the fleet's. Both compare this fingerprint: a
SHA-256 of the base URL, spelled one way (:func:`same_gateway`), and the app id, so the app
id itself is never stored (the private key never enters it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from ._errors import some_and_more

_DEFAULT_PORTS = {"http": 80, "https": 443}


def same_gateway(base_url: str) -> str:
    """``base_url`` spelled one way for every spelling of the same gateway: scheme and host
    in lower case (they are case-blind), the scheme's default port left out, no trailing
    slash. The path is kept as given (a gateway's paths may tell case apart)."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port  # check_base_url let it through: its port is a number
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


def gateway_fingerprint(base_url: str, app_id: str) -> str:
    """The SHA-256 (hex) of ``base_url`` (see :func:`same_gateway`) and ``app_id``: equal for
    every spelling of one gateway and one account, different for any other."""
    return hashlib.sha256(f"{same_gateway(base_url)}\n{app_id}".encode()).hexdigest()


def shown_base_url(base_url: str) -> str:
    """``base_url`` fit for a message or a listing: a ``user:password@`` part has its password
    replaced by ``***`` (clients refuse such URLs, but a journal file may hold anything)."""
    scheme, slashes, rest = base_url.partition("://")
    if not slashes:
        return base_url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        user_info, _, host = authority.rpartition("@")
        user = user_info.partition(":")[0] if ":" in user_info else ""
        authority = f"{user}:***@{host}" if user else f"***@{host}"
    return f"{scheme}://{authority}{slash}{path}"


@dataclass(frozen=True, slots=True)
class GatewayIdentity:
    """One gateway and account as the journal records it: the base URL as the client was
    given it (shown to users) and :func:`gateway_fingerprint` (compared)."""

    base_url: str
    fingerprint: str

    @classmethod
    def of(cls, base_url: str, app_id: str) -> GatewayIdentity:
        return cls(base_url, gateway_fingerprint(base_url, app_id))

    def elsewhere(self, row: _Recorded) -> bool:
        """Whether ``row``'s submit went to another gateway or account than this one. A row
        that records none (written before rows did) is taken as this one's."""
        return row.gateway_fingerprint not in (None, self.fingerprint)


class _Recorded(Protocol):
    """A journal row's gateway (``JournalEntry``'s two fields)."""

    @property
    def base_url(self) -> str | None: ...
    @property
    def gateway_fingerprint(self) -> str | None: ...


def other_gateways_said(rows: Iterable[_Recorded], base_url: str) -> str:
    """Where ``rows`` were submitted, beside ``base_url`` (this client's), for a message:
    "another gateway (base URL A, B) than this client's (base URL C)", the first three base
    URLs named; one that is this client's own is said "with another app id"."""
    mine = same_gateway(base_url)
    named: list[str] = []
    for row in rows:
        url = row.base_url
        said = shown_base_url(url) if url else "not recorded"
        if url and same_gateway(url) == mine:
            said += " with another app id"
        if said not in named:
            named.append(said)
    return (
        f"another gateway (base URL {some_and_more(named, 3)}) than this client's "
        f"(base URL {shown_base_url(base_url)})"
    )
