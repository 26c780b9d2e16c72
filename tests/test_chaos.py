"""Chaos: a seeded random sequence of faults, invariants checked after each settle.

Short form in CI; the long form by hand, e.g.
    NETWATCH_CHAOS_FAULTS=1000 NETWATCH_CHAOS_SEED=7 pytest tests/test_chaos.py
A failure names the seed and the faults so far, so it can be replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import wait_until

from .world import World

pytestmark = pytest.mark.integration

FAULTS = int(os.environ.get("NETWATCH_CHAOS_FAULTS", "40"))
SEED = int(os.environ.get("NETWATCH_CHAOS_SEED", str(random.SystemRandom().randrange(1 << 30))))

# NIC -> (vm, lower it is configured on, wire to test frames on; None: routed)
NICS = {
    ("va", "n0"): ("sh0", "shw0"),
    ("va", "n1"): ("la0", "law0"),
    ("vb", "n0"): ("sh0", "shw0"),
    ("vb", "n1"): ("up0", "upw0"),
    ("vc", "n0"): (None, None),
}
LOWERS = {"sh0": "shw0", "la0": "law0", "lb0": "lbw0", "up0": "upw0"}


class Chaos:
    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.override: dict[tuple[str, str], str] = {}  # rebinds in force
        self.fd_base: dict[str, int] = {}
        self.fd_seen: dict[str, list[str]] = {}
        self.history: list[str] = []

    # -- the world --------------------------------------------------------

    def build(self) -> None:
        w = self.world
        w.vm("va", {"id": "n0", "backend": "macvtap", "lower": "sh0", "mac": "52:54:00:c0:00:01"},
             {"id": "n1", "backend": "macvtap", "lower": "la0", "mac": "52:54:00:c0:00:02"})
        w.vm("vb", {"id": "n0", "backend": "macvtap", "lower": "sh0", "mac": "52:54:00:c0:00:03"},
             {"id": "n1", "backend": "tap", "wiring": "hub", "mode": "bridged", "bridge": "br0", "lower": "up0",
              "mac": "52:54:00:c0:00:04"})
        w.vm("vc", {"id": "n0", "backend": "tap", "wiring": "hub", "mode": "routed", "mac": "52:54:00:c0:00:05"})
        for lower, wire in LOWERS.items():
            w.lower(lower, wire)
        w.bridge("br0")
        for vm in ("va", "vb", "vc"):
            w.start_qemu(vm)
        w.start_netwatch()

    # -- faults -------------------------------------------------------------

    def fault(self) -> str:
        faults: list[Callable[[], str]] = [
            self.recreate_lower, self.flap_lower, self.rename_lower, self.move_lower, self.change_mac,
            self.recreate_bridge, self.delete_tap, self.kill_qemu, self.kill_netwatch, self.reload, self.rebind]
        return self.rng.choice(faults)()

    def ip(self, *args: str, check: bool = True) -> None:
        self.world.ns.ip(*args, check=check)

    def recreate_lower(self) -> str:
        lower = self.rng.choice(list(LOWERS))
        self.ip("link", "del", lower)
        self.world.lower(lower, LOWERS[lower])
        return f"recreate {lower}"

    def flap_lower(self) -> str:
        lower = self.rng.choice(list(LOWERS))
        self.ip("link", "set", lower, "down")
        self.ip("link", "set", lower, "up")
        return f"flap {lower}"

    def rename_lower(self) -> str:
        lower = self.rng.choice(list(LOWERS))
        self.ip("link", "set", lower, "down")
        self.ip("link", "set", lower, "name", "chaos-tmp")
        self.ip("link", "set", "chaos-tmp", "name", lower)
        self.ip("link", "set", lower, "up")
        return f"rename {lower} away and back"

    def move_lower(self) -> str:
        lower = self.rng.choice(list(LOWERS))
        other = self.world.scratch_netns()
        self.ip("link", "set", lower, "netns", other)
        subprocess.run(["ip", "-n", other, "link", "set", lower, "netns", self.world.ns.name], check=True)
        self.ip("link", "set", lower, "up")
        return f"move {lower} to another netns and back"

    def change_mac(self) -> str:
        lower = self.rng.choice(list(LOWERS))
        mac = "02:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(5))
        self.ip("link", "set", lower, "address", mac)
        return f"mac of {lower} -> {mac}"

    def recreate_bridge(self) -> str:
        self.ip("link", "del", "br0")
        self.world.bridge("br0")
        return "recreate br0"

    def delete_tap(self) -> str:
        vm = self.rng.choice(["vb", "vc"])
        name = f"nw-{vm}-n{1 if vm == 'vb' else 0}"
        self.ip("link", "del", name, check=False)
        return f"delete tap {name}"

    def kill_qemu(self) -> str:
        vm = self.rng.choice(["va", "vb", "vc"])
        self.world.qemus[vm].kill(signal.SIGKILL)
        self.world.start_qemu(vm)
        self.fd_base.pop(vm, None)
        self.fd_seen.pop(vm, None)
        return f"SIGKILL QEMU of {vm}, restart"

    def kill_netwatch(self) -> str:
        w = self.world
        assert w.netwatch is not None
        # Sometimes in the middle of a swap: a lower comes back just before.
        if self.rng.random() < 0.5:
            lower = self.rng.choice(list(LOWERS))
            self.ip("link", "del", lower)
            w.lower(lower, LOWERS[lower])
        w.netwatch.kill(signal.SIGKILL)
        w.start_netwatch()
        self.override.clear()  # a restart returns to the config
        self.fd_base.pop("netwatch", None)
        self.fd_seen.pop("netwatch", None)
        return "SIGKILL netwatch, restart"

    def reload(self) -> str:
        result = self.world.cli("reload")
        assert result.returncode == 0, result.stderr
        self.override.clear()
        return "reload"

    def rebind(self) -> str:
        current = self.override.get(("va", "n1"), "la0")
        target = "lb0" if current == "la0" else "la0"
        self.world.wait_state("va", "n1", "attached")
        result = self.world.cli("rebind", "va", "n1", target)
        assert result.returncode == 0, result.stderr
        self.override[("va", "n1")] = target
        return f"rebind va/n1 to {target}"

    # -- invariants ---------------------------------------------------------

    def expected_lower(self, key: tuple[str, str]) -> str | None:
        return self.override.get(key, NICS[key][0])

    def settle_and_check(self) -> None:
        w = self.world
        for key in NICS:
            lower = self.expected_lower(key)
            match = {"lower": lower} if lower else {}
            w.wait_state(*key, "attached", timeout=30, **match)
        for key in NICS:
            target = self.expected_lower(key)
            if target is not None:
                w.frame_reaches_guest(*key, LOWERS[target])
                w.frame_reaches_wire(*key, LOWERS[target])
        status = {(vm["name"], nic["id"]): nic for vm in w.status()["vms"] for nic in vm["nics"]}
        # Exactly one backend per NIC, in QEMU and in the kernel; nothing orphaned.
        for vm in ("va", "vb", "vc"):
            expected = sorted(n for (v, _), s in status.items() if v == vm for n in (s["netdev"], s["hub_netdev"]))
            assert w.backend_netdevs(vm) == expected, (vm, w.backend_netdevs(vm), expected)
        macvtaps = sorted(s["ifname"] for s in status.values() if s["backend"] == "macvtap")
        taps = sorted(s["ifname"] for s in status.values() if s["backend"] == "tap")
        assert sorted(w.ns.links("macvtap")) == macvtaps
        assert sorted(w.ns.links("tun")) == taps
        # The runtime records say what is.
        for (vm, nic), s in status.items():
            record = json.loads((Path(w.state) / "nics" / vm / f"{nic}.json").read_text())
            assert (record["ifname"], record["ifindex"], record["tap_netdev"]) == (s["ifname"], s["ifindex"],
                                                                                   s["netdev"]), (vm, nic, record)
        # fds stay flat per process (a restarted process sets a new baseline).
        assert w.netwatch is not None
        processes = {"netwatch": w.netwatch.pid, **{vm: q.pid for vm, q in w.qemus.items()}}
        for name, pid in processes.items():
            base = self.fd_base.setdefault(name, len(fd_links(pid)))
            self.fd_seen.setdefault(name, fd_links(pid))
            wait_until(lambda pid=pid, base=base: len(fd_links(pid)) <= base, 10,
                       f"the fd count of {name} to return to {base}",
                       lambda pid=pid, name=name: describe_new_fds(pid, self.fd_seen[name]))


def fd_links(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            found.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return found


def describe_new_fds(pid: int, before: list[str]) -> str:
    lines = []
    for entry in sorted(set(fd_links(pid)) - set(before)):
        inode = entry.split("socket:[")[-1].rstrip("]") if "socket:" in entry else None
        where = ""
        if inode:
            for table in ("unix", "netlink", "packet", "tcp", "udp"):
                text = Path(f"/proc/{pid}/net/{table}").read_text()
                if any(inode in line.split() for line in text.splitlines()):
                    where = f" ({table}: " + next(line for line in text.splitlines() if inode in line.split()) + ")"
        lines.append(entry + where)
    return "new fds: " + "; ".join(lines)


def run(chaos: Chaos, seed: int, faults: int) -> None:
    """Build, then ``faults`` faults each followed by a settle; any failure names the seed and the faults so far."""
    def replay() -> str:
        return (f"chaos seed {seed} failed after {len(chaos.history)} faults "
                f"(replay: NETWATCH_CHAOS_SEED={seed} NETWATCH_CHAOS_FAULTS={faults}):\n"
                + "\n".join(chaos.history[-15:]))
    try:
        chaos.build()
        chaos.settle_and_check()
        for _ in range(faults):
            chaos.history.append(chaos.fault())
            chaos.settle_and_check()
    except Exception as exc:  # any failure at all (a RuntimeError from `ip` too) must say how to replay it
        raise AssertionError(f"{replay()}\n{type(exc).__name__}: {exc}") from exc
    except BaseException:
        # The per-test timeout or ^C: not netwatch's failure, but the run must still be replayable.
        print(replay(), file=sys.stderr, flush=True)
        raise
    print(f"chaos seed {seed}: {faults} faults, 0 violations; {chaos.history}")


# About 0.3 s a fault here (40 in 11 s): 10 s each leaves room for a slow machine and the long form.
@pytest.mark.timeout(max(300, 10 * FAULTS))
def test_chaos(world: World) -> None:
    run(Chaos(world, random.Random(SEED)), SEED, FAULTS)


class Unlucky(Chaos):
    """A run whose third fault raises what no check expects (``ip`` fails: RuntimeError)."""

    def build(self) -> None:
        pass

    def settle_and_check(self) -> None:
        pass

    def fault(self) -> str:
        if len(self.history) == 2:
            raise RuntimeError("ip link del sh0: Cannot find device")
        return self.rng.choice(["flap sh0", "reload", "recreate br0"])


def test_any_failure_names_the_seed_and_the_faults() -> None:
    chaos = Unlucky(None, random.Random(5))  # type: ignore[arg-type]
    with pytest.raises(AssertionError) as failure:
        run(chaos, 5, 40)
    text = str(failure.value)
    assert text.startswith("chaos seed 5 failed after 2 faults (replay: NETWATCH_CHAOS_SEED=5 "
                           "NETWATCH_CHAOS_FAULTS=40)"), text
    assert "\n".join(chaos.history) in text and "RuntimeError: ip link del sh0: Cannot find device" in text, text
