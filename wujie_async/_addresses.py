"""Where downloads may connect: the scheme, literal addresses, and every address a name resolves
to (checked by the session's resolver just before connecting, so a name that re-resolves to a
refused address is refused too).

An image URL comes from the gateway, so it is as trustworthy as the gateway: a hostile or
compromised one could aim the client at services on the user's own machine or network. Public
addresses are always allowed. Loopback and private addresses are allowed only when the gateway
itself is on that kind of address (its base URL says so: the emulator on 127.0.0.1 serves its
images there too), or when the user opts in (``allow_private_addresses``), which also allows
every other special address (link-local with the cloud metadata service, multicast,
unspecified, reserved).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ._errors import InvalidRequestError

AddressKind = Literal["public", "loopback", "private", "special"]
_KIND_WORDS: dict[AddressKind, str] = {
    "loopback": "a loopback address (this machine)",
    "private": "a private address (a local network)",
    "special": "a link-local, multicast, unspecified or reserved address",
    "public": "a public address",
}
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: neither private nor global


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_kind(address: str) -> AddressKind | None:
    """What kind of IP address this is; None if it is not one (a name).

    IPv4-mapped IPv6 forms count as their IPv4 address; a zone (``%eth0``) is ignored.
    """
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "special"
    if ip.is_global:
        return "public"
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED):
        return "private"
    return "special"


def host_kind(host: str) -> AddressKind:
    """The kind of a URL's host as written: ``localhost`` is loopback, any other name public.

    A name is not resolved: what it resolves to is the name owner's to change, so only an
    address written in the URL (or ``localhost``) says where the gateway is.
    """
    if host.lower().rstrip(".") == "localhost":
        return "loopback"
    return address_kind(host) or "public"


@dataclass(frozen=True, slots=True)
class AddressRule:
    """The kinds of address a download may connect to.

    Attributes:
        allowed: the kinds allowed; ``public`` always is.
    """

    allowed: frozenset[AddressKind] = frozenset({"public"})

    @classmethod
    def for_gateway(cls, base_url: str, *, allow_private_addresses: bool = False) -> AddressRule:
        """The rule for images listed by the gateway at ``base_url``.

        Public addresses, plus loopback ones if the base URL is on loopback and private ones
        if it is on a private address; every kind with ``allow_private_addresses``.
        """
        if allow_private_addresses:
            return cls.everything()
        kind = host_kind(urlsplit(base_url).hostname or "")
        if kind in ("loopback", "private"):
            return cls(frozenset({"public", kind}))
        return cls()

    @classmethod
    def everything(cls) -> AddressRule:
        """Every kind of address (``allow_private_addresses``)."""
        return cls(frozenset({"public", "loopback", "private", "special"}))

    def allows(self, address: str) -> bool:
        """May a download connect to this IP address? (Not an address: no.)"""
        kind = address_kind(address)
        return kind is not None and kind in self.allowed

    def refusal(self, host: str, address: str) -> InvalidRequestError:
        """The error for a host (resolving to ``address``) that this rule refuses."""
        kind = address_kind(address) or "special"
        if kind in ("loopback", "private"):
            why = (
                f"the gateway's base URL is not on {'loopback' if kind == 'loopback' else 'one'}, "
                "so its image URLs may not point there"
            )
        else:
            why = "image URLs may not point there"
        return InvalidRequestError(
            [
                (
                    "url",
                    f"refusing to download from {host} ({address}): {_KIND_WORDS[kind]}; {why} "
                    "(allow_private_addresses=True permits it)",
                )
            ]
        )


# A host whose last label is digits or 0x-hex: an IPv4 address in shorthand, never a name.
_NUMERIC_LAST_LABEL = re.compile(r"(?:[^.]*\.)*(?:[0-9]+|0x[0-9a-f]*)\.?", re.IGNORECASE)


def check_url(url: str, *, allow_http: bool, rule: AddressRule) -> None:
    """Refuse URLs we will not fetch.

    Raises:
        InvalidRequestError: not http(s); plain http to a non-loopback host without
            ``allow_http``; or a literal address that ``rule`` refuses.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises here, not later
        # The host as aiohttp will connect to it: yarl normalises it (IDNA), so fullwidth
        # digits or ideographic dots become the literal address they spell, and a literal
        # address never goes through the checking resolver.
        host = URL(url).raw_host or ""
    except ValueError:
        raise InvalidRequestError([("url", "not a valid URL")]) from None
    scheme = parts.scheme.lower()
    if not (scheme == "https" or (scheme == "http" and (allow_http or is_loopback(host)))):
        raise InvalidRequestError(
            [
                (
                    "url",
                    f"refusing to download {scheme}://{host}: https only "
                    "(plain http is allowed for loopback, or with allow_http=True)",
                )
            ]
        )
    if not host:
        raise InvalidRequestError([("url", "not a valid URL (no host)")])
    if address_kind(host) is None:
        if _NUMERIC_LAST_LABEL.fullmatch(host):
            # No top-level domain is numeric: 127.1, 0 or 2130706433 is an address in a
            # shorthand some resolvers and HTTP stacks read (older aiohttp connects to it
            # without asking the checking resolver), so it is refused, whatever it spells.
            raise InvalidRequestError(
                [
                    (
                        "url",
                        f"refusing to download from {host}: a numeric host that is not a "
                        "canonical IPv4 address; not retried",
                    )
                ]
            )
        return  # a name: the session's resolver checks its addresses when connecting
    if not rule.allows(host):
        raise rule.refusal(host, host)


class ForbiddenAddressError(OSError):
    """Raised by the resolver; aiohttp wraps it in ClientConnectorError, we unwrap it."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to a refused address {address}")
        self.host = host
        self.address = address


class CheckingResolver(AbstractResolver):
    """Resolves as usual, then refuses the whole name if any address it gives is refused.

    aiohttp connects to what the resolver returns, so checking here (not before the request)
    also catches a name that resolves to a public address once and to a private one later.
    """

    def __init__(self, rule: AddressRule) -> None:
        self._inner = DefaultResolver()
        self._rule = rule

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not self._rule.allows(result["host"]):
                raise ForbiddenAddressError(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()
