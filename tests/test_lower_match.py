"""A lower spec by MAC or PCI address may match several links: netwatch names them and waits, never picks one."""

from __future__ import annotations

import pytest

from .world import World

pytestmark = pytest.mark.integration

SHARED = "02:aa:bb:cc:dd:01"


def test_an_ambiguous_mac_spec_is_refused_with_the_candidates(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": {"mac": SHARED}, "mac": "52:54:00:12:34:61"})
    for lower, wire in (("lo0", "wi0"), ("lo1", "wi1")):
        world.ns.add_veth(lower, wire)
        world.ns.ip("link", "set", lower, "address", SHARED)
    world.start_qemu("vm1")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "waiting-lower")
    assert nic["cause"] == (f"lower {SHARED} matches 2 links (lo0, lo1): add the name (or more of mac, pci) "
                            "to the lower spec to say which")
    assert world.macvtaps() == []
    world.delete_link("lo1")
    world.wait_state("vm1", "net0", "attached", lower="lo0")
    world.frame_reaches_guest("vm1", "net0", "wi0")
    # A second match appearing under an attached NIC leaves it where it is.
    world.ns.add_veth("lo2", "wi2")
    world.ns.ip("link", "set", "lo2", "address", SHARED)
    # Proof that netwatch has looked since lo2 matched: both lowers lose
    # their carrier after lo2's MAC changed, and only a pass of the NIC's own
    # (seeing lo0 and lo2 both) tells the guest, whichever lower it is on.
    world.ns.ip("link", "set", "wi0", "down")
    world.ns.ip("link", "set", "wi2", "down")
    down = world.wait_state("vm1", "net0", "attached", guest_link=False)
    assert (down["lower"], down["swaps"]) == ("lo0", 1), down
    world.ns.ip("link", "set", "wi0", "up")
    up = world.wait_state("vm1", "net0", "attached", guest_link=True)
    assert (up["lower"], up["swaps"]) == ("lo0", 1), up
    world.frame_reaches_guest("vm1", "net0", "wi0")
    assert world.macvtaps() == ["nw-vm1-net0"]
