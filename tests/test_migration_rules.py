"""Which NIC is configured in which migration phase, and with which hook context (netwatch/nic/migration.py)."""

from __future__ import annotations

import pytest

from netwatch.config import NicConfig
from netwatch.nic import migration


def nic(backend: str, mode: str) -> NicConfig:
    return NicConfig(id="net0", backend=backend, mac="52:54:00:00:00:01", hub=0, model="virtio-net-pci",
                     ifname="nw-vm-net0", lower=None, mode=mode, bridge="br0" if mode == "bridged" else None)


@pytest.mark.parametrize(("states", "phases"), [
    # Target: received, paused by -S (keeps "in"), resumed.
    (["inmigrate", "paused", "running"], ["in", "in", ""]),
    # Source: stopped for the last pass, completed.
    (["running", "finish-migrate", "postmigrate"], ["", "out", "out"]),
    # Source whose last pass failed: the guest runs again, or stays paused as it was.
    (["running", "finish-migrate", "running"], ["", "out", ""]),
    (["paused", "finish-migrate", "paused"], ["", "out", ""]),
    # An admin's pause is no migration.
    (["running", "paused", "running"], ["", "", ""]),
])
def test_phase_follows_the_run_state(states: list[str], phases: list[str]) -> None:
    now = migration.NONE
    seen = []
    for state in states:
        now = migration.phase(state, now)
        seen.append(now)
    assert seen == phases


def test_only_routed_taps_wait_and_leave() -> None:
    routed, bridged, macvtap = nic("tap", "routed"), nic("tap", "bridged"), nic("macvtap", "bridge")
    for phase in (migration.IN, migration.OUT):
        assert not migration.wants_configured(routed, phase)
        assert migration.wants_configured(bridged, phase) and migration.wants_configured(macvtap, phase)
    assert migration.wants_configured(routed, migration.NONE)


def test_contexts() -> None:
    assert migration.up_context(migration.IN, migration.IN) == "migrate-in"
    assert migration.up_context(migration.NONE, migration.IN) == "migrate-in"  # the target resumed
    assert migration.up_context(migration.NONE, migration.OUT) == "reattach"  # the source resumed
    assert migration.up_context(migration.NONE, migration.NONE) is None
    assert migration.down_context(migration.IN) == "migrate-failed"
    assert migration.down_context(migration.OUT) == "migrate-out"
    assert migration.down_context(migration.NONE) == "stop"


def test_the_watch_latches_each_qemus_phase() -> None:
    """Kept per QEMU, so a NIC that acts only after its QEMU is gone (or replaced) still gets the right context."""
    import asyncio

    from netwatch.qemu.runstate import RunStateWatch

    async def main() -> None:
        async def query() -> str:
            return "running"
        watch = RunStateWatch("vm", query, lambda: None)
        watch.start("running", 100)  # a source
        watch._latch("finish-migrate")
        watch._latch("postmigrate")
        watch.start("inmigrate", 200)  # then the guest comes back in a new QEMU
        assert watch.phase_of(100) == migration.OUT and watch.phase_of(200) == migration.IN
        watch._latch("paused")
        assert watch.phase_of(200) == migration.IN and 200 not in watch.arrived
        watch._latch("running")
        assert watch.phase_of(200) == migration.NONE and 200 in watch.arrived
        watch.start("paused", 300)  # a QEMU whose first state says nothing: its records decide
        assert watch.phase_of(300) is None
        for pid in range(400, 420):
            watch.start("running", pid)
        assert watch.phase_of(100) is None and len(watch.phases) == 8, "bounded"
    asyncio.run(main())
