"""An admin's rebind (`netwatch rebind VM NIC LOWER`): the NIC moved to another lower now, make-before-break
where its wiring can, until the next reload or restart returns it to its config.

Requests wait on the NIC and its own task serves them between two passes,
never in the middle of one: a rebind and a reattach never race over the
same backend. A request that cannot be done leaves the NIC where it was and
says so in one sentence (BadRebind for a target that is not a usable lower).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from netwatch.config import LowerSpec, ifname_problem
from netwatch.errors import BadRequest, NetwatchError
from netwatch.host.links import IFF_LOOPBACK
from netwatch.nic.env import NicEnv
from netwatch.nic.lowers import LowerChoice
from netwatch.nic.wiring import NicWiring
from netwatch.qemu.vm import QemuVm


class RebindError(NetwatchError):
    """A rebind could not be done; the NIC kept its path."""


class BadRebind(RebindError, BadRequest):
    """A rebind to something that is not a usable lower."""


class Rebinds:
    """One NIC's rebind requests: taken from the control socket, served by the NIC's task."""

    def __init__(self, vm_name: str, vm: QemuVm, env: NicEnv, lowers: LowerChoice, wiring: NicWiring,
                 kick: Callable[[], None], interest_changed: Callable[[], None]) -> None:
        self.vm_name, self.vm, self.env, self.lowers, self.wiring = vm_name, vm, env, lowers, wiring
        self.kick, self.interest_changed = kick, interest_changed
        self._requests: list[tuple[LowerSpec, asyncio.Future[dict[str, Any]]]] = []

    def name(self) -> str:
        return f"{self.vm_name}/{self.wiring.nic.id}"

    async def request(self, lower: str) -> dict[str, Any]:
        """Ask for the NIC on ``lower``; its status once it is there (or the error that kept it)."""
        why = ifname_problem(lower)
        if why:
            raise BadRebind(f"'{lower}' {why}")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests.append((LowerSpec(name=lower), future))
        self.kick()
        return await future

    async def serve(self, retiring: bool, status: Callable[[], dict[str, Any]]) -> None:
        """Every waiting request, in order (the NIC's task, between passes)."""
        while self._requests:
            spec, future = self._requests.pop(0)
            if retiring:
                future.set_exception(RebindError(f"{self.name()} is being removed"))
                continue
            try:
                await self._move(spec)
            except NetwatchError as exc:
                current = self.wiring.backend.lower if self.wiring.backend else "no lower"
                kind = BadRebind if isinstance(exc, BadRequest) else RebindError
                if not future.done():
                    future.set_exception(kind(f"cannot rebind {self.name()} to {spec.name or '?'}: {exc}; "
                                              f"it stays on {current}"))
                continue
            if not future.done():
                future.set_result(status())

    async def _move(self, spec: LowerSpec) -> None:
        if not self.vm.present:
            raise RebindError(f"QEMU of {self.vm_name} is not connected" if self.vm.monitored
                              else f"libvirt domain {self.vm.identity.libvirt_domain} is not running")
        target = self.lowers.target(spec)
        if target is None:
            raise BadRebind(f"there is no link named {spec.name}")
        if target.name in self.env.own_links() | set(self.wiring.names()):
            raise BadRebind(f"{target.name} is a netwatch backend")
        if target.flags & IFF_LOOPBACK:
            raise BadRebind(f"{target.name} is a loopback device")
        backend = self.wiring.backend
        previous, self.lowers.override = self.lowers.override, spec
        self.interest_changed()
        try:
            if backend is None or backend.lower_ifindex == target.index:
                return  # the next pass attaches it there, or it is there already
            driver = self.wiring.driver
            placement = driver.place(self.wiring.nic, target, self.env.links)
            if driver.moves_by_swap:
                await self.wiring.swap(placement, f"rebind to {target.name} requested")
            else:
                await self.wiring.maintain(placement)
        except BaseException:
            self.lowers.override = previous
            raise
