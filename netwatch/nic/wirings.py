"""Which wiring a NIC gets, what makes up its guest device, and the QEMU pair of a record."""

from __future__ import annotations

from netwatch.config import NicConfig
from netwatch.nic.records import NicRecord
from netwatch.qemu.direct import DirectWiring
from netwatch.qemu.hub import HubWiring
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.wiring import Pair, Wiring


def guest_side(nic: NicConfig) -> tuple[object, ...]:
    """What the guest's device is made of: a change to any is a replug (in either wiring)."""
    return nic.wiring, nic.guest_pci, nic.model, nic.queues, nic.hub, nic.mac


def make_wiring(vm_name: str, nic: NicConfig, vm: VmSession, unplug_timeout: float) -> Wiring:
    if nic.wiring == "direct":
        return DirectWiring(vm_name, nic, vm, unplug_timeout)
    return HubWiring(vm_name, nic, vm, unplug_timeout)


def pair_of(record: NicRecord) -> Pair:
    return Pair(tap=record.tap_netdev, port=record.hub_netdev)
