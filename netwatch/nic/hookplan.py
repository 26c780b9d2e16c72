"""Which if-up and if-down a NIC's backends get, and with which context.

A NIC's first if-up in a QEMU says ``start`` (``hot-add`` for a NIC added
while its VM ran), later ones ``reattach`` or ``rebind``; while its VM
migrates, the phase on this host decides whether the backend is configured
at all (the rules are in netwatch/nic/migration.py). Every wiring asks this
plan; none decides contexts itself.
"""

from __future__ import annotations

from dataclasses import replace

from netwatch.config import NicConfig
from netwatch.nic import migration
from netwatch.nic.env import NicEnv
from netwatch.nic.records import NicRecord
from netwatch.qemu.vm import QemuVm


class HookPlan:
    """One NIC's hook contexts and its VM's migration phase on this host."""

    def __init__(self, nic: NicConfig, vm: QemuVm, env: NicEnv, hot_added: bool = False) -> None:
        self.nic = nic
        self.vm = vm
        self.env = env
        # The if-up context of the first backend in a QEMU: "hot-add" for a NIC
        # added to the config while its VM ran, "start" otherwise.
        self.first_context = "hot-add" if hot_added else "start"
        self.started_for: int | None = None  # QEMU pid whose "start" hooks ran
        # Whether they ran at all: a VM without a monitor may not know its QEMU's pid (None).
        self.started = False
        self.up_context = "reattach"  # for the next if-up after "start"
        # The VM's migration phase on this host.
        self.phase = migration.NONE
        self._phase_pid: int | None = None  # the QEMU whose run state the phase follows

    def up(self, context: str, record: NicRecord) -> None:
        if record.configured:
            self.env.hooks.submit("up", context, record)

    def down(self, context: str, record: NicRecord) -> None:
        # Only what was configured is deconfigured: a routed tap deferred on a
        # migration target, or deconfigured on its source, owes no if-down.
        if record.configured:
            self.env.hooks.submit("down", context, record)

    def configured(self) -> bool:
        """Whether a backend made now is configured (its if-up runs) in the current phase."""
        return migration.wants_configured(self.nic, self.phase)

    def attach_context(self) -> str:
        """The if-up context of a backend just attached; the next one's follows from it."""
        context = self.first_context if not self.started or self.started_for != self.vm.pid else self.up_context
        arrived = self.vm.pid in self.vm.runstate.arrived  # the guest migrated in and ran here
        # Or, for a VM without a monitor, libvirt's hook said this host's QEMU is receiving it.
        if self.phase == migration.IN or (context == "start" and (arrived or self.vm.runstate.incoming)):
            context = "migrate-in"
        self.started_for, self.up_context, self.first_context = self.vm.pid, "reattach", "start"
        self.started = True
        return context

    def adopted(self, record: NicRecord, first: bool) -> None:
        """An earlier run's backend is kept (``first``: the NIC had none in this run)."""
        if first:
            self.started_for, self.started = record.qemu_pid, True
        self.phase = self.phase_for(self.vm.pid, record)

    def qemu_known(self, record: NicRecord) -> None:
        """The QEMU ``record``'s if-up ran for, before its pid was known, is ``record.qemu_pid``."""
        if self.started and self.started_for is None:
            self.started_for = record.qemu_pid

    def replaced(self, record: NicRecord, matches_config: bool) -> None:
        """An earlier run's backend is not kept: its if-up ran, so its if-down runs now, with what it saw."""
        if record.qemu_pid == self.vm.pid:
            # This QEMU's phase, which its states so far may not tell (a target paused after receiving).
            self.phase = self.phase_for(self.vm.pid, record)
            context = "lower-lost" if matches_config else "rebind"
        else:
            # That QEMU is gone; this one is new.
            context = migration.down_context(self.phase_for(record.qemu_pid, record))
        self.down(context, record)
        if record.qemu_pid == self.vm.pid:
            self.started_for, self.started = self.vm.pid, True
            self.up_context = "rebind" if context == "rebind" else "reattach"

    def gone(self, record: NicRecord) -> None:
        """``record``'s QEMU is gone, or the NIC left the config: its if-down, in the phase it was in."""
        # A VM dropped from a source's config after it migrated away: migrate-out, not stop.
        self.down(migration.down_context(self.phase_for(record.qemu_pid, record)), record)

    def phase_for(self, pid: int | None, record: NicRecord | None) -> str:
        """QEMU ``pid``'s migration phase: as the run-state watch latched it, else as ``record`` kept it."""
        latched = self.vm.runstate.phase_of(pid)
        if latched is not None:
            return latched
        if record is not None and pid is not None and record.qemu_pid == pid:
            return record.phase
        return self.phase if pid is not None and pid == self._phase_pid else migration.NONE

    def observe(self, backend: NicRecord | None) -> None:
        """Follow the VM's run state into this NIC's migration phase."""
        # A new QEMU starts from nothing: an earlier one's phase is not its own.
        self.phase = self.phase_for(self.vm.pid, backend)
        self._phase_pid = self.vm.pid

    def follow(self, backend: NicRecord) -> NicRecord:
        """``backend`` configured or deconfigured as the phase asks (hooks, announce): the record to keep."""
        before, now = backend.phase, self.phase
        want = migration.wants_configured(self.nic, now)
        if before == now and backend.configured == want:
            return backend
        record = replace(backend, phase=now, configured=want)
        if backend.configured and not want:
            self.env.hooks.submit("down", migration.down_context(now), backend)
        elif want and not backend.configured:
            context = migration.up_context(now, before) or "reattach"
            # The source deconfigures when its guest stops; give it that long before this host routes too.
            delay = self.env.migration_handover if context == "migrate-in" and now == migration.NONE else 0.0
            self.env.hooks.submit("up", context, record, delay)
        self.env.records.save(record)
        if before == migration.IN and now == migration.NONE:
            # The guest runs here now: switches learn where its MACs are.
            self.vm.announce(self.nic.id)
        return record
