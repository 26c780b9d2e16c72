"""Tap backends: bridged and routed, recreated bridges, uplinks and taps."""

from __future__ import annotations

import signal

import pytest

from netwatch.sandbox.testbed import wait_until

from .world import World

pytestmark = pytest.mark.integration

MAC = "52:54:00:ab:00:01"
TAP = "nw-vm1-net0"


def bridged_world(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "bridged", "bridge": "br0",
                     "lower": "up0",
                     "mac": MAC})
    world.bridge("br0")
    world.lower("up0", "uw0")


def test_bridged_tap_frames_both_ways(world: World) -> None:
    bridged_world(world)
    world.start_qemu("vm1")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "attached", guest_link=True)
    assert nic["ifname"] == TAP and nic["bridge_present"]
    assert world.master_of(TAP) == "br0" and world.master_of("up0") == "br0"
    info = world.ns.ip("-j", "link", "show", TAP)
    assert '"address":"fe:54:00:ab:00:01"' in info.replace(" ", ""), "the tap never carries the guest MAC"
    world.frame_reaches_guest("vm1", "net0", "uw0")
    world.frame_reaches_wire("vm1", "net0", "uw0")


def test_bridge_recreated_is_rejoined_without_touching_qemu(world: World) -> None:
    bridged_world(world)
    world.start_qemu("vm1")
    world.start_netwatch()
    before = world.wait_state("vm1", "net0", "attached")
    world.ns.ip("link", "del", "br0")
    wait_until(lambda: world.master_of(TAP) is None, 10, "the tap to leave the deleted bridge", world.dump)
    world.bridge("br0")
    wait_until(lambda: world.master_of(TAP) == "br0" and world.master_of("up0") == "br0", 10,
               "tap and uplink to join the new bridge", world.dump)
    world.frame_reaches_guest("vm1", "net0", "uw0")
    world.frame_reaches_wire("vm1", "net0", "uw0")
    after = world.wait_state("vm1", "net0", "attached")
    assert (after["netdev"], after["swaps"]) == (before["netdev"], before["swaps"]), "no QMP change"
    # The dying bridge is still listed for a moment: that is no failure (nor a retry delay).
    assert world.netwatch is not None and "failed" not in world.netwatch.log()


def test_uplink_recreated_is_rejoined(world: World) -> None:
    bridged_world(world)
    world.start_qemu("vm1")
    world.start_netwatch()
    before = world.wait_state("vm1", "net0", "attached")
    world.delete_link("up0")
    world.wait_state("vm1", "net0", "attached", lower_present=False)
    world.lower("up0", "uw0")
    wait_until(lambda: world.master_of("up0") == "br0", 10, "the new uplink to join br0", world.dump)
    world.frame_reaches_guest("vm1", "net0", "uw0")
    after = world.wait_state("vm1", "net0", "attached", lower_present=True)
    assert (after["netdev"], after["swaps"]) == (before["netdev"], before["swaps"])


def test_deleted_tap_is_recreated_and_swapped(world: World) -> None:
    bridged_world(world)
    world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap1")
    world.delete_link(TAP)
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap2")
    assert world.master_of(TAP) == "br0"
    world.frame_reaches_guest("vm1", "net0", "uw0")
    world.frame_reaches_wire("vm1", "net0", "uw0")
    assert world.backend_netdevs("vm1") == ["nw-net0-tap2", "nw-net0-up2"]


def test_missing_bridge_is_waited_for(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "bridged", "bridge": "br0", "mac": MAC})
    world.start_qemu("vm1")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "waiting-lower")
    assert "bridge br0 is not present" in nic["cause"]
    assert world.ns.links("tun") == []
    world.bridge("br0")
    world.wait_state("vm1", "net0", "attached")
    assert world.master_of(TAP) == "br0"


def test_routed_tap_with_a_route_hook(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "routed", "mac": MAC})
    world.hook("up", "10-route", 'exec ip route replace 198.51.100.7/32 dev "$1"\n')
    world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    assert world.master_of(TAP) is None
    wait_until(lambda: f"198.51.100.7 dev {TAP}" in world.ns.ip("route"), 10, "the hook's route", world.dump)
    # The route goes with the tap; the hook puts it back on the new one.
    world.delete_link(TAP)
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap2")
    wait_until(lambda: f"198.51.100.7 dev {TAP}" in world.ns.ip("route"), 10, "the route again", world.dump)


def test_qemu_exit_leaves_no_tap(world: World) -> None:
    bridged_world(world)
    qemu = world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    qemu.kill(signal.SIGKILL)
    world.wait_state("vm1", "net0", "waiting-vm")
    wait_until(lambda: world.ns.links("tun") == [], 10, "the tap to go with QEMU", world.dump)
    world.start_qemu("vm1")
    world.wait_state("vm1", "net0", "attached")
    world.frame_reaches_guest("vm1", "net0", "uw0")
