"""Per-source bounds count an IPv6 /64 as one source (broker/addresses.py): a host that owns a
/64 cannot rotate through its addresses past the pending-connection bound or the login limits."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from tether.broker.addresses import source_of
from tether.broker.pending import PendingConnections


def test_ipv4_is_itself_and_a_mapped_ipv4_is_its_ipv4() -> None:
    assert source_of("127.1.2.3") == "127.1.2.3"
    assert source_of("::ffff:10.0.0.7") == "10.0.0.7"


def test_ipv6_counts_per_64() -> None:
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert source_of("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("fe80::1%eth0") == "fe80::/64"


def test_a_name_that_is_not_an_address_is_kept() -> None:
    assert source_of("localhost") == "localhost"


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_every_address_of_a_64_is_one_source(host_bits: int) -> None:
    address = ipaddress.IPv6Address((0x20010DB8_00000005 << 64) | host_bits)
    assert source_of(str(address)) == "2001:db8:0:5::/64"


def test_the_pending_bound_holds_across_a_64() -> None:
    pending = PendingConnections(max_total=100, max_per_address=3)
    hosts = [f"2001:db8::{i:x}" for i in range(1, 6)]
    admitted = [pending.admit(i, h) for i, h in enumerate(hosts)]
    assert admitted == [True, True, True, False, False]
    assert pending.from_address("2001:db8::abcd") == 3
    assert pending.admit(10, "2001:db8:0:1::1")  # another /64
    pending.release(0)
    assert pending.admit(11, "2001:db8::99")
