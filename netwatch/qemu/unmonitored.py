"""A VM netwatch has no monitor for: its QEMU known from libvirt, or not at all.

Every NIC of such a VM is redirect-wired: QEMU (started by libvirt, say)
opens each persistent tap by name, and netwatch keeps it joined to its
lower in the kernel. Nothing is ever sent to QEMU, so the guest's carrier
does not follow the lower and no NIC is hot-added; everything else works.

What netwatch knows of the QEMU:

* with ``libvirt_domain`` set, libvirt's qemu hook tells it (netwatch's
  ``libvirt-hook`` command, over the control socket): a domain about to
  start (prepare, start, migrate), started (with QEMU's pid, which must be
  in the cgroup libvirt makes for that domain and no other VM's QEMU),
  stopped. A pidfd follows the QEMU between hooks, and at netwatch's start
  the domain's QEMU is found by its cgroup, so a missed hook costs nothing
  but the context of one hook run. A VM whose domain does not run has its
  macvlans taken away, as a monitored VM's are when its QEMU exits.
* without it, nothing: the VM is taken to be there always, and its NICs
  are joined whenever their lower is (frames wait for QEMU to open the tap).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netwatch import events
from netwatch.errors import QmpError
from netwatch.qemu.peer import Identity, QemuClaims, libvirt_problem, still_runs
from netwatch.qemu.process import QemuProcess
from netwatch.qemu.qmp import NetworkInfo
from netwatch.qemu.runstate import INMIGRATE, POSTMIGRATE, RUNNING, RunStateWatch

log = logging.getLogger(__name__)

# libvirt's qemu hook operations (https://libvirt.org/hooks.html), and what each says of the QEMU.
STARTING_OPS = frozenset({"prepare", "start", "migrate", "restore"})
RUNNING_OPS = frozenset({"started", "reconnect", "attach"})
ENDED_OPS = frozenset({"stopped", "release"})
HOOK_OPS = STARTING_OPS | RUNNING_OPS | ENDED_OPS


# How long a QEMU's exit waits for libvirt's stopped hook (libvirt calls it right after ending QEMU).
STOPPED_HOOK_WAIT = 5.0


class NoMonitor(QmpError):
    """A QMP command asked of a VM netwatch has no monitor for."""


@dataclass(frozen=True)
class LibvirtEvent:
    """One call of libvirt's qemu hook, as the hook command passes it on (validated at the control socket)."""

    domain: str
    op: str
    subop: str
    uuid: str | None = None
    # QEMU's pid as libvirt's pid file gives it (started, reconnect, attach).
    pid: int | None = None
    # stopped: the migration libvirt's status file says the domain was in ("out": the guest went to another
    # host; "in": it was coming here and did not arrive; None: neither, or the hook could not tell).
    migration: str | None = None


class UnmonitoredVm:
    """The QEMU of a VM without netwatch's monitor: as libvirt's hook and a pidfd tell (see the module)."""

    monitored = False
    connected = False
    refused: str | None = None

    def __init__(self, name: str, on_change: Callable[[], None], identity: Identity | None = None,
                 peers: QemuClaims | None = None, recorded: Callable[[], list[tuple[int, int | None]]] | None = None,
                 machine: str = "pc") -> None:
        self.name = name
        self.machine = machine
        self.identity = identity or Identity()
        self.on_change = on_change
        # The QEMU libvirt said runs (or that was found running), and which VM each QEMU is.
        self.process = QemuProcess(name, self._exited, peers, recorded)
        self.first_attempt = asyncio.Event()
        self.runstate = RunStateWatch(name, self._no_query, on_change)
        self.errors = 0
        self.path: str | None = None
        # Set from QEMU's exit until libvirt's stopped hook (bounded): see _exited.
        self._grace: asyncio.TimerHandle | None = None
        self._session = 1
        # Between libvirt's prepare (or migrate) and started: QEMU is on its way; its taps are wired for it.
        self._starting = False
        # What the last hook said, for status.
        self.last_event: str | None = None
        self.last_error: str | None = None

    # -- what NICs ask ------------------------------------------------------------

    @property
    def domain(self) -> str | None:
        return self.identity.libvirt_domain

    @property
    def present(self) -> bool:
        if self.domain is None:
            return True  # nothing tells: the taps are there for whenever QEMU opens them
        return self._starting or self._grace is not None or self.qemu_alive()

    @property
    def session(self) -> int:
        return self._session

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def pid_start(self) -> int | None:
        return self.process.start

    @property
    def run_state(self) -> str | None:
        return self.runstate.state

    def qemu_alive(self) -> bool:
        return self.process.runs()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise NoMonitor(f"netwatch has no monitor for VM {self.name} (no qmp in its config): cannot {command}")

    async def pass_fd(self, fd: int, fdname: str) -> None:
        raise NoMonitor(f"netwatch has no monitor for VM {self.name}: cannot pass an fd")

    async def network(self) -> NetworkInfo:
        raise NoMonitor(f"netwatch has no monitor for VM {self.name}: cannot read QEMU's network")

    def announce(self, nic: str) -> None:
        """QEMU announces a guest that migrated in by itself; a reattach's announcement is the wiring's (RARP)."""

    def expect_deleted(self, device: str) -> asyncio.Future[None]:
        raise NoMonitor(f"netwatch has no monitor for VM {self.name}: cannot follow device {device}")

    def forget_deleted(self, device: str, waiter: asyncio.Future[None]) -> None:
        pass

    async def _no_query(self) -> str:
        raise NoMonitor("no monitor")

    # -- life -----------------------------------------------------------------------

    async def __aenter__(self) -> UnmonitoredVm:
        if self.domain is not None:
            pid = self._recorded_qemu() or find_libvirt_qemu(self.domain)
            if pid is not None:
                self._adopt(pid, RUNNING, found=True)
        self.first_attempt.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.process.unwatch()
        if self._grace is not None:
            self._grace.cancel()

    def _recorded_qemu(self) -> int | None:
        assert self.domain is not None
        for pid, started in self.process.recorded():
            if still_runs(pid, started) and libvirt_problem(pid, self.domain) is None:
                return pid
        return None

    def libvirt(self, event: LibvirtEvent) -> str | None:
        """Follow one hook call; why it was refused (one sentence), or None."""
        self.last_event = f"{event.op} {event.subop}"
        if event.op in STARTING_OPS and event.subop == "begin":
            if event.op == "migrate":
                # This host's QEMU will receive the guest: its NICs' first if-up says migrate-in.
                self.runstate.incoming = True
            self._starting = True
            self.on_change()
        elif event.op in RUNNING_OPS:
            if event.pid is None:
                return f"libvirt's {event.op} hook gave no QEMU pid"
            refused = self._refusal(event.pid)
            if refused is not None:
                self.last_error = refused
                events.emit("error", f"libvirt domain {event.domain}: not taking pid {event.pid} as its QEMU: "
                            f"{refused}", vm=self.name)
                return refused
            self._adopt(event.pid, RUNNING)
        elif event.op in ENDED_OPS:
            self._ended(event.migration)
        return None

    def _refusal(self, pid: int) -> str | None:
        assert self.domain is not None
        problem = libvirt_problem(pid, self.domain)
        if problem is not None:
            return f"pid {pid} is not libvirt's QEMU of that domain: {problem}"
        other = self.process.other_vm(pid)
        if other is not None:
            return f"pid {pid} is the QEMU of VM '{other}'"
        return None

    def _adopt(self, pid: int, state: str, found: bool = False) -> None:
        if self.process.is_(pid):
            self._starting = False
            return
        self.process.follow(pid)
        self.process.claim(pid)
        self._session += 1
        self._starting = False
        self.last_error = None
        self.runstate.start(state, pid)
        how = "found running" if found else "started"
        events.emit("vm-connected", f"libvirt domain {self.domain}: QEMU (pid {pid}) {how}; no monitor: the "
                    "guest's carrier does not follow the lower", vm=self.name)
        self.on_change()

    def _exited(self) -> None:
        """QEMU exited. libvirt's stopped hook comes right after (libvirt ends QEMU, then calls it) and says
        whether the guest migrated away: its NICs' if-down context. It is waited for, a bounded while."""
        self.process.unwatch()
        if self.domain is None or self.process.pid is None:
            return
        self._grace = asyncio.get_running_loop().call_later(STOPPED_HOOK_WAIT, self._no_stopped_hook)

    def _no_stopped_hook(self) -> None:
        self._grace = None
        log.info("%s: QEMU exited and libvirt's stopped hook did not come within %g s", self.name, STOPPED_HOOK_WAIT)
        self._forget()
        self.on_change()

    def _ended(self, migration: str | None) -> None:
        """libvirt stopped the domain: its QEMU is gone; ``migration`` as LibvirtEvent says."""
        self._starting = False
        if self.process.pid is not None and self.runstate.state is not None and migration is not None:
            # The last state, as a monitor would have seen it: the NICs go down as migrate-out on a source,
            # as migrate-failed on a target the guest never ran on.
            self.runstate.told(POSTMIGRATE if migration == "out" else INMIGRATE)
        self.runstate.incoming = False
        self._forget()
        self.on_change()

    def _forget(self) -> None:
        """The QEMU is gone: the next backend is for the next one (its phase stays latched by pid)."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self.runstate.state is not None:
            self.runstate.gone()
        self.process.forget()

    def report(self) -> dict[str, Any]:
        return {"monitor": False, "libvirt_domain": self.domain, "libvirt_hook": self.last_event,
                "qemu_pid": self.process.pid if self.qemu_alive() else None}


def find_libvirt_qemu(domain: str) -> int | None:
    """The QEMU running in the cgroup libvirt makes for ``domain`` (netwatch started after it), or None."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if "qemu" not in os.path.basename(os.readlink(entry / "exe")):
                continue
        except OSError:
            continue
        if libvirt_problem(pid, domain) is None:
            found.append(pid)
    # libvirt runs one QEMU per domain; two would mean something this cannot tell apart.
    return found[0] if len(found) == 1 else None
