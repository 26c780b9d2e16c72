"""A NIC's backend over its life: made, adopted, swapped, detached, removed.

What is attached (the runtime record), its generation and swap count, the
guest link's state and which if-up context comes next live here; the NIC
controller decides when, the wiring (netwatch/qemu/wiring.py) does QEMU's
side and the driver (netwatch/host/backends.py) the kernel's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from netwatch import events
from netwatch.config import NicConfig
from netwatch.errors import LinkError, QmpError
from netwatch.host.backends import DRIVERS, Created, LinkVanished, Placement, made_by_netwatch, provably_ours
from netwatch.nic import migration
from netwatch.nic.records import NicRecord
from netwatch.nic.wirings import guest_side, make_wiring, pair_of
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.wiring import Survey, Wiring

if TYPE_CHECKING:  # NicEnv lives with the controller, which imports this module
    from netwatch.nic.controller import NicEnv

log = logging.getLogger(__name__)


class ForeignLink(LinkError):
    """A link has a NIC's backend name but is not netwatch's: nothing is done to it."""


class BackendLife:
    """One NIC's backend: the kernel link, its pair in QEMU, its record and hooks."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, env: NicEnv,
                 lower_name: Callable[[], str | None], hot_added: bool = False) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.lower_name = lower_name
        # How the backend reaches the guest, on QEMU's side.
        self.wiring: Wiring = make_wiring(vm_name, nic, vm, env.unplug_timeout)
        # The if-up context of the first backend in a QEMU: "hot-add" for a NIC
        # added to the config while its VM ran, "start" otherwise.
        self.first_context = "hot-add" if hot_added else "start"
        self.backend: NicRecord | None = None
        self.generation = 0
        self.swaps = 0
        self.guest_link: bool | None = None
        self.synced_session = 0  # the VM session whose QEMU view was last read
        self.started_for: int | None = None  # QEMU pid whose "start" hooks ran
        self.up_context = "reattach"  # for the next if-up after "start"
        self.lost_lower: str | None = None
        # The VM's migration phase on this host (netwatch/nic/migration.py).
        self.phase = migration.NONE
        self._phase_pid: int | None = None  # the QEMU whose run state the phase follows
        self.last_attach_seconds: float | None = None
        # (name, lower ifindex) of the backend link being made, until it is recorded or given up.
        self.making: tuple[str, int] | None = None

    def configure(self, nic: NicConfig) -> None:
        old, self.nic = self.nic, nic
        if guest_side(old) != guest_side(nic):
            # The guest's side changes: QEMU's view is read again and what
            # no longer agrees is replaced (a replug the guest sees).
            self.wiring = make_wiring(self.vm_name, nic, self.vm, self.env.unplug_timeout)
            self.synced_session = 0
        self.wiring.nic = nic
        self.wiring.unplug_timeout = self.env.unplug_timeout

    @property
    def driver(self) -> Any:
        return DRIVERS[self.nic.backend]

    async def sync_with_qemu(self) -> None:
        """Adopt the backend an earlier run left, if all agree on it; clean the rest."""
        survey = await self.wiring.survey()
        record = self.backend or self.env.records.load(self.vm_name, self.nic.id)
        gens = list(survey.generations)
        if record is not None:
            gens.append(record.generation)
            self.swaps = max(self.swaps, record.swaps)
        self.generation = max([self.generation, *gens])
        self.guest_link = None
        keep = record if record is not None and self._adoptable(record, survey) else None
        await self.wiring.clean(survey, pair_of(keep) if keep is not None else None)
        if await self.wiring.add_guest():
            events.emit("hot-add", f"added NIC {self.nic.id} to the running guest at {self.nic.guest_pci}",
                        vm=self.vm_name, nic=self.nic.id)
        if keep is not None:
            if self.backend is None:
                events.emit("attached", f"adopted {keep.ifname} on {keep.lower or 'no lower'} from an earlier run",
                            vm=self.vm_name, nic=self.nic.id, lower=keep.lower)
                self.started_for = keep.qemu_pid
            self.backend, self.swaps = keep, keep.swaps
            self.phase = self.phase_for(self.vm.pid, keep)
            # Made by a netwatch before backends were silent, it may not be.
            await self.best_effort(self.driver.silence(keep, self.env.links, self.env.ops), f"silencing {keep.ifname}")
            # Cut short mid-rebind, the kept pair may have been left quiet.
            await self.best_effort(self.wiring.reopen(pair_of(keep)), f"opening {keep.tap_netdev}")
            return
        if record is not None:
            if record.qemu_pid == self.vm.pid:
                # This QEMU's phase, which its states so far may not tell (a target paused after receiving).
                self.phase = self.phase_for(self.vm.pid, record)
            # Its if-up hooks ran: pair them with if-down, with the values they saw.
            context = self._why_not_adopted(record)
            self.hooks_down(context, record)
            if record.qemu_pid == self.vm.pid:
                self.started_for = self.vm.pid
                self.up_context = "rebind" if context == "rebind" else "reattach"
        for name in self.nic.backend_names:
            with contextlib.suppress(ForeignLink):  # said when the NIC next makes a backend under that name
                await self.clear_name(name)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None

    def _adoptable(self, record: NicRecord, survey: Survey) -> bool:
        link = self.env.links.get(record.ifindex)
        return (record.qemu_pid == self.vm.pid and self.wiring.holds(pair_of(record), survey) and link is not None
                and self.matches_config(record) and provably_ours(link, record, self.nic.backend_names))

    def matches_config(self, record: NicRecord) -> bool:
        nic = self.nic
        return (record.ifname in nic.backend_names and record.backend == nic.backend and record.mac == nic.mac
                and record.mode == nic.mode and record.bridge == nic.bridge and record.wiring == nic.wiring
                and record.queues == nic.queues)

    def _why_not_adopted(self, record: NicRecord) -> str:
        """The if-down context for a recorded backend that is being replaced."""
        if record.qemu_pid != self.vm.pid:
            # That QEMU is gone; this one is new.
            return migration.down_context(self.phase_for(record.qemu_pid, record))
        return "lower-lost" if self.matches_config(record) else "rebind"

    def made(self, record: NicRecord) -> bool:
        """Whether the link ``record`` (this run's, or adopted) names is still the backend netwatch made."""
        link = self.env.links.get(record.ifindex)
        return (link is not None and link.name == record.ifname
                and made_by_netwatch(link, record.backend, record.mac))

    async def clear_name(self, name: str) -> None:
        """Make room for a backend called ``name``: a stale one of netwatch's goes, any other link stays."""
        stale = self.env.links.named(name)
        if stale is None:
            return
        if not made_by_netwatch(stale, self.nic.backend, self.nic.mac):
            # A name is only a name: the admin's or another tool's link is never taken for netwatch's.
            raise ForeignLink(f"{name} (ifindex {stale.index}, {stale.kind or 'no kind'}, MAC {stale.mac or 'none'}) "
                              f"is not a backend netwatch made for this NIC: it is left alone", errno.EEXIST)
        await self.env.ops.delete(stale.index)

    async def set_guest_link(self, up: bool, cause: str) -> None:
        if not self.wiring.guest_present:
            self.guest_link = None  # no device in the guest (yet): nothing to set
            return
        if self.guest_link is up:
            return
        await self.vm.execute("set_link", {"name": self.nic.id, "up": up})
        self.guest_link = up
        events.emit("link-up" if up else "link-down", f"guest link {'up' if up else 'down'}: {cause}",
                    vm=self.vm_name, nic=self.nic.id, lower=self.lower_name())

    async def _create(self, name: str, placement: Placement, inert: bool = False) -> tuple[Created, str, str, int]:
        """A new backend link plus its QEMU pair: (link, tap netdev, hubport, generation).

        ``inert``: the pair joins the hub with its link down, passing nothing
        until it is switched on.
        """
        nic, ops = self.nic, self.env.ops
        gen = self.generation + 1
        await self.clear_name(name)
        self.making = (name, placement.lower.index if placement.lower else 0)
        try:
            try:
                created = await self.driver.create(nic, name, placement, ops, self.env.node_dir)
            except LinkError as exc:
                if exc.errno == errno.ENODEV and placement.lower is not None:
                    raise LinkVanished(str(exc)) from exc
                raise
            pair = self.wiring.pair(gen)
            tap, hub = pair.tap, pair.port
            try:
                await self.wiring.plug(created.fds, pair, inert)
            except BaseException:
                await self.best_effort(ops.delete(created.index), f"removing {name} after a failed attach")
                raise
            finally:
                created.close()
        finally:
            # attach() records it before it next awaits (a swap after its switch: one more pass at worst).
            self.making = None
        self.generation, self.swaps = gen, self.swaps + 1
        return created, tap, hub, gen

    def _record(self, name: str, created: Created, placement: Placement, tap: str, hub: str,
                gen: int) -> NicRecord:
        nic, lower = self.nic, placement.lower
        return NicRecord(
            vm=self.vm_name, nic=nic.id, backend=nic.backend, ifname=name, ifindex=created.index,
            lower=lower.name if lower else (nic.lower.describe() if nic.lower else ""),
            lower_ifindex=lower.index if lower else 0, tap_netdev=tap, hub_netdev=hub, generation=gen,
            mac=nic.mac, mode=nic.mode, bridge=nic.bridge, qemu_pid=self.vm.pid, swaps=self.swaps,
            guest_pci=str(nic.guest_pci) if nic.guest_pci else None, qemu_start=self.vm.pid_start,
            wiring=nic.wiring, queues=nic.queues, configured=migration.wants_configured(nic, self.phase),
            phase=self.phase)

    async def attach(self, placement: Placement) -> None:
        name = self.nic.ifname
        started = time.monotonic()
        created, tap, hub, gen = await self._create(name, placement)
        self.last_attach_seconds = round(time.monotonic() - started, 6)
        self.backend = self._record(name, created, placement, tap, hub, gen)
        self.env.records.save(self.backend)
        back = self.lost_lower is not None
        self.lost_lower = None
        lower = placement.lower
        events.emit("lower-back" if back else "attached",
                    f"{name} (ifindex {created.index}) is now {tap}: {placement.describe()}",
                    vm=self.vm_name, nic=self.nic.id, lower=lower.name if lower else None, netdev=tap,
                    ifindex=created.index)
        context = self.first_context if self.started_for != self.vm.pid else self.up_context
        arrived = self.vm.pid in self.vm.runstate.arrived  # the guest migrated in and ran here
        if self.phase == migration.IN or (context == "start" and arrived):
            context = "migrate-in"
        self.started_for, self.up_context, self.first_context = self.vm.pid, "reattach", "start"
        self.hooks_up(context, self.backend)
        await self.best_effort(self._announce(), "announce-self")

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
        created, tap, hub, gen = await self._create(name, placement, inert=True)
        self.last_attach_seconds = round(time.monotonic() - started, 6)
        new = self._record(name, created, placement, tap, hub, gen)
        try:
            await self.wiring.switch(pair_of(old), pair_of(new))
        except BaseException:
            await self.best_effort(self.wiring.unplug(pair_of(new)), f"removing {tap}")
            await self.best_effort(self.env.ops.delete(created.index), f"removing {name}")
            raise
        self.backend = new
        self.env.records.save(new)
        await self.best_effort(self._announce(), "announce-self")
        await self.best_effort(self.wiring.unplug(pair_of(old)), f"removing {old.tap_netdev}")
        if self.made(old):
            await self.best_effort(self.env.ops.delete(old.ifindex), f"removing {old.ifname}")
        self.hooks_down("rebind", old)
        self.hooks_up("rebind", new)
        events.emit("rebind", f"{cause}: {old.tap_netdev} on {old.lower} -> {tap} on {new.lower}",
                    vm=self.vm_name, nic=self.nic.id, lower=new.lower, netdev=tap, previous=old.lower)

    def follow_uplink(self, placement: Placement) -> None:
        """A tap's uplink left, came back or changed: record it and tell the hooks."""
        backend = self.backend
        assert backend is not None
        uplink = placement.lower
        now = uplink.index if uplink else 0
        if now == backend.lower_ifindex:
            return
        if uplink is None:
            self.hooks_down("lower-lost", backend)
            self.backend = replace(backend, lower_ifindex=0)
        else:
            renamed = backend.lower != uplink.name
            if renamed and backend.lower_ifindex:
                self.hooks_down("rebind", backend)
            self.backend = replace(backend, lower=uplink.name, lower_ifindex=uplink.index)
            self.hooks_up("rebind" if renamed else "reattach", self.backend)
            if renamed:
                events.emit("rebind", f"uplink {backend.lower} -> {uplink.name}", vm=self.vm_name, nic=self.nic.id,
                            lower=uplink.name, previous=backend.lower)
        self.env.records.save(self.backend)

    async def _announce(self) -> None:
        # Switches relearn where the guest MAC lives now.
        self.vm.announce(self.nic.id)

    async def detach(self, cause: str, context: str) -> None:
        backend = self.backend
        assert backend is not None
        await self.set_guest_link(False, cause)
        await self.wiring.unplug(pair_of(backend))
        if self.made(backend):
            await self.env.ops.delete(backend.ifindex)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None
        if context == "lower-lost":
            self.lost_lower = backend.lower
        self.hooks_down(context, backend)
        events.emit("lower-lost" if context == "lower-lost" else "detached",
                    f"{backend.tap_netdev} removed: {cause}", vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    # -- hooks and migration ----------------------------------------------------

    def hooks_up(self, context: str, record: NicRecord) -> None:
        if record.configured:
            self.env.hooks.submit("up", context, record)

    def hooks_down(self, context: str, record: NicRecord) -> None:
        # Only what was configured is deconfigured: a routed tap deferred on a
        # migration target, or deconfigured on its source, owes no if-down.
        if record.configured:
            self.env.hooks.submit("down", context, record)

    def phase_for(self, pid: int | None, record: NicRecord | None) -> str:
        """QEMU ``pid``'s migration phase: as the run-state watch latched it, else as ``record`` kept it."""
        latched = self.vm.runstate.phase_of(pid)
        if latched is not None:
            return latched
        if record is not None and pid is not None and record.qemu_pid == pid:
            return record.phase
        return self.phase if pid is not None and pid == self._phase_pid else migration.NONE

    def observe_run_state(self) -> None:
        """Follow the VM's run state into this NIC's migration phase."""
        # A new QEMU starts from nothing: an earlier one's phase is not its own.
        self.phase = self.phase_for(self.vm.pid, self.backend)
        self._phase_pid = self.vm.pid

    async def follow_migration(self) -> None:
        """Configure or deconfigure the attached backend as the phase asks (netwatch/nic/migration.py)."""
        await migration.follow(self)

    async def best_effort(self, action: Awaitable[Any], what: str) -> None:
        try:
            await action
        except (LinkError, QmpError) as exc:
            log.warning("%s/%s: %s failed: %s", self.vm_name, self.nic.id, what, exc)
