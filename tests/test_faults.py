"""Faults that must not cost a VM its network: stuck QEMUs, event storms, overflow."""

from __future__ import annotations

import signal
import subprocess

import pytest

from netwatch.sandbox.testbed import Netwatch, wait_until

from .world import World

pytestmark = pytest.mark.integration


def two_vm_world(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:f0:00:01"})
    world.vm("vm2", {"id": "net0", "backend": "macvtap", "lower": "lo1", "mac": "52:54:00:f0:00:02"})
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")


def running_two_vms(world: World) -> Netwatch:
    """Both VMs up, both NICs attached; the netwatch serving them."""
    two_vm_world(world)
    world.start_qemu("vm1")
    world.start_qemu("vm2")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    world.wait_state("vm2", "net0", "attached")
    return netwatch


def test_a_stuck_qemu_delays_no_other_vm(world: World) -> None:
    world.settings["qmp_timeout"] = 1
    two_vm_world(world)
    stuck = world.start_qemu("vm1")
    world.start_qemu("vm2")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    world.wait_state("vm2", "net0", "attached")
    assert stuck.proc is not None
    stuck.proc.send_signal(signal.SIGSTOP)  # it stops reading its monitor
    try:
        for lower, wire in (("lo0", "wi0"), ("lo1", "wi1")):
            world.delete_link(lower)
            world.lower(lower, wire)
        # vm2 is swapped while vm1's commands time out.
        world.wait_state("vm2", "net0", "attached", netdev="nw-net0-tap2")
        world.frame_reaches_guest("vm2", "net0", "wi1")
        nic = world.wait_state("vm1", "net0", "failed")
        assert "no answer within 1 s" in nic["cause"]
    finally:
        stuck.proc.send_signal(signal.SIGCONT)
    world.wait_state("vm1", "net0", "attached", timeout=60)
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_wire("vm1", "net0", "wi0")
    # Whatever the timed-out commands did, QEMU ends with exactly one backend.
    wait_until(lambda: len(world.backend_netdevs("vm1")) == 2, 10, "one backend pair in vm1", world.dump)
    assert sorted(world.macvtaps()) == ["nw-vm1-net0", "nw-vm2-net0"]


def test_netlink_overflow_in_a_burst_is_resynced(world: World) -> None:
    # A small receive buffer and a stopped netwatch make the overflow certain.
    world.settings["netlink_rcvbuf"] = 65536
    netwatch = running_two_vms(world)
    baseline = world.status()["service"]
    netwatch_proc = netwatch.proc
    assert netwatch_proc is not None
    netwatch_proc.send_signal(signal.SIGSTOP)
    try:
        burst = [f"link add st{i} type veth peer name sp{i}" for i in range(300)]
        burst += ["link del lo0"] + [f"link del st{i}" for i in range(0, 300, 2)]
        burst += ["link add lo0 type veth peer name wi0", "link set wi0 up", "link set lo0 up"]
        burst += [f"link del st{i}" for i in range(1, 300, 2)]
        subprocess.run(["ip", "-n", world.ns.name, "-batch", "-"], input="\n".join(burst) + "\n", text=True,
                       check=True)
    finally:
        netwatch_proc.send_signal(signal.SIGCONT)
    wait_until(lambda: "resynchronising links: netlink overflow" in netwatch.log(), 20, "the resync", world.dump)
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap2")
    world.frame_reaches_guest("vm1", "net0", "wi0")
    world.frame_reaches_wire("vm1", "net0", "wi0")
    assert world.nic("vm2", "net0")["netdev"] == "nw-net0-tap1"
    service = world.status()["service"]
    assert service["link_resyncs"] >= 1
    assert service["links"] == baseline["links"], "the table matches the kernel again"
    assert service["tasks"] <= baseline["tasks"] + 2, (baseline, service)
    assert sorted(world.macvtaps()) == ["nw-vm1-net0", "nw-vm2-net0"]


def test_event_storms_leave_no_growth(world: World) -> None:
    netwatch = running_two_vms(world)
    baseline = world.status()["service"]
    fds = netwatch.fd_count()
    for _ in range(3):
        burst = [f"link add sx{i} type veth peer name sy{i}" for i in range(200)]
        burst += [f"link set sx{i} up" for i in range(200)] + [f"link del sx{i}" for i in range(200)]
        subprocess.run(["ip", "-n", world.ns.name, "-batch", "-"], input="\n".join(burst) + "\n", text=True,
                       check=True)
    wait_until(lambda: world.status()["service"]["links"] == baseline["links"], 20, "the storm to pass", world.dump)
    after = world.status()["service"]
    assert after["tasks"] <= baseline["tasks"] + 1, (baseline, after)
    wait_until(lambda: netwatch.fd_count() <= fds, 10, "fd count back", world.dump)
    assert world.nic("vm1", "net0")["netdev"] == "nw-net0-tap1"
    world.frame_reaches_guest("vm2", "net0", "wi1")
