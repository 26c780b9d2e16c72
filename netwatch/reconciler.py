"""The reconciler: routes link, uevent and VM events to the NICs they concern."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from tenacity.wait import wait_base

from . import tasks
from .config import Config
from .links import Link
from .nic import NicController, NicEnv
from .qmp import VmSession

log = logging.getLogger(__name__)


class Reconciler:
    """Owns one VmSession per VM and one NicController task per NIC."""

    def __init__(self, config: Config, env: NicEnv, connect_wait: wait_base | None = None) -> None:
        self.config = config
        self.env = env
        self.connect_wait = connect_wait
        self.vms: dict[str, VmSession] = {}
        self.nics: dict[str, list[NicController]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Reconciler:
        await self._remove_orphans()
        for vm_config in self.config.vms:
            name = vm_config.name
            session = VmSession(name, vm_config.qmp, on_change=functools.partial(self.kick_vm, name),
                                timeout=self.config.settings.qmp_timeout, connect_wait=self.connect_wait)
            self.vms[name] = session
            self.nics[name] = [NicController(name, nic, session, self.env) for nic in vm_config.nics]
        for session in self.vms.values():
            await session.__aenter__()
        for nic in self.all_nics():
            self._tasks.append(asyncio.create_task(nic.run(), name=f"netwatch-nic-{nic.vm_name}-{nic.nic.id}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop(self._tasks)
        for session in self.vms.values():
            await session.__aexit__(None, None, None)

    async def _remove_orphans(self) -> None:
        """Backends recorded by an earlier run for NICs no longer configured."""
        configured = {(vm.name, nic.id) for vm in self.config.vms for nic in vm.nics}
        for record in self.env.records.all():
            if (record.vm, record.nic) in configured:
                continue
            link = self.env.links.get(record.ifindex)
            if link is not None and link.name == record.ifname:
                log.info("removing %s left for %s/%s, which is no longer configured",
                         record.ifname, record.vm, record.nic)
                await self.env.ops.delete(record.ifindex)
            self.env.records.remove(record.vm, record.nic)
            self.env.hooks.submit("down", "stop", record)

    def all_nics(self) -> list[NicController]:
        return [nic for nics in self.nics.values() for nic in nics]

    # -- events in ------------------------------------------------------------

    def kick_vm(self, name: str) -> None:
        for nic in self.nics.get(name, []):
            nic.kick()

    def kick_all(self) -> None:
        for nic in self.all_nics():
            nic.kick()

    def on_link_change(self, old: Link | None, new: Link | None) -> None:
        for nic in self.all_nics():
            if (old is not None and nic.interested(old)) or (new is not None and nic.interested(new)):
                nic.kick()

    def on_uevent(self, action: str, name: str, ifindex: int | None) -> None:
        link = self.env.links.get(ifindex) or self.env.links.named(name)
        if link is None:
            return
        self.on_link_change(None, link)

    # -- what status shows ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        vms = []
        for vm_config in self.config.vms:
            session = self.vms[vm_config.name]
            vms.append({"name": vm_config.name, "qmp": vm_config.qmp, "connected": session.connected,
                        "qemu_pid": session.pid if session.connected else None,
                        "nics": [nic.status() for nic in self.nics[vm_config.name]]})
        return {"vms": vms}
