"""Reference images come from callers' URLs: fetch them without letting a URL reach inside our network.

`PublicOnlyConnector` checks the address of every connection it opens: the literal IP of a URL, every
address its name resolves to, and every redirect hop, because each goes through `_resolve_host`. It
checks the exact addresses then connected to, so a name that resolves differently on a second lookup
(DNS rebinding) gains nothing. Loopback, private, link-local (the cloud metadata service at
169.254.169.254), shared, reserved, multicast and unspecified addresses are refused, in IPv4, IPv6 and
IPv6 forms that carry an IPv4 address (IPv4-mapped and -translated, IPv4-compatible, NAT64, 6to4,
Teredo) are judged by the IPv4 address they carry. Before any lookup the host is normalised the way a
resolver would see it (`resolver_host`) and judged by `host_problem`, the same check GenerateImage
applies at submit: what cannot be a host, legacy numeric forms such as `2130706433`, single-label and
internal names are refused outright.
"""

from __future__ import annotations

import io
import ipaddress
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import aiohttp
import idna
from PIL import Image, UnidentifiedImageError

from providers.base import ProviderRejected

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the most a reference image may weigh, whichever vendor it goes to
MAX_REFERENCE_BYTES = 20 * 1024 * 1024
#: the most pixels a reference may decode to (a decompression bomb is small on the wire)
MAX_REFERENCE_PIXELS = 50_000_000


class ForbiddenAddress(ProviderRejected):
    """A reference URL leads to an address that is not on the public internet."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: IPv6 prefixes whose last 32 bits are an IPv4 address that a stack or a gateway delivers to: NAT64's
#: well-known prefix, IPv4-compatible, IPv4-mapped and IPv4-translated (SIIT) addresses
_LOW32_IPV4 = tuple(
    ipaddress.IPv6Network(prefix) for prefix in ("64:ff9b::/96", "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96")
)
#: refused whatever they carry: local-use NAT64 (the IPv4 address sits where its prefix length says)
#: and Teredo (it carries a server and a client address)
_NEVER_PUBLIC = tuple(ipaddress.IPv6Network(prefix) for prefix in ("64:ff9b:1::/48", "2001::/32"))


def is_public(address: IPAddress) -> bool:
    """Whether an address is a global unicast address; IPv6 forms that carry an IPv4 address are judged
    by the IPv4 address (NAT64, 6to4, IPv4-mapped, -translated and -compatible)."""
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NEVER_PUBLIC):
            return False
        if address.sixtofour is not None:
            return is_public(address.sixtofour)
        if any(address in network for network in _LOW32_IPV4):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return address.is_global and not address.is_multicast


def permitted(address: IPAddress, allow: Sequence[IPNetwork] = ()) -> bool:
    """Whether references may be fetched from `address`: a public one, or one of the networks allowed."""
    return is_public(address) or any(address in network for network in allow)


#: a host name as a resolver takes it, in ASCII (underscores occur in real names, if not in IDNA's)
_HOST_NAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*")
#: names that never lead to the public internet
_INTERNAL_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa", ".lan")


def resolver_host(raw: str) -> str:
    """`raw` (a URL's host) as a resolver would look it up: percent-decoded, mapped to ASCII by IDNA
    (UTS 46: full-width dots and digits, case), without a trailing dot; ValueError for what cannot be
    a host. IPv6 literals come back in canonical form, without brackets."""
    text = unquote(raw, errors="strict")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        if "%" in text:  # a zone id names one of our own interfaces, never a host elsewhere
            raise ValueError(f"{raw!r} names a local interface")
        return str(ipaddress.IPv6Address(text))
    try:
        host = idna.encode(text, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        host = text.lower() if text.isascii() else ""
    host = host.removesuffix(".")
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{raw!r} cannot be a host name")
    return host


def host_problem(raw: str, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why references may not be fetched from the host `raw` (None when they may, as far as its name
    and literal address tell; the connector checks every address a name resolves to as well)."""
    try:
        host = resolver_host(raw)
    except ValueError:
        return f"{raw!r} is not a valid host name"
    if ":" in host or host.rpartition(".")[2].isdigit() or host.rpartition(".")[2].startswith("0x"):
        # an address: only the canonical forms, since resolvers read "127.1" and "0x7f.1" as 127.0.0.1
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return f"{host} is not a canonical IP address"
        return None if permitted(address, allow) else f"{host} is not a public address"
    if "." not in host or host == "localhost" or host.endswith(_INTERNAL_SUFFIXES):
        return f"{host} is not a public host"
    return None


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
        return permitted(ipaddress.ip_address(address.split("%", 1)[0]), self._allow)  # drop a zone id

    async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[Any]:
        problem = host_problem(host, self._allow)
        if problem is not None:
            raise ForbiddenAddress(f"reference image host: {problem}; only public http(s) URLs are fetched")
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
