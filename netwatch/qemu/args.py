"""The QEMU command-line arguments netwatch needs for one VM, as a shell
line, a JSON array, or a libvirt ``<qemu:commandline>`` block."""

from __future__ import annotations

import json
import re
import shlex
from xml.sax.saxutils import escape

from netwatch.config import DEFAULT_GUEST_SLOTS, GuestPci, NicConfig, VmConfig
from netwatch.errors import BadRequest

LIBVIRT_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

# Device ids libvirt generates from its aliases (src/qemu/qemu_alias.c):
# "net0", "hostnet0", "video0", "pci.1", "sata0-0-0", ... A NIC id of that
# shape makes libvirt's own devices (or its hotplug) fail with "Duplicate
# device ID". libvirt never generates ids starting "ua-" (user aliases).
_LIBVIRT_ALIAS = re.compile(
    r"(net|hostnet|video|sound|input|serial|parallel|channel|console|rng|watchdog|balloon|usb|pci|pcie|ide|sata|"
    r"scsi|virtio-disk|virtio-serial|hostdev|redir|smartcard|tpm|fs|shmem|vsock|iommu|nvram|panic|hub|ccid|dimm|"
    r"nvdimm|crypto|audio|memory|pr-helper|vnc|spice|seclabel)([-.]?\d+)*\Z")


def nic_args(nic: NicConfig, machine: str = "pc") -> list[str]:
    """Hub wiring: a fixed guest-side hubport and the NIC device peered with it.

    The backend joins the same hub later over QMP, so swapping it never
    touches the device the guest sees. Direct wiring: nothing (netwatch
    plugs the device itself once its backend exists).
    """
    if nic.wiring == "direct":
        return []
    return [
        "-netdev", f"hubport,id={nic.guest_port},hubid={nic.hub}",
        "-device", f"{nic.model},id={nic.id},netdev={nic.guest_port},mac={nic.mac}{_pinned(nic, machine)}",
    ]


def _pinned(nic: NicConfig, machine: str) -> str:
    # libvirt realizes these arguments before its own devices: an unpinned
    # NIC takes the first free slot, which libvirt then wants for VGA.
    if nic.guest_pci is None:
        return ""
    return "".join(f",{key}={value}" for key, value in nic.guest_pci.placement(machine).items())


def root_ports(vm: VmConfig) -> list[GuestPci]:
    """q35: the slots of the root bus that get a pcie-root-port of netwatch's.

    One per NIC on the root bus (q35's root bus does not hotplug, a port
    does), then ``spare_ports`` more at the next free default slots, where
    NICs added to the config later are hot-added.
    """
    if vm.machine != "q35":
        return []
    ports = [nic.guest_pci for nic in vm.nics if nic.guest_pci is not None and nic.guest_pci.bus is None]
    spare = [GuestPci(slot) for slot in DEFAULT_GUEST_SLOTS if GuestPci(slot) not in ports]
    return ports + spare[:vm.spare_ports]


def vm_args(vm: VmConfig) -> list[str]:
    # A dedicated monitor: QMP serves one client at a time, so other tools
    # keep their own. wait=off lets QEMU start before netwatch connects.
    args = ["-qmp", f"unix:{vm.qmp},server=on,wait=off"]
    for port in root_ports(vm):
        # chassis numbers must be unique per machine: netwatch's start at 0x80,
        # above the ones libvirt and Proxmox count up from 1.
        args += ["-device", f"pcie-root-port,id={port.port_id},bus=pcie.0,addr={port.slot:#04x},"
                            f"chassis={0x80 + port.slot},port={port.slot:#04x}"]
    for nic in vm.nics:
        args += nic_args(nic, vm.machine)
    return args


def render(vm: VmConfig, as_json: bool) -> str:
    args = vm_args(vm)
    return json.dumps(args) if as_json else shlex.join(args)


def libvirt_problems(vm: VmConfig) -> list[str]:
    """NIC ids that would collide with the ids libvirt gives its own devices."""
    return [f"VM '{vm.name}' NIC '{nic.id}': libvirt uses ids like '{nic.id}' for its own devices "
            f"('Duplicate device ID'); use an id starting 'ua-', such as 'ua-{nic.id}'"
            for nic in vm.nics if _LIBVIRT_ALIAS.match(nic.id)]


def render_libvirt(vm: VmConfig) -> str:
    """The block to paste into a libvirt domain, with a comment saying where it goes."""
    problems = libvirt_problems(vm)
    if problems:
        raise BadRequest("; ".join(problems))
    # "--" may not appear inside an XML comment.
    qmp = vm.qmp.replace("--", "-\u2010")
    lines = [
        f"<!-- netwatch: QEMU arguments for VM '{vm.name}'. Paste this as a child of <domain>, whose start tag"
        f" needs xmlns:qemu='{LIBVIRT_QEMU_NS}'. QEMU runs as libvirt's QEMU user, which must be able to"
        f" create {qmp} (see README, With libvirt). -->",
        "<qemu:commandline>",
    ]
    lines += [f"  <qemu:arg value={_attr(arg)}/>" for arg in vm_args(vm)]
    lines.append("</qemu:commandline>")
    return "\n".join(lines)


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"
