"""Events in: a VM's run state as its QEMU reports it, over netwatch's own monitor.

Every monitor gets STOP and RESUME and may ask ``query-status``; MIGRATION
events come only while the ``events`` migration capability is on, and
Proxmox turns it off. So an event only says "look again", and the states
whose next change comes without any event (a source completing its
migration, a paused guest being migrated, a target that finished receiving
under ``-S``) are polled while they last.

A QEMU decides how often its run state changes (and a guest too: suspend
and wakeup, or I/O errors with ``werror=stop``). Each change acted on is a
journal entry, a pass of every NIC and, for a routed tap, hook runs; a
QEMU flipping its state as fast as the QMP budget lets it made hundreds of
each a second, and past journald's rate limit every netwatch entry is lost,
other VMs' included. So each VM has a budget (:class:`FloodLimits`): within
it every change is logged and followed at once; past it the state is read
once per hold, its latest value acted on without an entry of its own, and
one summary entry per interval says what happened, until a hold passes
without an event or a change.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from netwatch import events
from netwatch.errors import QmpError
from netwatch.ratelimit import TokenBucket
from netwatch.untrusted import clean

log = logging.getLogger(__name__)

# SUSPEND/WAKEUP: a guest suspended to RAM leaves "running" without a STOP.
RUN_EVENTS = ("STOP", "RESUME", "MIGRATION", "SUSPEND", "WAKEUP")
# A run state is QEMU's word: compared with known names, shown only in this shape.
_STATE = re.compile(r"[a-z][a-z-]{0,31}\Z")

# The guest runs on this host.
RUNNING = "running"
# This QEMU waits for, or receives, an incoming migration.
INMIGRATE = "inmigrate"
# The source stopped the guest for the last pass of a migration, and after it.
FINISH_MIGRATE = "finish-migrate"
POSTMIGRATE = "postmigrate"

# A VM's migration phase on this host, kept per QEMU: "in" (this QEMU
# receives the guest, which has not run here yet), "out" (it stopped the
# guest for the last pass of an outgoing migration, or sent it away), "".
IN, OUT, NONE = "in", "out", ""
# QEMUs whose phase is remembered after they are gone (a pid per session).
PHASES_KEPT = 8


def phase(run_state: str | None, previous: str | None) -> str | None:
    """The migration phase for ``run_state``; states that say nothing keep ``previous`` (None: unknown)."""
    if run_state == INMIGRATE:
        return IN
    if run_state in (FINISH_MIGRATE, POSTMIGRATE):
        return OUT
    if run_state == RUNNING:
        return NONE
    if previous == OUT and run_state is not None:
        # Back from finish-migrate to paused: the migration of a paused guest failed.
        return NONE
    return previous


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


@dataclass(frozen=True)
class FloodLimits:
    """How many of one VM's run-state changes are logged and followed one by one."""

    # Changes at once: a migration is two or three per QEMU, an admin's pause two.
    burst: float = 20
    # Then this many a second, in the long run.
    rate: float = 0.5
    # Past the budget, the state is read once per hold (so the NICs follow at
    # most that often); the hold doubles, up to hold_max, while events keep coming.
    hold_min: float = 0.5
    hold_max: float = 8.0
    # Seconds between summary entries while it lasts.
    summary: float = 10.0


class _Flood:
    """A run-state flood under way: what its next summary entry says."""

    def __init__(self, now: float, hold: float, events_seen: int) -> None:
        self.started = self.since = now
        self.hold = hold
        self.events_seen = events_seen  # the watch's event count at the last look
        self.events = self.acted = 0  # since the last summary
        self.total_events = self.total_acted = 0


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
                 fast: float = FAST_POLL, slow: float = SLOW_POLL, limits: FloodLimits | None = None) -> None:
        self.vm_name = vm_name
        self.query = query
        self.on_change = on_change
        self.fast, self.slow = fast, slow
        # Kept for the VM, not per session: a QEMU reconnecting starts no new budget.
        self.limits = limits or FloodLimits()
        self._budget = TokenBucket(self.limits.burst, self.limits.rate)
        self._flood: _Flood | None = None
        # Where the last flood ended, and its hold then: a peer that pauses
        # just long enough to end one starts the next at that hold, not at hold_min.
        self._calm_since: float | None = None
        self._last_hold = self.limits.hold_min
        # Run-state events QEMU sent (STOP, RESUME, ...), for the summaries.
        self.event_count = 0
        self.state: str | None = None
        # The last state seen of the current or last QEMU: what a NIC goes by once it is gone.
        self.last: str | None = None
        # Set while this QEMU received the guest and the guest has not run here yet.
        self.incoming = False
        self._poked = asyncio.Event()
        # QEMU pid -> its migration phase, latched at each change seen (None: its
        # states so far said nothing; a NIC's runtime record may know more).
        self.phases: dict[int, str | None] = {}
        # QEMUs in which a guest that migrated in has run.
        self.arrived: set[int] = set()
        self.pid: int | None = None
        self._change_waiters: list[asyncio.Future[None]] = []

    def next_change(self) -> asyncio.Future[None]:
        """A future done at the next change of run state (cancel it when no longer wanted)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._change_waiters = [w for w in self._change_waiters if not w.done()]
        self._change_waiters.append(waiter)
        return waiter

    def _changed(self) -> None:
        waiters, self._change_waiters = self._change_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def start(self, state: str, pid: int) -> None:
        """The state read at connect, before any NIC acts on it."""
        self.state = self.last = state
        self.pid = pid
        self.incoming = state == INMIGRATE
        self._latch(state)
        if self.incoming:
            self._log(None, state)

    def phase_of(self, pid: int | None) -> str | None:
        return self.phases.get(pid) if pid is not None else None

    def _latch(self, state: str) -> None:
        if self.pid is None:
            return
        before = self.phases.get(self.pid)
        now = phase(state, before)
        if before == IN and now == NONE:
            self.arrived.add(self.pid)
        self.phases.pop(self.pid, None)
        self.phases[self.pid] = now  # newest last: the oldest go first
        while len(self.phases) > PHASES_KEPT:
            gone = next(iter(self.phases))
            del self.phases[gone]
            self.arrived.discard(gone)

    def poke(self) -> None:
        """A STOP, RESUME or MIGRATION event: the state may have changed."""
        self.event_count += 1
        self._poked.set()

    @property
    def flooding(self) -> bool:
        """Whether this VM's run state changes faster than its budget (its changes are followed coalesced)."""
        return self._flood is not None

    async def run(self) -> None:
        while True:
            flood = self._flood
            if flood is not None:
                # Events do not cut it short: they are what is being coalesced.
                await asyncio.sleep(flood.hold)
            else:
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
            if flood is not None:
                self._coalesced(flood, new)
            elif new != self.state:
                if self._budget.take():
                    self._change(new, quiet=False)
                else:
                    # Not acted on now: the first hold reads the latest state.
                    self._start_flood()

    def told(self, new: str) -> None:
        """A state learnt without a monitor (libvirt's hook says the VM migrates in, or left): followed as read."""
        if new != self.state:
            self._change(new, quiet=False)

    def _change(self, new: str, quiet: bool) -> None:
        old, self.state = self.state, new
        self.last = new
        self._latch(new)
        self._changed()
        if not quiet:
            self._log(old, new)
        if new == INMIGRATE:
            self.incoming = True
        elif new == RUNNING:
            self.incoming = False
        self.on_change()

    def _start_flood(self) -> None:
        limits, now = self.limits, time.monotonic()
        hold = limits.hold_min
        if self._calm_since is not None:
            # Halved for each summary interval of calm since the last flood.
            hold = max(hold, self._last_hold / 2 ** int((now - self._calm_since) // limits.summary))
        self._flood = _Flood(now, hold, self.event_count)
        events.emit("run-state-flood", f"QEMU changes its run state faster than netwatch follows it one change at "
                    f"a time (more than {limits.burst:g} changes at once, {limits.rate:g} a second after): its NICs "
                    f"now follow the latest state at most every {hold:g}-{max(hold, limits.hold_max):g} s, changes "
                    f"are not logged one by one and hooks run only for those followed; a summary every "
                    f"{limits.summary:g} s until it calms down", vm=self.vm_name, run_state=self.state)

    def _coalesced(self, flood: _Flood, new: str) -> None:
        """One look during a flood: act on the latest state; a summary when due; the end once calm."""
        seen = self.event_count - flood.events_seen
        flood.events_seen = self.event_count
        changed = new != self.state
        if changed:
            self._change(new, quiet=True)
            flood.acted += 1
            flood.total_acted += 1
        flood.events += seen
        flood.total_events += seen
        now = time.monotonic()
        if not seen and not changed:
            self._flood = None
            self._calm_since, self._last_hold = now, flood.hold
            events.emit("run-state-flood", f"QEMU's run state is calm again after {now - flood.started:.0f} s "
                        f"({flood.total_events:,} run-state events, {flood.total_acted} changes followed; the "
                        f"state is {self.state}): every change is logged and followed again", vm=self.vm_name,
                        run_state=self.state, events=flood.total_events, acted=flood.total_acted,
                        seconds=round(now - flood.started))
            return
        if now - flood.since >= self.limits.summary:
            events.emit("run-state-flood", f"{flood.events:,} run-state events in {now - flood.since:.0f} s, "
                        f"{flood.acted} changes followed (the state is now {self.state}); the changes in between "
                        f"were neither logged nor followed, and ran no hooks", vm=self.vm_name,
                        run_state=self.state, events=flood.events, acted=flood.acted,
                        seconds=round(now - flood.since))
            flood.since, flood.events, flood.acted = now, 0, 0
        flood.hold = min(max(flood.hold, self.limits.hold_max), flood.hold * 2)

    def gone(self) -> None:
        """The session ended: the state is unknown until the next one."""
        if self.incoming:
            events.emit("migration-failed", "the QMP session ended before the guest ran here: the incoming "
                        "migration did not complete", vm=self.vm_name, run_state=self.state)
        self.state, self.incoming = None, False

    def _log(self, old: str | None, new: str) -> None:
        kind, message = describe(old, new, self.incoming)
        events.emit(kind, message, vm=self.vm_name, run_state=new)
