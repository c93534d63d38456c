from __future__ import annotations

import pytest

from edgeward_shared.bus.mqtt import BrokerAddress


def test_host_port_parsing_including_ipv6() -> None:
    assert BrokerAddress.parse("127.0.0.1:8883") == BrokerAddress("127.0.0.1", 8883)
    assert BrokerAddress.parse("[::1]:8883") == BrokerAddress("::1", 8883)


@pytest.mark.parametrize("bad", ["", "host", ":8883", "host:", "host:0", "host:65536", "h:x"])
def test_bad_addresses_say_what_is_expected(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        BrokerAddress.parse(bad)
