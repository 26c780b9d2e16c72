"""Under libvirt: netwatch's block in a domain, a real guest pinging through lower flaps and a restart,
and libvirt's own NIC hotplug beside netwatch's pinned NIC.

libvirtd and virtlogd are Debian's (tools/bootstrap.sh test installs them),
walled off in the test's namespaces by tests/libvirt_host.py. The domain is
an ordinary one (type 'qemu', VGA, memballoon, ACPI) plus exactly the block
``netwatch qemu-args --libvirt`` prints, as an admin would paste it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import statistics
import subprocess
import time
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch.sandbox.guest import GuestError, Serial, build
from netwatch.sandbox.testbed import unique, wait_until

from .libvirt_host import QEMU_GROUP, QEMU_NS, QEMU_USER, LibvirtHost, running
from .world import World

pytestmark = pytest.mark.integration

NIC = "ua-nw0"  # libvirt names its own NICs net0, net1...: ids starting "ua-" are never its
MAC = "52:54:00:9a:10:01"
HOTPLUG_MAC = "52:54:00:9a:10:02"
LOWER, WIRE = "lo0", "wi0"
GUEST_ADDRESS, PEER_ADDRESS = "10.77.0.2/24", "10.77.0.1"
FLAPS = 3


@pytest.fixture
def libvirt(world: World) -> Iterator[LibvirtHost]:
    os.chmod(world.tmp, 0o711)  # QEMU runs as libvirt-qemu and must reach its files in here
    host = LibvirtHost(world.tmp / "libvirt", world.ns)
    with running(host, "test_libvirt"):
        yield host


def peer_network(world: World) -> str:
    """The guest's peer (10.77.0.1 on a bridge) in a namespace of its own, as outside a real host."""
    peer = world.scratch_netns()
    # A fixed bridge MAC: otherwise it follows the lowest port MAC, which changes
    # as cables come and go, and the guest's ARP entry points at an old one.
    for args in (("link", "add", "peerbr", "address", "02:00:00:77:00:01", "type", "bridge"),
                 ("link", "set", "peerbr", "up"),
                 ("addr", "add", f"{PEER_ADDRESS}/24", "dev", "peerbr")):
        subprocess.run(["ip", "-n", peer, *args], check=True)
    return peer


def cable(world: World, peer: str) -> float:
    """The lower, its other end in the peer's bridge; the moment it was created (before it was up).

    The wire end is created in the peer's namespace and joins the bridge
    before the lower comes up: moving it afterwards would blip the lower's
    carrier. The lower exists, down, for those few milliseconds, as a
    hot-plugged NIC does before it is brought up; times are counted from its
    creation, so they include them.
    """
    created = time.monotonic()
    world.ns.ip("link", "add", LOWER, "type", "veth", "peer", "name", WIRE, "netns", peer)
    subprocess.run(["ip", "-n", peer, "link", "set", WIRE, "master", "peerbr", "up"], check=True)
    world.ns.ip("link", "set", LOWER, "up")
    return created


def domain_xml(name: str, uuid: str, guest: Path, qemu_block: str) -> str:
    """An ordinary TCG domain booting the test guest, plus netwatch's block pasted in verbatim."""
    image = build()
    kernel, initrd = guest / "vmlinuz", guest / "initrd.cpio"
    # Copies: libvirt's DAC driver relabels what the domain boots from.
    shutil.copyfile(image.kernel, kernel)
    shutil.copyfile(image.initrd, initrd)
    serial = guest / "serial.log"
    serial.touch()  # the directory is root's: QEMU could not create it
    args = image.qemu_args(serial, [GUEST_ADDRESS], ping=PEER_ADDRESS)
    cmdline, memory = args[args.index("-append") + 1], args[args.index("-m") + 1]
    return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path='{serial}' append='on'/>
      <target port='0'/>
    </serial>
    <video><model type='vga'/></video>
    <memballoon model='virtio'/>
  </devices>
{qemu_block}
</domain>
"""


HOTPLUG_NIC = f"""<interface type='ethernet'>
  <mac address='{HOTPLUG_MAC}'/>
  <model type='virtio'/>
  <rom enabled='no'/>
</interface>
"""


def qmp(libvirt: LibvirtHost, name: str, command: str, **arguments: Any) -> Any:
    """One command on libvirt's own monitor (netwatch has its own)."""
    request = json.dumps({"execute": command, "arguments": arguments} if arguments else {"execute": command})
    return json.loads(libvirt.virsh("qemu-monitor-command", name, request))["return"]


def pci_slots(libvirt: LibvirtHost, name: str) -> dict[str, int]:
    """Device id (or class, for devices without one) -> slot on bus 0."""
    return {device.get("qdev_id") or device["class_info"].get("desc", "?"): device["slot"]
            for bus in qmp(libvirt, name, "query-pci") for device in bus["devices"]}


def netwatch_status(world: World) -> dict[str, Any]:
    """``netwatch status --json``, as an admin asks."""
    result = world.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_libvirt_domain_keeps_its_nic_through_flaps_restart_and_hotplug(world: World, libvirt: LibvirtHost) -> None:
    try:
        build()
    except GuestError as exc:
        pytest.fail(f"the test guest cannot be built: {exc}", pytrace=False)
    name = unique("nwlv-")
    qmp_dir = world.tmp / "qmp"  # QEMU, as libvirt-qemu, creates netwatch's QMP socket in here
    qmp_dir.mkdir(mode=0o700)
    shutil.chown(qmp_dir, QEMU_USER, QEMU_GROUP)
    vm = world.vm(name, {"id": NIC, "backend": "macvtap", "lower": LOWER, "mac": MAC})
    vm["qmp"] = str(qmp_dir / f"{name}.qmp")
    # What proves the QMP peer is this domain's QEMU (docs/security.md).
    vm["uuid"], vm["qemu_user"] = str(uuid_mod.uuid4()), QEMU_USER
    world.write_config()
    peer = peer_network(world)
    cable(world, peer)

    block = world.cli("qemu-args", "--libvirt", name)
    assert block.returncode == 0, block.stderr
    guest = world.tmp / "guest"
    guest.mkdir(mode=0o755)
    libvirt.define(name, domain_xml(name, vm["uuid"], guest, block.stdout.strip()))
    defined = libvirt.virsh("dumpxml", name)
    assert "<qemu:commandline>" in defined and f"id={NIC}," in defined, "libvirt kept netwatch's block"
    serial = Serial(guest / "serial.log")

    def dump() -> str:
        return "\n".join(["== guest serial (tail)", *serial.lines()[-8:], world.dump(), libvirt.dump(name)])

    def wait_line(line: str, timeout: float = 30, count: int = 1) -> float:
        """Until the guest printed ``line`` ``count`` times since the mark; the moment it was seen."""
        wait_until(lambda: serial.count(line) >= count, timeout, f"the guest to print {line!r} x{count}", dump,
                   interval=0.005)
        return time.monotonic()

    def wait_nic(state: str, timeout: float = 10) -> dict[str, Any]:
        wait_until(lambda: world.nic(name, NIC).get("state") == state, timeout, f"{NIC} to be {state}", dump)
        return world.nic(name, NIC)

    world.start_netwatch()
    started = time.monotonic()
    libvirt.virsh("start", name)
    wait_nic("attached", timeout=30)
    attached = time.monotonic() - started
    pinged = wait_line("GUEST-PING ok", timeout=120) - started
    wait_line("GUEST-PING ok", count=3)
    print(f"\nvirsh start: NIC {NIC} attached after {attached:.2f} s, the guest's first ping answered "
          f"{pinged:.2f} s after the start (boot included)")
    [qemu] = libvirt.qemu_pids()
    assert os.stat(f"/proc/{qemu}").st_uid == pwd.getpwnam(QEMU_USER).pw_uid, "QEMU runs as libvirt's user"
    status = netwatch_status(world)
    nic = status["vms"][0]["nics"][0]
    assert (nic["id"], nic["state"], nic["lower"]) == (NIC, "attached", LOWER), status
    slots = pci_slots(libvirt, name)
    print(f"guest PCI slots: {slots}")
    assert slots.get("video0") == 2 and slots.get("balloon0") == 3, slots
    assert slots.get(NIC) not in (None, 2, 3), slots
    ready = serial.first("GUEST-READY")
    assert ready == f"GUEST-READY mac={MAC} pci=0000:00:{slots[NIC]:02x}.0", ready

    # Lower flaps: nothing is done in the guest or in libvirt; pings resume.
    resumed = []
    for flap in range(1, FLAPS + 1):
        swaps = world.nic(name, NIC)["swaps"]
        serial.set_mark()
        world.delete_link(LOWER)
        wait_line("GUEST-CARRIER 0", timeout=10)
        wait_nic("waiting-lower")
        serial.set_mark()  # a ping answered before the loss must not count as after the return
        created = cable(world, peer)
        back = wait_line("GUEST-PING ok") - created
        resumed.append(back)
        wait_line("GUEST-PING ok", count=3)
        assert serial.count("GUEST-CARRIER 1") == 1, serial.lines()
        after = wait_nic("attached")
        assert after["swaps"] == swaps + 1, after
        print(f"flap {flap}: {LOWER} deleted and recreated; pings answered again {back:.3f} s after it was "
              f"recreated (backends handed to QEMU: {after['swaps']})")

    # The domain restarted by libvirt: a new QEMU on the same socket, netwatch reconnects.
    libvirt.virsh("destroy", name)
    wait_nic("waiting-vm", timeout=20)
    serial.set_mark()
    started = time.monotonic()
    libvirt.virsh("start", name)
    start_took = time.monotonic() - started
    wait_nic("attached", timeout=30)
    reattached = time.monotonic() - started
    pinged = wait_line("GUEST-PING ok", timeout=120) - started
    wait_line("GUEST-PING ok", count=3)
    print(f"virsh destroy + start: virsh start took {start_took:.2f} s; NIC attached {reattached:.2f} s and the "
          f"rebooted guest's first ping answered {pinged:.2f} s after the start")
    assert serial.first("GUEST-READY") == ready, "same MAC and PCI address after the restart"

    # libvirt's own hotplug of a second NIC, in a slot of libvirt's choosing.
    hotplug = guest / "hotplug-nic.xml"
    hotplug.write_text(HOTPLUG_NIC)
    libvirt.virsh("attach-device", name, str(hotplug), "--live")
    iflist = libvirt.virsh("domiflist", name)
    assert HOTPLUG_MAC in iflist, iflist
    slots = pci_slots(libvirt, name)
    alias = next(device for device, slot in slots.items() if device.startswith("net"))
    print(f"virsh attach-device: libvirt's NIC {alias} went to slot {slots[alias]:#04x}, netwatch's {NIC} is at "
          f"{slots[NIC]:#04x}")

    def guest_driver_bound() -> bool:
        status = qmp(libvirt, name, "x-query-virtio-status", path=f"/machine/peripheral/{alias}/virtio-backend")
        return any("DRIVER_OK" in flag for flag in status["status"]["statuses"])
    wait_until(guest_driver_bound, 30, f"the guest's virtio-net driver to take {alias}", dump, interval=0.1)
    serial.set_mark()
    wait_line("GUEST-PING ok", count=3)  # netwatch's NIC unaffected
    assert world.nic(name, NIC)["state"] == "attached"

    whole = Serial(serial.path)
    boots = [line for line in whole.lines() if line.startswith("GUEST-READY")]
    assert boots == [ready, ready], f"booted once per start, same MAC and PCI address: {boots}"
    seen = {line.split(" ", 1)[1] for line in whole.lines() if line.startswith("GUEST-ETH0")}
    assert seen == {ready.split(" ", 1)[1]}, f"eth0 kept its MAC and PCI address through every swap: {seen}"
    print(f"{FLAPS} flaps: pings back after median {statistics.median(resumed):.3f} s, max {max(resumed):.3f} s "
          "(the guest pings every 0.2 s; a ping lost in the outage waits out its 1 s timeout)")
