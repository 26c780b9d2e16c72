"""How a NIC's backend reaches the guest inside QEMU: one interface, an
implementation per wiring. The NIC controller decides when a backend is
made, replaced or removed; a wiring does it on QEMU's side.

Hub wiring (the only one so far): the guest NIC is peered with a fixed
hubport from the command line; each backend is a tap netdev fed the
backend link's fd plus a second hubport on the same hub, added and removed
over QMP, so the guest never sees a swap.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from netwatch.config import NicConfig
from netwatch.errors import QmpError
from netwatch.qemu.qmp import NetworkInfo, VmSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """What one backend is in QEMU: its tap netdev and the port joining it to the guest."""

    tap: str
    port: str


@dataclass(frozen=True)
class Survey:
    """QEMU's view of one NIC, read when a session (re)starts."""

    network: NetworkInfo
    netdevs: frozenset[str]  # every netdev of this NIC's backends in QEMU
    generations: tuple[int, ...]


class Wiring(Protocol):
    """What the NIC controller asks of QEMU's side of a backend."""

    def pair(self, generation: int) -> Pair: ...
    async def survey(self) -> Survey: ...
    def holds(self, pair: Pair, survey: Survey) -> bool: ...
    async def clean(self, survey: Survey, keep: Pair | None) -> None: ...
    async def plug(self, fd: int, pair: Pair, inert: bool = False) -> None: ...
    async def switch(self, old: Pair, new: Pair) -> None: ...
    async def unplug(self, pair: Pair) -> None: ...
    async def reopen(self, pair: Pair) -> None: ...


class HubWiring:
    """The guest NIC on a fixed hubport; backends join and leave the same hub."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.hub: int | None = None  # where QEMU's guest port actually is
        self._ids = re.compile(rf"nw-{re.escape(nic.id)}-(tap|up|fd)(\d+)\Z")

    def pair(self, generation: int) -> Pair:
        return Pair(f"nw-{self.nic.id}-tap{generation}", f"nw-{self.nic.id}-up{generation}")

    @property
    def fdname(self) -> str:
        # One name per NIC, not per generation: netdev_add consumes the fd at
        # once, and a stray one left under it is replaced or closed by name.
        return f"nw-{self.nic.id}-fd"

    async def survey(self) -> Survey:
        network = await self.vm.network()
        self.hub = self._guest_hub(network)
        netdevs = frozenset(name for name in network.netdevs if self._ids.match(name))
        generations = tuple(int(match.group(2)) for name in netdevs if (match := self._ids.match(name)))
        # An attach cut short between getfd and netdev_add (netwatch killed)
        # leaves QEMU holding the fd under the NIC's fd name.
        if await self._remove("closefd", {"fdname": self.fdname}):
            log.info("%s/%s: closed %s, left in QEMU by an attach that was cut short", self.vm_name, self.nic.id,
                     self.fdname)
        return Survey(network, netdevs, generations)

    def _guest_hub(self, network: NetworkInfo) -> int:
        port = next((p for p in network.ports if p.port == self.nic.guest_port), None)
        if port is None:
            raise QmpError(f"QEMU has no hubport {self.nic.guest_port} for NIC {self.nic.id}: start the VM with "
                           f"the arguments of 'netwatch qemu-args {self.vm_name}'")
        if port.hub != self.nic.hub:
            log.warning("%s/%s: QEMU has the guest port on hub %d, the config says %d: using %d until QEMU "
                        "restarts", self.vm_name, self.nic.id, port.hub, self.nic.hub, port.hub)
        return port.hub

    def holds(self, pair: Pair, survey: Survey) -> bool:
        """Whether QEMU has exactly this pair, on the guest's hub."""
        found = [p for p in survey.network.ports if p.port == pair.port and p.peer == pair.tap and p.hub == self.hub]
        return len(found) == 1

    async def clean(self, survey: Survey, keep: Pair | None) -> None:
        """Remove every backend netdev of this NIC but ``keep``'s."""
        for name in sorted(survey.netdevs, key=lambda n: "-up" not in n):  # hubports before their taps
            if keep is None or name not in (keep.port, keep.tap):
                await self._remove("netdev_del", {"id": name})

    async def plug(self, fd: int, pair: Pair, inert: bool = False) -> None:
        """Hand ``fd`` to QEMU and join it to the guest's hub (``inert``: with its link down)."""
        await self.vm.pass_fd(fd, self.fdname)
        try:
            await self.vm.execute("netdev_add", {"type": "tap", "id": pair.tap, "fd": self.fdname})
        except BaseException:
            await _best_effort(self.vm.execute("closefd", {"fdname": self.fdname}), f"closefd {self.fdname}")
            raise
        try:
            if inert:
                # Down before it joins the hub: a netdev whose link is down
                # neither sends nor receives, so no frame can cross the hub
                # between this lower and the one still in use.
                await self.vm.execute("set_link", {"name": pair.tap, "up": False})
            await self.vm.execute("netdev_add", {"type": "hubport", "id": pair.port, "netdev": pair.tap,
                                                 "hubid": self.nic.hub if self.hub is None else self.hub})
        except BaseException:
            await _best_effort(self._remove("netdev_del", {"id": pair.tap}), f"netdev_del {pair.tap}")
            raise

    async def switch(self, old: Pair, new: Pair) -> None:
        """The old pair goes quiet and the new (inert) one opens; never both open at once.

        Both commands are sent together: QEMU runs them in order, so the gap
        is its own, not a round trip. On failure the old pair is reopened.
        """
        try:
            await asyncio.gather(self.vm.execute("set_link", {"name": old.tap, "up": False}),
                                 self.vm.execute("set_link", {"name": new.tap, "up": True}))
        except BaseException:
            await _best_effort(self.reopen(old), f"reopening {old.tap}")
            raise

    async def reopen(self, pair: Pair) -> None:
        await self.vm.execute("set_link", {"name": pair.tap, "up": True})

    async def unplug(self, pair: Pair) -> None:
        await self._remove("netdev_del", {"id": pair.port})
        await self._remove("netdev_del", {"id": pair.tap})

    async def _remove(self, command: str, arguments: dict[str, Any]) -> bool:
        """Run a removal command; False if QEMU had nothing by that name."""
        try:
            await self.vm.execute(command, arguments)
        except QmpError as exc:
            if "not found" not in str(exc):
                raise
            return False
        return True


async def _best_effort(action: Any, what: str) -> None:
    try:
        await action
    except QmpError as exc:
        log.warning("%s failed: %s", what, exc)
