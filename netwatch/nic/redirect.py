"""Redirect wiring: a tap that never dies, joined to the lower by the kernel.

QEMU opens a persistent tap by name (vnet header, offloads, vhost-net where
there is one) and keeps it for its whole life. On the lower, a macvlan with
the guest's MAC demultiplexes as a macvtap would; two tc ingress filters
(u32 match-all, mirred egress redirect) join the two, one each way. When
the lower goes, only the macvlan goes with it; when it comes back, a new
macvlan is made and the tap's filter replaced in place (a mirred action
whose target unregistered drops every frame). Nothing is sent to QEMU on a
flap but the guest's carrier; the guest's MAC is announced from the host.

The tap, the macvlan and the filters are made, checked and taken apart by
netwatch/nic/tapjoin.py; this keeps the NIC's account of them: its record,
generation and swaps, the earlier run's wiring it adopts, its hooks and
what is said. The NIC controller decides; this acts (netwatch/nic/wiring.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from netwatch import events
from netwatch.config import NicConfig
from netwatch.errors import LinkError, QmpError
from netwatch.host import rarp
from netwatch.host.backends import MacvtapDriver, Placement
from netwatch.host.links import Link, LinkTable
from netwatch.nic import migration
from netwatch.nic.env import NicEnv
from netwatch.nic.guestlink import GuestLink
from netwatch.nic.hookplan import HookPlan
from netwatch.nic.records import NicRecord
from netwatch.nic.tapjoin import TapJoin
from netwatch.qemu.vm import QemuVm
from netwatch.qemu.wiring import QemuSide, vhost_available

log = logging.getLogger(__name__)


class RedirectDriver(MacvtapDriver):
    """Where a redirect NIC's macvlan goes (as a macvtap would) and whether the one it has still works."""

    # The tap's own state is put back by a pass (its filters, its flags).
    own_flags_matter = True

    def broken(self, record: NicRecord, links: LinkTable) -> str | None:
        macvlan = links.get(record.macvlan_ifindex)
        if macvlan is None or macvlan.name != record.macvlan:
            return f"macvlan {record.macvlan} is gone"
        if macvlan.parent != record.lower_ifindex or links.get(record.lower_ifindex) is None:
            return f"lower {record.lower} is gone"
        tap = links.get(record.ifindex)
        if tap is None or tap.name != record.ifname:
            return f"tap {record.ifname} is gone"
        return None


class RedirectWiring:
    """One redirect NIC: its persistent tap, its macvlan and the filters between them."""

    driver = RedirectDriver()

    def __init__(self, vm_name: str, nic: NicConfig, vm: QemuVm, env: NicEnv, hooks: HookPlan,
                 lower_name: Callable[[], str | None]) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.env = env
        self.hooks = hooks
        self.lower_name = lower_name
        self.qemu = QemuSide(vm_name, nic, vm, env.unplug_timeout)
        self.kernel = TapJoin(nic, vm, env)  # the tap and what joins it to the lower
        self.backend: NicRecord | None = None
        self.generation = 0
        self.swaps = 0
        # The guest's carrier, as last set.
        self.guest = GuestLink(vm_name, nic.id, vm, lower_name)
        self._guest = False  # QEMU has the NIC's device, peered with the tap netdev
        self.synced_session = 0
        self.lost_lower: str | None = None
        self.last_attach_seconds: float | None = None

    # -- what the controller asks -------------------------------------------

    def configure(self, nic: NicConfig) -> None:
        self.nic = nic
        self.qemu.nic = nic
        self.qemu.unplug_timeout = self.env.unplug_timeout
        if self.kernel.configure(nic):
            self.synced_session = 0  # another tap: made (or found) on the next pass

    @property
    def guest_present(self) -> bool:
        return self._guest

    def names(self) -> tuple[str, ...]:
        return self.nic.link_names

    def expected(self, old: Link | None, new: Link | None) -> bool:
        return False  # every change of the tap or the macvlan gets a pass

    def matches_config(self, record: NicRecord) -> bool:
        nic = self.nic
        return (record.ifname == nic.ifname and record.backend == nic.backend and record.mac == nic.mac
                and record.mode == nic.mode and record.wiring == nic.wiring and record.queues == nic.queues
                and record.macvlan in nic.macvlan_names)

    async def prepare(self) -> None:
        """The persistent tap, whether or not the VM or the lower is there: QEMU opens it by name at start."""
        if await self.kernel.ensure_tap() and self.backend is None \
                and self.env.records.load(self.vm_name, self.nic.id) is None:
            self._keep_tap_record()

    def _keep_tap_record(self) -> None:
        """Recorded while nothing is joined: the tap is netwatch's, and a later run that finds the NIC gone
        removes it (after a crash as after a clean stop)."""
        nic = self.nic
        self.env.records.save(NicRecord(
            vm=self.vm_name, nic=nic.id, backend=nic.backend, ifname=nic.ifname, ifindex=self.kernel.tap, lower="",
            lower_ifindex=0, tap_netdev=nic.netdev_id, hub_netdev="", generation=max(self.generation, 1),
            mac=nic.mac, mode=nic.mode, bridge=None, qemu_pid=None, swaps=self.swaps,
            guest_pci=str(nic.guest_pci) if nic.guest_pci else None, wiring=nic.wiring, queues=nic.queues,
            configured=False))  # no if-up ran: none is owed

    async def sync(self) -> None:
        """QEMU's view read again: its device is there (hot-added if not); an earlier run's wiring adopted."""
        session = self.vm.session
        await self.prepare()
        if self.vm.monitored:
            network = await self.vm.network()
            device = await self.qemu.find_device(network)
            self._guest = (device is not None and device.peer == self.nic.netdev_id
                           and self.qemu.device_in_place(device))
            if not self._guest:
                await self._add_guest(device is not None)
        # Without a monitor the device is whoever started QEMU's (libvirt's <interface>): nothing to add or set.
        self.guest.forget()
        record = self.backend or self.env.records.load(self.vm_name, self.nic.id)
        if record is not None:
            self.generation, self.swaps = max(self.generation, record.generation), max(self.swaps, record.swaps)
        if record is not None and self._same_qemu(record) and self.matches_config(record) \
                and await self.kernel.joined(record):
            if record.qemu_pid != self.vm.pid:
                # Joined for a QEMU libvirt was about to start: this is it.
                record = replace(record, qemu_pid=self.vm.pid, qemu_start=self.vm.pid_start)
                self.env.records.save(record)
                self.hooks.qemu_known(record)
            if self.backend is None:
                events.emit("attached", f"adopted {record.macvlan} -> {record.ifname} on {record.lower} from an "
                            "earlier run", vm=self.vm_name, nic=self.nic.id, lower=record.lower)
            self.hooks.adopted(record, first=self.backend is None)
            self.backend, self.swaps = record, record.swaps
        else:
            if record is not None and record.macvlan:  # a tap kept with nothing joined had no if-up
                self.hooks.replaced(record, self.matches_config(record))
            await self.kernel.delete_macvlans()
            self.backend = None
            self._keep_tap_record()
        self.synced_session = session

    def _same_qemu(self, record: NicRecord) -> bool:
        """Whether ``record``'s wiring was made for the QEMU there is now (or, without a monitor, for the
        one libvirt was about to start when it was made: QEMU's pid comes with libvirt's started hook)."""
        return record.qemu_pid == self.vm.pid or (not self.vm.monitored and record.qemu_pid is None)

    async def _add_guest(self, stale: bool) -> None:
        """Hot-add the NIC: the tap netdev (QEMU opens the tap by name), then the device at its address."""
        if stale:
            await self.qemu.delete_device()  # another wiring's, or at another address or MAC
        netdev: dict[str, Any] = {"type": "tap", "id": self.nic.netdev_id, "ifname": self.nic.ifname,
                                  "script": "no", "downscript": "no", "vnet_hdr": True}
        if self.nic.queues > 1:
            netdev["queues"] = self.nic.queues
        if vhost_available():
            netdev["vhost"] = True
        await self.qemu.remove("netdev_del", {"id": self.nic.netdev_id})
        await self.vm.execute("netdev_add", netdev)
        try:
            await self.qemu.add_device(self.nic.netdev_id)
        except BaseException:
            with contextlib.suppress(QmpError):
                await self.qemu.remove("netdev_del", {"id": self.nic.netdev_id})
            raise
        self._guest = True
        events.emit("hot-add", f"added NIC {self.nic.id} to the running guest at {self.nic.guest_pci}",
                    vm=self.vm_name, nic=self.nic.id)

    async def set_guest_link(self, up: bool, cause: str) -> None:
        await self.guest.set(up, cause, self._guest)

    async def follow_migration(self) -> None:
        if self.backend is not None:
            self.backend = self.hooks.follow(self.backend)

    # -- joining --------------------------------------------------------------

    def _record(self, name: str, index: int, lower: Link) -> NicRecord:
        nic = self.nic
        return NicRecord(
            vm=self.vm_name, nic=nic.id, backend=nic.backend, ifname=nic.ifname, ifindex=self.kernel.tap,
            lower=lower.name, lower_ifindex=lower.index, tap_netdev=nic.netdev_id, hub_netdev="",
            generation=self.generation, mac=nic.mac, mode=nic.mode, bridge=None, qemu_pid=self.vm.pid,
            swaps=self.swaps, guest_pci=str(nic.guest_pci) if nic.guest_pci else None, qemu_start=self.vm.pid_start,
            wiring=nic.wiring, queues=nic.queues, configured=self.hooks.configured(), phase=self.hooks.phase,
            macvlan=name, macvlan_ifindex=index)

    async def attach(self, placement: Placement) -> None:
        lower = placement.lower
        assert lower is not None
        await self.prepare()
        name = self.nic.macvlan_names[0]
        started = time.monotonic()
        index = await self.kernel.join(name, lower)
        self.last_attach_seconds = round(time.monotonic() - started, 6)
        self.generation, self.swaps = self.generation + 1, self.swaps + 1
        self.backend = self._record(name, index, lower)
        self.env.records.save(self.backend)
        back = self.lost_lower is not None
        self.lost_lower = None
        events.emit("lower-back" if back else "attached",
                    f"{name} (ifindex {index}) on {lower.name} joined to tap {self.nic.ifname}",
                    vm=self.vm_name, nic=self.nic.id, lower=lower.name, netdev=self.nic.netdev_id, ifindex=index)
        self.hooks.up(self.hooks.attach_context(), self.backend)
        self._announce(name)

    async def swap(self, placement: Placement, cause: str) -> None:
        """Rebind: the old macvlan is cut before the new one passes a frame, so nothing crosses between lowers."""
        old = self.backend
        lower = placement.lower
        assert old is not None and lower is not None
        name = next(n for n in self.nic.macvlan_names if n != old.macvlan)
        started = time.monotonic()
        index = await self.kernel.join(name, lower, cut=old)
        self.last_attach_seconds = round(time.monotonic() - started, 6)
        self.generation, self.swaps = self.generation + 1, self.swaps + 1
        new = self._record(name, index, lower)
        self.backend = new
        self.env.records.save(new)
        self._announce(name)
        self.hooks.down("rebind", old)
        self.hooks.up("rebind", new)
        events.emit("rebind", f"{cause}: {old.macvlan} on {old.lower} -> {name} on {lower.name}", vm=self.vm_name,
                    nic=self.nic.id, lower=lower.name, netdev=self.nic.netdev_id, previous=old.lower)

    def _announce(self, macvlan: str) -> None:
        """The guest's MAC announced from the host on ``macvlan``, only where the guest runs.

        On a migration's target before the guest arrives (QEMU inmigrate, or
        paused after receiving it), or on its source after it left, switches
        would learn the guest on a host it is not running on and send its
        traffic there until it speaks again. The guest's arrival is announced
        by QEMU (and by netwatch's announce-self when the phase ends).

        With the VM's monitor, QEMU announces (the frames take the guest's own
        path: tap, filter, macvlan); without one, netwatch sends the same RARP
        rounds itself, which needs a packet socket (units/netwatch-redirect.conf).
        """
        if self.hooks.phase != migration.NONE:
            return
        nic_id, mac = self.nic.id, self.nic.mac
        if self.vm.connected:
            self.guest.announce_when_up(lambda: self.vm.announce(nic_id), from_guest=True)
        else:
            self.guest.announce_when_up(lambda: rarp.announce(macvlan, mac), from_guest=False)

    async def maintain(self, placement: Placement) -> None:
        """Put back what something else took away: the filters (libvirt's <bandwidth> deletes the qdisc)."""
        backend = self.backend
        assert backend is not None
        restored = await self.kernel.repair(backend)
        if restored:
            events.emit("filters-restored", f"the redirect filter of {' and '.join(restored)} was gone or changed: "
                        "made again", vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    async def detach(self, cause: str, context: str) -> None:
        backend = self.backend
        assert backend is not None
        await self.set_guest_link(False, cause)
        await self.kernel.delete_macvlan(backend.macvlan, strict=False)  # the tap's filter: replaced at the next join
        self.backend = None
        self._keep_tap_record()
        if context == "lower-lost":
            self.lost_lower = backend.lower
        self.hooks.down(context, backend)
        events.emit("lower-lost" if context == "lower-lost" else "detached",
                    f"{backend.macvlan} removed: {cause}", vm=self.vm_name, nic=self.nic.id, lower=backend.lower)

    # -- taken away -------------------------------------------------------------

    async def vm_gone(self) -> None:
        """QEMU is gone: the tap stays (the next QEMU opens it), the macvlan goes until QEMU is back."""
        self.guest.forget()
        self.synced_session = 0
        self._guest = False
        if self.vm.qemu_alive():
            return
        backend = self.backend or self.env.records.load(self.vm_name, self.nic.id)
        if backend is None or not backend.macvlan:
            return
        self.backend = None
        await self.kernel.delete_macvlan(backend.macvlan, strict=False)
        if self.kernel.tap_index is not None:
            self._keep_tap_record()
        else:
            self.env.records.remove(self.vm_name, self.nic.id)
        self.hooks.gone(backend)
        events.emit("detached", f"{backend.macvlan} removed: QEMU exited", vm=self.vm_name, nic=self.nic.id,
                    lower=backend.lower)

    async def hot_remove(self) -> None:
        """The NIC left the config of a running VM: its device leaves the guest, then the tap and macvlan go."""
        if self.vm.connected:
            if self.synced_session != self.vm.session:
                await self.sync()
            if self._guest:
                await self.qemu.delete_device()
                self._guest = False
            await self.qemu.remove("netdev_del", {"id": self.nic.netdev_id})
        backend = self.backend
        await self.remove(context="hot-remove")
        events.emit("hot-remove", f"NIC {self.nic.id} removed from the running guest: it is no longer configured",
                    vm=self.vm_name, nic=self.nic.id, lower=backend.lower if backend else None)

    async def remove(self, context: str | None = None) -> None:
        """The NIC left the config: its macvlan and its tap go (a tap QEMU still holds is left, said once)."""
        backend, self.backend = self.backend, None
        await self.kernel.delete_macvlans(strict=False)
        try:
            await self.kernel.delete_tap()
        except LinkError as exc:
            # QEMU still holds it: its record stays, and a later start removes it once QEMU let go.
            log.warning("%s/%s: tap %s stays: %s", self.vm_name, self.nic.id, self.nic.ifname, exc)
            self._keep_tap_record()
        else:
            self.env.records.remove(self.vm_name, self.nic.id)
        if backend is not None:
            if context is None:
                self.hooks.gone(backend)
            else:
                self.hooks.down(context, backend)

    # -- what it reports ----------------------------------------------------------

    def report(self) -> dict[str, Any]:
        backend = self.backend
        return {
            "ifname": self.nic.ifname,
            "ifindex": self.kernel.tap_index,
            "netdev": self.nic.netdev_id,
            "hub_netdev": None,
            "hub": None,
            "macvlan": backend.macvlan if backend else None,
            "macvlan_ifindex": backend.macvlan_ifindex if backend else None,
            "guest_present": self._guest,
            "guest_link": self.guest.state,
            "configured": backend.configured if backend else False,
            "swaps": self.swaps,
            "last_attach_seconds": self.last_attach_seconds,
            "generation": self.generation,
        }
