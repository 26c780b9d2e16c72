"""Redirect NICs with a real Linux guest: hot-added and hot-removed on reload (pc and q35), and multiqueue.

The guest (netwatch/sandbox/guest.py) sets up each ethN that has an address
whenever it appears and reports it (MAC, PCI address, receive queues) and
its going; it pings its peer from eth0. Nothing is done in the guest by the
tests.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from netwatch.sandbox.guest import Serial, build
from netwatch.sandbox.testbed import wait_until

from .test_guest import cable, peer_network, wait_line
from .test_hotplug import MAC0, MAC1, nic_lines, peer_pings
from .test_redirect_linkops import _tap_fields
from .world import World

pytestmark = pytest.mark.integration

TAP0, TAP1 = "nw-vm1-net0", "nw-vm1-net1"


def redirect(nic: str, lower: str, mac: str, **more: object) -> dict[str, object]:
    return {"id": nic, "backend": "macvtap", "wiring": "redirect", "lower": lower, "mac": mac, **more}


def guest(world: World, machine: str, *nics: dict[str, object], addrs: tuple[str, ...] = ("10.77.0.2/24",),
          extra: tuple[str, ...] = ()) -> tuple[Serial, str]:
    """tests/test_hotplug.py's guest, but netwatch first: QEMU opens the tap netwatch made (started first,
    QEMU would make a throwaway tap of that name itself, which netwatch refuses as not its own)."""
    world.vm("vm1", *nics)
    world.vm_dict("vm1")["machine"] = machine
    world.write_config()
    peer = peer_network(world)
    subprocess.run(["ip", "-n", peer, "addr", "add", "10.77.1.1/24", "dev", "peerbr"], check=True)
    cable(world, peer, "lo0", "wi0")
    cable(world, peer, "lo1", "wi1")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP0), 10, "the persistent tap", world.dump)
    serial = Serial(world.tmp / "guest-serial.log")
    world.start_qemu("vm1", [*build().qemu_args(serial.path, list(addrs), ping="10.77.0.1", serve=True), *extra])
    return serial, peer


def tun_queues(pid: int, tap: str) -> int:
    """How many of process ``pid``'s fds are queues of the tap ``tap`` (the kernel's fdinfo names it)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if f"iff:\t{tap}\n" in open(f"/proc/{pid}/fdinfo/{fd}").read():  # noqa: SIM115 - procfs, read whole
                count += 1
        except FileNotFoundError:
            continue
    return count


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_hot_add_and_hot_remove_of_a_redirect_nic(world: World, machine: str) -> None:
    world.recording_hooks()
    serial, peer = guest(world, machine, redirect("net0", "lo0", MAC0), addrs=("10.77.0.2/24", "10.77.1.2/24"))
    world.wait_state("vm1", "net0", "attached", timeout=60)
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=2)
    assert not nic_lines(serial, "eth1")
    qemu = world.qemus["vm1"]
    assert tun_queues(qemu.pid, TAP1) == 0 and not world.ns.link_exists(TAP1)
    # The new NIC: its plan, then the reload.
    world.vm_dict("vm1")["nics"].append(redirect("net1", "lo1", MAC1))
    world.write_config()
    plan = world.cli("reload", "--dry-run")
    assert plan.returncode == 0 and plan.stdout.startswith("hot-add vm1/net1: new in the config"), plan
    assert not world.ns.link_exists(TAP1), "a dry run makes nothing"
    assert world.cli("reload").returncode == 0
    added = world.wait_state("vm1", "net1", "attached", timeout=30)
    assert (added["wiring"], added["guest_pci"], added["ifname"], added["netdev"]) == (
        "redirect", "0x18", TAP1, "nwr-net1"), added
    # netwatch's persistent tap (QEMU would have made a throwaway one of that name), opened by QEMU by name.
    fields = _tap_fields(world.ns, TAP1)
    assert (fields["persist"], fields["vnet_hdr"], fields["multi_queue"]) == (True, True, False), fields
    info = qemu.info_network()
    assert f"nwr-net1: index=0,type=tap,ifname={TAP1}" in info, info
    assert tun_queues(qemu.pid, TAP1) == 1
    wait_until(lambda: nic_lines(serial, "eth1"), 30, "eth1 in the guest", world.dump)
    line = nic_lines(serial, "eth1")[0]
    assert f"mac={MAC1}" in line, line
    if machine == "pc":
        assert " pci=0000:00:18.0 " in line, line
    peer_pings(world, peer, "10.77.1.2")
    ups = wait_until(lambda: [run["argv"] for run in world.hook_runs() if run["env"].get("NETWATCH_NIC") == "net1"],
                     20, "the if-up hook", world.dump)
    assert ups == [[TAP1, "hot-add"]], ups
    # A restart in between: the hot-added NIC is adopted as it is, not plugged again.
    assert world.netwatch is not None
    world.netwatch.kill(signal.SIGTERM)
    world.start_netwatch()
    after = world.wait_state("vm1", "net1", "attached", timeout=30)
    assert (after["ifindex"], after["macvlan_ifindex"], after["swaps"]) == (
        added["ifindex"], added["macvlan_ifindex"], added["swaps"]), (added, after)
    assert len(nic_lines(serial, "eth1")) == 1 and not any(line.startswith("GUEST-NIC-GONE") for line in serial.lines())
    # Hot-remove: the device leaves the guest, then the netdev, the macvlan and the tap go.
    world.vm_dict("vm1")["nics"].pop()
    world.write_config()
    plan = world.cli("reload", "--dry-run")
    assert plan.stdout.startswith("hot-remove vm1/net1: gone from the config"), plan
    assert world.cli("reload").returncode == 0
    wait_line(serial, "GUEST-NIC-GONE eth1", world)
    wait_until(lambda: world.nic("vm1", "net1") == {}, 30, "net1 to leave status", world.dump)
    assert not world.ns.link_exists(TAP1), world.dump()
    assert world.ns.links("macvlan") == ["nwm-vm1-net0"], world.dump()
    assert "nwr-net1" not in qemu.info_network() and tun_queues(qemu.pid, TAP1) == 0
    assert not (world.tmp / "state" / "nics" / "vm1" / "net1.json").exists()
    runs = wait_until(lambda: [run["argv"] for run in world.hook_runs() if run["env"].get("NETWATCH_NIC") == "net1"]
                      if len([run for run in world.hook_runs() if run["env"].get("NETWATCH_NIC") == "net1"]) >= 2
                      else None, 20, "the if-down hook", world.dump)
    assert runs == [[TAP1, "hot-add"], [TAP1, "hot-remove"]], runs
    serial.set_mark()
    wait_line(serial, "GUEST-PING ok", world, count=2)  # eth0 untouched throughout
    assert len(nic_lines(Serial(serial.path), "eth0")) == 1
    print(f"\nhot-add on {machine}: {TAP1} made, netdev nwr-net1 opened it by name, device at 0x18: {line}; "
          "hot-remove: device_del, DEVICE_DELETED, tap and macvlan gone")


def test_multiqueue_redirect_nic_in_a_two_vcpu_guest_pings_through_a_flap(world: World) -> None:
    serial, peer = guest(world, "pc", redirect("net0", "lo0", MAC0, queues=2), extra=("-smp", "2"))
    status = world.wait_state("vm1", "net0", "attached", timeout=60)
    assert status["queues"] == 2, status
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=3)
    fields = _tap_fields(world.ns, TAP0)
    assert (fields["multi_queue"], fields["vnet_hdr"], fields["persist"]) == (True, True, True), fields
    assert "multi_queue" in world.ns.ip("-d", "link", "show", TAP0)
    qemu = world.qemus["vm1"]
    # QEMU opened the tap twice (a queue each), and the guest's driver sees two queue pairs.
    assert tun_queues(qemu.pid, TAP0) == 2
    lines = nic_lines(serial, "eth0")
    assert len(lines) == 1 and lines[0].endswith(" rxq=2"), lines
    peer_pings(world, peer, "10.77.0.2")
    first = world.nic("vm1", "net0")
    serial.set_mark()
    world.delete_link("lo0")
    world.wait_state("vm1", "net0", "waiting-lower")
    wait_line(serial, "GUEST-CARRIER 0", world)
    cable(world, peer, "lo0", "wi0")
    world.wait_state("vm1", "net0", "attached", swaps=first["swaps"] + 1)
    wait_line(serial, "GUEST-PING ok", world, count=3)
    peer_pings(world, peer, "10.77.0.2")
    assert tun_queues(qemu.pid, TAP0) == 2 and not any(line.startswith("GUEST-NIC-GONE") for line in serial.lines())
    assert world.nic("vm1", "net0")["ifindex"] == first["ifindex"]
    print(f"\nmultiqueue: {TAP0} multi_queue, QEMU holds {tun_queues(qemu.pid, TAP0)} queues, guest {lines[0]}; "
          "pings resumed after a flap")


def test_a_guest_that_does_not_release_its_redirect_nic(world: World) -> None:
    world.settings["unplug_timeout"] = 2
    serial, _peer = guest(world, "pc", redirect("net0", "lo0", MAC0), redirect("net1", "lo1", MAC1),
                          addrs=("10.77.0.2/24", "10.77.1.2/24"))
    world.wait_state("vm1", "net1", "attached", timeout=60)
    wait_until(lambda: nic_lines(serial, "eth1"), 120, "eth1 in the guest", world.dump)
    qemu = world.qemus["vm1"]
    qemu.qmp("stop")  # a guest that runs no code answers no unplug request
    world.vm_dict("vm1")["nics"].pop()
    world.write_config()
    assert world.cli("reload").returncode == 0
    failed = world.wait_state("vm1", "net1", "failed", timeout=30)
    assert "did not release NIC net1 within 2 s" in failed["cause"], failed
    assert world.ns.link_exists(TAP1) and "nwr-net1" in qemu.info_network(), "its tap stays while the guest holds it"
    assert world.nic("vm1", "net0")["state"] == "attached", "the other NIC is not held up"
    qemu.qmp("cont")  # the guest lets go: the next attempt completes the removal
    wait_until(lambda: world.nic("vm1", "net1") == {}, 60, "net1 to leave status", world.dump)
    assert not world.ns.link_exists(TAP1) and world.ns.links("macvlan") == ["nwm-vm1-net0"], world.dump()
    info = qemu.info_network()
    assert "net1:" not in info and "nwr-net1" not in info, info
    # Let go once, and never plugged again on the way out. Both NICs were there at boot, and the guest
    # names them in slot order: net1 (0x18) is its eth0.
    wait_line(serial, "GUEST-NIC-GONE eth0", world)
    assert [line.split(" addr=")[0] for line in nic_lines(serial, "eth0")] == [
        f"GUEST-NIC eth0 mac={MAC1} pci=0000:00:18.0"], serial.lines()
    assert world.netwatch is not None
    assert world.netwatch.log().count("added NIC net1") == 0, world.netwatch.log()
