"""The client's address behind a load balancer: ``X-Forwarded-For`` from trusted proxies only.

Rules for this module:
- Pure. The socket's peer is the client unless it is one of ``TRUSTED_PROXIES`` (networks, e.g.
  ``127.0.0.1/32,10.0.0.0/8``); then the header's addresses are read from the right, skipping
  trusted ones, and the first untrusted one is the client. Anything a client wrote further left
  is not believed (it can put any address there).
- Used for what is counted per address (``HANDSHAKE_RATE``, failed logins) and for the audit log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``TRUSTED_PROXIES``: comma-separated addresses or networks; ValueError names a bad one."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not an address or network: {item!r}") from None
    return tuple(networks)


@lru_cache(maxsize=4096)
def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: tuple[Network, ...]) -> str:
    """The address to count and log for a request from ``peer`` with these header values."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage where an address should be: count the proxy
    return hops[0] if hops else peer
