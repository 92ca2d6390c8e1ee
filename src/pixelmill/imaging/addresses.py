"""Which network addresses a fetch may connect to (the SSRF guard)."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}")

# Ranges that are not covered by the ``is_private``/``is_loopback``... flags of the
# standard library, or that deserve a name of their own in the error message.
_EXTRA_FORBIDDEN = [
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT"),
    (ipaddress.ip_network("192.0.0.0/24"), "IETF protocol assignments"),
    (ipaddress.ip_network("198.18.0.0/15"), "benchmarking"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "cloud metadata"),
]
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is a literal one, else None.

    Brackets are allowed, and so are the legacy IPv4 forms that C resolvers accept
    (``2130706433``, ``0x7f.1``, ``0177.0.0.1``), which name the same addresses.
    """
    bare = host.strip("[]")
    if bare.endswith(".") and not bare.endswith(".."):
        bare = bare[:-1]  # a fully qualified spelling: `127.0.0.1.` is 127.0.0.1
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if bare and _LEGACY_IPV4.fullmatch(bare.lower()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def forbidden_reason(address: IPAddress) -> str | None:
    """Why connecting to ``address`` is refused by default, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return forbidden_reason(mapped)
    if address in _METADATA:
        return "a cloud metadata address"
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    for network, name in _EXTRA_FORBIDDEN:
        if address.version == network.version and address in network:
            return f"a {name} address"
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Refuses non-public addresses unless private ones are explicitly allowed."""

    allow_private: bool = False

    def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be connected to under this policy, or None."""
        if self.allow_private:
            return None
        return forbidden_reason(address)

    def name_refusal(self, host: str) -> str | None:
        """Why the name ``host`` may not be resolved under this policy, or None: every
        name under ``localhost`` is loopback (RFC 6761), whatever a resolver says."""
        if self.allow_private:
            return None
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            return "a loopback name"
        return None
