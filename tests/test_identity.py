"""A QMP peer that is not provably the VM's QEMU is refused, and nothing of the VM's is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netwatch.sandbox import wait_until

from .test_hostile import ROOT
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


def test_an_impostor_on_the_socket_gets_nothing_after_a_restart(world: World) -> None:
    """Found in review: the impostor got the VM's new macvtap and read its frames; the real QEMU lost its own."""
    world.vm("b", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_B})
    world.lower("lo0", "wi0")
    qemu = world.start_qemu("b")
    netwatch = world.start_netwatch()
    before = world.wait_state("b", "net0", "attached")
    netwatch.kill()
    impostor = subprocess.Popen([sys.executable, "-m", "tests.hostile_peer", "impostor",
                                 str(world.vm_dict("b")["qmp"])], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline().strip() == "listening"
        world.start_netwatch()
        refused(world, "b", f"the QEMU recorded for this VM (pid {qemu.pid}) still runs")
        assert world.macvtaps() == [before["ifname"]], "b's macvtap stays"
        assert world.ns.ip("-o", "link", "show", str(before["ifname"])).split(":")[0] == str(before["ifindex"])
        assert world.backend_netdevs("b") == [before["netdev"], before["hub_netdev"]]
        world.frame_reaches_guest("b", "net0", "wi0")  # through the real QEMU's own backend, untouched
    finally:
        impostor.send_signal(signal.SIGKILL)
        impostor.wait(10)


def test_one_qemu_never_serves_two_vms(world: World) -> None:
    a = world.vm("a", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_A})
    c = world.vm("c", {"id": "net0", "backend": "macvtap", "lower": "lo1", "mac": MAC_B})
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")
    qemu = world.start_qemu("a", extra_args=["-qmp", f"unix:{c['qmp']},server=on,wait=off"])
    world.start_netwatch()
    world.wait_state("a", "net0", "attached")
    refused(world, "c", f"pid {qemu.pid} is the QEMU of VM 'a'")
    assert world.macvtaps() == ["nw-a-net0"]
    assert a["qmp"] != c["qmp"]


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
