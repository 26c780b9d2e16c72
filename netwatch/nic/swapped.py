"""Hub and direct wirings: a backend that dies with its lower and is made
anew under the running QEMU.

Each backend is a kernel link plus its pair in QEMU, handed over as fds
(netwatch/qemu/hub.py: the guest never sees a swap; netwatch/qemu/direct.py:
a swap is a replug); the two halves are made and taken apart together by
netwatch/nic/halves.py. The NIC controller decides when a backend is made,
moved, detached or removed; this does it, keeps the runtime record, asks
the hook plan which context each hook gets, and says what happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from netwatch import events
from netwatch.config import NicConfig
from netwatch.host.backends import Created, Placement
from netwatch.host.links import Link
from netwatch.nic.env import NicEnv
from netwatch.nic.guestlink import GuestLink
from netwatch.nic.halves import BackendHalves, pair_of
from netwatch.nic.hookplan import HookPlan
from netwatch.nic.records import NicRecord
from netwatch.qemu.peer import still_runs
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.wiring import Pair, Survey, Wiring


class SwappedBackend:
    """One NIC's backend under the hub or direct wiring: made, adopted, swapped, detached, removed."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, env: NicEnv, hooks: HookPlan,
                 lower_name: Callable[[], str | None]) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.hooks = hooks
        self.lower_name = lower_name
        # The backend's link in the kernel and its pair in QEMU.
        self.halves = BackendHalves(vm_name, nic, vm, env)
        self.backend: NicRecord | None = None
        self.generation = 0
        self.swaps = 0
        # The guest's carrier, as last set.
        self.guest = GuestLink(vm_name, nic.id, vm, lower_name)
        self.synced_session = 0  # the VM session whose QEMU view was last read
        self.lost_lower: str | None = None
        self.last_attach_seconds: float | None = None

    # -- what the controller asks -------------------------------------------

    def configure(self, nic: NicConfig) -> None:
        self.nic = nic
        if self.halves.configure(nic):
            self.synced_session = 0  # QEMU's side is new: its view is read again

    @property
    def qemu(self) -> Wiring:
        """How the backend reaches the guest, on QEMU's side."""
        return self.halves.qemu

    @property
    def driver(self) -> Any:
        return self.halves.links.driver

    async def prepare(self) -> None:
        return None  # nothing of a swapped backend exists before QEMU

    @property
    def guest_present(self) -> bool:
        return self.qemu.guest_present

    def names(self) -> tuple[str, ...]:
        """The kernel links of this NIC's backends may have these names, and no other link may."""
        return self.nic.backend_names

    def expected(self, old: Link | None, new: Link | None) -> bool:
        return self.halves.links.expected(self.backend, old, new)

    def matches_config(self, record: NicRecord) -> bool:
        nic = self.nic
        return (record.ifname in nic.backend_names and record.backend == nic.backend and record.mac == nic.mac
                and record.mode == nic.mode and record.bridge == nic.bridge and record.wiring == nic.wiring
                and record.queues == nic.queues)

    async def sync(self) -> None:
        """QEMU's view read again: adopt the backend an earlier run left, if all agree on it; clean the rest."""
        session = self.vm.session
        survey = await self.qemu.survey()
        record = self.backend or self.env.records.load(self.vm_name, self.nic.id)
        gens = list(survey.generations)
        if record is not None:
            gens.append(record.generation)
            self.swaps = max(self.swaps, record.swaps)
        self.generation = max([self.generation, *gens])
        self.guest.forget()
        keep = record if record is not None and self._adoptable(record, survey) else None
        await self.qemu.clean(survey, pair_of(keep) if keep is not None else None)
        if await self.qemu.add_guest():
            events.emit("hot-add", f"added NIC {self.nic.id} to the running guest at {self.nic.guest_pci}",
                        vm=self.vm_name, nic=self.nic.id)
        if keep is not None:
            if self.backend is None:
                events.emit("attached", f"adopted {keep.ifname} on {keep.lower or 'no lower'} from an earlier run",
                            vm=self.vm_name, nic=self.nic.id, lower=keep.lower)
            self.hooks.adopted(keep, first=self.backend is None)
            self.backend, self.swaps = keep, keep.swaps
            await self.halves.keep(keep)
        else:
            if record is not None:
                self.hooks.replaced(record, self.matches_config(record))
            await self.halves.clear_names()
            self.env.records.remove(self.vm_name, self.nic.id)
            self.backend = None
        self.synced_session = session

    def _adoptable(self, record: NicRecord, survey: Survey) -> bool:
        return record.qemu_pid == self.vm.pid and self.matches_config(record) and self.halves.hold(record, survey)

    async def set_guest_link(self, up: bool, cause: str) -> None:
        await self.guest.set(up, cause, self.qemu.guest_present)

    async def follow_migration(self) -> None:
        """Configure or deconfigure the attached backend as its VM's migration phase asks."""
        if self.backend is not None:
            self.backend = self.hooks.follow(self.backend)

    # -- making and replacing -------------------------------------------------

    async def _create(self, name: str, placement: Placement, inert: bool = False) -> tuple[Created, Pair, int]:
        """A new backend link plus its QEMU pair, and its generation.

        ``inert``: the pair joins the hub with its link down, passing nothing
        until it is switched on.
        """
        gen = self.generation + 1
        created, pair = await self.halves.make(name, placement, gen, inert)
        self.generation, self.swaps = gen, self.swaps + 1
        return created, pair, gen

    def _record(self, name: str, created: Created, placement: Placement, pair: Pair, gen: int) -> NicRecord:
        nic, lower = self.nic, placement.lower
        return NicRecord(
            vm=self.vm_name, nic=nic.id, backend=nic.backend, ifname=name, ifindex=created.index,
            lower=lower.name if lower else (nic.lower.describe() if nic.lower else ""),
            lower_ifindex=lower.index if lower else 0, tap_netdev=pair.tap, hub_netdev=pair.port, generation=gen,
            mac=nic.mac, mode=nic.mode, bridge=nic.bridge, qemu_pid=self.vm.pid, swaps=self.swaps,
            guest_pci=str(nic.guest_pci) if nic.guest_pci else None, qemu_start=self.vm.pid_start,
            wiring=nic.wiring, queues=nic.queues, configured=self.hooks.configured(), phase=self.hooks.phase)

    async def attach(self, placement: Placement) -> None:
        name = self.nic.ifname
        started = time.monotonic()
        created, pair, gen = await self._create(name, placement)
        self.last_attach_seconds = round(time.monotonic() - started, 6)
        self.backend = self._record(name, created, placement, pair, gen)
        self.env.records.save(self.backend)
        back = self.lost_lower is not None
        self.lost_lower = None
        lower = placement.lower
        events.emit("lower-back" if back else "attached",
                    f"{name} (ifindex {created.index}) is now {pair.tap}: {placement.describe()}",
                    vm=self.vm_name, nic=self.nic.id, lower=lower.name if lower else None, netdev=pair.tap,
                    ifindex=created.index)
        self.hooks.up(self.hooks.attach_context(), self.backend)
        # Switches relearn where the guest MAC lives now, once the guest can be heard.
        self._announce()

    async def swap(self, placement: Placement, cause: str) -> None:
        """Make-before-break: the new backend joins the hub before the old one leaves."""
        old = self.backend
        assert old is not None and placement.lower is not None
        name = next(n for n in self.nic.backend_names if n != old.ifname)
        # Both pairs hang off the guest's hub for a moment, and QEMU's hub
        # forwards between all its ports: the new pair joins with its link
        # down, the old one goes quiet, then the new one opens. Never both
        # at once (4-21 broadcasts per rebind crossed between the two
        # lowers' networks before).
        started = time.monotonic()
        created, pair, gen = await self._create(name, placement, inert=True)
        self.last_attach_seconds = round(time.monotonic() - started, 6)
        new = self._record(name, created, placement, pair, gen)
        await self.halves.switch(old, name, created, pair)
        self.backend = new
        self.env.records.save(new)
        self._announce()
        await self.halves.retire(old)
        self.hooks.down("rebind", old)
        self.hooks.up("rebind", new)
        events.emit("rebind", f"{cause}: {old.tap_netdev} on {old.lower} -> {pair.tap} on {new.lower}",
                    vm=self.vm_name, nic=self.nic.id, lower=new.lower, netdev=pair.tap, previous=old.lower)

    def _announce(self) -> None:
        nic_id = self.nic.id
        self.guest.announce_when_up(lambda: self.vm.announce(nic_id), from_guest=True)

    async def maintain(self, placement: Placement) -> None:
        """Keep the attached backend wired where ``placement`` says (a tap's bridge and uplink)."""
        assert self.backend is not None
        await self.driver.maintain(self.backend, placement, self.env.links, self.env.ops)
        self._follow_uplink(placement)

    def _follow_uplink(self, placement: Placement) -> None:
        """A tap's uplink left, came back or changed: record it and tell the hooks."""
        backend = self.backend
        assert backend is not None
        uplink = placement.lower
        now = uplink.index if uplink else 0
        if now == backend.lower_ifindex:
            return
        if uplink is None:
            self.hooks.down("lower-lost", backend)
            self.backend = replace(backend, lower_ifindex=0)
        else:
            renamed = backend.lower != uplink.name
            if renamed and backend.lower_ifindex:
                self.hooks.down("rebind", backend)
            self.backend = replace(backend, lower=uplink.name, lower_ifindex=uplink.index)
            self.hooks.up("rebind" if renamed else "reattach", self.backend)
            if renamed:
                events.emit("rebind", f"uplink {backend.lower} -> {uplink.name}", vm=self.vm_name, nic=self.nic.id,
                            lower=uplink.name, previous=backend.lower)
        self.env.records.save(self.backend)

    async def detach(self, cause: str, context: str) -> None:
        backend = self.backend
        assert backend is not None
        await self.set_guest_link(False, cause)
        await self.halves.take_down(backend)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None
        if context == "lower-lost":
            self.lost_lower = backend.lower
        self.hooks.down(context, backend)
        events.emit("lower-lost" if context == "lower-lost" else "detached",
                    f"{backend.tap_netdev} removed: {cause}", vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    # -- taken away ------------------------------------------------------------

    async def vm_gone(self) -> None:
        """QEMU is gone: its netdevs went with it; drop the backend unless QEMU lives on."""
        self.guest.forget()
        self.synced_session = 0
        self.halves.forget_qemu()
        backend = self.backend
        if self.vm.qemu_alive():
            return
        if backend is None:
            # After a restart: a backend recorded for a QEMU that is gone is
            # cleaned now, not when (if ever) this VM's next QEMU connects.
            backend = self.env.records.load(self.vm_name, self.nic.id)
            if backend is None or (backend.qemu_pid is not None
                                   and still_runs(backend.qemu_pid, backend.qemu_start)):
                return
        self.backend = None
        ours = await self.halves.withdraw(backend, unplug=False)  # its netdevs went with QEMU
        self.env.records.remove(self.vm_name, self.nic.id)
        if not ours:
            return  # not what netwatch attached: no if-up ran for it, none is owed
        self.hooks.gone(backend)
        events.emit("detached", f"{backend.ifname} removed: QEMU exited", vm=self.vm_name, nic=self.nic.id,
                    lower=backend.lower)

    async def hot_remove(self) -> None:
        """The NIC left the config of a running VM: its device leaves the guest, then its backend goes.

        A guest that does not release the device raises UnplugTimeout: the
        NIC fails with that reason and keeps its backend (QEMU still feeds it).
        """
        if not self.vm.connected:
            await self.remove()
            return
        if self.synced_session != self.vm.session:
            await self.sync()
        if self.qemu.guest_present:
            await self.qemu.remove_guest()
        backend, self.backend = self.backend, None
        if backend is not None:
            ours = await self.halves.withdraw(backend)
            self.env.records.remove(self.vm_name, self.nic.id)
            if ours:
                self.hooks.down("hot-remove", backend)
        events.emit("hot-remove", f"NIC {self.nic.id} removed from the running guest: it is no longer configured",
                    vm=self.vm_name, nic=self.nic.id, lower=backend.lower if backend else None)

    async def remove(self) -> None:
        """The NIC left the config: take its backend out of QEMU and the kernel."""
        backend = self.backend
        if backend is None:
            return
        self.backend = None
        ours = await self.halves.withdraw(backend, unplug=self.vm.connected, briefly=True)
        self.env.records.remove(self.vm_name, self.nic.id)
        if not ours:
            return
        self.hooks.gone(backend)
        events.emit("detached", f"{backend.tap_netdev} removed: the NIC is no longer configured",
                    vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    # -- what it reports ---------------------------------------------------------

    def report(self) -> dict[str, Any]:
        backend = self.backend
        hub = self.qemu.hub
        return {
            "ifname": backend.ifname if backend else self.nic.ifname,
            "ifindex": backend.ifindex if backend else None,
            "netdev": backend.tap_netdev if backend else None,
            "hub_netdev": backend.hub_netdev if backend else None,
            "hub": self.nic.hub if hub is None else hub,
            "guest_present": self.qemu.guest_present,
            "guest_link": self.guest.state,
            # Whether its if-up ran (a routed tap waits while its guest migrates).
            "configured": backend.configured if backend else False,
            "swaps": self.swaps,
            "last_attach_seconds": self.last_attach_seconds,
            "generation": self.generation,
        }
