"""The reconciler for one NIC: compare what is with what should be, and act.

Level-triggered: events only *kick* a NIC; every pass re-reads the link
table and the VM session, so a lost or duplicated event never leaves a NIC
wrong. One task per NIC serialises its operations (reconcile passes and
admin requests such as rebind); NICs run in parallel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential
from tenacity.wait import wait_base

from netwatch import events
from netwatch.config import LowerSpec, NicConfig, ifname_problem
from netwatch.errors import BadRequest, LinkError, NetwatchError, QmpError
from netwatch.host.backends import DRIVERS, Created, LinkVanished, Placement, ambiguity, find_lower, matching_lowers
from netwatch.host.linkops import LinkOps
from netwatch.host.links import Link, LinkTable
from netwatch.host.udev import udev_initialized
from netwatch.nic.records import NicRecord, RecordStore
from netwatch.nic.state import NicState, NicStateMachine
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.wiring import HubWiring, Pair, Survey
from netwatch.service.hooks import HookRunner

log = logging.getLogger(__name__)

# Seconds a NIC's removal waits for QEMU before it removes the kernel side anyway.
REMOVE_DEADLINE = 2.0

IFF_LOOPBACK = 0x8


class RebindError(NetwatchError):
    """A rebind could not be done; the NIC kept its path."""


class BadRebind(RebindError, BadRequest):
    """A rebind to something that is not a usable lower."""


def default_retry_wait() -> wait_base:
    return wait_exponential(multiplier=0.2, min=0.2, max=30.0)


@dataclass
class NicEnv:
    """What every NIC controller shares: the host view and the tools to act."""

    links: LinkTable
    ops: LinkOps
    records: RecordStore
    hooks: HookRunner
    node_dir: str
    udev_gate: bool = False
    retry_wait: wait_base | None = None
    on_state_change: Callable[[], None] | None = None
    # Every backend name of every configured NIC: never a lower.
    own_links: Callable[[], set[str]] = set
    # Told when a NIC's interest() may have changed.
    on_interest_change: Callable[[NicController], None] = lambda nic: None


class NicController:
    """One guest NIC: owns its backend, its state machine and its task."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, env: NicEnv) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.fsm = NicStateMachine(vm_name, nic.id, on_change=env.on_state_change)
        self.backend: NicRecord | None = None
        self.lower: Link | None = None
        self.override: LowerSpec | None = None  # set by rebind until the next reload/restart
        self.generation = 0
        self.swaps = 0
        self.guest_link: bool | None = None
        self.first_pass = asyncio.Event()
        self._synced_session = 0
        self._started_for: int | None = None  # QEMU pid whose "start" hooks ran
        self._up_context = "reattach"  # for the next if-up after "start"
        self._lost_lower: str | None = None
        self._requests: list[tuple[LowerSpec, asyncio.Future[dict[str, Any]]]] = []
        self.pending_config: NicConfig | None = None
        self._kick = asyncio.Event()
        self._kick.set()
        # How the backend reaches the guest, on QEMU's side.
        self.wiring = HubWiring(vm_name, nic, vm)

    @property
    def driver(self) -> Any:
        return DRIVERS[self.nic.backend]

    # -- events in ----------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    @property
    def kicked(self) -> bool:
        """Whether a pass is due (an event arrived since the last one began)."""
        return self._kick.is_set()

    def interest(self) -> set[tuple[str, object]]:
        """The link names, MACs and ifindexes whose changes concern this NIC.

        ("any", None) means every link (a PCI match needs sysfs, not the event).
        """
        keys: set[tuple[str, object]] = {("name", name) for name in self.nic.backend_names}
        if self.nic.bridge:
            keys.add(("name", self.nic.bridge))
        for spec in (self.nic.lower, self.override, self.pending_config.lower if self.pending_config else None):
            if spec is None:
                continue
            if spec.pci is not None:
                keys.add(("any", None))
            elif spec.name is not None:
                keys.add(("name", spec.name))
            elif spec.mac is not None:
                keys.add(("mac", spec.mac))
        if self.backend is not None:
            keys.update((("index", self.backend.ifindex), ("index", self.backend.lower_ifindex)))
        if self.lower is not None:
            keys.add(("index", self.lower.index))
        return keys

    def update_config(self, nic: NicConfig) -> None:
        """A reload: the new config applies from the next pass (rebinds end there)."""
        self.pending_config = nic
        self.env.on_interest_change(self)
        self.kick()

    async def rebind(self, lower: str) -> dict[str, Any]:
        """Move the NIC to ``lower`` now (make-before-break); its status after."""
        why = ifname_problem(lower)
        if why:
            raise BadRebind(f"'{lower}' {why}")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests.append((LowerSpec(name=lower), future))
        self.kick()
        return await future

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        wait = self.env.retry_wait or default_retry_wait()
        await self.vm.first_attempt.wait()
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self.pending_config is not None:
                # Between passes, never in the middle of one.
                self.nic, self.override, self.pending_config = self.pending_config, None, None
                self.wiring.nic = self.nic
            while self._requests:
                spec, future = self._requests.pop(0)
                await self._serve_rebind(spec, future)
            # Exception, not BaseException: cancellation always ends the loop.
            async for attempt in AsyncRetrying(wait=wait, retry=retry_if_exception_type(Exception),
                                               reraise=True):
                with attempt:
                    await self._reconcile_or_fail()

    async def _reconcile_or_fail(self) -> None:
        try:
            await self.reconcile()
        except NetwatchError as exc:
            # QEMU's view is unknown after a failed or timed-out command.
            self._synced_session = 0
            self.fsm.to(NicState.FAILED, f"{exc} (will retry)", lower=self._lower_name())
            log.debug("%s/%s failed", self.vm_name, self.nic.id, exc_info=exc)
            raise
        except Exception as exc:
            # A bug must not take the other NICs down: report it in full, retry.
            self._synced_session = 0
            log.exception("%s/%s: internal error", self.vm_name, self.nic.id)
            self.fsm.to(NicState.FAILED, f"internal error: {exc!r} (will retry)", lower=self._lower_name())
            raise
        finally:
            self.first_pass.set()
            self.env.on_interest_change(self)

    async def reconcile(self) -> None:
        if not self.vm.connected and self.vm.refused is not None:
            # Not provably this VM's QEMU: nothing of the VM's is touched,
            # not even a backend its own QEMU may still be using.
            self.fsm.to(NicState.FAILED, f"QMP peer refused: {self.vm.refused}")
            return
        if not self.vm.connected:
            await self._vm_gone()
            self.fsm.to(NicState.WAITING_VM, "QEMU is not connected")
            return
        if self._synced_session != self.vm.session:
            session = self.vm.session
            await self._sync_with_qemu()
            self._synced_session = session
        matches = self._matching_lowers()
        lower = self._pick(matches)
        self.lower = lower or self.lower
        placement = self.driver.place(self.nic, lower, self.env.links)
        if lower is None and len(matches) > 1:
            spec = self.override or self.nic.lower
            assert spec is not None
            placement = replace(placement, ready=False, missing=ambiguity(spec, matches))
        if self.backend is not None:
            await self._check_backend(placement)
        if self.backend is None:
            if not placement.ready:
                await self._set_guest_link(False, placement.missing)
                self.fsm.to(NicState.WAITING_LOWER, placement.missing)
                return
            self.fsm.to(NicState.ATTACHING, self._where(placement))
            try:
                await self._attach(placement)
            except LinkVanished:
                # Its removal event is on its way; that is not a failure.
                await self._set_guest_link(False, "no lower")
                self.fsm.to(NicState.WAITING_LOWER, f"lower {self._spec_name()} vanished while attaching")
                return
        else:
            try:
                await self.driver.maintain(self.backend, placement, self.env.links, self.env.ops)
            except LinkVanished as exc:
                log.debug("%s/%s: %s; waiting for the link's events", self.vm_name, self.nic.id, exc)
                return
            self._follow_uplink(placement)
        await self._set_guest_link(self.driver.carrier(placement), "lower carrier")
        self.fsm.to(NicState.ATTACHED, f"backend {self.backend.ifname if self.backend else '?'}: "
                    f"{self._where(placement)}", lower=lower.name if lower else None)

    async def _check_backend(self, placement: Placement) -> None:
        """Detach a dead or outdated backend; move a live one make-before-break."""
        backend = self.backend
        assert backend is not None
        broken = self.driver.broken(backend, self.env.links)
        if broken:
            await self._detach(broken, "lower-lost")
        elif not self._matches_config(backend):
            self._up_context = "rebind"
            await self._detach("the configuration changed", "rebind")
        elif (misplaced := self.driver.misplaced(backend, placement)) is not None:
            if placement.ready and self.driver.moves_by_swap:
                await self._swap(placement, f"rebind: {misplaced}")
            else:
                await self._detach(misplaced, "lower-lost")

    def find_lower(self) -> Link | None:
        return self._pick(self._matching_lowers())

    def _matching_lowers(self) -> list[Link]:
        return matching_lowers(self.override or self.nic.lower, self.env.own_links() | set(self.nic.backend_names),
                               self.env.links, self._ready)

    def _pick(self, matches: list[Link]) -> Link | None:
        if len(matches) == 1:
            return matches[0]
        # A second match appearing under an attached NIC (a VLAN made on its
        # lower, say) must not tear the NIC down: it stays where it is.
        backend = self.backend
        current = [link for link in matches if backend is not None and link.index == backend.lower_ifindex]
        return current[0] if current else None

    def _ready(self, link: Link) -> bool:
        # With udevd, a link is used only once udev is done with it (renames).
        return not self.env.udev_gate or udev_initialized(link.index)

    def _where(self, placement: Placement) -> str:
        parts = []
        if placement.lower is not None:
            parts.append(f"lower {placement.lower.name} (ifindex {placement.lower.index})")
        if placement.bridge is not None:
            parts.append(f"bridge {placement.bridge.name}")
        return ", ".join(parts) or "routed"

    # -- QEMU's view ----------------------------------------------------------

    async def _sync_with_qemu(self) -> None:
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
        await self.wiring.clean(survey, _pair(keep) if keep is not None else None)
        if keep is not None:
            if self.backend is None:
                events.emit("attached", f"adopted {keep.ifname} on {keep.lower or 'no lower'} from an earlier run",
                            vm=self.vm_name, nic=self.nic.id, lower=keep.lower)
                self._started_for = keep.qemu_pid
            self.backend, self.swaps = keep, keep.swaps
            # Cut short mid-rebind, the kept pair may have been left quiet.
            await self._best_effort(self.wiring.reopen(_pair(keep)), f"opening {keep.tap_netdev}")
            return
        if record is not None:
            # Its if-up hooks ran: pair them with if-down, with the values they saw.
            context = self._why_not_adopted(record)
            self.env.hooks.submit("down", context, record)
            if context != "stop":
                self._started_for = self.vm.pid
                self._up_context = "rebind" if context == "rebind" else "reattach"
        for name in self.nic.backend_names:
            stale = self.env.links.named(name)
            if stale is not None:
                await self.env.ops.delete(stale.index)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None

    def _adoptable(self, record: NicRecord, survey: Survey) -> bool:
        link = self.env.links.get(record.ifindex)
        return (record.qemu_pid == self.vm.pid and self.wiring.holds(_pair(record), survey) and link is not None
                and link.name == record.ifname and self._matches_config(record))

    def _matches_config(self, record: NicRecord) -> bool:
        nic = self.nic
        return (record.ifname in nic.backend_names and record.backend == nic.backend and record.mac == nic.mac
                and record.mode == nic.mode and record.bridge == nic.bridge)

    def _why_not_adopted(self, record: NicRecord) -> str:
        """The if-down context for a recorded backend that is being replaced."""
        if record.qemu_pid != self.vm.pid:
            return "stop"  # that QEMU is gone; this one is new
        return "lower-lost" if self._matches_config(record) else "rebind"

    async def _set_guest_link(self, up: bool, cause: str) -> None:
        if self.guest_link is up:
            return
        await self.vm.execute("set_link", {"name": self.nic.id, "up": up})
        self.guest_link = up
        events.emit("link-up" if up else "link-down", f"guest link {'up' if up else 'down'}: {cause}",
                    vm=self.vm_name, nic=self.nic.id, lower=self._lower_name())

    # -- backend lifecycle --------------------------------------------------

    async def _create(self, name: str, placement: Placement, inert: bool = False) -> tuple[Created, str, str, int]:
        """A new backend link plus its QEMU pair: (link, tap netdev, hubport, generation).

        ``inert``: the pair joins the hub with its link down, passing nothing
        until it is switched on.
        """
        nic, ops = self.nic, self.env.ops
        gen = self.generation + 1
        stale = self.env.links.named(name)
        if stale is not None:
            await ops.delete(stale.index)
        try:
            created = await self.driver.create(nic, name, placement, ops, self.env.node_dir)
        except LinkError as exc:
            if exc.errno == errno.ENODEV and placement.lower is not None:
                raise LinkVanished(str(exc)) from exc
            raise
        pair = self.wiring.pair(gen)
        tap, hub = pair.tap, pair.port
        try:
            await self.wiring.plug(created.fd, pair, inert)
        except BaseException:
            await self._best_effort(ops.delete(created.index), f"removing {name} after a failed attach")
            raise
        finally:
            os.close(created.fd)
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
            guest_pci=str(nic.guest_pci) if nic.guest_pci else None, qemu_start=self.vm.pid_start)

    async def _attach(self, placement: Placement) -> None:
        name = self.nic.ifname
        created, tap, hub, gen = await self._create(name, placement)
        self.backend = self._record(name, created, placement, tap, hub, gen)
        self.env.records.save(self.backend)
        back = self._lost_lower is not None
        self._lost_lower = None
        lower = placement.lower
        events.emit("lower-back" if back else "attached",
                    f"{name} (ifindex {created.index}) is now {tap}: {self._where(placement)}",
                    vm=self.vm_name, nic=self.nic.id, lower=lower.name if lower else None, netdev=tap,
                    ifindex=created.index)
        context = "start" if self._started_for != self.vm.pid else self._up_context
        self._started_for, self._up_context = self.vm.pid, "reattach"
        self.env.hooks.submit("up", context, self.backend)
        await self._best_effort(self._announce(), "announce-self")

    async def _swap(self, placement: Placement, cause: str) -> None:
        """Make-before-break: the new backend joins the hub before the old one leaves."""
        old = self.backend
        assert old is not None and placement.lower is not None
        name = next(n for n in self.nic.backend_names if n != old.ifname)
        # Both pairs hang off the guest's hub for a moment, and QEMU's hub
        # forwards between all its ports: the new pair joins with its link
        # down, the old one goes quiet, then the new one opens. Never both
        # at once (4-21 broadcasts per rebind crossed between the two
        # lowers' networks before).
        created, tap, hub, gen = await self._create(name, placement, inert=True)
        new = self._record(name, created, placement, tap, hub, gen)
        try:
            await self.wiring.switch(_pair(old), _pair(new))
        except BaseException:
            await self._best_effort(self.wiring.unplug(_pair(new)), f"removing {tap}")
            await self._best_effort(self.env.ops.delete(created.index), f"removing {name}")
            raise
        self.backend = new
        self.env.records.save(new)
        await self._best_effort(self._announce(), "announce-self")
        await self._best_effort(self.wiring.unplug(_pair(old)), f"removing {old.tap_netdev}")
        link = self.env.links.get(old.ifindex)
        if link is not None and link.name == old.ifname:
            await self._best_effort(self.env.ops.delete(old.ifindex), f"removing {old.ifname}")
        self.env.hooks.submit("down", "rebind", old)
        self.env.hooks.submit("up", "rebind", new)
        events.emit("rebind", f"{cause}: {old.tap_netdev} on {old.lower} -> {tap} on {new.lower}",
                    vm=self.vm_name, nic=self.nic.id, lower=new.lower, netdev=tap, previous=old.lower)

    def _follow_uplink(self, placement: Placement) -> None:
        """A tap's uplink left, came back or changed: record it and tell the hooks."""
        backend = self.backend
        assert backend is not None
        uplink = placement.lower
        now = uplink.index if uplink else 0
        if now == backend.lower_ifindex:
            return
        if uplink is None:
            self.env.hooks.submit("down", "lower-lost", backend)
            self.backend = replace(backend, lower_ifindex=0)
        else:
            renamed = backend.lower != uplink.name
            if renamed and backend.lower_ifindex:
                self.env.hooks.submit("down", "rebind", backend)
            self.backend = replace(backend, lower=uplink.name, lower_ifindex=uplink.index)
            self.env.hooks.submit("up", "rebind" if renamed else "reattach", self.backend)
            if renamed:
                events.emit("rebind", f"uplink {backend.lower} -> {uplink.name}", vm=self.vm_name, nic=self.nic.id,
                            lower=uplink.name, previous=backend.lower)
        self.env.records.save(self.backend)

    async def _announce(self) -> None:
        # Switches relearn where the guest MAC lives now.
        self.vm.announce(self.nic.id)

    async def _detach(self, cause: str, context: str) -> None:
        backend = self.backend
        assert backend is not None
        await self._set_guest_link(False, cause)
        await self.wiring.unplug(_pair(backend))
        link = self.env.links.get(backend.ifindex)
        if link is not None and link.name == backend.ifname:
            await self.env.ops.delete(backend.ifindex)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None
        if context == "lower-lost":
            self._lost_lower = backend.lower
        self.env.hooks.submit("down", context, backend)
        events.emit("lower-lost" if context == "lower-lost" else "detached",
                    f"{backend.tap_netdev} removed: {cause}", vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    async def _vm_gone(self) -> None:
        """QEMU is gone: its netdevs went with it; drop the backend unless QEMU lives on."""
        self.guest_link = None
        self._synced_session = 0
        backend = self.backend
        if backend is None or self.vm.qemu_alive():
            return
        self.backend = None
        link = self.env.links.get(backend.ifindex)
        if link is not None and link.name == backend.ifname:
            await self._best_effort(self.env.ops.delete(backend.ifindex), f"removing {backend.ifname}")
        self.env.records.remove(self.vm_name, self.nic.id)
        self.env.hooks.submit("down", "stop", backend)
        events.emit("detached", f"{backend.ifname} removed: QEMU exited", vm=self.vm_name, nic=self.nic.id,
                    lower=backend.lower)

    async def remove(self) -> None:
        """The NIC left the config: take its backend out of QEMU and the kernel."""
        backend = self.backend
        if backend is None:
            return
        self.backend = None
        if self.vm.connected:
            # Best effort, briefly: a QEMU that does not answer must not hold
            # up a reload (each command would wait out qmp_timeout).
            try:
                async with asyncio.timeout(REMOVE_DEADLINE):
                    await self._best_effort(self.wiring.unplug(_pair(backend)), "removing the backend from QEMU")
                    await self._best_effort(self.vm.execute("set_link", {"name": self.nic.id, "up": False}),
                                            "set_link")
            except TimeoutError:
                log.warning("%s/%s: QEMU did not answer within %g s while the NIC was removed; its netdevs stay "
                            "in QEMU, the backend link goes", self.vm_name, self.nic.id, REMOVE_DEADLINE)
        link = self.env.links.get(backend.ifindex)
        if link is not None and link.name == backend.ifname:
            await self._best_effort(self.env.ops.delete(backend.ifindex), f"removing {backend.ifname}")
        self.env.records.remove(self.vm_name, self.nic.id)
        self.env.hooks.submit("down", "stop", backend)
        events.emit("detached", f"{backend.tap_netdev} removed: the NIC is no longer configured",
                    vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    async def _serve_rebind(self, spec: LowerSpec, future: asyncio.Future[dict[str, Any]]) -> None:
        name = spec.name or "?"
        try:
            await self._rebind_now(spec)
        except NetwatchError as exc:
            current = self.backend.lower if self.backend else "no lower"
            kind = BadRebind if isinstance(exc, BadRequest) else RebindError
            if not future.done():
                future.set_exception(kind(f"cannot rebind {self.vm_name}/{self.nic.id} to {name}: {exc}; "
                                          f"it stays on {current}"))
            return
        if not future.done():
            future.set_result(self.status())

    async def _rebind_now(self, spec: LowerSpec) -> None:
        if not self.vm.connected:
            raise RebindError(f"QEMU of {self.vm_name} is not connected")
        target = find_lower(spec, set(), self.env.links, self._ready)
        if target is None:
            raise BadRebind(f"there is no link named {spec.name}")
        if target.name in self.env.own_links() | set(self.nic.backend_names):
            raise BadRebind(f"{target.name} is a netwatch backend")
        if target.flags & IFF_LOOPBACK:
            raise BadRebind(f"{target.name} is a loopback device")
        backend = self.backend
        previous, self.override = self.override, spec
        self.env.on_interest_change(self)
        try:
            if backend is None or backend.lower_ifindex == target.index:
                return  # the next pass attaches it there, or it is there already
            placement = self.driver.place(self.nic, target, self.env.links)
            if self.driver.moves_by_swap:
                await self._swap(placement, f"rebind to {target.name} requested")
            else:
                await self.driver.maintain(backend, placement, self.env.links, self.env.ops)
                self._follow_uplink(placement)
        except BaseException:
            self.override = previous
            raise

    async def _best_effort(self, action: Awaitable[Any], what: str) -> None:
        try:
            await action
        except (LinkError, QmpError) as exc:
            log.warning("%s/%s: %s failed: %s", self.vm_name, self.nic.id, what, exc)

    # -- what status shows ---------------------------------------------------

    def _spec_name(self) -> str:
        spec = self.override or self.nic.lower
        return spec.describe() if spec else "-"

    def _lower_name(self) -> str | None:
        return self.lower.name if self.lower else (self.nic.lower.describe() if self.nic.lower else None)

    def _cause(self) -> str:
        # Connection attempts fail without a transition: say why while waiting.
        if self.fsm.state is NicState.WAITING_VM and self.vm is not None and self.vm.last_error:
            return f"QEMU is not connected: {self.vm.last_error}"
        return self.fsm.cause

    def status(self) -> dict[str, Any]:
        lower = self.find_lower()
        backend = self.backend
        status: dict[str, Any] = {
            "id": self.nic.id,
            "backend": self.nic.backend,
            "state": self.fsm.state.value,
            "cause": self._cause(),
            "lower": lower.name if lower else self._spec_name(),
            "lower_ifindex": lower.index if lower else None,
            "lower_present": lower is not None,
            "ifname": backend.ifname if backend else self.nic.ifname,
            "ifindex": backend.ifindex if backend else None,
            "netdev": backend.tap_netdev if backend else None,
            "hub_netdev": backend.hub_netdev if backend else None,
            "hub": self.nic.hub if self.wiring.hub is None else self.wiring.hub,
            "mac": self.nic.mac,
            "mode": self.nic.mode,
            "guest_pci": str(self.nic.guest_pci) if self.nic.guest_pci else None,
            "guest_link": self.guest_link,
            "swaps": self.swaps,
            "generation": self.generation,
            "last_change": self.fsm.last_change,
        }
        if self.override is not None:
            status["rebound"] = {"lower": self.override.describe(),
                                 "config_lower": self.nic.lower.describe() if self.nic.lower else None,
                                 "until": "the next reload or restart, which returns to the config"}
        if self.nic.bridge is not None:
            status["bridge"] = self.nic.bridge
            status["bridge_present"] = self.env.links.named(self.nic.bridge) is not None
        return status


def _pair(record: NicRecord) -> Pair:
    return Pair(tap=record.tap_netdev, port=record.hub_netdev)
