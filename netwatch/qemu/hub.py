"""Hub wiring: the guest NIC is peered with a fixed hubport; each backend is
a tap netdev fed the backend link's fd plus a second hubport on the same
hub, added and removed over QMP, so the guest never sees a swap.

The guest's side (its hubport and device) comes from the command line, or
is hot-added by netwatch when QEMU lacks it (a NIC added to the config of a
running VM) and hot-removed when the NIC leaves the config.
"""

from __future__ import annotations

import asyncio
import logging

from netwatch.config import NicConfig
from netwatch.qemu.qmp import NetworkInfo, VmSession
from netwatch.qemu.wiring import GuestDevice, Pair, QemuSide, Survey, best_effort

log = logging.getLogger(__name__)


class HubWiring(QemuSide):
    """The guest NIC on a fixed hubport; backends join and leave the same hub."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, unplug_timeout: float = 15.0) -> None:
        super().__init__(vm_name, nic, vm, unplug_timeout)
        self._guest = False  # QEMU has the guest port and the device peered with it, in place
        self._stale: tuple[bool, bool] = (False, False)  # (a device, a guest port) to remove first

    @property
    def guest_present(self) -> bool:
        return self._guest

    def pair(self, generation: int) -> Pair:
        return Pair(f"nw-{self.nic.id}-tap{generation}", f"nw-{self.nic.id}-up{generation}")

    async def survey(self) -> Survey:
        network = await self.vm.network()
        netdevs, generations = self.own_netdevs(network)
        await self.close_strays()
        device = await self.find_device(network)
        port = self._guest_port(network)
        if port is not None and port.hub != self.nic.hub:
            log.warning("%s/%s: QEMU has the guest port on hub %d, the config says %d: using %d until QEMU "
                        "restarts", self.vm_name, self.nic.id, port.hub, self.nic.hub, port.hub)
        self.hub = port.hub if port is not None else None
        self._guest = port is not None and device is not None and self.device_in_place(device)
        self._stale = (device is not None and not self._guest, port is not None and not self._guest)
        return Survey(network, netdevs, generations, device)

    def _guest_port(self, network: NetworkInfo) -> _Port | None:
        found = [p for p in network.ports if p.port == self.nic.guest_port]
        if len(found) != 1 or found[0].peer != self.nic.id:
            return None
        return _Port(found[0].hub)

    def holds(self, pair: Pair, survey: Survey) -> bool:
        """Whether QEMU has exactly this pair, on the guest's hub."""
        found = [p for p in survey.network.ports if p.port == pair.port and p.peer == pair.tap and p.hub == self.hub]
        return self.hub is not None and len(found) == 1

    async def clean(self, survey: Survey, keep: Pair | None) -> None:
        """Remove every backend netdev of this NIC but ``keep``'s, and a guest side out of place."""
        for name in sorted(survey.netdevs, key=lambda n: "-up" not in n):  # hubports before their taps
            if keep is None or name not in (keep.port, keep.tap):
                await self.remove("netdev_del", {"id": name})
        stale_device, stale_port = self._stale
        if stale_device:
            # Another wiring's device, or one at another address or MAC: the
            # config says otherwise, so the guest sees it leave and come back.
            await self.delete_device()
        if stale_port or (stale_device and self.nic.guest_port in survey.network.netdevs):
            await self.remove("netdev_del", {"id": self.nic.guest_port})
        self._stale = (False, False)

    async def add_guest(self) -> bool:
        """Hot-add the guest's hubport and device if QEMU lacks them; True if it did."""
        if self._guest:
            return False
        await self.vm.execute("netdev_add", {"type": "hubport", "id": self.nic.guest_port, "hubid": self.nic.hub})
        try:
            await self.add_device(self.nic.guest_port)
        except BaseException:
            await best_effort(self.remove("netdev_del", {"id": self.nic.guest_port}), "netdev_del guest port")
            raise
        self.hub, self._guest = self.nic.hub, True
        return True

    async def remove_guest(self) -> None:
        """Hot-remove: the device leaves the guest, then its hubport goes."""
        await self.delete_device()
        self._guest = False
        await self.remove("netdev_del", {"id": self.nic.guest_port})

    async def plug(self, fds: tuple[int, ...], pair: Pair, inert: bool = False) -> None:
        """Hand the fd to QEMU and join it to the guest's hub (``inert``: with its link down)."""
        await self.add_tap(fds, pair.tap)
        try:
            if inert:
                # Down before it joins the hub: a netdev whose link is down
                # neither sends nor receives, so no frame can cross the hub
                # between this lower and the one still in use.
                await self.vm.execute("set_link", {"name": pair.tap, "up": False})
            await self.vm.execute("netdev_add", {"type": "hubport", "id": pair.port, "netdev": pair.tap,
                                                 "hubid": self.nic.hub if self.hub is None else self.hub})
        except BaseException:
            await best_effort(self.remove("netdev_del", {"id": pair.tap}), f"netdev_del {pair.tap}")
            raise

    async def switch(self, old: Pair, new: Pair) -> None:
        """The old pair goes quiet and the new (inert) one opens; both open for one command of QEMU's at most.

        Both commands are sent together: QEMU runs them in order, so the gap
        is its own, not a round trip; but it runs the second whatever became
        of the first. So when the new pair opened and the old one did not go
        quiet, the old one leaves the hub with the very next command (reopened
        instead, both lowers' networks stayed joined until the new one was
        unplugged). When the new pair did not open, it is set quiet (a command
        that got no answer may still have run) before the old one reopens.
        """
        quiet: object
        opened: object
        try:
            quiet, opened = await asyncio.gather(self.vm.execute("set_link", {"name": old.tap, "up": False}),
                                                 self.vm.execute("set_link", {"name": new.tap, "up": True}),
                                                 return_exceptions=True)
        except BaseException:  # cancelled: either may have run
            await self._roll_back(old, new)
            raise
        if isinstance(opened, BaseException):
            await self._roll_back(old, new)
            raise opened
        if isinstance(quiet, BaseException):
            try:
                # The hubport is what joins it to the guest; its tap goes with the rest of the old backend.
                await self.remove("netdev_del", {"id": old.port})
            except BaseException:
                await self._roll_back(old, new)
                raise
            log.warning("%s/%s: %s did not go quiet (%s): it left the hub once %s opened", self.vm_name,
                        self.nic.id, old.tap, quiet, new.tap)

    async def _roll_back(self, old: Pair, new: Pair) -> None:
        """The new pair quiet, then the old one open again: in that order, never both open."""
        await best_effort(self.vm.execute("set_link", {"name": new.tap, "up": False}), f"quieting {new.tap}")
        await best_effort(self.reopen(old), f"reopening {old.tap}")

    async def reopen(self, pair: Pair) -> None:
        await self.vm.execute("set_link", {"name": pair.tap, "up": True})

    async def unplug(self, pair: Pair) -> None:
        await self.remove("netdev_del", {"id": pair.port})
        await self.remove("netdev_del", {"id": pair.tap})


class _Port:
    def __init__(self, hub: int) -> None:
        self.hub = hub


__all__ = ["GuestDevice", "HubWiring"]
