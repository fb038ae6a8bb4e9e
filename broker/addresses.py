"""Which source a connection counts against: its IPv4 address, or its IPv6 /64.

The per-address bounds (pending connections, failed logins, the login queue's round robin)
exist so one source cannot take everything. One IPv6 host is routinely given a whole /64
(2^64 addresses), so counting per IPv6 address would let it rotate past every bound; a /64
is what one site or subscriber holds, as an IPv4 address is behind a NAT. An IPv4-mapped IPv6
address is its IPv4 address.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["source_of"]

IPV6_PREFIX = 64


@functools.lru_cache(maxsize=4096)
def source_of(host: str) -> str:
    """The key `host` (an address as the socket gave it) counts against."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host  # not an IP address (a test's name, a Unix socket): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)
