"""A real Linux guest keeps its network across lower flaps and a rebind."""

from __future__ import annotations

import subprocess

import pytest

from netwatch.sandbox.guest import Serial, build
from netwatch.sandbox.testbed import wait_until

from .world import World

pytestmark = pytest.mark.integration

MAC = "52:54:00:9a:00:01"


def wait_line(serial: Serial, line: str, world: World, timeout: float = 30, count: int = 1) -> None:
    wait_until(lambda: serial.count(line) >= count, timeout, f"the guest to print {line!r} x{count}",
               lambda: "\n".join(serial.lines()[-5:]) + "\n" + world.dump())


def peer_network(world: World) -> str:
    """The guest's peer (10.77.0.1 on a bridge) in a namespace of its own, as outside a real host."""
    peer = world.scratch_netns()
    # A fixed bridge MAC: otherwise it follows the lowest port MAC, which changes
    # as cables come and go, and the guest's ARP entry points at an old one.
    for args in (("link", "add", "peerbr", "address", "02:00:00:77:00:01", "type", "bridge"),
                 ("link", "set", "peerbr", "up"),
                 ("addr", "add", "10.77.0.1/24", "dev", "peerbr")):
        subprocess.run(["ip", "-n", peer, *args], check=True)
    return peer


def cable(world: World, peer: str, lower: str, wire: str) -> None:
    """A lower on the host whose other end plugs into the peer's bridge."""
    world.lower(lower, wire)
    world.ns.ip("link", "set", wire, "netns", peer)
    subprocess.run(["ip", "-n", peer, "link", "set", wire, "master", "peerbr", "up"], check=True)


def test_guest_pings_survive_lower_flaps_and_a_rebind(world: World) -> None:
    image = build()
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    peer = peer_network(world)
    cable(world, peer, "lo0", "wi0")
    cable(world, peer, "lo1", "wi1")
    serial = Serial(world.tmp / "guest-serial.log")
    world.start_qemu("vm1", image.qemu_args(serial.path, ["10.77.0.2/24"], ping="10.77.0.1"))
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=3)
    ready = [line for line in serial.lines() if line.startswith("GUEST-READY")]
    assert len(ready) == 1 and ready[0].startswith(f"GUEST-READY mac={MAC} pci=0000:00:"), ready
    for _ in range(3):
        serial.set_mark()
        world.delete_link("lo0")
        wait_line(serial, "GUEST-CARRIER 0", world)
        cable(world, peer, "lo0", "wi0")
        wait_line(serial, "GUEST-CARRIER 1", world)
        wait_line(serial, "GUEST-PING ok", world, count=3)
    serial.set_mark()
    assert world.cli("rebind", "vm1", "net0", "lo1").returncode == 0
    wait_line(serial, "GUEST-PING ok", world, count=5)
    assert world.nic("vm1", "net0")["lower"] == "lo1"
    serial.set_mark()
    world.delete_link("lo0")  # the old lower is out of the path: its loss is nothing to the guest
    wait_line(serial, "GUEST-PING ok", world, count=5)
    assert "GUEST-CARRIER 0" not in serial.lines() and "GUEST-PING fail" not in serial.lines(), serial.lines()
    whole = Serial(serial.path)
    assert [line for line in whole.lines() if line.startswith("GUEST-READY")] == ready, "the guest never rebooted"
    carriers = {line for line in whole.lines() if line.startswith("GUEST-CARRIER")}
    assert carriers <= {"GUEST-CARRIER 0", "GUEST-CARRIER 1"}, "eth0 never went away (no hot-unplug)"
    assert len(carriers) == 2, "it saw its carrier go and come back"
    seen = {line.split(" ", 1)[1] for line in whole.lines() if line.startswith("GUEST-ETH0")}
    assert seen == {ready[0].split(" ", 1)[1]}, f"eth0 kept its MAC and PCI address through every swap: {seen}"


@pytest.mark.parametrize("wiring", ["hub", "direct"])
def test_guest_on_a_tap_survives_its_bridge_being_recreated(world: World, wiring: str) -> None:
    image = build()
    world.vm("vm1", {"id": "net0", "backend": "tap", "mode": "bridged", "bridge": "br0", "lower": "up0",
                     "mac": MAC, "wiring": wiring})
    world.bridge("br0")
    peer = peer_network(world)
    cable(world, peer, "up0", "upw0")
    serial = Serial(world.tmp / "guest-serial.log")
    world.start_qemu("vm1", image.qemu_args(serial.path, ["10.77.0.2/24"], ping="10.77.0.1"))
    world.start_netwatch()
    before = world.wait_state("vm1", "net0", "attached")
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=3)
    for _ in range(3):
        serial.set_mark()
        world.ns.ip("link", "del", "br0")
        wait_line(serial, "GUEST-PING fail", world)
        world.bridge("br0")
        wait_line(serial, "GUEST-PING ok", world, count=3)
    after = world.wait_state("vm1", "net0", "attached")
    assert after["netdev"] == before["netdev"], "the bridge came back without touching QEMU"
    whole = Serial(serial.path)
    assert len([line for line in whole.lines() if line.startswith("GUEST-READY")]) == 1
    # A tap's carrier is its own (QEMU holds it throughout): the guest keeps
    # its link while the bridge is away and only its pings go unanswered. A
    # direct NIC plugged after the guest booted was absent ("") before.
    carriers = [line for line in whole.lines() if line.startswith("GUEST-CARRIER")]
    assert carriers in (["GUEST-CARRIER 1"], ["GUEST-CARRIER", "GUEST-CARRIER 1"]), whole.lines()
    assert not any(line.startswith("GUEST-NIC-GONE") for line in whole.lines()), "never replugged"
