"""Events in: a VM's run state as its QEMU reports it, over netwatch's own monitor.

Every monitor gets STOP and RESUME and may ask ``query-status``; MIGRATION
events come only while the ``events`` migration capability is on, and
Proxmox turns it off. So an event only says "look again", and the states
whose next change comes without any event (a source completing its
migration, a paused guest being migrated, a target that finished receiving
under ``-S``) are polled while they last.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

from netwatch import events
from netwatch.errors import QmpError
from netwatch.untrusted import clean

log = logging.getLogger(__name__)

RUN_EVENTS = ("STOP", "RESUME", "MIGRATION")
# A run state is QEMU's word: compared with known names, shown only in this shape.
_STATE = re.compile(r"[a-z][a-z-]{0,31}\Z")

# The guest runs on this host.
RUNNING = "running"
# This QEMU waits for, or receives, an incoming migration.
INMIGRATE = "inmigrate"
# The source stopped the guest for the last pass of a migration, and after it.
FINISH_MIGRATE = "finish-migrate"
POSTMIGRATE = "postmigrate"

# Seconds between looks while the next change may come unannounced.
FAST_POLL = 0.05  # finish-migrate: a source's last pass, a fraction of a second
SLOW_POLL = 1.0  # paused, inmigrate, prelaunch, ...: may move without an event


def poll_interval(state: str | None, fast: float = FAST_POLL, slow: float = SLOW_POLL) -> float | None:
    """How long to wait for an event before asking again (None: only events move it)."""
    if state == FINISH_MIGRATE:
        return fast
    if state in (RUNNING, POSTMIGRATE):
        # Out of running: STOP. Out of postmigrate: RESUME, or QEMU ends.
        return None
    return slow


def parse_status(answer: object) -> str:
    """The ``status`` of a query-status answer, or QmpError for anything else."""
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, str) or not _STATE.match(status):
        raise QmpError(f"query-status answered {clean(answer, 80)}, not a run state")
    return status


def describe(old: str | None, new: str, incoming: bool) -> tuple[str, str]:
    """The journal event kind and sentence for a change of run state."""
    if new == INMIGRATE:
        return "migration-incoming", "QEMU waits for the guest to migrate in"
    if new == FINISH_MIGRATE:
        return "migration-finishing", "the guest stopped: QEMU sends the last of its outgoing migration"
    if new == POSTMIGRATE:
        return "migration-completed", "the guest migrated away; this QEMU only waits to be ended"
    if old in (FINISH_MIGRATE, POSTMIGRATE):
        return "migration-failed", f"the outgoing migration did not complete: the guest is {new} here again"
    if new == RUNNING and incoming:
        return "migration-arrived", "the guest runs here after its migration"
    return "run-state", f"run state {old or 'unknown'} -> {new}"


class RunStateWatch:
    """One QEMU session's run state: asked at connect, asked again on each event or poll."""

    def __init__(self, vm_name: str, query: Callable[[], Awaitable[str]], on_change: Callable[[], None],
                 fast: float = FAST_POLL, slow: float = SLOW_POLL) -> None:
        self.vm_name = vm_name
        self.query = query
        self.on_change = on_change
        self.fast, self.slow = fast, slow
        self.state: str | None = None
        # The last state seen of the current or last QEMU: what a NIC goes by once it is gone.
        self.last: str | None = None
        # Set while this QEMU received the guest and the guest has not run here yet.
        self.incoming = False
        self._poked = asyncio.Event()

    def start(self, state: str) -> None:
        """The state read at connect, before any NIC acts on it."""
        self.state = self.last = state
        self.incoming = state == INMIGRATE
        if self.incoming:
            self._log(None, state)

    def poke(self) -> None:
        """A STOP, RESUME or MIGRATION event: the state may have changed."""
        self._poked.set()

    async def run(self) -> None:
        while True:
            interval = poll_interval(self.state, self.fast, self.slow)
            try:
                async with asyncio.timeout(interval):
                    await self._poked.wait()
            except TimeoutError:
                pass
            self._poked.clear()
            try:
                new = await self.query()
            except QmpError as exc:
                # The session is failing; its end is reported where it ends.
                log.debug("%s: query-status: %s", self.vm_name, exc)
                await asyncio.sleep(self.slow)
                continue
            if new != self.state:
                old, self.state = self.state, new
                self.last = new
                self._log(old, new)
                if new == INMIGRATE:
                    self.incoming = True
                elif new == RUNNING:
                    self.incoming = False
                self.on_change()

    def gone(self) -> None:
        """The session ended: the state is unknown until the next one."""
        if self.incoming:
            events.emit("migration-failed", "QEMU went away before the guest ran here: the incoming migration "
                        "did not complete", vm=self.vm_name, run_state=self.state)
        self.state, self.incoming = None, False

    def _log(self, old: str | None, new: str) -> None:
        kind, message = describe(old, new, self.incoming)
        events.emit(kind, message, vm=self.vm_name, run_state=new)
