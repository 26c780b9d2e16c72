"""Direct wiring and NIC hotplug with a real Linux guest, on pc and q35.

The guest (netwatch/sandbox/guest.py) sets up each ethN that has an address
whenever it appears and reports it (MAC and PCI address) and its going; it
pings its peer from eth0. Nothing is done in the guest by the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from netwatch.sandbox.guest import ECHO_PORT, Serial, build
from netwatch.sandbox.testbed import wait_until

from .test_guest import cable, peer_network, wait_line
from .world import World

pytestmark = pytest.mark.integration

MAC0 = "52:54:00:9b:00:01"
MAC1 = "52:54:00:9b:00:02"


def nic_lines(serial: Serial, eth: str) -> list[str]:
    return [line for line in serial.lines() if line.startswith(f"GUEST-NIC {eth} ")]


def guest(world: World, machine: str, *nics: dict[str, object], addrs: tuple[str, ...] = ("10.77.0.2/24",),
          extra: tuple[str, ...] = (), **vm_keys: object) -> tuple[Serial, str]:
    """A VM with ``nics`` booting the test guest, netwatch running, the peer network cabled to lo0 and lo1."""
    world.vm("vm1", *nics)
    world.vm_dict("vm1").update({"machine": machine, **vm_keys})
    world.write_config()
    peer = peer_network(world)
    subprocess.run(["ip", "-n", peer, "addr", "add", "10.77.1.1/24", "dev", "peerbr"], check=True)
    cable(world, peer, "lo0", "wi0")
    cable(world, peer, "lo1", "wi1")
    serial = Serial(world.tmp / "guest-serial.log")
    world.start_qemu("vm1", [*build().qemu_args(serial.path, list(addrs), ping="10.77.0.1", serve=True), *extra])
    world.start_netwatch()
    return serial, peer


ECHO = ("import socket, sys\n"
        "with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:\n"
        "    s.sendall(b'nw'); assert s.recv(2) == b'nw'\n")


def peer_pings(world: World, peer: str, address: str, timeout: float = 60) -> None:
    last: list[str] = []

    def answered() -> bool:
        # A round trip through the guest's TCP echo (there is no ping on these hosts).
        done = subprocess.run(["ip", "netns", "exec", peer, sys.executable, "-c", ECHO, address, str(ECHO_PORT)],
                              capture_output=True, text=True)
        last[:] = [done.stdout + done.stderr]
        return done.returncode == 0
    def dump() -> str:
        neigh = subprocess.run(["ip", "-n", peer, "neigh"], capture_output=True, text=True).stdout
        addrs = subprocess.run(["ip", "-n", peer, "-br", "addr"], capture_output=True, text=True).stdout
        return f"{world.dump()}\n== ping\n{last}\n== peer neighbours\n{neigh}\n== peer addresses\n{addrs}"
    wait_until(answered, timeout, f"{address} to answer the peer's ping", dump)


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_direct_nic_replugged_across_lower_flaps_and_a_rebind(world: World, machine: str) -> None:
    serial, _peer = guest(world, machine, {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0,
                                           "wiring": "direct"})
    status = world.wait_state("vm1", "net0", "attached", timeout=60)
    assert status["wiring"] == "direct" and status["guest_pci"] == "0x19", status
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=3)
    first = nic_lines(serial, "eth0")
    assert len(first) == 1 and f"mac={MAC0}" in first[0], first
    assert not any(line.startswith("GUEST-NIC-GONE") for line in serial.lines()), "plugged once, with its backend"
    info = world.qemus["vm1"].info_network()
    assert "nw-net0-up" not in info and "hub" not in info.split("net0:")[1].split("\n")[0], info
    for flap in range(3):
        serial.set_mark()
        world.delete_link("lo0")
        wait_line(serial, "GUEST-NIC-GONE eth0", world)
        world.wait_state("vm1", "net0", "waiting-lower")
        cable(world, _peer, "lo0", "wi0")
        wait_line(serial, "GUEST-PING ok", world, count=3, timeout=60)
        again = nic_lines(serial, "eth0")
        # Same MAC and PCI address: the guest sees the same NIC come back.
        assert [line.rsplit(" addr=", 1)[0] for line in again] == [first[0].rsplit(" addr=", 1)[0]], (flap, again)
    serial.set_mark()
    assert world.cli("rebind", "vm1", "net0", "lo1").returncode == 0
    wait_line(serial, "GUEST-PING ok", world, count=3, timeout=60)
    assert world.nic("vm1", "net0")["lower"] == "lo1"
    assert [line.rsplit(" addr=", 1)[0] for line in nic_lines(serial, "eth0")] == [first[0].rsplit(" addr=", 1)[0]]
    whole = Serial(serial.path)
    assert len([line for line in whole.lines() if line.startswith("GUEST-READY")]) == 1, "no reboot"
    assert world.qemus["vm1"].proc is not None and world.qemus["vm1"].proc.poll() is None


@pytest.mark.parametrize("wiring", ["hub", "direct"])
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_hot_add_and_hot_remove_across_a_restart(world: World, machine: str, wiring: str) -> None:
    log = world.recording_hooks()
    serial, peer = guest(world, machine, {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0,
                                          "wiring": wiring},
                         addrs=("10.77.0.2/24", "10.77.1.2/24"))
    world.wait_state("vm1", "net0", "attached", timeout=60)
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=2)
    assert not nic_lines(serial, "eth1")
    # The new NIC: its plan first, then the reload.
    world.vm_dict("vm1")["nics"].append({"id": "net1", "backend": "macvtap", "lower": "lo1", "mac": MAC1,
                                         "wiring": wiring})
    world.write_config()
    plan = world.cli("reload", "--dry-run")
    assert plan.returncode == 0 and plan.stdout.startswith("hot-add vm1/net1: new in the config"), plan
    # A positive answer (raises if netwatch gave none): net0 as it was, no net1 yet.
    nics = {nic["id"]: nic["state"] for vm in world.status()["vms"] if vm["name"] == "vm1" for nic in vm["nics"]}
    assert nics == {"net0": "attached"}, f"a dry run changes nothing: {nics}"
    assert world.cli("reload").returncode == 0
    added = world.wait_state("vm1", "net1", "attached", timeout=30)
    assert added["guest_pci"] == "0x18", added
    wait_until(lambda: nic_lines(serial, "eth1"), 30, "eth1 in the guest", world.dump)
    assert f"mac={MAC1}" in nic_lines(serial, "eth1")[0]
    peer_pings(world, peer, "10.77.1.2")
    ups = wait_until(lambda: [run["argv"] for run in world.hook_runs() if run["env"].get("NETWATCH_NIC") == "net1"],
                     20, "the if-up hook", world.dump)
    assert ups == [[added["ifname"], "hot-add"]], ups
    # A restart between hot-add and hot-remove: the hot-added NIC is adopted, not replugged.
    assert world.netwatch is not None
    world.netwatch.kill(signal.SIGTERM)
    world.start_netwatch()
    after = world.wait_state("vm1", "net1", "attached", timeout=30)
    assert after["netdev"] == added["netdev"] and after["ifindex"] == added["ifindex"], (added, after)
    assert len(nic_lines(serial, "eth1")) == 1 and not any(line.startswith("GUEST-NIC-GONE") for line in serial.lines())
    peer_pings(world, peer, "10.77.1.2")
    # Hot-remove.
    world.vm_dict("vm1")["nics"].pop()
    world.write_config()
    plan = world.cli("reload", "--dry-run")
    assert plan.stdout.startswith("hot-remove vm1/net1: gone from the config"), plan
    assert world.cli("reload").returncode == 0
    wait_line(serial, "GUEST-NIC-GONE eth1", world)
    wait_until(lambda: world.nic("vm1", "net1") == {}, 30, "net1 to leave status", world.dump)
    assert added["ifname"] not in world.macvtaps()
    assert "nw-net1" not in world.qemus["vm1"].info_network()
    runs = wait_until(lambda: [run["argv"] for run in world.hook_runs() if run["env"].get("NETWATCH_NIC") == "net1"]
                      if len(world.hook_runs()) >= 3 else None, 20, "the if-down hook", world.dump)
    assert runs == [[added["ifname"], "hot-add"], [added["ifname"], "hot-remove"]], runs
    assert log.exists()
    wait_line(serial, "GUEST-PING ok", world, count=2)  # eth0 untouched throughout
    assert len(nic_lines(serial, "eth0")) == 1


def test_a_guest_that_does_not_release_its_nic(world: World) -> None:
    world.settings["unplug_timeout"] = 2
    serial, _peer = guest(world, "pc", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0},
                          {"id": "net1", "backend": "macvtap", "lower": "lo1", "mac": MAC1, "wiring": "direct"},
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
    assert failed["ifname"] in world.macvtaps(), "its backend stays while the guest holds the NIC"
    assert "nw-net1-tap" in qemu.info_network()
    assert world.nic("vm1", "net0")["state"] == "attached", "the other NIC is not held up"
    qemu.qmp("cont")  # the guest lets go: the next attempt completes the removal
    wait_until(lambda: world.nic("vm1", "net1") == {}, 60, "net1 to leave status", world.dump)
    assert failed["ifname"] not in world.macvtaps()
    assert os.path.exists(serial.path)


def test_multiqueue_direct_nics_on_a_macvtap_and_a_tap(world: World) -> None:
    world.bridge("br0")
    serial, peer = guest(world, "pc", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0,
                                       "wiring": "direct", "queues": 2},
                         {"id": "net1", "backend": "tap", "mode": "bridged", "bridge": "br0", "lower": "lo1",
                          "mac": MAC1, "wiring": "direct", "queues": 2},
                         addrs=("10.77.0.2/24", "10.77.1.2/24"), extra=("-smp", "2"))
    for nic in ("net0", "net1"):
        status = world.wait_state("vm1", nic, "attached", timeout=60)
        assert status["queues"] == 2, status
    wait_until(lambda: len(nic_lines(serial, "eth0")) + len(nic_lines(serial, "eth1")) == 2, 120,
               "both NICs in the guest", world.dump)
    # The guest's driver sees two queue pairs on each (one per vCPU).
    assert all(line.endswith(" rxq=2") for line in nic_lines(serial, "eth0") + nic_lines(serial, "eth1")), \
        serial.lines()
    info = world.qemus["vm1"].info_network()
    assert "net0: index=0,type=nic" in info and "net1: index=0,type=nic" in info, info
    peer_pings(world, peer, "10.77.0.2")
    peer_pings(world, peer, "10.77.1.2")


def test_direct_nic_after_restarts_that_missed_a_flap_or_cut_a_replug_short(world: World) -> None:
    serial, peer = guest(world, "pc", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0,
                                       "wiring": "direct"})
    world.wait_state("vm1", "net0", "attached", timeout=60)
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=2)
    qemu, netwatch = world.qemus["vm1"], world.netwatch
    assert netwatch is not None

    def one_device_one_netdev() -> bool:
        info = qemu.info_network()
        return info.count("type=nic") == 1 and len(world.backend_netdevs("vm1")) == 1

    # 1. The lower flaps while netwatch is stopped: the device is left peered
    # with a dead netdev; the next netwatch replugs it onto a new backend.
    netwatch.kill(signal.SIGTERM)
    world.delete_link("lo0")
    cable(world, peer, "lo0", "wi0")
    serial.set_mark()
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", timeout=30)
    wait_line(serial, "GUEST-PING ok", world, count=2, timeout=60)
    assert one_device_one_netdev(), qemu.info_network()
    # 2. Cut short between device_del and device_add (here: the device_del
    # is done by hand while netwatch is stopped): the device is plugged again.
    netwatch.kill(signal.SIGTERM)
    qemu.qmp("device_del", id="net0")
    wait_until(lambda: "net0:" not in qemu.info_network(), 30, "the guest to release net0", world.dump)
    serial.set_mark()
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", timeout=30)
    wait_line(serial, "GUEST-PING ok", world, count=2, timeout=60)
    assert one_device_one_netdev(), qemu.info_network()
    assert [line.rsplit(" addr=", 1)[0] for line in nic_lines(serial, "eth0")] == \
        [f"GUEST-NIC eth0 mac={MAC0} pci=0000:00:19.0"]


def test_a_nic_removed_while_its_vm_is_down_just_goes(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0},
             {"id": "net1", "backend": "macvtap", "lower": "lo1", "mac": MAC1, "wiring": "direct"})
    world.lower("lo0", "wi0")
    world.start_netwatch()
    world.wait_state("vm1", "net1", "waiting-vm")
    world.vm_dict("vm1")["nics"].pop()
    world.write_config()
    plan = world.cli("reload", "--dry-run")
    assert plan.stdout.splitlines() == ["hot-remove vm1/net1: gone from the config; device_del at 0x18"], plan
    assert world.cli("reload").returncode == 0
    wait_until(lambda: world.nic("vm1", "net1") == {}, 20, "net1 to leave status", world.dump)
    assert world.nic("vm1", "net0")["state"] == "waiting-vm"
