"""The reconciler for one NIC: compare what is with what should be, and act.

Level-triggered: events only *kick* a NIC; every pass re-reads the link
table and the VM session, so a lost or duplicated event never leaves a NIC
wrong. One task per NIC serialises its operations; NICs run in parallel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential
from tenacity.wait import wait_base

from . import events
from .chardev import macvtap_devnum, open_chardev
from .config import LowerSpec, NicConfig
from .errors import LinkError, NetwatchError, QmpError
from .linkops import LinkOps
from .links import Link, LinkTable
from .nic_state import NicState, NicStateMachine
from .qmp import HubPort, VmSession
from .records import NicRecord, RecordStore

log = logging.getLogger(__name__)


class LowerVanished(NetwatchError):
    """The lower went away between being seen and being used."""


def default_retry_wait() -> wait_base:
    return wait_exponential(multiplier=0.2, min=0.2, max=30.0)


@dataclass
class NicEnv:
    """What every NIC controller shares: the host view and the tools to act."""

    links: LinkTable
    ops: LinkOps
    records: RecordStore
    node_dir: str
    udev_gate: bool = False
    retry_wait: wait_base | None = None


def lower_matches(spec: LowerSpec, link: Link) -> bool:
    if spec.name is not None and link.name != spec.name:
        return False
    if spec.mac is not None and (link.mac or "").lower() != spec.mac:
        return False
    return not (spec.pci is not None and _pci_address(link.name) != spec.pci)


def _pci_address(ifname: str) -> str | None:
    try:
        return os.path.basename(os.path.realpath(f"/sys/class/net/{ifname}/device", strict=True))
    except OSError:
        return None


class NicController:
    """One guest NIC: owns its backend, its state machine and its task."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: VmSession, env: NicEnv) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.fsm = NicStateMachine(vm_name, nic.id)
        self.backend: NicRecord | None = None
        self.lower: Link | None = None
        self.generation = 0
        self.swaps = 0
        self.guest_link: bool | None = None
        self._synced_session = 0
        self._lost_lower: str | None = None
        self._kick = asyncio.Event()
        self._kick.set()
        self._backend_ids = re.compile(rf"nw-{re.escape(nic.id)}-(tap|up|fd)(\d+)\Z")

    # -- events in ----------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    def interested(self, link: Link) -> bool:
        spec = self.nic.lower
        if link.name == self.nic.ifname:
            return True
        if spec is not None and (spec.pci is not None or lower_matches(spec, link)):
            return True
        known = {self.backend.ifindex, self.backend.lower_ifindex} if self.backend else set()
        if self.lower is not None:
            known.add(self.lower.index)
        return link.index in known

    # -- the loop -----------------------------------------------------------

    async def run(self) -> None:
        wait = self.env.retry_wait or default_retry_wait()
        while True:
            await self._kick.wait()
            self._kick.clear()
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

    async def reconcile(self) -> None:
        if not self.vm.connected:
            await self._vm_gone()
            self.fsm.to(NicState.WAITING_VM, "QEMU is not connected")
            return
        if self._synced_session != self.vm.session:
            session = self.vm.session
            await self._sync_with_qemu()
            self._synced_session = session
        lower = self.find_lower()
        self.lower = lower or self.lower
        if self.backend is not None:
            broken = self._backend_broken(lower)
            if broken:
                await self._detach(broken, lost=True)
        if lower is None:
            await self._set_guest_link(False, "no lower")
            self.fsm.to(NicState.WAITING_LOWER, f"lower {self._spec_name()} is not present")
            return
        if self.backend is None:
            self.fsm.to(NicState.ATTACHING, f"lower {lower.name} (ifindex {lower.index}) is present")
            try:
                await self._attach(lower)
            except LowerVanished:
                # Its removal event is on its way; that is not a failure.
                await self._set_guest_link(False, "no lower")
                self.fsm.to(NicState.WAITING_LOWER, f"lower {lower.name} vanished while attaching")
                return
        await self._set_guest_link(lower.carrier, f"lower {lower.name} carrier")
        self.fsm.to(NicState.ATTACHED, f"backend {self.nic.ifname} on {lower.name}", lower=lower.name)

    def find_lower(self) -> Link | None:
        spec = self.nic.lower
        if spec is None:
            return None
        found = [link for link in self.env.links
                 if link.name != self.nic.ifname and lower_matches(spec, link) and self._ready(link)]
        return min(found, key=lambda link: link.index) if found else None

    def _ready(self, link: Link) -> bool:
        # With udevd, a link is used only once udev is done with it (renames).
        if not self.env.udev_gate:
            return True
        from .udev import udev_initialized
        return udev_initialized(link.index)

    def _backend_broken(self, lower: Link | None) -> str | None:
        backend = self.backend
        assert backend is not None
        macvtap = self.env.links.get(backend.ifindex)
        if lower is None:
            return f"lower {backend.lower} is gone"
        if lower.index != backend.lower_ifindex:
            return f"lower {self._spec_name()} is now ifindex {lower.index}"
        if macvtap is None or macvtap.name != backend.ifname:
            return f"backend {backend.ifname} is gone"
        if macvtap.parent != lower.index:
            return f"backend {backend.ifname} is not on {lower.name}"
        return None

    # -- QEMU's view ----------------------------------------------------------

    async def _sync_with_qemu(self) -> None:
        """Adopt the backend an earlier run left, if all agree on it; clean the rest."""
        network = await self.vm.network()
        netdevs = {name for name in network.netdevs if self._backend_ids.match(name)}
        record = self.backend or self.env.records.load(self.vm_name, self.nic.id)
        gens = [int(match.group(2)) for name in netdevs if (match := self._backend_ids.match(name))]
        if record is not None:
            gens.append(record.generation)
            self.swaps = max(self.swaps, record.swaps)
        self.generation = max([self.generation, *gens])
        self.guest_link = None
        keep = record if record is not None and self._adoptable(record, network.ports) else None
        for name in sorted(netdevs, key=lambda n: "-up" not in n):  # hubports before their taps
            if keep is None or name not in (keep.hub_netdev, keep.tap_netdev):
                await self._netdev_del(name)
        if keep is not None:
            if self.backend is None:
                events.emit("attached", f"adopted {keep.ifname} on {keep.lower} from an earlier run",
                            vm=self.vm_name, nic=self.nic.id, lower=keep.lower)
            self.backend, self.swaps = keep, keep.swaps
            return
        stale = self.env.links.named(self.nic.ifname)
        if stale is not None:
            await self.env.ops.delete(stale.index)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None

    def _adoptable(self, record: NicRecord, ports: tuple[HubPort, ...]) -> bool:
        pair = [p for p in ports if p.port == record.hub_netdev and p.peer == record.tap_netdev
                and p.hub == self.nic.hub]
        macvtap = self.env.links.get(record.ifindex)
        return (record.qemu_pid == self.vm.pid and len(pair) == 1 and macvtap is not None
                and macvtap.name == record.ifname and record.backend == self.nic.backend)

    async def _netdev_del(self, name: str) -> None:
        try:
            await self.vm.execute("netdev_del", {"id": name})
        except QmpError as exc:
            if "not found" not in str(exc):
                raise

    async def _set_guest_link(self, up: bool, cause: str) -> None:
        if self.guest_link is up:
            return
        await self.vm.execute("set_link", {"name": self.nic.id, "up": up})
        self.guest_link = up
        events.emit("link-up" if up else "link-down", f"guest link {'up' if up else 'down'}: {cause}",
                    vm=self.vm_name, nic=self.nic.id, lower=self._lower_name())

    # -- backend lifecycle --------------------------------------------------

    async def _attach(self, lower: Link) -> None:
        nic, ops = self.nic, self.env.ops
        gen = self.generation + 1
        stale = self.env.links.named(nic.ifname)
        if stale is not None:
            await ops.delete(stale.index)
        try:
            index = await ops.add_macvtap(nic.ifname, lower.index, nic.mac, nic.mode)
        except LinkError as exc:
            if exc.errno == errno.ENODEV:
                raise LowerVanished(str(exc)) from exc
            raise
        tap, hub = f"nw-{nic.id}-tap{gen}", f"nw-{nic.id}-up{gen}"
        fd: int | None = None
        try:
            fd = open_chardev(macvtap_devnum(nic.ifname, index), self.env.node_dir, nic.ifname)
            await self._add_backend(fd, gen, tap, hub)
        except BaseException:
            await self._best_effort(ops.delete(index), f"removing {nic.ifname} after a failed attach")
            raise
        finally:
            if fd is not None:
                os.close(fd)
        self.generation, self.swaps = gen, self.swaps + 1
        self.backend = NicRecord(
            vm=self.vm_name, nic=nic.id, backend=nic.backend, ifname=nic.ifname, ifindex=index,
            lower=lower.name, lower_ifindex=lower.index, tap_netdev=tap, hub_netdev=hub, generation=gen,
            mac=nic.mac, mode=nic.mode, bridge=nic.bridge, qemu_pid=self.vm.pid, swaps=self.swaps)
        self.env.records.save(self.backend)
        back = self._lost_lower is not None
        self._lost_lower = None
        events.emit("lower-back" if back else "attached",
                    f"{nic.ifname} (ifindex {index}) on {lower.name} (ifindex {lower.index}) is now {tap}",
                    vm=self.vm_name, nic=nic.id, lower=lower.name, netdev=tap, ifindex=index)
        await self._best_effort(self._announce(), "announce-self")

    async def _add_backend(self, fd: int, gen: int, tap: str, hub: str) -> None:
        fdname = f"nw-{self.nic.id}-fd{gen}"
        await self.vm.pass_fd(fd, fdname)
        try:
            await self.vm.execute("netdev_add", {"type": "tap", "id": tap, "fd": fdname})
        except BaseException:
            await self._best_effort(self.vm.execute("closefd", {"fdname": fdname}), f"closefd {fdname}")
            raise
        try:
            await self.vm.execute("netdev_add", {"type": "hubport", "id": hub, "hubid": self.nic.hub,
                                                 "netdev": tap})
        except BaseException:
            await self._best_effort(self._netdev_del(tap), f"netdev_del {tap}")
            raise

    async def _announce(self) -> None:
        # Switches relearn where the guest MAC lives now.
        await self.vm.execute("announce-self", {"initial": 50, "max": 550, "rounds": 3, "step": 100,
                                                "interfaces": [self.nic.id]})

    async def _detach(self, cause: str, lost: bool) -> None:
        backend = self.backend
        assert backend is not None
        await self._set_guest_link(False, cause)
        await self._netdev_del(backend.hub_netdev)
        await self._netdev_del(backend.tap_netdev)
        macvtap = self.env.links.get(backend.ifindex)
        if macvtap is not None and macvtap.name == backend.ifname:
            await self.env.ops.delete(backend.ifindex)
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None
        if lost:
            self._lost_lower = backend.lower
        events.emit("lower-lost" if lost else "detached", f"{backend.tap_netdev} removed: {cause}",
                    vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    async def _vm_gone(self) -> None:
        """QEMU is gone: its netdevs went with it; drop the macvtap unless QEMU lives on."""
        self.guest_link = None
        self._synced_session = 0
        backend = self.backend
        if backend is None or self.vm.qemu_alive():
            return
        self.backend = None
        macvtap = self.env.links.get(backend.ifindex)
        if macvtap is not None and macvtap.name == backend.ifname:
            await self._best_effort(self.env.ops.delete(backend.ifindex), f"removing {backend.ifname}")
        self.env.records.remove(self.vm_name, self.nic.id)
        events.emit("detached", f"{backend.ifname} removed: QEMU exited", vm=self.vm_name, nic=self.nic.id,
                    lower=backend.lower)

    async def stop(self, remove_backend: bool) -> None:
        """Leave the NIC: when asked, take its backend out of QEMU and the kernel."""
        if not remove_backend or self.backend is None:
            return
        backend = self.backend
        if self.vm.connected:
            await self._best_effort(self._netdev_del(backend.hub_netdev), "netdev_del")
            await self._best_effort(self._netdev_del(backend.tap_netdev), "netdev_del")
        await self._best_effort(self.env.ops.delete(backend.ifindex), f"removing {backend.ifname}")
        self.env.records.remove(self.vm_name, self.nic.id)
        self.backend = None

    async def _best_effort(self, action: Any, what: str) -> None:
        try:
            await action
        except (LinkError, QmpError) as exc:
            log.warning("%s/%s: %s failed: %s", self.vm_name, self.nic.id, what, exc)

    # -- what status shows ---------------------------------------------------

    def _spec_name(self) -> str:
        return self.nic.lower.describe() if self.nic.lower else "-"

    def _lower_name(self) -> str | None:
        return self.lower.name if self.lower else (self.nic.lower.describe() if self.nic.lower else None)

    def status(self) -> dict[str, Any]:
        lower = self.find_lower()
        backend = self.backend
        return {
            "id": self.nic.id,
            "backend": self.nic.backend,
            "state": self.fsm.state.value,
            "cause": self.fsm.cause,
            "lower": lower.name if lower else self._spec_name(),
            "lower_ifindex": lower.index if lower else None,
            "lower_present": lower is not None,
            "ifname": self.nic.ifname,
            "ifindex": backend.ifindex if backend else None,
            "netdev": backend.tap_netdev if backend else None,
            "hub": self.nic.hub,
            "mac": self.nic.mac,
            "mode": self.nic.mode,
            "guest_link": self.guest_link,
            "swaps": self.swaps,
            "last_change": self.fsm.last_change,
        }

