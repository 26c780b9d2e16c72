"""libvirt's qemu hook, routed: each call to the running VMs whose ``libvirt_domain`` it names.

The hook command (libvirthook.py) passes each call over the control
socket; what a VM does with it is netwatch/qemu/unmonitored.py's. A VM
with netwatch's monitor only has the call's UUID checked: its monitor says
what its QEMU does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from netwatch import events
from netwatch.config import Config
from netwatch.host.links import LinkTable
from netwatch.nic.controller import NicController
from netwatch.qemu.qmp import VmSession
from netwatch.qemu.unmonitored import LibvirtEvent, UnmonitoredVm


class LibvirtDomains:
    """Routes libvirt's hook calls to the running VMs (``vms``, with their ``nics``) of the domain they name."""

    def __init__(self, vms: Mapping[str, VmSession | UnmonitoredVm], nics: Mapping[str, Mapping[str, NicController]],
                 links: LinkTable) -> None:
        self.vms = vms
        self.nics = nics
        self.links = links

    def follow(self, event: LibvirtEvent, config: Config) -> dict[str, Any]:
        """One call of libvirt's qemu hook: the VMs whose ``libvirt_domain`` in ``config`` it names follow it.

        The answer comes once those VMs' NICs have had a pass: at ``prepare``
        the hook (and libvirt) wait for the taps QEMU is about to open.
        """
        followed, refused = [], []
        for name, session in self.vms.items():
            vm = config.vm(name)
            if vm is None or vm.libvirt_domain != event.domain:
                continue
            if vm.uuid is not None and event.uuid is not None and vm.uuid != event.uuid.lower():
                why = f"the domain's UUID is {event.uuid}, not {vm.uuid} as the config says"
                events.emit("error", f"libvirt domain {event.domain}: its {event.op} hook is not for VM {name}: "
                            f"{why}", vm=name)
                refused.append(f"{name}: {why}")
                continue
            if not isinstance(session, UnmonitoredVm):
                continue  # its monitor says what its QEMU does
            problem = session.libvirt(event)
            if problem is not None:
                refused.append(f"{name}: {problem}")
            else:
                followed.append(name)
        return {"vms": followed, "refused": refused}

    async def taps_ready(self, vms: list[str], timeout: float) -> list[str]:
        """Wait (at most ``timeout`` s) until the taps QEMU opens by name for ``vms`` are there; what is not."""
        def missing() -> list[NicController]:
            return [nic for vm in vms for nic in self.nics.get(vm, {}).values()
                    if nic.nic.wiring == "redirect" and self.links.named(nic.nic.ifname) is None]
        waiters = [nic.next_pass() for nic in missing()]
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)
        return [f"{nic.vm_name}/{nic.nic.id}: tap {nic.nic.ifname} is not there ({nic.fsm.cause})"
                for nic in missing()]
