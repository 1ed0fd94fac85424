"""The client's address behind trusted proxies (sentientedge/forwarded.py)."""

from __future__ import annotations

import re

import pytest

from sentientedge.forwarded import client_address, parse_networks

LB = parse_networks("127.0.0.1/32, 10.0.0.0/8")


def test_a_direct_client_is_its_socket_peer_whatever_it_claims():
    assert client_address("203.0.113.9", ["1.2.3.4"], LB) == "203.0.113.9"
    assert client_address("203.0.113.9", [], ()) == "203.0.113.9"


def test_behind_trusted_proxies_the_first_untrusted_hop_from_the_right_is_the_client():
    assert client_address("127.0.0.1", ["198.51.100.7"], LB) == "198.51.100.7"
    # A client that forged a left part is not believed; two trusted hops are skipped.
    assert client_address("10.0.0.5", ["6.6.6.6, 198.51.100.7, 10.0.0.9"], LB) == "198.51.100.7"
    assert client_address("127.0.0.1", ["198.51.100.7", "10.1.1.1"], LB) == "198.51.100.7"
    assert client_address("::ffff:127.0.0.1", ["2001:db8::1"], LB) == "2001:db8::1"
    assert client_address("127.0.0.1", ["not-an-address"], LB) == "127.0.0.1"
    assert client_address("127.0.0.1", [], LB) == "127.0.0.1"


def test_bad_settings_name_the_entry():
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_networks("127.0.0.1, 10.0.0.0/33")
