"""Live migration between two simulated hosts, each with its own netwatch, with the real guest.

Host A and host B are network namespaces with their own config, state dir
and hooks; each has a lower ``lo0`` cabled into a third "switch" namespace
that holds the guest's peer (10.77.0.1). The guest has a macvtap on lo0
(eth0, which pings the peer) and a routed tap (eth1), whose if-up/if-down
hooks keep a marker file on their host, as a routed NIC's host routes and
proxy ARP would be. The test migrates the guest as an orchestrator does:
QEMU on B started with ``-incoming``, ``migrate`` on A over a unix socket,
then A's QEMU ended.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch.sandbox.guest import Serial, build
from netwatch.sandbox.testbed import Netns, wait_until

from .test_guest import cable, peer_network, wait_line
from .world import World

pytestmark = pytest.mark.integration

MAC0 = "52:54:00:9c:00:01"
MAC1 = "52:54:00:9c:00:02"


@pytest.fixture
def host_b() -> Iterator[World]:
    tmp = Path(tempfile.mkdtemp(prefix="nwt-"))
    try:
        with Netns("nwt") as ns:
            world = World(tmp, ns)
            try:
                yield world
            finally:
                world.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def migration_hooks(world: World) -> None:
    """Hooks that log each run with its time, and keep the routed NIC's marker on this host."""
    log, marker = world.tmp / "hooks.jsonl", world.tmp / "routed.on"
    record = (f"python3 -c 'import json,os,sys,time; print(json.dumps({{\"t\": time.time(), \"argv\": sys.argv[1:], "
              f"\"nic\": os.environ[\"NETWATCH_NIC\"]}}))' \"$1\" \"$2\" >> {log}\n")
    world.hook("up", "50-record", record + f'[ "$MODE" = routed ] && touch {marker}\nexit 0\n')
    world.hook("down", "50-record", record + f'[ "$MODE" = routed ] && rm -f {marker}\nexit 0\n')


def runs(world: World) -> list[dict[str, Any]]:
    path = world.tmp / "hooks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def contexts(world: World, nic: str) -> list[str]:
    return [run["argv"][1] for run in runs(world) if run["nic"] == nic]


def routed_on(world: World) -> bool:
    return (world.tmp / "routed.on").exists()


def configure(world: World, wiring: str) -> None:
    # Default slots go down from 0x19 in config order, and the guest names its
    # NICs in slot order: listed second, net0 is the guest's eth0.
    world.vm("vm1", {"id": "net1", "backend": "tap", "mode": "routed", "mac": MAC1},
             {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC0, "wiring": wiring})
    migration_hooks(world)


class Sampler(threading.Thread):
    """Where the routed NIC is configured, every few milliseconds, until stopped."""

    def __init__(self, a: World, b: World) -> None:
        super().__init__(daemon=True)
        self.a, self.b = a, b
        self.samples: list[tuple[float, bool, bool]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), routed_on(self.a), routed_on(self.b)))
            time.sleep(0.002)

    def stop(self) -> list[tuple[float, bool, bool]]:
        self.done.set()
        self.join(5)
        self.samples.append((time.time(), routed_on(self.a), routed_on(self.b)))  # what the caller saw last
        return self.samples


def guest_args(serial: Serial) -> list[str]:
    return build().qemu_args(serial.path, ["10.77.0.2/24"], ping="10.77.0.1")


def boot_on_a(a: World, b: World, wiring: str) -> tuple[Serial, str]:
    configure(a, wiring)
    configure(b, wiring)
    peer = peer_network(a)
    cable(a, peer, "lo0", "wa0")
    cable(b, peer, "lo0", "wb0")
    serial = Serial(a.tmp / "guest-serial.log")
    a.start_qemu("vm1", guest_args(serial))
    a.start_netwatch()
    b.start_netwatch()
    a.wait_state("vm1", "net0", "attached", timeout=60)
    a.wait_state("vm1", "net1", "attached", timeout=60)
    wait_line(serial, "GUEST-PING ok", a, timeout=120, count=3)
    wait_until(lambda: routed_on(a), 10, "the routed NIC configured on A", a.dump)
    return serial, peer


def start_target(b: World, incoming: str, paused: bool, events: bool) -> tuple[Serial, str]:
    """B's QEMU as an orchestrator starts it: same devices, waiting for the guest."""
    serial = Serial(b.tmp / "guest-serial.log")
    args = guest_args(serial)
    uri = f"unix:{b.tmp / 'migrate.sock'}"
    args += ["-incoming", "defer" if incoming == "defer" else uri, *(["-S"] if paused else [])]
    qemu = b.start_qemu("vm1", args)
    if events:
        qemu.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    if incoming == "defer":
        qemu.qmp("migrate-incoming", uri=uri)
    return serial, uri


def set_events(world: World, on: bool) -> None:
    world.qemus["vm1"].qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": on}])


def wait_migrated(a: World, timeout: float = 120) -> dict[str, Any]:
    def completed() -> dict[str, Any] | None:
        info = a.qemus["vm1"].qmp("query-migrate")
        if info.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"the migration {info['status']}: {info}")
        return info if info.get("status") == "completed" else None
    return wait_until(completed, timeout, "the migration to complete", a.dump)


def fails(serial: Serial) -> int:
    return serial.count("GUEST-PING fail")


# The routed tap is wired direct (a tap's default), so the target plugs its device while it is "inmigrate".
@pytest.mark.parametrize(("events", "incoming", "paused", "wiring"),
                         [(True, "defer", False, "hub"), (False, "uri", True, "direct")],
                         ids=["events-defer-hub", "no-events-uri-paused-direct"])
def test_migration_configures_each_nic_in_its_phase(world: World, host_b: World, events: bool, incoming: str,
                                                    paused: bool, wiring: str) -> None:
    a, b = world, host_b
    serial_a, _peer = boot_on_a(a, b, wiring)
    set_events(a, events)
    serial_a.set_mark()
    serial_b, uri = start_target(b, incoming, paused, events)
    # netwatch on B: the backends exist, the macvtap is configured, the routed tap waits.
    b.wait_state("vm1", "net0", "attached", timeout=30)
    status_b = b.wait_state("vm1", "net1", "attached", timeout=30)
    assert status_b["configured"] is False and status_b["migration"] == "in", status_b
    vm_b = next(vm for vm in b.status()["vms"] if vm["name"] == "vm1")
    assert vm_b["run_state"] == "inmigrate", vm_b
    sampler = Sampler(a, b)
    sampler.start()
    started = time.time()
    a.qemus["vm1"].qmp("migrate", uri=uri)
    wait_migrated(a)
    # When the test saw it completed, polling every 10 ms (QEMU 7.2's total-time sometimes reads 0).
    finished = time.time()
    if paused:
        wait_until(lambda: b.qemus["vm1"].qmp("query-status")["status"] == "paused", 30, "B paused after it",
                   b.dump)
        assert not routed_on(b), "B configures its routed NIC only when the guest runs there"
        # A restart of B's netwatch here: its records say the guest has not run on B yet.
        assert b.netwatch is not None
        b.netwatch.kill(signal.SIGTERM)
        b.start_netwatch()
        kept = b.wait_state("vm1", "net1", "attached", timeout=30)
        assert kept["configured"] is False and kept["migration"] == "in", kept
        assert not routed_on(b) and contexts(b, "net1") == [], runs(b)
        b.qemus["vm1"].qmp("cont")
    wait_until(lambda: routed_on(b), 20, "the routed NIC configured on B", b.dump)
    samples = sampler.stop()
    wait_line(serial_b, "GUEST-PING ok", b, timeout=60, count=3)
    vm_a = next(vm for vm in a.status()["vms"] if vm["name"] == "vm1")
    assert vm_a["run_state"] == "postmigrate", vm_a
    # The macvtap's migrate-in on B ran before the migration finished.
    ups = [run for run in runs(b) if run["nic"] == "net0"]
    assert [run["argv"][1] for run in ups] == ["migrate-in"], ups
    assert ups[0]["t"] < finished, f"{ups} started {started} seen completed {finished}"
    assert contexts(b, "net1") == ["migrate-in"]
    # The routed NIC: never on both hosts; on A before, on B after.
    both = [sample for sample in samples if sample[1] and sample[2]]
    assert not both, f"configured on two hosts at once: {both}\n{migration_log(a, b)}"
    assert samples[0][1] and not samples[0][2] and samples[-1][2] and not samples[-1][1], (samples[0], samples[-1])
    gap = [sample for sample in samples if not sample[1] and not sample[2]]
    gap_ms = (gap[-1][0] - gap[0][0]) * 1000 if gap else 0.0
    # A: the routed tap went at once; the macvtap goes with A's QEMU, as migrate-out, never stop.
    assert contexts(a, "net1") == ["start", "migrate-out"], runs(a)
    assert contexts(a, "net0") == ["start"], runs(a)
    if incoming == "defer":
        # A's netwatch restarts in between: its records say the guest went away, so still migrate-out.
        assert a.netwatch is not None
        a.netwatch.kill(signal.SIGTERM)
    with contextlib.suppress(EOFError):  # QEMU may be gone before its answer
        a.qemus["vm1"].qmp("quit")
    if incoming == "defer":
        a.qemus["vm1"].kill()  # reaped: the restarted netwatch must see it gone
        a.start_netwatch()
    wait_until(lambda: contexts(a, "net0") == ["start", "migrate-out"], 20, "A's macvtap if-down", a.dump)
    a.wait_state("vm1", "net0", "waiting-vm")
    assert "stop" not in [run["argv"][1] for run in runs(a)], runs(a)
    assert not a.macvtaps(), "A removed its backends"
    lost = fails(serial_a) + fails(serial_b)
    print(f"\nmigration ({'events' if events else 'no events'}, {incoming}, {'-S' if paused else 'running'}, "
          f"macvtap {wiring}): "
          f"{(finished - started) * 1000:.0f} ms, {lost} pings lost, "
          f"routed NIC on neither host for {gap_ms:.1f} ms")
    assert status_of(b, "net0")["state"] == "attached" and status_of(b, "net1")["configured"] is True
    assert next(vm for vm in b.status()["vms"] if vm["name"] == "vm1")["run_state"] == "running"


def migration_log(a: World, b: World) -> str:
    lines = []
    for name, world in (("A", a), ("B", b)):
        assert world.netwatch is not None
        lines += [f"{name} {line}" for line in world.netwatch.log().splitlines()
                  if "migrat" in line or "run-state" in line or "hook" in line or "net0" in line]
        lines += [f"{name} hook {run}" for run in runs(world)]
    return "\n".join(lines)


def status_of(world: World, nic: str) -> dict[str, Any]:
    return world.nic("vm1", nic)


@pytest.mark.parametrize("events", [True, False], ids=["events", "no-events"])
def test_a_target_killed_mid_migration_leaves_the_source_serving(world: World, host_b: World,
                                                                 events: bool) -> None:
    a, b = world, host_b
    serial_a, _peer = boot_on_a(a, b, "hub")
    set_events(a, events)
    # Slow enough to be cut in the middle.
    a.qemus["vm1"].qmp("migrate-set-parameters", **{"max-bandwidth": 2 * 1024 * 1024})
    _serial_b, uri = start_target(b, "uri", False, events)
    b.wait_state("vm1", "net0", "attached", timeout=30)
    b.wait_state("vm1", "net1", "attached", timeout=30)
    sampler = Sampler(a, b)
    sampler.start()
    a.qemus["vm1"].qmp("migrate", uri=uri)
    wait_until(lambda: a.qemus["vm1"].qmp("query-migrate").get("ram", {}).get("transferred", 0) > 0, 30,
               "the migration under way", a.dump)
    b.qemus["vm1"].kill()
    wait_until(lambda: a.qemus["vm1"].qmp("query-migrate").get("status") == "failed", 30,
               "the source to see the migration fail", a.dump)
    # B: the macvtap's if-up is paired with migrate-failed, the routed tap never ran; nothing is left.
    wait_until(lambda: contexts(b, "net0") == ["migrate-in", "migrate-failed"], 20, "B's if-down", b.dump)
    b.wait_state("vm1", "net0", "waiting-vm")
    b.wait_state("vm1", "net1", "waiting-vm")
    wait_until(lambda: not b.macvtaps() and not list((Path(b.state) / "nics").glob("*/*.json")), 10,
               "B's backends and records gone", b.dump)
    assert not b.ns.ip("-br", "link", "show", "type", "tun").strip(), "B's tap gone"
    assert contexts(b, "net1") == [], runs(b)
    # A: still serving, configured all along.
    samples = sampler.stop()
    assert all(sample[1] and not sample[2] for sample in samples), "A kept its routed NIC; B never had it"
    assert contexts(a, "net1") == ["start"] and contexts(a, "net0") == ["start"], runs(a)
    serial_a.set_mark()
    wait_line(serial_a, "GUEST-PING ok", a, timeout=30, count=3)
    assert next(vm for vm in a.status()["vms"] if vm["name"] == "vm1")["run_state"] == "running"
