"""A NIC's backend taken away: its QEMU gone, the NIC hot-removed, or dropped from the config."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from netwatch import events
from netwatch.host.backends import provably_ours
from netwatch.nic import migration
from netwatch.nic.records import NicRecord
from netwatch.nic.wirings import make_wiring, pair_of
from netwatch.qemu.peer import still_runs

if TYPE_CHECKING:
    from netwatch.nic.lifecycle import BackendLife

log = logging.getLogger(__name__)

# Seconds a NIC's removal waits for QEMU before it removes the kernel side anyway.
REMOVE_DEADLINE = 2.0


async def delete_backend(life: BackendLife, backend: NicRecord) -> bool:
    """Delete the link ``backend`` names if it is provably the NIC's; whether the record describes what is there.

    False: a link of that name at that ifindex is not netwatch's: it is
    left alone, said once (its record is dropped by the caller).
    """
    link = life.env.links.get(backend.ifindex)
    if link is None or link.name != backend.ifname:
        return True  # gone already (a macvtap dies with its lower, a tap with its QEMU)
    if not provably_ours(link, backend, life.nic.backend_names):
        log.warning("%s/%s: not removing %s (ifindex %d): the record names it, but it is not the %s netwatch "
                    "made for this NIC (%s, MAC %s)", life.vm_name, life.nic.id, link.name, link.index,
                    backend.backend, link.kind or "no kind", link.mac or "none")
        return False
    await life.best_effort(life.env.ops.delete(backend.ifindex), f"removing {backend.ifname}")
    return True


async def vm_gone(life: BackendLife) -> None:
    """QEMU is gone: its netdevs went with it; drop the backend unless QEMU lives on."""
    life.guest_link = None
    life.synced_session = 0
    # What the wiring knew of QEMU's side is read again from the next QEMU.
    life.wiring = make_wiring(life.vm_name, life.nic, life.vm, life.env.unplug_timeout)
    backend = life.backend
    if life.vm.qemu_alive():
        return
    if backend is None:
        # After a restart: a backend recorded for a QEMU that is gone is
        # cleaned now, not when (if ever) this VM's next QEMU connects.
        backend = life.env.records.load(life.vm_name, life.nic.id)
        if backend is None or (backend.qemu_pid is not None
                               and still_runs(backend.qemu_pid, backend.qemu_start)):
            return
    life.backend = None
    ours = await delete_backend(life, backend)
    life.env.records.remove(life.vm_name, life.nic.id)
    if not ours:
        return  # not what netwatch attached: no if-up ran for it, none is owed
    life.hooks_down(migration.down_context(life.phase_for(backend.qemu_pid, backend)), backend)
    events.emit("detached", f"{backend.ifname} removed: QEMU exited", vm=life.vm_name, nic=life.nic.id,
                lower=backend.lower)


async def hot_remove(life: BackendLife) -> None:
    """The NIC left the config of a running VM: its device leaves the guest, then its backend goes.

    A guest that does not release the device raises UnplugTimeout: the
    NIC fails with that reason and keeps its backend (QEMU still feeds it).
    """
    if not life.vm.connected:
        await remove(life)
        return
    if life.synced_session != life.vm.session:
        session = life.vm.session
        await life.sync_with_qemu()
        life.synced_session = session
    if life.wiring.guest_present:
        await life.wiring.remove_guest()
    backend, life.backend = life.backend, None
    if backend is not None:
        await life.best_effort(life.wiring.unplug(pair_of(backend)), "removing the backend from QEMU")
        ours = await delete_backend(life, backend)
        life.env.records.remove(life.vm_name, life.nic.id)
        if ours:
            life.hooks_down("hot-remove", backend)
    events.emit("hot-remove", f"NIC {life.nic.id} removed from the running guest: it is no longer configured",
                vm=life.vm_name, nic=life.nic.id, lower=backend.lower if backend else None)


async def remove(life: BackendLife) -> None:
    """The NIC left the config: take its backend out of QEMU and the kernel."""
    backend = life.backend
    if backend is None:
        return
    life.backend = None
    if life.vm.connected:
        # Best effort, briefly: a QEMU that does not answer must not hold
        # up a reload (each command would wait out qmp_timeout).
        try:
            async with asyncio.timeout(REMOVE_DEADLINE):
                await life.best_effort(life.wiring.unplug(pair_of(backend)), "removing the backend from QEMU")
                await life.best_effort(life.vm.execute("set_link", {"name": life.nic.id, "up": False}),
                                        "set_link")
        except TimeoutError:
            log.warning("%s/%s: QEMU did not answer within %g s while the NIC was removed; its netdevs stay "
                        "in QEMU, the backend link goes", life.vm_name, life.nic.id, REMOVE_DEADLINE)
    ours = await delete_backend(life, backend)
    life.env.records.remove(life.vm_name, life.nic.id)
    if not ours:
        return
    # A VM dropped from a source's config after it migrated away: migrate-out, not stop.
    life.hooks_down(migration.down_context(life.phase_for(backend.qemu_pid, backend)), backend)
    events.emit("detached", f"{backend.tap_netdev} removed: the NIC is no longer configured",
                vm=life.vm_name, nic=life.nic.id, lower=backend.lower)
