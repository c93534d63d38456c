"""swtpm's port pairs for a large simulated fleet (the 1,000-device soak, issue 18).

A thousand devices started within a minute found no pair of consecutive free ports where
the kernel's ``bind(0)`` draws them: that is the range ``connect()`` takes client ports
from, and every probe and TPM session leaves one in TIME_WAIT. The pairs now come from
below it, and each is checked free, both ports, at the time of asking.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

from edgeward_device_sim.swtpm import _PAIR_RANGE, _free_port_pair


def test_a_thousand_pairs_held_at_once_are_found_below_the_ephemeral_range() -> None:
    low, high = _PAIR_RANGE
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert high <= ephemeral_low
    with ExitStack() as held:
        ports = set()
        for _ in range(1000):
            port = _free_port_pair()
            assert low <= port < high
            for each in (port, port + 1):  # held, as a running swtpm holds them
                sock = held.enter_context(socket.socket())
                sock.bind(("127.0.0.1", each))
            ports.add(port)
        assert len(ports) == 1000


def test_ports_handed_out_but_not_yet_bound_are_not_drawn_again() -> None:
    taken: set[int] = set()
    for _ in range(2000):  # nothing is bound here: only ``taken`` keeps the pairs apart
        port = _free_port_pair(taken)
        assert port not in taken
        assert port + 1 not in taken
        taken.update((port, port + 1))
    assert len(taken) == 4000
