"""Live migration of a guest whose eth0 is a redirect NIC, between two hosts each with its own netwatch.

tests/test_migration.py's two hosts and switch, with net0 wired "redirect"
(net1 is the routed tap, as there). The target joins its macvlan at once
(macvtap-like NICs are configured on the target while QEMU is inmigrate, so
the guest's announcement reaches the switches), but nothing on the target
may announce the guest's MAC before the guest runs there: a switch would
send the guest's traffic to a host where it does not run. Likewise the
source after the guest left it. Both are checked on the switch's ports.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import time

import pytest

from netwatch.host.rarp import ETH_P_RARP
from netwatch.sandbox.guest import Serial
from netwatch.sandbox.testbed import Netns, wait_until

from .test_guest import cable, peer_network, wait_line
from .test_migration import (  # noqa: F401 - host_b is a fixture
    MAC0,
    Sampler,
    configure,
    contexts,
    fails,
    guest_args,
    host_b,
    routed_on,
    runs,
    set_events,
    start_target,
    status_of,
    wait_migrated,
)
from .world import World

pytestmark = pytest.mark.integration

TAP = "nw-vm1-net0"
ETH_P_ALL = 0x0003


class FromGuestMac:
    """Frames with the guest's source MAC that come out of one host's lower, as the switch port sees them."""

    def __init__(self, peer: str, wire: str) -> None:
        with _named(peer).entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((wire, 0))
        self.sock.setblocking(False)
        self.frames: list[tuple[float, int]] = []  # (time, ethertype)

    def read(self) -> list[tuple[float, int]]:
        while select.select([self.sock], [], [], 0)[0]:
            frame, address = self.sock.recvfrom(2048)
            # Incoming on the switch's port: sent by that host (not the switch's own frames going out to it).
            if address[2] != socket.PACKET_OUTGOING and frame[6:12] == bytes.fromhex(MAC0.replace(":", "")):
                self.frames.append((time.time(), int.from_bytes(frame[12:14], "big")))
        return self.frames

    def rarps(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for at, kind in self.read() if kind == ETH_P_RARP and since <= at < until)

    def close(self) -> None:
        self.sock.close()


def _named(name: str) -> Netns:
    """The namespace ``name`` the world made (not made or removed here)."""
    ns = Netns.__new__(Netns)
    ns.name = name
    return ns


def boot_on_a(a: World, b: World) -> tuple[Serial, str]:
    """As test_migration's, but each netwatch first: QEMU opens the tap its host's netwatch made."""
    configure(a, "redirect")
    configure(b, "redirect")
    peer = peer_network(a)
    cable(a, peer, "lo0", "wa0")
    cable(b, peer, "lo0", "wb0")
    a.start_netwatch()
    b.start_netwatch()
    for world in (a, b):
        wait_until(lambda world=world: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)  # type: ignore[misc]
    serial = Serial(a.tmp / "guest-serial.log")
    a.start_qemu("vm1", guest_args(serial))
    a.wait_state("vm1", "net0", "attached", timeout=60)
    a.wait_state("vm1", "net1", "attached", timeout=60)
    wait_line(serial, "GUEST-PING ok", a, timeout=120, count=3)
    wait_until(lambda: routed_on(a), 10, "the routed NIC configured on A", a.dump)
    return serial, peer


@pytest.mark.parametrize(("events", "incoming", "paused"), [(True, "defer", False), (False, "uri", True)],
                         ids=["events-defer", "no-events-uri-paused"])
def test_redirect_nic_migrates_in_its_phase_and_only_the_running_host_announces(
        world: World, host_b: World, events: bool, incoming: str, paused: bool) -> None:  # noqa: F811
    a, b = world, host_b
    serial_a, peer = boot_on_a(a, b)
    on_a, on_b = FromGuestMac(peer, "wa0"), FromGuestMac(peer, "wb0")
    try:
        set_events(a, events)
        serial_a.set_mark()
        serial_b, uri = start_target(b, incoming, paused, events)
        # B: the macvlan joined at once, its if-up run (migrate-in); the routed tap waits.
        joined = b.wait_state("vm1", "net0", "attached", timeout=30)
        assert joined["wiring"] == "redirect" and joined["configured"] is True and joined["migration"] == "in", joined
        assert b.ns.links("macvlan") == [joined["macvlan"]]
        status_b = b.wait_state("vm1", "net1", "attached", timeout=30)
        assert status_b["configured"] is False and status_b["migration"] == "in", status_b
        assert next(vm for vm in b.status()["vms"] if vm["name"] == "vm1")["run_state"] == "inmigrate"
        # A host-side announcement is sent at once and then for 0.8 s (QEMU's rounds): give it that long.
        time.sleep(1.0)
        early_b = on_b.rarps()
        sampler = Sampler(a, b)
        sampler.start()
        started = time.time()
        a.qemus["vm1"].qmp("migrate", uri=uri)
        wait_migrated(a)
        finished = time.time()
        if paused:
            wait_until(lambda: b.qemus["vm1"].qmp("query-status")["status"] == "paused", 30, "B paused after it",
                       b.dump)
            # A restart of B's netwatch here: its records say the guest has not run on B yet; nothing is remade.
            assert b.netwatch is not None
            b.netwatch.kill(signal.SIGTERM)
            b.start_netwatch()
            kept = b.wait_state("vm1", "net0", "attached", timeout=30)
            assert (kept["macvlan_ifindex"], kept["migration"]) == (joined["macvlan_ifindex"], "in"), kept
            time.sleep(1.0)
            assert on_b.rarps() == early_b, "B announced the guest's MAC while it had not run there"
            b.qemus["vm1"].qmp("cont")
        wait_until(lambda: routed_on(b), 20, "the routed NIC configured on B", b.dump)
        sampler.stop()
        wait_line(serial_b, "GUEST-PING ok", b, timeout=60, count=3)
        resumed = b.wait_state("vm1", "net0", "attached")
        assert resumed["macvlan_ifindex"] == joined["macvlan_ifindex"] and resumed["migration"] is None, resumed
        # The guest's frames now come out of B's lower.
        wait_until(lambda: any(at > finished for at, _kind in on_b.read()), 10, "the guest's frames on B's port")
        assert contexts(b, "net1") == ["migrate-in"], runs(b)
        # Where the guest runs, a remade macvlan is announced: with the VM's monitor by QEMU's announce-self
        # (netwatch asks three rounds), without one from the host (QEMU's five).
        remade = time.time()
        on_b_nic = b.nic("vm1", "net0")
        b.delete_link(on_b_nic["macvlan"])
        b.wait_state("vm1", "net0", "attached", swaps=on_b_nic["swaps"] + 1)
        wait_until(lambda: on_b.rarps(since=remade) >= 3, 10, "B's announcement of the guest", b.dump)
        running_b = on_b.rarps(since=remade)
        # A after the guest left: its macvlan deleted (as by a lower flap, with A's wire kept for the count) is
        # made again there, and nothing is announced.
        vm_a = next(vm for vm in a.status()["vms"] if vm["name"] == "vm1")
        assert vm_a["run_state"] == "postmigrate", vm_a
        left = time.time()
        before_flap = a.nic("vm1", "net0")
        a.delete_link(before_flap["macvlan"])
        a.wait_state("vm1", "net0", "attached", swaps=before_flap["swaps"] + 1)
        time.sleep(1.0)
        late_a = on_a.rarps(since=left)
        # A's QEMU goes: its macvlan goes with it, its tap stays for the VM's next QEMU; if-down migrate-out.
        with contextlib.suppress(EOFError):
            a.qemus["vm1"].qmp("quit")
        wait_until(lambda: contexts(a, "net0")[-1:] == ["migrate-out"], 20, "A's if-down", a.dump)
        a.wait_state("vm1", "net0", "waiting-vm")
        assert "stop" not in [run["argv"][1] for run in runs(a)], runs(a)
        assert not a.ns.links("macvlan") and a.ns.link_exists(TAP), a.dump()
        lost = fails(serial_a) + fails(serial_b)
        print(f"\nredirect migration ({'events' if events else 'no events'}, {incoming}, "
              f"{'-S' if paused else 'running'}): {(finished - started) * 1000:.0f} ms, {lost} pings lost; "
              f"guest MAC announced (RARP) from B before the guest ran there: {early_b}; from A after it left, "
              f"across a remade macvlan on A: {late_a}; from B, where it runs, across a remade macvlan: "
              f"{running_b}; A's net0 hooks {contexts(a, 'net0')}, B's {contexts(b, 'net0')}")
        assert (early_b, late_a) == (0, 0), "only the host where the guest runs announces its MAC"
        wait_until(lambda: contexts(b, "net0") == ["migrate-in", "lower-lost", "reattach"], 20, "B's hooks", b.dump)
        assert status_of(b, "net0")["state"] == "attached" and status_of(b, "net1")["configured"] is True
    finally:
        on_a.close()
        on_b.close()
