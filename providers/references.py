"""Reference images come from callers' URLs: fetch them without letting a URL reach inside our network.

`PublicOnlyConnector` checks the address of every connection it opens: the literal IP of a URL, every
address its name resolves to, and every redirect hop, because each goes through `_resolve_host`. It
checks the exact addresses then connected to, so a name that resolves differently on a second lookup
(DNS rebinding) gains nothing. Loopback, private, link-local (the cloud metadata service at
169.254.169.254), shared, reserved, multicast and unspecified addresses are refused, in IPv4, IPv6 and
IPv4-mapped IPv6 forms; aiohttp itself refuses legacy numeric forms such as `2130706433`.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Sequence
from typing import Any

import aiohttp
from PIL import Image, UnidentifiedImageError

from providers.base import ProviderRejected

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the most a reference image may weigh, whichever vendor it goes to
MAX_REFERENCE_BYTES = 20 * 1024 * 1024
#: the most pixels a reference may decode to (a decompression bomb is small on the wire)
MAX_REFERENCE_PIXELS = 50_000_000


class ForbiddenAddress(ProviderRejected):
    """A reference URL leads to an address that is not on the public internet."""


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is a global unicast address (IPv4-mapped IPv6 judged as the IPv4 it carries)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """'127.0.0.0/8, ::1/128' into networks (the allow-list for the sandbox and tests)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


class PublicOnlyConnector(aiohttp.TCPConnector):
    """A connector that connects only to public addresses, or to the networks explicitly allowed."""

    def __init__(self, *, allow: Sequence[IPNetwork] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._allow = tuple(allow)

    def permitted(self, address: str) -> bool:
        """Whether this connector may connect to `address`."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        return is_public(ip) or any(ip in network for network in self._allow)

    async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[Any]:
        resolved = await super()._resolve_host(host, port, traces)
        allowed = [entry for entry in resolved if self.permitted(entry["host"])]
        if not allowed:
            addresses = ", ".join(sorted({str(entry["host"]) for entry in resolved}))
            raise ForbiddenAddress(
                f"reference image host {host} resolves to {addresses}, which is not a public address; "
                "only public http(s) URLs are fetched"
            )
        return allowed


def check_reference_image(data: bytes, what: str) -> None:
    """Refuse bytes that do not decode as an image, or that would decode to too many pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_REFERENCE_PIXELS:
                raise ProviderRejected(
                    f"{what} is {image.width}x{image.height}, over {MAX_REFERENCE_PIXELS} pixels"
                )
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ProviderRejected(f"{what} is not a readable image ({exc.__class__.__name__})") from exc
