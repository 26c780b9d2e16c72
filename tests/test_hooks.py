"""ifup/ifdown hooks: contexts, environment, and hooks that hang or fail."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import wait_until

from .world import World

pytestmark = pytest.mark.integration

MAC = "52:54:00:cc:00:01"
ENV_KEYS = {"PATH", "NETWATCH_VM", "NETWATCH_NIC", "INTERFACE", "LOWER", "MAC", "MODE", "BACKEND", "BRIDGE",
            "CONTEXT"}


def runs_of(world: World, count: int) -> list[dict[str, object]]:
    def enough() -> list[dict[str, object]] | None:
        runs = world.hook_runs()
        return runs if len(runs) >= count else None
    return wait_until(enough, 15, f"{count} hook runs", lambda: f"{world.hook_runs()}\n{world.dump()}")


def test_hooks_see_every_context_with_the_full_environment(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.lower("lo0", "wi0")
    world.recording_hooks()
    # Not run: a name run-parts would skip, and a file that is not executable.
    world.hook("up", "bad.name", "exit 1\n")
    world.hook("up", "60-not-executable", "exit 1\n").chmod(0o644)
    qemu = world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    runs = runs_of(world, 1)
    assert runs[0]["argv"] == ["nw-vm1-net0", "start"]
    assert set(runs[0]["env"]) == ENV_KEYS, "nothing inherited, nothing missing"
    assert runs[0]["env"] == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NETWATCH_VM": "vm1",
        "NETWATCH_NIC": "net0", "INTERFACE": "nw-vm1-net0", "LOWER": "lo0", "MAC": MAC, "MODE": "bridge",
        "BACKEND": "macvtap", "BRIDGE": "", "CONTEXT": "start"}
    world.delete_link("lo0")
    world.wait_state("vm1", "net0", "waiting-lower")
    world.lower("lo0", "wi0")
    world.wait_state("vm1", "net0", "attached")
    qemu.kill(signal.SIGKILL)
    world.wait_state("vm1", "net0", "waiting-vm")
    world.start_qemu("vm1")
    world.wait_state("vm1", "net0", "attached")
    runs = runs_of(world, 5)
    assert [(r["argv"][1], r["env"]["CONTEXT"]) for r in runs] == [  # type: ignore[index]
        ("start", "start"), ("lower-lost", "lower-lost"), ("reattach", "reattach"), ("stop", "stop"),
        ("start", "start")]
    assert all(set(r["env"]) == ENV_KEYS for r in runs)  # type: ignore[arg-type]


def test_hanging_and_failing_hooks_change_nothing(world: World) -> None:
    world.settings["hook_timeout"] = 1
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.vm("vm2", {"id": "net0", "backend": "macvtap", "lower": "lo1", "mac": "52:54:00:cc:00:02"})
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")
    world.hook("up", "10-hang", "exec sleep 3017\n")
    world.hook("up", "20-fail", "echo boom >&2\nexit 3\n")
    world.hook("down", "10-hang", "exec sleep 3017\n")
    world.start_qemu("vm1")
    world.start_qemu("vm2")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    other = world.wait_state("vm2", "net0", "attached")
    for _ in range(3):
        world.delete_link("lo0")
        world.wait_state("vm1", "net0", "waiting-lower")
        world.lower("lo0", "wi0")
        world.frame_reaches_guest("vm1", "net0", "wi0")
        world.frame_reaches_guest("vm2", "net0", "wi1")
    world.wait_state("vm1", "net0", "attached", swaps=4)
    assert world.wait_state("vm2", "net0", "attached")["swaps"] == other["swaps"]
    wait_until(lambda: "exited with status 3: boom" in netwatch.log()
               and "did not finish within 1 s and was killed" in netwatch.log(), 20, "hook failures logged",
               world.dump)
    # Hung hooks are killed, children and all.
    wait_until(lambda: subprocess.run(["pgrep", "-f", "sleep 3017"], capture_output=True).returncode == 1, 30,
               "hung hooks to be killed", world.dump)


def test_if_down_after_a_config_change_gets_the_recorded_values(world: World) -> None:
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "bridged", "bridge": "br0", "mac": MAC})
    world.bridge("br0")
    world.bridge("br1")
    world.recording_hooks()
    world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    runs_of(world, 1)
    netwatch.kill(signal.SIGTERM)
    world.vms[0]["nics"][0]["bridge"] = "br1"
    world.write_config()
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", netdev="nw-net0-tap2")
    assert world.master_of("nw-vm1-net0") == "br1"
    runs = runs_of(world, 3)
    assert [(r["env"]["CONTEXT"], r["env"]["BRIDGE"]) for r in runs] == [  # type: ignore[index]
        ("start", "br0"), ("rebind", "br0"), ("rebind", "br1")]


def test_example_routed_hook_sets_up_and_cleans_up(world: World) -> None:
    shutil.copytree(Path(__file__).parent.parent / "conf" / "hooks", world.hooks_dir, symlinks=True)
    (world.hooks_dir / "routes" / "vm1-net0").write_text("# guest addresses\n198.51.100.9\n2001:db8::9\n")
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "routed", "lower": "up0", "mac": MAC})
    world.lower("up0", "uw0")
    qemu = world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    tap = "nw-vm1-net0"

    def configured() -> bool:
        return (f"198.51.100.9 dev {tap}" in world.ns.ip("route")
                and f"2001:db8::9 dev {tap}" in world.ns.ip("-6", "route")
                and "2001:db8::9 dev up0 proxy" in world.ns.ip("-6", "neigh", "show", "proxy"))
    wait_until(configured, 10, "routes and proxy NDP from the example hook", world.dump)
    proxy_arp = subprocess.run(world.ns.exec_argv("cat", f"/proc/sys/net/ipv4/conf/{tap}/proxy_arp"),
                               capture_output=True, text=True).stdout.strip()
    assert proxy_arp == "1"
    qemu.kill(signal.SIGKILL)
    wait_until(lambda: "2001:db8::9" not in world.ns.ip("-6", "neigh", "show", "proxy"), 10,
               "the if-down hook to remove the proxy entry", world.dump)
    assert world.netwatch is not None
    world.status()  # netwatch writes what it held before it answers
    assert [line for line in world.netwatch.log().splitlines() if "20-routed" in line] == []
