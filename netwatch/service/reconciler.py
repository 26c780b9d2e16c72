"""The reconciler: routes link, uevent and VM events to the NICs they concern,
and applies a new configuration as a difference (worked out by configchange.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from typing import Any

from tenacity.wait import wait_base

from netwatch import events, tasks
from netwatch.config import Config, VmConfig
from netwatch.errors import BadRequest, ConfigError, LinkError
from netwatch.host.backends import made_by_netwatch
from netwatch.host.links import Link
from netwatch.nic import migration
from netwatch.nic.controller import NicController
from netwatch.nic.env import NicEnv
from netwatch.nic.records import NicRecord
from netwatch.qemu.announce import AnnounceGate
from netwatch.qemu.peer import QemuClaims
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.unmonitored import LibvirtEvent, UnmonitoredVm
from netwatch.service.configchange import ConfigChange, GuestSlots
from netwatch.service.domains import LibvirtDomains

log = logging.getLogger(__name__)


class UnknownTarget(BadRequest):
    """A request named a VM or NIC that is not configured."""


class Reconciler:
    """Owns one VmSession per VM and one NicController task per NIC.

    What a reload changes is a ConfigChange's to work out (configchange.py);
    which VMs libvirt's hook concerns is LibvirtDomains' (domains.py).
    """

    def __init__(self, config: Config, env: NicEnv, connect_wait: wait_base | None = None) -> None:
        self.config = config
        self.env = env
        self.connect_wait = connect_wait
        self.vms: dict[str, VmSession | UnmonitoredVm] = {}
        self.nics: dict[str, dict[str, NicController]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Which NICs care about which link names, MACs and ifindexes: events
        # are routed by lookup, not by asking every NIC.
        self._interest: dict[tuple[str, object], set[NicController]] = {}
        self._keys: dict[NicController, set[tuple[str, object]]] = {}
        self._own_links: set[str] | None = None
        # Which VM each running QEMU is (admitted, or in the records): one QEMU never serves two VMs.
        self._peers = QemuClaims()
        self._announce_gate = AnnounceGate()
        self._slots = GuestSlots(self.nics, env.records)
        self._domains = LibvirtDomains(self.vms, self.nics, env.links)
        env.own_links = self.own_links
        env.on_interest_change = self.update_interest

    async def __aenter__(self) -> Reconciler:
        # Before any session, and before orphans' records go: a QEMU an
        # earlier run served to a VM is that VM's while it runs.
        for record in self.env.records.all():
            if record.qemu_pid is not None:
                self._peers.recorded(record.qemu_pid, record.qemu_start, record.vm)
        await self._remove_orphans()
        for vm_config in self.config.vms:
            await self._add_vm(vm_config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop(list(self._tasks.values()))
        self._tasks.clear()
        for session in self.vms.values():
            await session.__aexit__(None, None, None)
        await self._announce_gate.close()

    async def _remove_orphans(self) -> None:
        """Backends recorded by an earlier run for NICs no longer configured."""
        configured = {(vm.name, nic.id) for vm in self.config.vms for nic in vm.nics}
        for record in self.env.records.all():
            if (record.vm, record.nic) in configured:
                continue
            if record.wiring == "redirect":
                await self._remove_redirect_orphan(record)
                continue
            link = self.env.links.get(record.ifindex)
            if link is not None and link.name == record.ifname and made_by_netwatch(link, record.backend, record.mac):
                log.info("removing %s left for %s/%s, which is no longer configured",
                         record.ifname, record.vm, record.nic)
                await self.env.ops.delete(record.ifindex)
            elif link is not None and link.name == record.ifname:
                log.warning("not removing %s: the record of %s/%s names it, but it is not the %s netwatch made",
                            record.ifname, record.vm, record.nic, record.backend)
            self.env.records.remove(record.vm, record.nic)
            if record.configured:  # a routed tap deferred or deconfigured by a migration owes none
                self.env.hooks.submit("down", migration.down_context(record.phase), record)

    async def _remove_redirect_orphan(self, record: NicRecord) -> None:
        """A redirect NIC no longer configured: its macvlan and persistent tap, each only when it proves netwatch's."""
        macvlan = self.env.links.get(record.macvlan_ifindex)
        if macvlan is not None and macvlan.name == record.macvlan and macvlan.kind == "macvlan" \
                and macvlan.mac == record.mac:
            await self.env.ops.delete(macvlan.index)
        try:
            if await self.env.ops.delete_tap(record.ifname, record.mac):
                log.info("removed tap %s left for %s/%s, which is no longer configured", record.ifname, record.vm,
                         record.nic)
        except LinkError as exc:
            log.warning("not removing tap %s of %s/%s: %s", record.ifname, record.vm, record.nic, exc)
        self.env.records.remove(record.vm, record.nic)
        if record.configured:
            self.env.hooks.submit("down", migration.down_context(record.phase), record)

    # -- VMs and NICs come and go ---------------------------------------------

    async def _add_vm(self, vm_config: VmConfig) -> None:
        name = vm_config.name
        session: VmSession | UnmonitoredVm
        if vm_config.qmp is None:
            session = UnmonitoredVm(name, on_change=functools.partial(self.kick_vm, name),
                                    identity=vm_config.identity, peers=self._peers,
                                    recorded=functools.partial(self._recorded_qemus, vm_config),
                                    machine=vm_config.machine)
        else:
            session = VmSession(name, vm_config.qmp, on_change=functools.partial(self.kick_vm, name),
                                timeout=self.config.settings.qmp_timeout, connect_wait=self.connect_wait,
                                identity=vm_config.identity, peers=self._peers,
                                recorded=functools.partial(self._recorded_qemus, vm_config),
                                machine=vm_config.machine, announce_gate=self._announce_gate)
        self.vms[name] = session
        self.nics[name] = {}
        await session.__aenter__()
        for nic in self._slots.keep(vm_config, self.config.path).nics:
            self._add_nic(name, NicController(name, nic, session, self.env))

    def _recorded_qemus(self, vm_config: VmConfig) -> list[tuple[int, int | None]]:
        records = (self.env.records.load(vm_config.name, nic.id) for nic in vm_config.nics)
        return [(record.qemu_pid, record.qemu_start) for record in records
                if record is not None and record.qemu_pid is not None]

    def _add_nic(self, vm: str, controller: NicController) -> None:
        self.nics[vm][controller.nic.id] = controller
        self._own_links = None
        self.update_interest(controller)
        self._tasks[(vm, controller.nic.id)] = asyncio.create_task(
            controller.run(), name=f"netwatch-nic-{vm}-{controller.nic.id}")

    async def _remove_nic(self, vm: str, nic_id: str) -> None:
        controller = self.nics[vm].pop(nic_id)
        await tasks.stop([self._tasks.pop((vm, nic_id))])
        await controller.remove()
        self.env.hooks.failures.pop((vm, nic_id), None)
        self._own_links = None
        self._set_interest(controller, set())

    def _retire_nic(self, vm: str, nic_id: str) -> None:
        """Hot-remove: the NIC's own task takes it out of the guest, then it is dropped."""
        controller = self.nics[vm][nic_id]
        controller.retire()
        task = self._tasks[(vm, nic_id)]

        def retired(done: asyncio.Task[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                return  # stopped with the service, or reported by tasks.watch
            if self.nics.get(vm, {}).get(nic_id) is controller and controller.retiring:
                del self.nics[vm][nic_id]
                self._tasks.pop((vm, nic_id), None)
                self.env.hooks.failures.pop((vm, nic_id), None)
                self._own_links = None
                self._set_interest(controller, set())
                self.env.on_state_change and self.env.on_state_change()

        task.add_done_callback(retired)

    async def _remove_vm(self, vm: str) -> None:
        for nic_id in list(self.nics[vm]):
            await self._remove_nic(vm, nic_id)
        del self.nics[vm]
        await self.vms.pop(vm).__aexit__(None, None, None)

    async def reload(self, new: Config) -> dict[str, Any]:
        """Apply ``new`` as a difference; refuse what only a restart can change."""
        change = self._change(new)
        refused = change.refused()
        if refused:
            raise ConfigError(refused)
        summary: Counter[str] = Counter()
        new_vms = change.vms()
        self.config = new
        self.env.hooks.hooks_dir = new.settings.hooks_dir
        self.env.hooks.timeout = new.settings.hook_timeout
        self.env.unplug_timeout = new.settings.unplug_timeout
        self.env.migration_handover = new.settings.migration_handover
        for name in change.removed(new_vms):
            await self._remove_vm(name)
            summary["VMs removed"] += 1
        for name, vm in new_vms.items():
            if name not in self.vms:
                await self._add_vm(vm)
                summary["VMs added"] += 1
                continue
            session = self.vms[name]
            if isinstance(session, VmSession):
                session.timeout = new.settings.qmp_timeout
            wanted = {nic.id: nic for nic in vm.nics}
            for nic_id, leaving in list(self.nics[name].items()):
                if nic_id not in wanted and not leaving.retiring:
                    self._retire_nic(name, nic_id)
                    summary["NICs hot-removed"] += 1
            for nic_id, nic in wanted.items():
                controller = self.nics[name].get(nic_id)
                if controller is None:
                    self._add_nic(name, NicController(name, nic, session, self.env, hot_added=session.connected))
                    summary["NICs hot-added"] += 1
                else:
                    if controller.nic != nic or controller.lowers.override is not None or controller.retiring:
                        summary["NICs changed"] += 1
                    controller.update_config(nic)
        self._own_links = None
        text = ", ".join(f"{count} {what}" for what, count in sorted(summary.items())) or "nothing changed"
        events.emit("service", f"configuration reloaded from {new.path}: {text}")
        return {"changes": dict(summary), "summary": text}

    def _change(self, new: Config) -> ConfigChange:
        return ConfigChange(self.config, new, self.nics, self._slots)

    def refused_settings(self, new: Config) -> list[str]:
        return self._change(new).refused()

    def plan(self, new: Config) -> list[dict[str, str]]:
        """What a reload to ``new`` would do, one step per VM or NIC; nothing is changed."""
        return self._change(new).steps()

    # -- events in ------------------------------------------------------------

    def all_nics(self) -> list[NicController]:
        return [nic for nics in self.nics.values() for nic in nics.values()]

    def own_links(self) -> set[str]:
        if self._own_links is None:
            self._own_links = {name for nic in self.all_nics() for name in nic.nic.link_names}
            for nic in self.all_nics():
                if nic.pending_config is not None:
                    self._own_links.update(nic.pending_config.link_names)
        return self._own_links

    def update_interest(self, nic: NicController) -> None:
        self._set_interest(nic, nic.interest())

    def _set_interest(self, nic: NicController, keys: set[tuple[str, object]]) -> None:
        old = self._keys.get(nic, set())
        if keys == old:
            return
        for key in old - keys:
            holders = self._interest.get(key)
            if holders is not None:
                holders.discard(nic)
                if not holders:
                    del self._interest[key]
        for key in keys - old:
            self._interest.setdefault(key, set()).add(nic)
        if keys:
            self._keys[nic] = keys
        else:
            self._keys.pop(nic, None)

    def kick_vm(self, name: str) -> None:
        for nic in self.nics.get(name, {}).values():
            nic.kick()

    def kick_all(self) -> None:
        for nic in self.all_nics():
            nic.kick()

    def on_link_change(self, old: Link | None, new: Link | None) -> None:
        concerned: set[NicController] = set(self._interest.get(("any", None), ()))
        for link in (old, new):
            if link is not None:
                for key in (("name", link.name), ("index", link.index), ("mac", link.mac)):
                    concerned.update(self._interest.get(key, ()))
        for nic in concerned:
            if not nic.expected(old, new):
                nic.kick()

    def on_uevent(self, action: str, name: str, ifindex: int | None) -> None:
        link = self.env.links.get(ifindex) or self.env.links.named(name)
        if link is None:
            return
        self.on_link_change(None, link)

    async def settled(self) -> None:
        """Every NIC has made its first pass (after its VM's first connection attempt)."""
        for nic in self.all_nics():
            await nic.first_pass.wait()

    # -- requests -------------------------------------------------------------

    async def taps_ready(self, vms: list[str], timeout: float) -> list[str]:
        """Wait (at most ``timeout`` s) until the taps QEMU opens by name for ``vms`` are there; what is not."""
        return await self._domains.taps_ready(vms, timeout)

    def nic(self, vm: str, nic: str) -> NicController:
        if vm not in self.nics:
            raise UnknownTarget(f"no VM named '{vm}' is configured")
        if nic not in self.nics[vm]:
            raise UnknownTarget(f"VM '{vm}' has no NIC '{nic}'")
        return self.nics[vm][nic]

    # -- what status shows ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        # What runs, not what the config says: during a reload the two differ.
        vms = []
        for name, session in self.vms.items():
            vm: dict[str, Any] = {
                "name": name, "qmp": session.path, "connected": session.connected,
                "qemu_pid": session.pid if session.connected else None, "refused": session.refused,
                "run_state": session.run_state, "incoming": session.runstate.incoming,
                "qmp_errors": session.errors, "run_state_flood": session.runstate.flooding, "monitor": True}
            if isinstance(session, UnmonitoredVm):
                vm.update(session.report())
            vm["nics"] = [nic.status() for nic in self.nics.get(name, {}).values()]
            vms.append(vm)
        return {"vms": vms}

    def libvirt_event(self, event: LibvirtEvent) -> dict[str, Any]:
        """One call of libvirt's qemu hook: the VMs whose ``libvirt_domain`` it names follow it."""
        return self._domains.follow(event, self.config)

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        states = Counter(nic.fsm.state.value for nic in self.all_nics())
        connected = sum(1 for session in self.vms.values() if session.connected)
        waiting = states["waiting-vm"] + states["waiting-lower"] + states["attaching"]
        return (f"{len(self.vms)} VMs ({connected} connected), {sum(states.values())} NICs: "
                f"{states['attached']} attached, {waiting} waiting, {states['failed']} failed")
