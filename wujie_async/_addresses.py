"""Where downloads may connect: the scheme, literal addresses, and every address a name resolves
to (checked by the session's resolver just before connecting, so a name that re-resolves to a
private address is refused too).

Link-local (cloud metadata), private, multicast, unspecified and reserved addresses are refused
unless ``allow_private``; loopback is allowed, so that the emulator works.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ._errors import InvalidRequestError


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_allowed(address: str, *, allow_private: bool = False) -> bool:
    """May we connect to this IP address? Loopback and public addresses only, by default.

    Refused unless ``allow_private``: link-local (169.254/16 with the cloud metadata service,
    fe80::/10), private (10/8, 172.16/12, 192.168/16, fc00::/7), shared (100.64/10),
    multicast, unspecified and reserved addresses, IPv4-mapped IPv6 forms included.
    """
    if allow_private:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, *, allow_http: bool, allow_private: bool = False) -> None:
    """Refuse URLs we will not fetch.

    Raises:
        InvalidRequestError: not http(s); plain http to a non-loopback host without
            ``allow_http``; or a literal address that ``address_allowed`` refuses.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a malformed port raises here, not later
    except ValueError:
        raise InvalidRequestError([("url", "not a valid URL")]) from None
    if not (
        parts.scheme == "https" or (parts.scheme == "http" and (allow_http or is_loopback(host)))
    ):
        raise InvalidRequestError(
            [
                (
                    "url",
                    f"refusing to download {parts.scheme}://{host}: https only "
                    "(plain http is allowed for loopback, or with allow_http)",
                )
            ]
        )
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return  # a name: the session's resolver checks its addresses when connecting
    if not address_allowed(host, allow_private=allow_private):
        raise refused_address(host, host)


def refused_address(host: str, address: str) -> InvalidRequestError:
    return InvalidRequestError(
        [
            (
                "url",
                f"refusing to download from {host} ({address}): a link-local, private, "
                "multicast or reserved address (allow_private permits it)",
            )
        ]
    )


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

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not address_allowed(result["host"], allow_private=self._allow_private):
                raise ForbiddenAddressError(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()
