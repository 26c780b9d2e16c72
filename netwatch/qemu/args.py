"""The QEMU command-line arguments netwatch needs for one VM, as a shell
line, a JSON array, or libvirt domain XML: ``<interface>`` elements for
redirect-wired NICs, a ``<qemu:commandline>`` block for the others."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from xml.sax.saxutils import escape

from netwatch.config import DEFAULT_GUEST_SLOTS, GuestPci, NicConfig, VmConfig
from netwatch.errors import BadRequest

LIBVIRT_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# As in netwatch/qemu/wiring.py (the direct wiring opens it itself); not
# imported from there, which would load the QMP client into every CLI call.
VHOST_NET = "/dev/vhost-net"
# netwatch's device models -> libvirt's <model type>: the ones libvirt
# passes to QEMU unchanged under these names (virtio picks virtio-net-pci).
LIBVIRT_MODELS = {"virtio-net-pci": "virtio", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139"}
# libvirt names the PCI controller with index N "pci.N", and its <address bus>
# is that index: a guest_pci on such a bus is the same place for both.
_LIBVIRT_BUS = re.compile(r"pci\.(\d{1,3})\Z")
# What XML 1.0 cannot carry at all, escaped or not (a kernel name may hold it).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

# Device ids libvirt generates from its aliases (src/qemu/qemu_alias.c):
# "net0", "hostnet0", "video0", "pci.1", "sata0-0-0", ... A NIC id of that
# shape makes libvirt's own devices (or its hotplug) fail with "Duplicate
# device ID". libvirt never generates ids starting "ua-" (user aliases).
_LIBVIRT_ALIAS = re.compile(
    r"(net|hostnet|video|sound|input|serial|parallel|channel|console|rng|watchdog|balloon|usb|pci|pcie|ide|sata|"
    r"scsi|virtio-disk|virtio-serial|hostdev|redir|smartcard|tpm|fs|shmem|vsock|iommu|nvram|panic|hub|ccid|dimm|"
    r"nvdimm|crypto|audio|memory|pr-helper|vnc|spice|seclabel)([-.]?\d+)*\Z")


def vhost_available() -> bool:
    return os.path.exists(VHOST_NET)


def _opt(value: str) -> str:
    """A value inside a QEMU option string: a comma is doubled, or it would start an option of its own
    (an interface name or a path may hold one: "x,script=/tmp/y")."""
    return value.replace(",", ",,")


def nic_args(nic: NicConfig, machine: str = "pc", vhost: bool = False) -> list[str]:
    """Hub wiring: a fixed guest-side hubport and the NIC device peered with it.

    The backend joins the same hub later over QMP, so swapping it never
    touches the device the guest sees. Direct wiring: nothing (netwatch
    plugs the device itself once its backend exists). Redirect wiring: a tap
    netdev on the persistent tap netwatch keeps (QEMU opens it by name;
    netwatch never replaces it) and the device peered with it; ``vhost``:
    whether this host has vhost-net.
    """
    if nic.wiring == "direct":
        return []
    if nic.wiring == "redirect":
        netdev = f"tap,id={nic.netdev_id},ifname={_opt(nic.ifname)},script=no,downscript=no,vnet_hdr=on"
        device = f"{nic.model},id={nic.id},netdev={nic.netdev_id},mac={nic.mac}{_pinned(nic, machine)}"
        if vhost:
            netdev += ",vhost=on"
        if nic.queues > 1:
            # The persistent tap is multiqueue then (QEMU's queues must match
            # its flag); a vector per queue each way, one for config, one for control.
            netdev += f",queues={nic.queues}"
            device += f",mq=on,vectors={2 * nic.queues + 2}"
        return ["-netdev", netdev, "-device", device]
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


def root_ports(vm: VmConfig, nics: Sequence[NicConfig] | None = None) -> list[GuestPci]:
    """q35: the slots of the root bus that get a pcie-root-port of netwatch's.

    One per NIC on the root bus (q35's root bus does not hotplug, a port
    does), whatever its wiring, then ``spare_ports`` more at the next free
    default slots, where NICs added to the config later are hot-added.
    ``nics``: the VM's NICs whose devices netwatch's arguments carry (all).
    """
    if vm.machine != "q35":
        return []
    nics = vm.nics if nics is None else nics
    ports = [nic.guest_pci for nic in nics if nic.guest_pci is not None and nic.guest_pci.bus is None]
    spare = [GuestPci(slot) for slot in DEFAULT_GUEST_SLOTS if GuestPci(slot) not in ports]
    return ports + spare[:vm.spare_ports]


def vm_args(vm: VmConfig, vhost: bool | None = None, libvirt: bool = False) -> list[str]:
    """``vhost``: whether vhost-net is there (None: look for /dev/vhost-net). ``libvirt``: leave out the
    redirect NICs, which are libvirt <interface> elements there."""
    nics = [nic for nic in vm.nics if not (libvirt and nic.wiring == "redirect")]
    if vhost is None:
        vhost = vhost_available()
    # A dedicated monitor: QMP serves one client at a time, so other tools
    # keep their own. wait=off lets QEMU start before netwatch connects.
    args = [] if vm.qmp is None else ["-qmp", f"unix:{_opt(vm.qmp)},server=on,wait=off"]
    for port in root_ports(vm, nics):
        # chassis numbers must be unique per machine: netwatch's start at 0x80,
        # above the ones libvirt and Proxmox count up from 1.
        args += ["-device", f"pcie-root-port,id={port.port_id},bus=pcie.0,addr={port.slot:#04x},"
                            f"chassis={0x80 + port.slot},port={port.slot:#04x}"]
    for nic in nics:
        args += nic_args(nic, vm.machine, vhost)
    return args


def render(vm: VmConfig, as_json: bool, vhost: bool | None = None) -> str:
    args = vm_args(vm, vhost)
    return json.dumps(args) if as_json else shlex.join(args)


def libvirt_problems(vm: VmConfig) -> list[str]:
    """Why ``render_libvirt`` would refuse the VM: NIC ids in the <qemu:commandline> block that would
    collide with the ids libvirt gives its own devices; redirect NICs libvirt cannot express."""
    problems = [f"VM '{vm.name}' NIC '{nic.id}': libvirt uses ids like '{nic.id}' for its own devices "
                f"('Duplicate device ID'); use an id starting 'ua-', such as 'ua-{nic.id}'"
                for nic in vm.nics if nic.wiring != "redirect" and _LIBVIRT_ALIAS.match(nic.id)]
    for nic in (nic for nic in vm.nics if nic.wiring == "redirect"):
        where = f"VM '{vm.name}' NIC '{nic.id}'"
        if nic.model not in LIBVIRT_MODELS:
            problems.append(f"{where}: libvirt has no <model type> for {nic.model}; under libvirt a redirect NIC's "
                            f"model is one of {', '.join(LIBVIRT_MODELS)}")
        bus = nic.guest_pci.bus if nic.guest_pci is not None else None
        if bus is not None and not ((found := _LIBVIRT_BUS.match(bus)) and int(found.group(1)) <= 0xFF):
            problems.append(f"{where}: guest_pci {nic.guest_pci} is on bus '{bus}', which libvirt has no name for "
                            "(its PCI buses are pci.N, N the index of their <controller type='pci'>, 0-255)")
        if _NOT_XML.search(nic.ifname):
            problems.append(f"{where}: its tap's name {nic.ifname!r} holds characters XML cannot carry; "
                            "set ifname to a plain one")
    if vm.qmp is not None and _NOT_XML.search(vm.qmp) and _needs_commandline(vm):
        problems.append(f"VM '{vm.name}': its qmp path {vm.qmp!r} holds characters XML cannot carry")
    return problems


def render_libvirt(vm: VmConfig) -> str:
    """libvirt domain XML for the VM, each part with a comment saying where it goes.

    Redirect NICs are ordinary libvirt ``<interface type='ethernet'>``
    elements on the tap netwatch keeps (libvirt opens it, with vhost-net
    where it can; nothing taints the domain). The other NICs, and
    netwatch's monitor, need QEMU arguments: a ``<qemu:commandline>``
    block, printed only when the VM has such NICs (or no redirect NIC).
    """
    problems = libvirt_problems(vm)
    if problems:
        raise BadRequest("; ".join(problems))
    redirect = [nic for nic in vm.nics if nic.wiring == "redirect"]
    parts = []
    if redirect:
        parts.append(_interfaces(vm, redirect, monitor=_needs_commandline(vm)))
    if _needs_commandline(vm):
        parts.append(_commandline(vm))
    return "\n".join(parts)


def _needs_commandline(vm: VmConfig) -> bool:
    """Whether netwatch needs QEMU arguments libvirt has no element for: hub or direct NICs, or the
    monitor the config asks for with ``qmp`` (a VM whose NICs are all redirect-wired may do without)."""
    return vm.qmp is not None or any(nic.wiring != "redirect" for nic in vm.nics)


def _commandline(vm: VmConfig) -> str:
    lines = [
        f"<!-- netwatch: QEMU arguments for VM '{_comment(vm.name)}'. Paste this as a child of <domain>, whose start"
        f" tag needs xmlns:qemu='{LIBVIRT_QEMU_NS}'. QEMU runs as libvirt's QEMU user, which must be able to"
        f" create {_comment(vm.qmp or '?')} (see docs/libvirt.md). -->",
        "<qemu:commandline>",
    ]
    lines += [f"  <qemu:arg value={_attr(arg)}/>" for arg in vm_args(vm, libvirt=True)]
    lines.append("</qemu:commandline>")
    return "\n".join(lines)


def _interfaces(vm: VmConfig, nics: list[NicConfig], monitor: bool) -> str:
    """The redirect NICs as <interface> elements, each acceptable alone to ``virsh attach-device``.

    Addresses. On ``pc`` the NIC is pinned at its guest_pci on bus 0
    (pci-root hotplugs, so a live attach-device works too). On ``q35`` a
    root-bus guest_pci is left out: libvirt accepts an endpoint on
    pcie-root (bus 0) only from a defined domain's XML and never for a
    hotplug (src/conf/domain_addr.c: pcie-root has no HOTPLUGGABLE flag, so
    ``virsh attach-device`` fails "requires hotplug capability"), and a
    netwatch root port would need a <controller> whose index the admin's
    domain may already use. Without an address libvirt puts the NIC behind a
    pcie-root-port of its own, as it does for the NICs it adds itself, and
    writes that address into the domain: it stays put from then on. A
    guest_pci on a named bus pci.N is libvirt's controller N: pinned there.
    """
    if not monitor:
        carrier = ("Without netwatch's monitor the guest's carrier does not follow the lower: the guest's link stays"
                   " up while the lower is gone, and frames flow again once it is back.")
    else:
        blind = ", ".join(f"'{_comment(nic.id)}'" for nic in nics if not nic.id.startswith("ua-"))
        carrier = ("netwatch's monitor (the <qemu:commandline> below) makes the guest's carrier follow the lower for"
                   " the NICs whose id starts 'ua-' (libvirt gives the device that id, its <alias>)"
                   + (f"; not for {blind}, whose device libvirt names itself: their link stays up while the lower"
                      " is gone." if blind else "."))
    lines = [
        f"<!-- netwatch: VM '{_comment(vm.name)}': its redirect-wired NICs as libvirt <interface> elements. Put each"
        f" under <devices> (virsh edit {_comment(vm.name)}), or give one alone to virsh attach-device (live, to the"
        " config, or both). netwatch makes each tap named in <target dev> and keeps it wired to its lower; libvirt"
        " opens it and never deletes it (managed='no', libvirt 5.7 or later), so netwatch must have made it (it"
        f" does at its start) before the domain starts. {carrier} -->",
    ]
    if vm.machine == "q35" and any(nic.guest_pci is not None and nic.guest_pci.bus is None for nic in nics):
        lines.append("<!-- q35: no <address> for a NIC on the root bus: libvirt puts it behind a pcie-root-port of"
                     " its own (q35's root bus does not hotplug) and keeps that address in the domain. A live"
                     " attach-device needs a free pcie-root-port in the domain; libvirt adds none to a running"
                     " one. -->")
    for nic in nics:
        lower = nic.lower.describe() if nic.lower is not None else "?"
        lines.append(f"<!-- NIC '{_comment(nic.id)}': on {_comment(lower)}, macvlan mode {nic.mode} -->")
        lines.append("<interface type='ethernet'>")
        lines.append(f"  <mac address={_attr(nic.mac)}/>")
        lines.append(f"  <target dev={_attr(nic.ifname)} managed='no'/>")
        lines.append(f"  <model type={_attr(LIBVIRT_MODELS[nic.model])}/>")
        if nic.queues > 1:
            lines.append(f"  <driver queues='{nic.queues}'/>")
        if nic.id.startswith("ua-"):
            # A user alias is the QEMU device's id: the one netwatch's monitor knows it by.
            lines.append(f"  <alias name={_attr(nic.id)}/>")
        if (address := _libvirt_address(nic, vm.machine)) is not None:
            lines.append(f"  {address}")
        lines.append("</interface>")
    return "\n".join(lines)


def _libvirt_address(nic: NicConfig, machine: str) -> str | None:
    pci = nic.guest_pci
    if pci is None or (pci.bus is None and machine == "q35"):
        return None
    found = _LIBVIRT_BUS.match(pci.bus) if pci.bus is not None else None
    bus = int(found.group(1)) if found else 0
    return f"<address type='pci' domain='0x0000' bus='{bus:#04x}' slot='{pci.slot:#04x}' function='0x0'/>"


def _comment(text: str) -> str:
    """Text inside an XML comment: "--" may not appear there, nor a character XML cannot carry."""
    return _NOT_XML.sub("?", text).replace("--", "-\u2010")


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"
