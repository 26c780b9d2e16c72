"""A reload, worked out before anything changes: what differs between the running configuration and a new one.

The Reconciler applies it (removing, adding and updating VMs and NICs);
what is worked out here changes nothing, so ``netwatch reload --plan``
(Reconciler.plan) and the reload itself cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from netwatch.config import Config, GuestPci, VmConfig, assign_slots, parse_guest_pci
from netwatch.errors import ConfigError
from netwatch.nic.controller import NicController
from netwatch.nic.records import RecordStore

# Running NICs by VM name and NIC id: the Reconciler's, read only.
Running = Mapping[str, Mapping[str, NicController]]

# What only a restart can change.
RESTART_SETTINGS = ("state_dir", "udev", "control_group", "device_dir")


class GuestSlots:
    """Where each NIC sits in its guest, kept: a NIC with no guest_pci in the file keeps the slot it has now."""

    def __init__(self, running: Running, records: RecordStore) -> None:
        self.running = running
        self.records = records

    def keep(self, vm: VmConfig, path: str) -> VmConfig:
        """``vm`` with each NIC that has no guest_pci in the file (at ``path``) at the slot it has now.

        A default slot follows the NIC's place in the file: removing a NIC
        would move the ones after it. A NIC keeps the slot its running
        controller (or, after a restart, its runtime record) has; only new
        NICs take free default slots.
        """
        kept: dict[str, GuestPci] = {}
        running = self.running.get(vm.name, {})
        for nic in vm.nics:
            controller = running.get(nic.id)
            if controller is not None and controller.nic.guest_pci is not None:
                kept[nic.id] = controller.nic.guest_pci
            elif controller is None and (record := self.records.load(vm.name, nic.id)) is not None:
                slot = parse_guest_pci(record.guest_pci)
                if slot is not None:
                    kept[nic.id] = slot
        nics, short = assign_slots(list(vm.nics), kept)
        if short:
            raise ConfigError([f"{path}: vm '{vm.name}' nic '{nic_id}': key 'guest_pci': is required: "
                               "the default slots are taken by the VM's running NICs" for nic_id in short])
        return replace(vm, nics=tuple(nics))


class ConfigChange:
    """From the running configuration ``old`` (with its ``running`` NICs) to ``new``: nothing is changed here."""

    def __init__(self, old: Config, new: Config, running: Running, slots: GuestSlots) -> None:
        self.old = old
        self.new = new
        self.running = running
        self.slots = slots

    def refused(self) -> list[str]:
        """The settings ``new`` changes that only a restart can."""
        return [f"{self.new.path}: key '{key}': cannot change while netwatch runs (restart it)"
                for key in RESTART_SETTINGS
                if getattr(self.old.settings, key) != getattr(self.new.settings, key)]

    @staticmethod
    def same_vm(old: VmConfig | None, new: VmConfig | None) -> bool:
        """Whether a reload keeps the VM's session (else the VM is removed and added anew)."""
        return (old is not None and new is not None
                and (old.qmp, old.identity, old.machine) == (new.qmp, new.identity, new.machine))

    def vms(self) -> dict[str, VmConfig]:
        """``new``'s VMs by name, each kept one with its NICs at the slots they have (ConfigError if that cannot be)."""
        old_vms = {vm.name: vm for vm in self.old.vms}
        return {vm.name: self.slots.keep(vm, self.old.path) if self.same_vm(old_vms.get(vm.name), vm) else vm
                for vm in self.new.vms}

    def removed(self, new_vms: Mapping[str, VmConfig]) -> list[str]:
        """The running VMs whose session goes: gone from ``new_vms``, or with another qmp, identity or machine."""
        old_vms = {vm.name: vm for vm in self.old.vms}
        return [name for name, vm in old_vms.items() if not self.same_vm(vm, new_vms.get(name))]

    def steps(self) -> list[dict[str, str]]:
        """What a reload to ``new`` would do, one step per VM or NIC."""
        steps: list[dict[str, str]] = []
        old_vms = {vm.name: vm for vm in self.old.vms}
        for name, vm in old_vms.items():
            if not self.same_vm(vm, self.new.vm(name)):
                steps.append({"vm": name, "nic": "", "action": "remove-vm",
                              "why": "gone from the config" if self.new.vm(name) is None
                              else "its qmp, identity or machine changed"})
        for vm in self.new.vms:
            if not self.same_vm(old_vms.get(vm.name), vm):
                steps.append({"vm": vm.name, "nic": "", "action": "add-vm", "why": "new in the config"})
                continue
            running = self.running.get(vm.name, {})
            kept = self.slots.keep(vm, self.old.path)
            wanted = {nic.id: nic for nic in kept.nics}
            for nic_id, leaving in running.items():
                if nic_id not in wanted:
                    steps.append({"vm": vm.name, "nic": nic_id, "action": "hot-remove",
                                  "why": f"gone from the config; device_del at {leaving.nic.guest_pci}"})
            for nic_id, nic in wanted.items():
                controller = running.get(nic_id)
                if controller is None:
                    steps.append({"vm": vm.name, "nic": nic_id, "action": "hot-add",
                                  "why": f"new in the config; {nic.wiring} wiring at {nic.guest_pci}"})
                elif (step := controller.plan(nic)) is not None:
                    steps.append({"vm": vm.name, "nic": nic_id, **step})
        return steps
