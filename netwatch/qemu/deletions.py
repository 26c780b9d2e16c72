"""Events in: DEVICE_DELETED, told to whoever awaits a device's removal (a replug, a hot-remove)."""

from __future__ import annotations

import asyncio

from netwatch.errors import QmpError


class DeviceDeletions:
    """device id -> futures told when QEMU reports it deleted; only awaited devices are remembered."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def expect(self, device: str) -> asyncio.Future[None]:
        """A future done when QEMU reports ``device`` deleted; ask before the device_del."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(device, []).append(waiter)
        return waiter

    def forget(self, device: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(device, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(device, None)

    def deleted(self, device: str) -> None:
        # QEMU's word: a device id is compared with the awaited ones, never used.
        for waiter in self._waiters.pop(device, []):
            if not waiter.done():
                waiter.set_result(None)

    def fail_all(self, why: str) -> None:
        """The session ended: nobody waits for an event that can no longer come."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(QmpError(why))
        self._waiters.clear()
