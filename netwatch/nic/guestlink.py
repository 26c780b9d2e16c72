"""The guest's carrier: it follows the lower through QMP set_link, in every wiring with a guest device."""

from __future__ import annotations

from collections.abc import Callable

from netwatch import events
from netwatch.qemu.vm import QemuVm


class GuestLink:
    """What netwatch last set the guest NIC's link to (None: unknown, or no device to set)."""

    def __init__(self, vm_name: str, nic_id: str, vm: QemuVm, lower_name: Callable[[], str | None]) -> None:
        self.vm_name = vm_name
        self.nic_id = nic_id
        self.vm = vm
        self.lower_name = lower_name
        self.state: bool | None = None

    def forget(self) -> None:
        """QEMU's view is to be read again (a new session, or QEMU gone)."""
        self.state = None

    async def set(self, up: bool, cause: str, present: bool) -> None:
        """The guest NIC's link ``up`` or down because of ``cause``; nothing while it has no device (``present``)."""
        if not present:
            self.state = None  # no device in the guest (yet): nothing to set
            return
        if self.state is up:
            return
        await self.vm.execute("set_link", {"name": self.nic_id, "up": up})
        self.state = up
        events.emit("link-up" if up else "link-down", f"guest link {'up' if up else 'down'}: {cause}",
                    vm=self.vm_name, nic=self.nic_id, lower=self.lower_name())
