"""Direct wiring: the guest NIC is peered with the backend's tap netdev
itself (vnet header and offloads; vhost-net where /dev/vhost-net exists;
several queues). QEMU cannot re-peer a NIC, so every new backend is a
replug the guest sees: device_del, DEVICE_DELETED awaited, device_add with
the same id, MAC and PCI address, peered with the new netdev. The device is
plugged once the first backend exists (no lower, no NIC in the guest).
"""

from __future__ import annotations

import logging

from netwatch.config import NicConfig
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.wiring import Pair, QemuSide, Survey, best_effort, vhost_available

log = logging.getLogger(__name__)


class DirectWiring(QemuSide):
    """The guest NIC peered straight with its backend's tap netdev."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, unplug_timeout: float = 15.0) -> None:
        super().__init__(vm_name, nic, vm, unplug_timeout)
        self._peer: str | None = None  # the netdev the guest's device is peered with, when it is in place
        self._stale = False

    @property
    def guest_present(self) -> bool:
        return self._peer is not None

    def pair(self, generation: int) -> Pair:
        return Pair(f"nw-{self.nic.id}-tap{generation}", "")

    async def survey(self) -> Survey:
        network = await self.vm.network()
        netdevs, generations = self.own_netdevs(network)
        await self.close_strays()
        device = await self.find_device(network)
        ours = device is not None and device.peer in netdevs and self.device_in_place(device)
        self._peer = device.peer if ours and device is not None else None
        self._stale = device is not None and not ours
        return Survey(network, netdevs, generations, device)

    def holds(self, pair: Pair, survey: Survey) -> bool:
        return self._peer == pair.tap and pair.tap in survey.netdevs

    async def clean(self, survey: Survey, keep: Pair | None) -> None:
        """Remove a device that is not the kept backend's, then every other backend netdev."""
        if self._stale or (self._peer is not None and (keep is None or self._peer != keep.tap)):
            await self.delete_device()
            self._peer = None
        if self.nic.guest_port in survey.network.netdevs:
            await self.remove("netdev_del", {"id": self.nic.guest_port})  # from an earlier hub wiring
        for name in sorted(survey.netdevs, key=lambda n: "-up" not in n):  # hubports before their taps
            if keep is None or name != keep.tap:
                await self.remove("netdev_del", {"id": name})
        self._stale = False

    async def add_guest(self) -> bool:
        return False  # the device comes with its first backend

    async def remove_guest(self) -> None:
        await self.delete_device()
        self._peer = None

    async def plug(self, fds: tuple[int, ...], pair: Pair, inert: bool = False) -> None:
        """The backend's netdev, and (unless ``inert``: a replug follows) the device peered with it."""
        await self.add_tap(fds, pair.tap, vhost=vhost_available())
        if inert:
            return
        try:
            if self._peer is not None:
                await self.delete_device()  # a device left peered with a dead netdev
                self._peer = None
            await self.add_device(pair.tap)
        except BaseException:
            await best_effort(self.remove("netdev_del", {"id": pair.tap}), f"netdev_del {pair.tap}")
            raise
        self._peer = pair.tap

    async def switch(self, old: Pair, new: Pair) -> None:
        """Replug: the device leaves the guest and comes back peered with ``new``."""
        await self.delete_device()
        self._peer = None
        try:
            await self.add_device(new.tap)
        except BaseException:
            # The old backend still works: the guest gets its NIC back on it.
            await best_effort(self.add_device(old.tap), f"re-adding {self.nic.id}")
            raise
        self._peer = new.tap

    async def unplug(self, pair: Pair) -> None:
        if self._peer == pair.tap:
            await self.delete_device()
            self._peer = None
        await self.remove("netdev_del", {"id": pair.tap})

    async def reopen(self, pair: Pair) -> None:
        return None  # a direct backend is never left quiet
