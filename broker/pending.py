"""The bound on connections that have not registered yet (issue 12).

A connection is pending from its accept until its `register` is answered `registered`, or
until it closes. Pending connections cost the broker without any credentials, so their number
is bounded per source address and in all; the ListenerManager asks `admit` at accept, before
any transport or Listener exists, and closes the socket at once when it says no. Pure data:
no I/O, no clock.

The per-address default (2,000) lets 1,000 devices behind one NAT address connect at once.
An "address" is an IPv4 address or an IPv6 /64 (`addresses.py`).
"""

from __future__ import annotations

from tether.broker.addresses import source_of

__all__ = ["PendingConnections"]


class PendingConnections:
    def __init__(self, *, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._hosts: dict[int, str] = {}  # conn_id -> its source address
        self._per_host: dict[str, int] = {}
        self.refused = 0  # connections closed at accept for being over a bound

    def __len__(self) -> int:
        return len(self._hosts)

    def admit(self, conn_id: int, host: str) -> bool:
        """Count `conn_id` as pending, or refuse it (counted) if that would pass a bound."""
        host = source_of(host)
        here = self._per_host.get(host, 0)
        if len(self._hosts) >= self.max_total or here >= self.max_per_address:
            self.refused += 1
            return False
        self._hosts[conn_id] = host
        self._per_host[host] = here + 1
        return True

    def release(self, conn_id: int) -> None:
        """Registered or closed: no longer pending (a no-op if it was not)."""
        host = self._hosts.pop(conn_id, None)
        if host is None:
            return
        left = self._per_host[host] - 1
        if left:
            self._per_host[host] = left
        else:
            del self._per_host[host]

    def from_address(self, host: str) -> int:
        return self._per_host.get(source_of(host), 0)

    def clear(self) -> None:
        self._hosts.clear()
        self._per_host.clear()
