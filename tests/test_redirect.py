"""wiring = "redirect": a persistent tap QEMU opens by name, joined to the lower by a macvlan and two tc
filters; a lower flap remakes the macvlan and filters and sends nothing to QEMU but the carrier."""

from __future__ import annotations

import json
import select
import socket
import time
import uuid

import pytest

from netwatch.sandbox.guest import Serial, build
from netwatch.sandbox.testbed import test_frame as make_frame
from netwatch.sandbox.testbed import wait_until

from .test_guest import cable, peer_network, wait_line
from .world import PEER_MAC, World

pytestmark = pytest.mark.integration

MAC = "52:54:00:9b:00:01"
TAP = "nw-vm1-net0"


def redirect_nic(lower: str = "lo0", **more: object) -> dict[str, object]:
    return {"id": "net0", "backend": "macvtap", "wiring": "redirect", "lower": lower, "mac": MAC, **more}


def frame_reaches_tap(world: World, wire: str, timeout: float = 10) -> None:
    """Send on ``wire`` to the guest's MAC until the frame leaves the tap towards QEMU."""
    # ETH_P_ALL: frames a device transmits reach only such packet sockets.
    with world.ns.entered():
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    tap.bind((TAP, 0))
    try:
        tag = uuid.uuid4().bytes
        with world.ns.entered():
            out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        out.bind((wire, 0))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out.send(make_frame(MAC, PEER_MAC, tag))
            ready, _, _ = select.select([tap], [], [], 0.05)
            while ready:
                if tag in tap.recv(65536):
                    return
                ready, _, _ = select.select([tap], [], [], 0)
        raise AssertionError(f"no frame from {wire} left {TAP} within {timeout} s\n{world.dump()}")
    finally:
        tap.close()


def test_a_flap_remakes_the_macvlan_and_never_touches_qemu(world: World) -> None:
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    world.start_netwatch()
    # The tap exists before QEMU starts: QEMU opens it by name.
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    assert world.nic("vm1", "net0")["state"] == "waiting-vm"
    qemu = world.start_qemu("vm1")
    first = world.wait_state("vm1", "net0", "attached")
    assert first["wiring"] == "redirect" and first["macvlan"] == "nwm-vm1-net0", first
    network = qemu.info_network()
    frame_reaches_tap(world, "wi0")
    for flap in range(3):
        world.delete_link("lo0")
        world.wait_state("vm1", "net0", "waiting-lower")
        world.lower("lo0", "wi0")
        now = world.wait_state("vm1", "net0", "attached", swaps=first["swaps"] + flap + 1)
        frame_reaches_tap(world, "wi0")
        # The same tap and netdev throughout; QEMU's networks unchanged.
        assert (now["ifname"], now["ifindex"], now["netdev"]) == (first["ifname"], first["ifindex"], first["netdev"])
    assert qemu.info_network() == network
    # A flap is no failure: a pass that met the macvlan on its way out said "No such device" and failed.
    assert world.netwatch is not None
    failures = [line for line in world.netwatch.log().splitlines() if "-> failed" in line]
    assert failures == [], failures
    # One macvlan, ours, silent; the tap's filter points at it.
    macvlans = world.ns.links("macvlan")
    assert macvlans == ["nwm-vm1-net0"], macvlans
    assert "inet6" not in world.ns.ip("addr", "show", "nwm-vm1-net0")


def test_deleted_filters_come_back_and_are_logged(world: World) -> None:
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    world.start_qemu("vm1")
    world.wait_state("vm1", "net0", "attached")
    frame_reaches_tap(world, "wi0")
    # As libvirt's <bandwidth> does: the tap's ingress qdisc (and netwatch's filter with it) deleted.
    import subprocess
    subprocess.run(world.ns.exec_argv("tc", "qdisc", "del", "dev", TAP, "ingress"), check=True)
    world.ns.ip("link", "set", TAP, "down")  # a link event: the next pass comes
    world.ns.ip("link", "set", TAP, "up")
    assert world.netwatch is not None
    wait_until(lambda: "filters-restored" in world.netwatch.log() or "made again" in world.netwatch.log(), 10,
               "the filters made again", world.dump)
    frame_reaches_tap(world, "wi0")


def test_restart_adopts_the_wiring_without_a_change(world: World) -> None:
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    world.start_qemu("vm1")
    before = world.wait_state("vm1", "net0", "attached")
    assert world.netwatch is not None
    world.netwatch.kill()
    frame_reaches_tap(world, "wi0")  # frames flow with netwatch gone
    world.start_netwatch()
    after = world.wait_state("vm1", "net0", "attached")
    assert (after["macvlan_ifindex"], after["ifindex"], after["swaps"]) == (
        before["macvlan_ifindex"], before["ifindex"], before["swaps"]), (before, after)
    frame_reaches_tap(world, "wi0")


def test_a_tap_name_taken_by_something_else_is_refused(world: World) -> None:
    world.ns.add_veth(TAP, "squat1")
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: "not netwatch's" in world.nic("vm1", "net0").get("cause", ""), 15,
               "the NIC to say its tap name is taken", world.dump)
    assert world.ns.link_exists(TAP) and world.ns.links("tun") == []


def test_a_nic_dropped_from_the_config_takes_its_tap_and_macvlan(world: World) -> None:
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    world.start_qemu("vm1")
    world.wait_state("vm1", "net0", "attached")
    world.qemus["vm1"].close()
    world.wait_state("vm1", "net0", "waiting-vm")
    assert world.netwatch is not None
    world.netwatch.kill()  # as after a crash: the records and links stay
    world.vms.clear()
    world.vm("vm2")
    world.start_netwatch()
    wait_until(lambda: not world.ns.link_exists(TAP) and not world.ns.links("macvlan"), 10,
               "the orphaned tap and macvlan removed", world.dump)


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_guest_pings_through_flaps_with_its_nic_untouched(world: World, machine: str) -> None:
    image = build()
    vm = world.vm("vm1", redirect_nic())
    vm["machine"] = machine
    world.write_config()
    peer = peer_network(world)
    cable(world, peer, "lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    serial = Serial(world.tmp / "guest-serial.log")
    world.start_qemu("vm1", image.qemu_args(serial.path, ["10.77.0.2/24"], ping="10.77.0.1"))
    world.wait_state("vm1", "net0", "attached")
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=3)
    ready = [line for line in serial.lines() if line.startswith("GUEST-READY")]
    for _ in range(3):
        serial.set_mark()
        world.delete_link("lo0")
        wait_line(serial, "GUEST-CARRIER 0", world)  # the carrier follows the lower (netwatch has the monitor)
        cable(world, peer, "lo0", "wi0")
        wait_line(serial, "GUEST-CARRIER 1", world)
        wait_line(serial, "GUEST-PING ok", world, count=3)
    whole = Serial(serial.path)
    assert [line for line in whole.lines() if line.startswith("GUEST-READY")] == ready, "the guest never rebooted"
    assert not any(line.startswith("GUEST-NIC-GONE") for line in whole.lines()), "its NIC never left"
    seen = {line.split(" ", 1)[1] for line in whole.lines() if line.startswith("GUEST-ETH0")}
    assert seen == {ready[0].split(" ", 1)[1]}, f"eth0 kept its MAC and PCI address: {seen}"
    print(json.dumps(world.nic("vm1", "net0")))
