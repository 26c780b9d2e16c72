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
        self.carrier: bool | None = None  # the lower's, as last given
        # An announcement of the guest's MAC waiting for a path that carries it (and whether it needs the
        # guest's device, link up: QEMU's own), or None.
        self._announce: tuple[Callable[[], None], bool] | None = None

    def announce_when_up(self, send: Callable[[], None], from_guest: bool) -> None:
        """Have ``send`` announce the guest's MAC once frames can leave: the lower's carrier up and, for
        QEMU's announce-self (``from_guest``), the guest NIC's link up.

        QEMU drops what a NIC with its link down sends, announce-self's RARPs
        too. Asked for at the reattach, the announcement ran before the
        lower's carrier (and so the guest link) came up when the lower was a
        NIC just plugged back: on the hot-swap host (issue 24) 0 of its 3
        rounds left the host for some NICs.
        """
        self._announce = (send, from_guest)
        self._flush()

    def _flush(self) -> None:
        if self._announce is None or not self.carrier:
            return
        send, from_guest = self._announce
        if from_guest and self.state is not True:
            return
        self._announce = None
        send()

    def forget(self) -> None:
        """QEMU's view is to be read again (a new session, or QEMU gone)."""
        self.state = None

    async def set(self, up: bool, cause: str, present: bool) -> None:
        """The guest NIC's link ``up`` or down because of ``cause``; nothing while it has no device (``present``)."""
        if not present:
            self.state = None  # no device in the guest (yet): nothing to set
        elif self.state is not up:
            await self.vm.execute("set_link", {"name": self.nic_id, "up": up})
            self.state = up
            events.emit("link-up" if up else "link-down", f"guest link {'up' if up else 'down'}: {cause}",
                        vm=self.vm_name, nic=self.nic_id, lower=self.lower_name())
        self.carrier = up
        self._flush()
