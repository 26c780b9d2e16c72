"""A QMP peer that is not provably the VM's QEMU is refused, and nothing of the VM's is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import wait_until

from .world import World

pytestmark = pytest.mark.integration

MAC_A, MAC_B = "52:54:00:ab:00:01", "52:54:00:ab:00:02"
UUID = "6f1a2b3c-0d4e-4f5a-8b6c-7d8e9f0a1b2c"


def refused(world: World, vm: str, text: str) -> dict[str, object]:
    nic = world.wait_state(vm, "net0", "failed")
    assert str(nic["cause"]).startswith("QMP peer refused: ") and text in str(nic["cause"]), nic["cause"]
    assert world.netwatch is not None
    wait_until(lambda: f"refusing the QMP peer on {world.vm_dict(vm)['qmp']}" in world.netwatch.log(), 10,
               "the refusal in the journal", world.dump)
    return nic


def test_one_qemu_never_serves_two_vms(world: World) -> None:
    # One QEMU with two monitors, at a's socket and at c's: whichever VM
    # connects first has it (uuid or cgroup would say which is right); the
    # other is refused, so one QEMU never gets two VMs' networks.
    # One MAC for both (a clone): with another one the winner would, rightly,
    # replug the NIC to its own MAC, which a QEMU with no guest OS never lets go.
    c = world.vm("c", {"id": "net0", "backend": "macvtap", "lower": "lo1", "mac": MAC_A})
    world.vm("a", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_A})
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")
    qemu = world.start_qemu("a", extra_args=["-qmp", f"unix:{c['qmp']},server=on,wait=off"])
    world.start_netwatch()

    def outcome() -> tuple[str, str] | None:
        states = {vm: str(world.nic(vm, "net0").get("state")) for vm in ("a", "c")}
        if sorted(states.values()) == ["attached", "failed"]:
            return next(vm for vm, state in states.items() if state == "attached"), \
                next(vm for vm, state in states.items() if state == "failed")
        return None
    winner, loser = wait_until(outcome, 20, "one VM attached and the other refused", world.dump)
    refused(world, loser, f"pid {qemu.pid} is the QEMU of VM '{winner}'")
    assert world.macvtaps() == [f"nw-{winner}-net0"]


def test_the_uuid_must_be_the_vms(world: World) -> None:
    world.vm("u", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_A})
    world.vm_dict("u")["uuid"] = UUID
    world.write_config()
    world.lower("lo0", "wi0")
    world.start_qemu("u", extra_args=["-uuid", "00000000-0000-4000-8000-000000000001"])
    world.start_netwatch()
    refused(world, "u", f"its UUID is 00000000-0000-4000-8000-000000000001, not {UUID}")
    assert world.macvtaps() == []
    world.start_qemu("u")  # with the VM's own -uuid
    world.wait_state("u", "net0", "attached")
    world.frame_reaches_guest("u", "net0", "wi0")


def test_the_qemu_user_and_cgroup_must_be_the_vms(world: World) -> None:
    world.vm("q", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_A})
    world.vm_dict("q")["qemu_user"] = "nobody"
    world.write_config()
    world.lower("lo0", "wi0")
    world.start_qemu("q")
    netwatch = world.start_netwatch()
    refused(world, "q", "it runs as uid 0, not as nobody")
    netwatch.kill()
    del world.vm_dict("q")["qemu_user"]
    world.vm_dict("q")["cgroup"] = "/machine.slice/machine-qemu*.scope"
    world.write_config()
    world.start_netwatch()
    refused(world, "q", "does not match '/machine.slice/machine-qemu*.scope'")
    assert world.macvtaps() == []


def test_a_socket_where_others_could_put_theirs_is_refused(world: World) -> None:
    shared = Path(world.tmp) / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may create (or replace) a socket here
    world.vm("w", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_A})
    world.vm_dict("w")["qmp"] = str(shared / "w.qmp")
    world.write_config()
    world.lower("lo0", "wi0")
    world.start_qemu("w")
    world.start_netwatch()
    refused(world, "w", f"{shared} is writable by others than root and the VM's QEMU user")
    assert world.macvtaps() == []
