"""The guest's MAC is announced once frames can leave, not before (issue 24).

On the hot-swap host a NIC plugged back came up without carrier for a
while: netwatch attached the macvtap at once and asked QEMU for
announce-self, whose three rounds all went while the guest link (which
follows the lower's carrier) was down. QEMU drops what a NIC with its link
down sends: switches never relearned the guest (0 of 3 RARPs outside).
Here, with a real QEMU, a lower without carrier at the attach: its RARPs
must come once the carrier does.
"""

from __future__ import annotations

import struct

import pytest

from netwatch.sandbox.testbed import wait_until

from .test_silent_backends import ETH_P_RARP, sniffing
from .world import World

pytestmark = pytest.mark.integration

MAC0 = "52:54:00:77:10:01"  # on lo0, whose wire is down at the attach
MAC1 = "52:54:00:77:10:02"  # on lo1: its announcement ends after net0's would have


def rarps(frames: list[bytes]) -> int:
    return sum(1 for frame in frames if struct.unpack("!H", frame[12:14])[0] == ETH_P_RARP)


@pytest.mark.parametrize("wiring", ["hub", "redirect"])
def test_a_nic_attached_without_carrier_is_announced_when_the_carrier_comes(world: World, wiring: str) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0, "wiring": wiring},
             {"id": "net1", "backend": "macvtap", "lower": "lo1", "mac": MAC1, "wiring": wiring})
    ns = world.ns
    # lo0 up, its peer wi0 down: lo0 has no carrier.
    ns.ip("link", "add", "lo0", "type", "veth", "peer", "name", "wi0")
    ns.ip("link", "set", "lo0", "up")
    with sniffing(ns, "wi0") as sniffer:
        world.start_netwatch()  # first: a redirect NIC's tap is netwatch's to make before QEMU opens it
        for tap in ("nw-vm1-net0", "nw-vm1-net1") if wiring == "redirect" else ():
            wait_until(lambda tap=tap: world.ns.link_exists(tap), 10, f"the tap {tap}", world.dump)
        world.start_qemu("vm1")
        world.wait_state("vm1", "net0", "attached", guest_link=False)
        # net1's lower appears only now: its announcement is asked for after net0's was (before the fix),
        # in the same QEMU, with the same rounds; when its last RARP is out, net0's rounds are over.
        world.lower("lo1", "wi1")
        sniffer.frames["wi1"] = []
        sniffer.listen("wi1")
        world.wait_state("vm1", "net1", "attached", guest_link=True)
        wait_until(lambda: rarps(sniffer.sent_by(MAC1, "wi1")) >= 3, 10, "net1's three RARPs on wi1", world.dump)
        ns.ip("link", "set", "wi0", "up")
        world.wait_state("vm1", "net0", "attached", guest_link=True)
        found = wait_until(lambda: rarps(sniffer.sent_by(MAC0, "wi0")) >= 1 or None, 10,
                           "net0's announcement on wi0 once its lower had carrier", world.dump)
        assert found
        # All of its rounds, as for net1.
        wait_until(lambda: rarps(sniffer.sent_by(MAC0, "wi0")) >= 3, 10, "net0's three RARPs on wi0", world.dump)
