"""Actions out: the two kinds of backend a guest NIC can have.

A driver says where a backend should go given the host links now
(:meth:`place`), whether an attached one is broken, how to create one (a
link plus the fd QEMU gets) and how to keep it wired (:meth:`maintain`).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, Container
from dataclasses import dataclass

from netwatch.config import LowerSpec, NicConfig
from netwatch.errors import DeviceError, LinkError, NetwatchError
from netwatch.host.chardev import open_macvtap
from netwatch.host.linkops import LinkOps, refuse_router_advertisements
from netwatch.host.links import Link, LinkTable
from netwatch.host.ptap import tap_mac
from netwatch.nic.records import NicRecord

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100


class LinkVanished(NetwatchError):
    """A link went away between being seen and being used: its event is on the way."""


@dataclass(frozen=True)
class Placement:
    """The host links a NIC's backend hangs off, as they are now."""

    lower: Link | None
    bridge: Link | None
    ready: bool
    missing: str

    def describe(self) -> str:
        parts = []
        if self.lower is not None:
            parts.append(f"lower {self.lower.name} (ifindex {self.lower.index})")
        if self.bridge is not None:
            parts.append(f"bridge {self.bridge.name}")
        return ", ".join(parts) or "routed"


@dataclass(frozen=True)
class Created:
    """A backend link netwatch made, with one fd per queue (the caller closes them)."""

    index: int
    fds: tuple[int, ...]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def lower_matches(spec: LowerSpec, link: Link) -> bool:
    if spec.name is not None and link.name != spec.name:
        return False
    if spec.mac is not None and (link.mac or "").lower() != spec.mac:
        return False
    return spec.pci is None or pci_address(link.name) == spec.pci


def pci_address(ifname: str) -> str | None:
    """The PCI function of a NIC (the one of its virtio device), or None (not a PCI NIC, or gone)."""
    try:
        device = os.path.realpath(f"/sys/class/net/{ifname}/device", strict=True)
        # A virtio-net NIC's device is its virtio device (virtio3), a child of
        # the PCI function; its number changes when the NIC is plugged again.
        if os.path.basename(os.path.realpath(f"{device}/subsystem", strict=True)) == "virtio":
            device = os.path.dirname(device)
    except OSError:
        return None
    return os.path.basename(device)


def matching_lowers(spec: LowerSpec | None, exclude: Container[str], links: LinkTable,
                    usable: Callable[[Link], bool]) -> list[Link]:
    """Every usable link matching ``spec``, by ifindex, never one of ``exclude``.

    A MAC may match several links (VLAN subinterfaces and macvlans inherit
    their parent's, bond members share the bond's), and a PCI address too
    (representors, multi-port cards): more than one match is the caller's
    to refuse, never to settle by picking one.
    """
    if spec is None:
        return []
    if spec.name is not None:  # the common case: one lookup, not a scan
        named = links.named(spec.name)
        candidates = [named] if named is not None else []
    else:
        candidates = list(links)
    found = [link for link in candidates if link.name not in exclude and lower_matches(spec, link) and usable(link)]
    return sorted(found, key=lambda link: link.index)


def find_lower(spec: LowerSpec | None, exclude: Container[str], links: LinkTable,
               usable: Callable[[Link], bool]) -> Link | None:
    """The one usable link matching ``spec``; None when there is none or more than one."""
    found = matching_lowers(spec, exclude, links, usable)
    return found[0] if len(found) == 1 else None


def ambiguity(spec: LowerSpec, found: list[Link]) -> str:
    names = ", ".join(link.name for link in found[:8]) + (", ..." if len(found) > 8 else "")
    return (f"lower {spec.describe()} matches {len(found)} links ({names}): "
            "add the name (or more of mac, pci) to the lower spec to say which")


class MacvtapDriver:
    """A macvtap on the lower; it dies with the lower and is made anew.

    Moving to another lower is make-before-break: the new macvtap (under
    the NIC's other name) joins the hub before the old one leaves.
    """

    moves_by_swap = True
    # Nothing is done about the macvtap's own flags (the guest's carrier is
    # the lower's): an event that only shows it as made asks for no pass.
    own_flags_matter = False

    def place(self, nic: NicConfig, lower: Link | None, links: LinkTable) -> Placement:
        spec = nic.lower.describe() if nic.lower else "-"
        return Placement(lower, None, lower is not None, "" if lower else f"lower {spec} is not present")

    def broken(self, record: NicRecord, links: LinkTable) -> str | None:
        macvtap = links.get(record.ifindex)
        if macvtap is None or macvtap.name != record.ifname:
            return f"backend {record.ifname} is gone"
        if macvtap.parent != record.lower_ifindex or links.get(record.lower_ifindex) is None:
            return f"lower {record.lower} is gone"
        return None

    def misplaced(self, record: NicRecord, placement: Placement) -> str | None:
        lower = placement.lower
        if lower is None:
            return f"lower {record.lower} no longer matches"
        if lower.index != record.lower_ifindex:
            return f"the lower is now {lower.name} (ifindex {lower.index})"
        return None

    async def create(self, nic: NicConfig, name: str, placement: Placement, ops: LinkOps,
                     node_dir: str) -> Created:
        assert placement.lower is not None
        index = await ops.add_macvtap(name, placement.lower.index, nic.mac, nic.mode)
        fds: list[int] = []
        try:
            # Each open of a macvtap's device is one more queue.
            for _ in range(nic.queues):
                fds.append(open_macvtap(name, index, node_dir))
        except DeviceError:
            Created(index, tuple(fds)).close()
            await ops.delete(index)
            raise
        return Created(index, tuple(fds))

    async def maintain(self, record: NicRecord, placement: Placement, links: LinkTable, ops: LinkOps) -> None:
        return None

    async def silence(self, record: NicRecord, links: LinkTable, ops: LinkOps) -> None:
        """An adopted macvtap as one made now: without the guest's link-local address a kernel default gave it."""
        link = links.get(record.ifindex)
        if link is not None and link.name == record.ifname:
            await ops.silence(link.index, generated_from=link.mac)

    def carrier(self, placement: Placement) -> bool:
        return placement.lower is not None and placement.lower.carrier


class TapDriver:
    """A tap netwatch creates by name; bridged mode keeps it (and the uplink) in the bridge.

    The tap lives as long as QEMU holds its fd: no orphan when QEMU exits.
    Losing the bridge or the uplink does not touch the tap or QEMU; they are
    enslaved again when they come back.
    """

    moves_by_swap = False
    own_flags_matter = True  # a tap set down or out of its bridge is put back

    def place(self, nic: NicConfig, lower: Link | None, links: LinkTable) -> Placement:
        bridge = links.named(nic.bridge) if nic.bridge else None
        missing = []
        if nic.mode == "bridged" and (bridge is None or bridge.kind != "bridge"):
            missing.append(f"bridge {nic.bridge} is not present")
            bridge = None
        if nic.lower is not None and lower is None:
            missing.append(f"uplink {nic.lower.describe()} is not present")
        return Placement(lower, bridge, not missing, "; ".join(missing))

    def broken(self, record: NicRecord, links: LinkTable) -> str | None:
        tap = links.get(record.ifindex)
        if tap is None or tap.name != record.ifname:
            return f"tap {record.ifname} is gone"
        return None

    def misplaced(self, record: NicRecord, placement: Placement) -> str | None:
        return None  # the uplink is rewired by maintain(); the tap itself stays

    async def create(self, nic: NicConfig, name: str, placement: Placement, ops: LinkOps,
                     node_dir: str) -> Created:
        fds = open_tap(name, nic.queues)
        try:
            index = await ops.index_of(name)
            # Made down; silent before it goes up (LinkOps.silence), and deaf to a guest's router.
            await ops.silence(index)
            refuse_router_advertisements(name)
            changes: dict[str, object] = {"address": tap_mac(nic.mac), "state": "up"}
            if placement.bridge is not None:
                changes["master"] = placement.bridge.index
            await ops.configure(index, f"set up tap {name}", **changes)
        except LinkError:
            for fd in fds:
                os.close(fd)  # the tap goes with its last fd
            raise
        return Created(index, fds)

    async def maintain(self, record: NicRecord, placement: Placement, links: LinkTable, ops: LinkOps) -> None:
        bridge = placement.bridge
        if bridge is None:
            return
        old_uplink = links.get(record.lower_ifindex) if record.lower_ifindex else None
        if (old_uplink is not None and placement.lower is not None and old_uplink.index != placement.lower.index
                and old_uplink.master == bridge.index):
            # Rebound: the old uplink leaves first, so the bridge never joins two uplinks.
            await ops.configure(old_uplink.index, f"remove {old_uplink.name} from bridge {bridge.name}", master=0)
        for port in (links.get(record.ifindex), placement.lower):
            if port is None or port.master == bridge.index:
                continue
            try:
                await ops.configure(port.index, f"add {port.name} to bridge {bridge.name}", master=bridge.index)
            except LinkError as exc:
                # A bridge being deleted still shows in the table for a moment.
                if await _replaced(ops, bridge) or await _replaced(ops, port):
                    raise LinkVanished(str(exc)) from exc
                raise

    async def silence(self, record: NicRecord, links: LinkTable, ops: LinkOps) -> None:
        """An adopted tap as one made now (its own link-local address, from the tap's MAC, goes too)."""
        tap = links.get(record.ifindex)
        if tap is not None and tap.name == record.ifname:
            await ops.silence(tap.index, generated_from=tap.mac)
            refuse_router_advertisements(tap.name)

    def carrier(self, placement: Placement) -> bool:
        # The guest still reaches its bridge neighbours while the uplink is
        # away, so the tap's own carrier (always up while QEMU holds it) counts.
        return True


async def _replaced(ops: LinkOps, link: Link) -> bool:
    """Whether ``link`` is gone (or is another link by now)."""
    try:
        return await ops.index_of(link.name) != link.index
    except LinkError:
        return True


def made_by_netwatch(link: Link, backend: str, guest_mac: str) -> bool:
    """Whether ``link`` is the kind of link netwatch makes for a ``backend`` NIC, with the MAC it gives it.

    A record is only a file and a name only a name: before netwatch deletes
    or reuses a link, the link itself must say it is netwatch's (a macvtap
    with the guest's MAC, or a tap with the guest MAC's fe: form).
    """
    if backend == "macvtap":
        return link.kind == "macvtap" and link.mac == guest_mac
    return link.kind == "tun" and link.mac == tap_mac(guest_mac)


def provably_ours(link: Link, record: NicRecord, names: Container[str]) -> bool:
    """Whether ``link`` itself says it is the backend ``record`` describes: the NIC's own name, kind and MAC."""
    if link.name != record.ifname or record.ifname not in names:
        return False
    return made_by_netwatch(link, record.backend, record.mac)


def open_tap(name: str, queues: int = 1) -> tuple[int, ...]:
    """Create tap ``name`` (vnet header, no packet info); return one fd per queue."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise DeviceError(f"cannot open /dev/net/tun: {exc.strerror or exc}") from exc
            fds.append(fd)
            try:
                # The first creates the tap; with IFF_MULTI_QUEUE each next one attaches a queue.
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            except OSError as exc:
                raise DeviceError(f"cannot create tap {name}: {exc.strerror or exc}") from exc
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)


Driver = MacvtapDriver | TapDriver
DRIVERS: dict[str, Driver] = {"macvtap": MacvtapDriver(), "tap": TapDriver()}
