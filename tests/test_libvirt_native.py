"""A libvirt domain with netwatch's NICs as ordinary libvirt elements: no qemu:commandline, no monitor of
netwatch's, netwatch's libvirt hook installed (issue #23).

The domain is built from what ``netwatch qemu-args --libvirt`` prints alone (its <interface> elements
under <devices>); libvirtd is Debian's, walled off by tests/libvirt_host.py, and runs netwatch's hook
(conf/libvirt/qemu.d/netwatch, here pointing at this test's netwatch and config). A real guest pings its
peer through lower flaps, a hot-added and hot-removed NIC, managedsave and start, a libvirtd restart and
a netwatch restart.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from netwatch.sandbox.guest import GuestError, Serial, build
from netwatch.sandbox.testbed import _die_with_parent, unique, wait_until

from .libvirt_host import LibvirtHost, running
from .test_libvirt import LOWER, cable, domain_xml, peer_network
from .world import World

pytestmark = pytest.mark.integration

NIC, MAC = "ua-nw0", "52:54:00:9a:20:01"
HOT, HOT_MAC = "ua-nw1", "52:54:00:9a:20:02"
FLAPS = 3


class HookedLibvirt(LibvirtHost):
    """The test's libvirt with netwatch's qemu hook installed before libvirtd starts (it looks once, then)."""

    def __init__(self, root: Path, world: World) -> None:
        super().__init__(root, world.ns)
        netwatch = Path(sys.executable).with_name("netwatch")
        # conf/libvirt/qemu.d/netwatch, with this test's netwatch and config.
        shipped = (Path(__file__).parent.parent / "conf" / "libvirt" / "qemu.d" / "netwatch").read_text()
        self.hook = shipped.replace("/usr/local/bin/netwatch libvirt-hook",
                                    f"{netwatch} libvirt-hook -c {world.config_path}")
        assert self.hook != shipped

    def _make_dirs(self) -> None:
        super()._make_dirs()
        path = self.root / "etc" / "hooks" / "qemu.d" / "netwatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.hook)
        path.chmod(0o755)

    def restart_libvirtd(self) -> None:
        """libvirtd stopped and started again; its running QEMUs stay (it reconnects to them)."""
        assert self.libvirtd is not None and self.virtlogd is not None
        self.libvirtd.send_signal(signal.SIGTERM)
        self.libvirtd.wait(30)
        with open(self.root / "libvirtd.log", "ab") as log:
            self.libvirtd = subprocess.Popen(["nsenter", "-F", "-t", str(self.virtlogd.pid), "-m", "-n", "libvirtd"],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             preexec_fn=_die_with_parent)
        wait_until(lambda: self.run_virsh("uri").returncode == 0, 30, "libvirtd to answer again", self.dump,
                   interval=0.1)


@pytest.fixture
def libvirt(world: World) -> Iterator[HookedLibvirt]:
    os.chmod(world.tmp, 0o711)  # QEMU runs as libvirt-qemu and must reach its files in here
    host = HookedLibvirt(world.tmp / "libvirt", world)
    with running(host, "test_libvirt_native"):
        yield host


def interfaces(printed: str) -> dict[str, str]:
    """The <interface> elements ``qemu-args --libvirt`` printed, by their <alias>, as text."""
    root = ElementTree.fromstring(f"<devices>{printed}</devices>")
    assert not [child for child in root if child.tag != "interface"], printed
    return {element.find("alias").get("name"): ElementTree.tostring(element, encoding="unicode")  # type: ignore
            for element in root}


def domifstat(libvirt: LibvirtHost, name: str, tap: str) -> dict[str, int]:
    text = libvirt.virsh("domifstat", name, tap)
    return {key: int(value) for key, value in re.findall(r"\S+ (\w+) (\d+)", text)}


def test_libvirt_native_domain_untainted_through_flaps_hotplug_and_restarts(world: World,
                                                                             libvirt: HookedLibvirt) -> None:
    try:
        build()
    except GuestError as exc:
        pytest.fail(f"the test guest cannot be built: {exc}", pytrace=False)
    name = unique("nwln-")
    domain_uuid = str(uuid_mod.uuid4())
    nic = {"id": NIC, "backend": "macvtap", "wiring": "redirect", "lower": LOWER, "mac": MAC}
    hot = {"id": HOT, "backend": "macvtap", "wiring": "redirect", "lower": LOWER, "mac": HOT_MAC}
    vm = world.vm(name, nic, hot)
    del vm["qmp"]  # libvirt's monitor is libvirt's: netwatch has none
    vm["uuid"], vm["libvirt_domain"] = domain_uuid, name
    world.write_config()
    world.recording_hooks()
    peer = peer_network(world)
    cable(world, peer)
    printed = world.cli("qemu-args", "--libvirt", name)
    assert printed.returncode == 0 and "qemu:commandline" not in printed.stdout, printed
    elements = interfaces(printed.stdout)
    tap, hot_tap = world.config().vm(name).nics[0].ifname, world.config().vm(name).nics[1].ifname  # type: ignore
    guest = world.tmp / "guest"
    guest.mkdir(mode=0o755)
    xml = domain_xml(name, domain_uuid, guest, "").replace("</devices>", elements[NIC] + "\n  </devices>")
    serial = Serial(guest / "serial.log")

    def dump() -> str:
        return "\n".join(["== guest serial (tail)", *serial.lines()[-8:], world.dump(), libvirt.dump(name)])

    def wait_line(line: str, timeout: float = 30, count: int = 1) -> float:
        wait_until(lambda: serial.count(line) >= count, timeout, f"the guest to print {line!r} x{count}", dump,
                   interval=0.005)
        return time.monotonic()

    def wait_nic(nic_id: str, state: str, timeout: float = 15) -> dict[str, Any]:
        wait_until(lambda: world.nic(name, nic_id).get("state") == state, timeout, f"{nic_id} to be {state}", dump)
        return world.nic(name, nic_id)

    def pings(what: str) -> None:
        serial.set_mark()
        wait_line("GUEST-PING ok", timeout=60, count=3)
        print(f"{what}: the guest's pings answered")

    world.start_netwatch()
    # netwatch first: the taps libvirt opens by name are there; nothing is joined while the domain is off.
    wait_until(lambda: world.ns.link_exists(tap) and world.ns.link_exists(hot_tap), 10, "the taps", dump)
    wait_nic(NIC, "waiting-vm")
    libvirt.define(name, xml)
    started = time.monotonic()
    libvirt.virsh("start", name)
    wait_nic(NIC, "attached", timeout=30)
    pinged = wait_line("GUEST-PING ok", timeout=120) - started
    print(f"\nvirsh start: the guest's first ping answered {pinged:.2f} s after the start (boot included)")
    pings("started")

    # Nothing of netwatch's in the domain; libvirt knows the NIC as its own and counts its traffic.
    defined = libvirt.virsh("dumpxml", name)
    assert "qemu:commandline" not in defined and f"<target dev='{tap}' managed='no'/>" in defined, defined
    log = libvirt.qemu_log(name)
    assert "taint" not in log.lower(), f"libvirt tainted the domain:\n{log}"
    iflist = libvirt.virsh("domiflist", name)
    assert tap in iflist and MAC in iflist, iflist
    before = domifstat(libvirt, name, tap)
    pings("counting")
    after = domifstat(libvirt, name, tap)
    assert after["rx_packets"] > before["rx_packets"] and after["tx_packets"] > before["tx_packets"], (before, after)
    status = world.status()
    vm_status = next(v for v in status["vms"] if v["name"] == name)
    assert vm_status["monitor"] is False and vm_status["qemu_pid"] in libvirt.qemu_pids(), vm_status
    print(f"virsh domifstat {tap}: {after}")

    # Lower flaps: nothing is sent to QEMU; the guest's carrier never changes; pings resume.
    resumed = []
    for _flap in range(FLAPS):
        world.delete_link(LOWER)
        wait_nic(NIC, "waiting-lower")
        serial.set_mark()
        created = cable(world, peer)
        resumed.append(wait_line("GUEST-PING ok") - created)
        wait_nic(NIC, "attached")
    assert Serial(serial.path).count("GUEST-CARRIER 0") == 0, "no monitor: the carrier was never touched"
    print(f"{FLAPS} flaps: pings back after median {statistics.median(resumed):.3f} s, max {max(resumed):.3f} s")

    # libvirt's attach-device and detach-device of netwatch's second NIC, element as printed.
    hot_xml = guest / "hot.xml"
    hot_xml.write_text(elements[HOT])
    libvirt.virsh("attach-device", name, str(hot_xml), "--live")
    wait_until(lambda: hot_tap in libvirt.virsh("domiflist", name), 20, "the hot NIC in domiflist", dump)
    wait_nic(HOT, "attached")
    pings("attach-device")
    libvirt.virsh("detach-device", name, str(hot_xml), "--live", timeout=120)
    wait_until(lambda: hot_tap not in libvirt.virsh("domiflist", name), 60, "the hot NIC gone", dump)
    assert world.ns.link_exists(hot_tap), "the tap stays netwatch's while the NIC is configured"
    pings("detach-device")

    # managedsave, then start: the stopped hook, then prepare/started again; the same tap reopened.
    libvirt.virsh("managedsave", name, timeout=120)
    wait_nic(NIC, "waiting-vm")
    libvirt.virsh("start", name, timeout=120)
    wait_nic(NIC, "attached", timeout=30)
    pings("managedsave + start")

    # libvirtd restarted: its QEMU runs on; netwatch keeps the NIC.
    swaps = world.nic(name, NIC)["swaps"]
    libvirt.restart_libvirtd()
    pings("libvirtd restart")
    assert world.nic(name, NIC)["swaps"] == swaps and world.nic(name, NIC)["state"] == "attached"

    # netwatch restarted: it finds the domain's QEMU by its cgroup and adopts the wiring as it is.
    before_restart = world.nic(name, NIC)
    assert world.netwatch is not None
    world.netwatch.kill()
    world.start_netwatch()
    kept = wait_nic(NIC, "attached")
    assert (kept["macvlan_ifindex"], kept["swaps"]) == (before_restart["macvlan_ifindex"], swaps), kept
    pings("netwatch restart")

    # Not here: a guest reboot. The test guest does not come back from a reset (system_reset, with libvirt
    # or plain QEMU: the -kernel boot does not run again), and it has no shell to reboot itself from; QEMU,
    # its device and the tap stay as they are across one, so nothing of netwatch's is involved.

    libvirt.virsh("destroy", name)
    wait_nic(NIC, "waiting-vm")
    assert world.ns.links("macvlan") == [], "the domain is off: no macvlan on the lower"
    contexts = [(run["env"]["NETWATCH_NIC"], run["argv"][1]) for run in world.hook_runs()]
    print(f"if-up/if-down contexts: {contexts}")
    # Each libvirt start and stop once (managedsave's too), each flap; none for libvirtd's or netwatch's restart.
    assert [c for n, c in contexts if n == NIC] == ["start", *["lower-lost", "reattach"] * FLAPS,
                                                    "stop", "start", "stop"], contexts
