"""What a NIC knows of its VM's QEMU: the one interface both kinds of VM give.

A VM with netwatch's monitor (``qmp`` set) is a :class:`~netwatch.qemu.qmp.VmSession`:
QMP says when QEMU runs, in which run state, and takes commands. A VM
without one (:class:`~netwatch.qemu.unmonitored.UnmonitoredVm`, every NIC
redirect-wired: QEMU opens its taps by name) learns of its QEMU from
libvirt's hook, or not at all; it takes no commands.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from netwatch.qemu.peer import Identity
from netwatch.qemu.qmp import NetworkInfo
from netwatch.qemu.runstate import RunStateWatch


class QemuVm(Protocol):
    name: str
    machine: str
    identity: Identity
    runstate: RunStateWatch
    first_attempt: asyncio.Event

    @property
    def monitored(self) -> bool:
        """Whether netwatch has this VM's monitor (QMP commands, carrier, hot-add)."""

    @property
    def connected(self) -> bool:
        """Whether the monitor is connected now (never, for a VM without one)."""

    @property
    def present(self) -> bool:
        """Whether the VM's QEMU runs, or is about to start, as far as netwatch can tell."""

    @property
    def session(self) -> int:
        """Counts the QEMUs (or QMP sessions) seen: a new one means QEMU's view is to be read again."""

    @property
    def pid(self) -> int | None: ...

    @property
    def pid_start(self) -> int | None: ...

    @property
    def refused(self) -> str | None:
        """Why the last QEMU that claimed to be this VM's was refused (None: none was)."""

    @property
    def last_error(self) -> str | None: ...

    @property
    def run_state(self) -> str | None: ...

    def qemu_alive(self) -> bool: ...

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    async def pass_fd(self, fd: int, fdname: str) -> None: ...

    def announce(self, nic: str) -> None: ...

    async def network(self) -> NetworkInfo: ...

    def expect_deleted(self, device: str) -> asyncio.Future[None]: ...

    def forget_deleted(self, device: str, waiter: asyncio.Future[None]) -> None: ...
