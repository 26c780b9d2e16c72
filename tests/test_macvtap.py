"""The core promise, against the real kernel and a real QEMU: a macvtap NIC
survives its lower disappearing and coming back."""

from __future__ import annotations

import os
import signal

import pytest

from netwatch.sandbox.testbed import wait_until

from .world import World

pytestmark = pytest.mark.integration

MAC = "52:54:00:12:34:56"


def one_nic_world(world: World, lower: str = "lo0", wire: str = "wi0", start_lower: bool = True) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": lower, "mac": MAC})
    if start_lower:
        world.lower(lower, wire)


def test_attach_and_frames_both_ways(world: World) -> None:
    one_nic_world(world)
    world.start_qemu("vm1")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "attached", guest_link=True)
    assert nic["lower"] == "lo0" and nic["lower_present"] and nic["ifname"] == "nw-vm1-net0"
    assert nic["netdev"] == "nw-net0-tap1"
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_wire("vm1", "net0", "wi0")
    assert world.macvtaps() == ["nw-vm1-net0"]
    assert world.backend_netdevs("vm1") == ["nw-net0-tap1", "nw-net0-up1"]


def flap(world: World, lower: str = "lo0", wire: str = "wi0") -> None:
    world.delete_link(lower)
    world.wait_state("vm1", "net0", "waiting-lower", guest_link=False)
    world.lower(lower, wire)
    world.frame_reaches_guest("vm1", "net0", wire)


def test_twenty_flaps_frames_flow_after_each(world: World) -> None:
    one_nic_world(world)
    world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    for _ in range(20):
        flap(world)
        world.frame_reaches_wire("vm1", "net0", "wi0")
    nic = world.wait_state("vm1", "net0", "attached", guest_link=True)
    assert nic["swaps"] == 21
    assert world.macvtaps() == ["nw-vm1-net0"]
    assert world.backend_netdevs("vm1") == ["nw-net0-tap21", "nw-net0-up21"]


def test_hundred_flaps_no_fd_growth(world: World) -> None:
    one_nic_world(world)
    qemu = world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    # Warm-up: QEMU creates a few eventfds for its first swaps, once.
    for _ in range(10):
        flap(world)
    world.wait_state("vm1", "net0", "attached", guest_link=True)
    before = (netwatch.fd_count(), qemu.fd_count())
    for _ in range(100):
        flap(world)
    world.wait_state("vm1", "net0", "attached", guest_link=True)
    # A control connection may still be closing just now: allow it to finish.
    wait_until(lambda: netwatch.fd_count() <= before[0] and qemu.fd_count() <= before[1], 10,
               f"fd counts (netwatch, qemu) back to {before}, now "
               f"{(netwatch.fd_count(), qemu.fd_count())}", world.dump)
    assert "failed" not in netwatch.log()
    assert world.macvtaps() == ["nw-vm1-net0"]
    assert len(world.backend_netdevs("vm1")) == 2


def test_deferred_start_attaches_when_lower_appears(world: World) -> None:
    one_nic_world(world, start_lower=False)
    world.start_qemu("vm1")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "waiting-lower", guest_link=False)
    assert not nic["lower_present"]
    assert world.macvtaps() == []
    world.lower("lo0", "wi0")
    world.wait_state("vm1", "net0", "attached", guest_link=True)
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_wire("vm1", "net0", "wi0")


def test_qemu_killed_and_restarted(world: World) -> None:
    one_nic_world(world)
    qemu = world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    qemu.kill(signal.SIGKILL)
    world.wait_state("vm1", "net0", "waiting-vm")
    # The dead QEMU's macvtap is not left behind.
    wait_until(lambda: world.macvtaps() == [], 10, "the orphaned macvtap to be removed", world.dump)
    world.start_qemu("vm1")
    world.wait_state("vm1", "net0", "attached", guest_link=True)
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_wire("vm1", "net0", "wi0")
    assert world.macvtaps() == ["nw-vm1-net0"]
    assert len(world.backend_netdevs("vm1")) == 2


def test_netwatch_killed_and_restarted_adopts(world: World) -> None:
    one_nic_world(world)
    world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    before = world.wait_state("vm1", "net0", "attached", guest_link=True)
    netwatch.kill(signal.SIGKILL)
    world.start_netwatch()
    after = world.wait_state("vm1", "net0", "attached")
    # Adopted, not rebuilt: same backend, no swap.
    assert (after["netdev"], after["ifindex"], after["swaps"]) == (before["netdev"], before["ifindex"],
                                                                    before["swaps"])
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_wire("vm1", "net0", "wi0")
    assert world.macvtaps() == ["nw-vm1-net0"]
    assert world.backend_netdevs("vm1") == ["nw-net0-tap1", "nw-net0-up1"]


def test_lower_flapped_while_netwatch_was_down(world: World) -> None:
    one_nic_world(world)
    world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    netwatch.kill(signal.SIGKILL)
    world.delete_link("lo0")
    world.lower("lo0", "wi0")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap2")
    assert nic["swaps"] == 2
    world.frame_reaches_guest("vm1", "net0", "wi0")
    assert world.backend_netdevs("vm1") == ["nw-net0-tap2", "nw-net0-up2"]
    assert world.macvtaps() == ["nw-vm1-net0"]


def test_failed_attach_rolls_back_and_retries(world: World) -> None:
    one_nic_world(world)
    world.start_qemu("vm1")
    # netwatch opens macvtap devices through nodes it makes in state_dir/dev:
    # a file in the way makes every attach fail after the macvtap exists.
    (world.tmp / "state").mkdir()
    blocker = world.tmp / "state" / "dev"
    blocker.write_text("in the way")
    world.start_netwatch()
    nic = world.wait_state("vm1", "net0", "failed")
    assert "device" in nic["cause"]
    assert world.macvtaps() == []
    assert world.backend_netdevs("vm1") == []
    blocker.unlink()
    world.wait_state("vm1", "net0", "attached", timeout=60)
    world.frame_reaches_guest("vm1", "net0", "wi0")
    assert world.macvtaps() == ["nw-vm1-net0"]


def test_two_vms_are_independent(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.vm("vm2", {"id": "net0", "backend": "macvtap", "lower": "lo1", "mac": "52:54:00:12:34:57"},
             {"id": "net1", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:12:34:58"})
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")
    world.start_qemu("vm1")
    world.start_qemu("vm2")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    world.wait_state("vm2", "net0", "attached")
    world.wait_state("vm2", "net1", "attached")
    world.delete_link("lo1")
    world.wait_state("vm2", "net0", "waiting-lower")
    assert world.nic("vm2", "net1")["state"] == "attached"
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_guest("vm2", "net1", "wi0")
    world.lower("lo1", "wi1")
    world.wait_state("vm2", "net0", "attached")
    world.frame_reaches_guest("vm2", "net0", "wi1")
    assert sorted(world.macvtaps()) == ["nw-vm1-net0", "nw-vm2-net0", "nw-vm2-net1"]


def test_lower_matched_by_mac_follows_a_rename(world: World) -> None:
    world.lower("lo0", "wi0")
    mac = world.ns.ip("-j", "link", "show", "lo0")
    import json
    lower_mac = json.loads(mac)[0]["address"]
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": {"mac": lower_mac}, "mac": MAC})
    world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", lower="lo0")
    world.ns.ip("link", "set", "lo0", "down")
    world.ns.ip("link", "set", "lo0", "name", "renamed0")
    world.ns.ip("link", "set", "renamed0", "up")
    world.wait_state("vm1", "net0", "attached", lower="renamed0", guest_link=True)
    world.frame_reaches_guest("vm1", "net0", "wi0")


def test_an_fd_left_by_a_cut_short_attach_is_closed(world: World) -> None:
    """netwatch killed between getfd and netdev_add: QEMU must not keep the fd."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    one_nic_world(world)
    qemu = world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap1")
    netwatch.kill(signal.SIGKILL)

    def dev_null_fds() -> int:
        fds = os.listdir(f"/proc/{qemu.pid}/fd")
        return sum(1 for fd in fds if os.path.realpath(f"/proc/{qemu.pid}/fd/{fd}") == "/dev/null")
    before = dev_null_fds()
    vm = world.config().vm("vm1")
    assert vm is not None
    # What the killed netwatch would have done next, on its monitor: getfd.
    client = QEMUMonitorProtocol(vm.qmp)
    client.settimeout(5)
    client.connect()
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        client.send_fd_scm(fd)
        client.cmd("getfd", fdname="nw-net0-fd")
    finally:
        os.close(fd)
        client.close()
    assert dev_null_fds() == before + 1
    world.start_netwatch()
    # The backend is adopted (no new attach would replace the fd by name) ...
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap1")
    # ... and the stray fd is closed all the same.
    wait_until(lambda: dev_null_fds() == before, 10, "QEMU to close the fd left by getfd", world.dump)
