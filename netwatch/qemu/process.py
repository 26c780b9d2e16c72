"""The QEMU process serving one VM: which it is, whether it still runs, and its claim.

Both kinds of VM have one: a monitored VM's is the peer of its QMP
connection, an unmonitored one's is the pid libvirt's hook gives. A pid
with its start time names one process for good; a pidfd tells of its exit
without polling and cannot be fooled by pid reuse. Which VM each QEMU is,
is shared by all VMs (peer.py's QemuClaims): one QEMU serves one VM while
it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
from collections.abc import Callable

from netwatch.errors import NetwatchError
from netwatch.qemu.peer import Claims, Identity, Peer, QemuClaims, peer_problem, start_time, still_runs

log = logging.getLogger(__name__)


class QemuProcess:
    """One VM's QEMU process: pid, start time, a pidfd reporting its exit, and the VM's claims on QEMUs."""

    def __init__(self, vm: str, on_exit: Callable[[], None], peers: QemuClaims | None = None,
                 recorded: Callable[[], list[tuple[int, int | None]]] | None = None) -> None:
        self.vm = vm
        self.on_exit = on_exit
        # Which VM each QEMU process is, shared by all VMs.
        self.peers = peers if peers is not None else QemuClaims()
        # (pid, start time) of the QEMUs the runtime records say served this VM.
        self.recorded = recorded or list
        self.pid: int | None = None
        self.start: int | None = None
        self._pidfd: int | None = None

    def is_(self, pid: int) -> bool:
        """Whether ``pid`` is the process followed now (the same pid and start time)."""
        return pid == self.pid and start_time(pid) == self.start

    def follow(self, pid: int) -> None:
        """Take ``pid`` as the VM's QEMU: its start time now, and its exit reported to ``on_exit``."""
        self.unwatch()
        self.pid, self.start = pid, start_time(pid)
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as exc:
            log.warning("%s: cannot watch QEMU pid %s: %s", self.vm, pid, exc)
            return
        # Its exit may come after the QMP socket closed: report it too.
        asyncio.get_running_loop().add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        # The pidfd stays open until unwatch: alive() keeps telling that it exited.
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
        self.on_exit()

    def alive(self) -> bool:
        """Whether the QEMU followed still runs, as its pidfd tells (False if none is watched).

        A pidfd becomes readable when its process exits, zombie or not, and
        cannot be fooled by pid reuse.
        """
        if self._pidfd is None:
            return False
        # poll, not select: select() cannot watch an fd numbered 1024 or more.
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def runs(self) -> bool:
        """Whether the QEMU followed still runs, as /proc tells by its pid and start time."""
        return self.pid is not None and still_runs(self.pid, self.start)

    def unwatch(self) -> None:
        """Stop watching the pidfd (the pid and start time stay)."""
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def forget(self) -> None:
        """The QEMU is gone: none is followed any more."""
        self.unwatch()
        self.pid = self.start = None

    # -- claims ---------------------------------------------------------------

    def other_vm(self, pid: int) -> str | None:
        """The other VM whose QEMU ``pid`` is, or None."""
        return self.peers.other_than(pid, self.vm)

    def claim(self, pid: int) -> None:
        """``pid`` is this VM's QEMU until it exits (the claim outlives any session)."""
        self.peers.claim(pid, self.vm)

    def refusal(self, peer: Peer | None, path: str, identity: Identity) -> str | None:
        """Why ``peer`` on ``path`` is not provably this VM's QEMU, or None (peer.py has the reasoning; the UUID
        is asked apart, over QMP)."""
        try:
            recorded = self.recorded()
        except NetwatchError as exc:
            return f"its runtime records cannot be read ({exc})"
        return peer_problem(peer, path, identity,
                            Claims(self.vm, self.peers, self.pid, self.pid is not None and self.alive(), recorded))
