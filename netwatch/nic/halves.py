"""A hub or direct backend's two halves: its link in the kernel and its netdev pair in QEMU.

Under the hub and direct wirings a backend is a macvtap or tap link
(netwatch/nic/backendlinks.py) whose fds QEMU holds as a netdev pair
(netwatch/qemu/hub.py, direct.py). The halves are made, switched and
taken apart here, together: a link QEMU did not take is deleted again, a
new pair that does not take over from the old one goes with its link, and
a pair done with leaves QEMU before its link is deleted. What the NIC
records of its backend, which hooks run and what is said are
netwatch/nic/swapped.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

from netwatch.config import NicConfig
from netwatch.errors import LinkError, QmpError
from netwatch.host.backends import Created, Placement
from netwatch.nic.backendlinks import BackendLinks, ForeignLink
from netwatch.nic.env import NicEnv
from netwatch.nic.records import NicRecord
from netwatch.nic.wiring import guest_side
from netwatch.qemu.direct import DirectWiring
from netwatch.qemu.hub import HubWiring
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.wiring import Pair, Survey, Wiring

log = logging.getLogger(__name__)

# Seconds a NIC's removal waits for QEMU before it removes the kernel side anyway.
REMOVE_DEADLINE = 2.0


def qemu_side(vm_name: str, nic: NicConfig, vm: VmSession, unplug_timeout: float) -> Wiring:
    if nic.wiring == "direct":
        return DirectWiring(vm_name, nic, vm, unplug_timeout)
    return HubWiring(vm_name, nic, vm, unplug_timeout)


def pair_of(record: NicRecord) -> Pair:
    return Pair(tap=record.tap_netdev, port=record.hub_netdev)


class BackendHalves:
    """One hub or direct NIC's backend links (:attr:`links`) and QEMU's side of them (:attr:`qemu`)."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, env: NicEnv) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.links = BackendLinks(vm_name, nic, env)
        # How the backend reaches the guest, on QEMU's side.
        self.qemu: Wiring = qemu_side(vm_name, nic, vm, env.unplug_timeout)

    def configure(self, nic: NicConfig) -> bool:
        """Take ``nic``'s config; whether QEMU's side was made anew (its view is then to be read again)."""
        old, self.nic = self.nic, nic
        self.links.nic = nic
        renewed = guest_side(old) != guest_side(nic)
        if renewed:
            # The guest's side changes: QEMU's view is read again and what
            # no longer agrees is replaced (a replug the guest sees).
            self.qemu = qemu_side(self.vm_name, nic, self.vm, self.env.unplug_timeout)
        self.qemu.nic = nic
        self.qemu.unplug_timeout = self.env.unplug_timeout
        return renewed

    def forget_qemu(self) -> None:
        """QEMU is gone: what was known of its side is read again from the next QEMU."""
        self.qemu = qemu_side(self.vm_name, self.nic, self.vm, self.env.unplug_timeout)

    # -- an earlier run's backend ------------------------------------------------

    def hold(self, record: NicRecord, survey: Survey) -> bool:
        """Whether both halves ``record`` names are there: QEMU holds its pair and its link proves itself the NIC's."""
        return self.qemu.holds(pair_of(record), survey) and self.links.proven(record)

    async def keep(self, record: NicRecord) -> None:
        """``record``'s adopted halves put right, as far as they can be."""
        # Made by a netwatch before backends were silent, it may not be.
        await self.best_effort(self.links.driver.silence(record, self.env.links, self.env.ops),
                               f"silencing {record.ifname}")
        # Cut short mid-rebind, the kept pair may have been left quiet.
        await self.best_effort(self.qemu.reopen(pair_of(record)), f"opening {record.tap_netdev}")

    async def clear_names(self) -> None:
        """The NIC's backend names free of stale links of netwatch's; any other link stays."""
        for name in self.nic.backend_names:
            with contextlib.suppress(ForeignLink):  # said when the NIC next makes a backend under that name
                await self.links.clear_name(name)

    # -- making and replacing ------------------------------------------------------

    async def make(self, name: str, placement: Placement, gen: int, inert: bool = False) -> tuple[Created, Pair]:
        """A new backend link ``name`` where ``placement`` says, plugged into QEMU as generation ``gen``'s pair.

        ``inert``: the pair joins the hub with its link down, passing nothing
        until it is switched on.
        """
        try:
            created = await self.links.create(name, placement)
            pair = self.qemu.pair(gen)
            try:
                await self.qemu.plug(created.fds, pair, inert)
            except BaseException:
                await self.best_effort(self.env.ops.delete(created.index), f"removing {name} after a failed attach")
                raise
            finally:
                created.close()
        finally:
            # attach() records it before it next awaits (a swap after its switch: one more pass at worst).
            self.links.making = None
        return created, pair

    async def switch(self, old: NicRecord, name: str, created: Created, pair: Pair) -> None:
        """``pair`` (link ``name``, just made) takes over from ``old``'s in QEMU; if it does not, both its halves go."""
        try:
            await self.qemu.switch(pair_of(old), pair)
        except BaseException:
            await self.best_effort(self.qemu.unplug(pair), f"removing {pair.tap}")
            await self.best_effort(self.env.ops.delete(created.index), f"removing {name}")
            raise

    async def retire(self, old: NicRecord) -> None:
        """``old``'s halves gone once another pair took over (best effort)."""
        await self.best_effort(self.qemu.unplug(pair_of(old)), f"removing {old.tap_netdev}")
        if self.links.made(old):
            await self.best_effort(self.env.ops.delete(old.ifindex), f"removing {old.ifname}")

    # -- taken apart ---------------------------------------------------------------

    async def take_down(self, backend: NicRecord) -> None:
        """``backend``'s pair out of QEMU, then its link if it is still the one netwatch made; failures raise."""
        await self.qemu.unplug(pair_of(backend))
        if self.links.made(backend):
            await self.env.ops.delete(backend.ifindex)

    async def withdraw(self, backend: NicRecord, *, unplug: bool = True, briefly: bool = False) -> bool:
        """``backend`` taken apart for good: its pair out of QEMU (``unplug``, best effort), then its link if
        provably the NIC's; whether the record described what was there (:meth:`BackendLinks.delete_recorded`).

        ``briefly``: the guest's link set down too, and QEMU given
        REMOVE_DEADLINE in all: a QEMU that does not answer must not hold up
        a reload (each command would wait out qmp_timeout).
        """
        if unplug and not briefly:
            await self.best_effort(self.qemu.unplug(pair_of(backend)), "removing the backend from QEMU")
        elif unplug:
            try:
                async with asyncio.timeout(REMOVE_DEADLINE):
                    await self.best_effort(self.qemu.unplug(pair_of(backend)), "removing the backend from QEMU")
                    await self.best_effort(self.vm.execute("set_link", {"name": self.nic.id, "up": False}),
                                           "set_link")
            except TimeoutError:
                log.warning("%s/%s: QEMU did not answer within %g s while the NIC was removed; its netdevs stay "
                            "in QEMU, the backend link goes", self.vm_name, self.nic.id, REMOVE_DEADLINE)
        return await self.links.delete_recorded(backend)

    async def best_effort(self, action: Awaitable[Any], what: str) -> None:
        try:
            await action
        except (LinkError, QmpError) as exc:
            log.warning("%s/%s: %s failed: %s", self.vm_name, self.nic.id, what, exc)
