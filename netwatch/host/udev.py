"""Events in: udev (or raw kernel uevent) notices about network devices.

pyudev's own observer is a thread; here the monitor's socket is read from
the event loop. With udevd present, a new link is only used once udev has
finished with it (it may still be renamed), which the kernel source cannot
tell, so the link table consults :meth:`UdevGate.ready`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

import pyudev

from netwatch.errors import NetwatchError

log = logging.getLogger(__name__)

UDEV_CONTROL = "/run/udev/control"
UDEV_DATA = "/run/udev/data"

UeventHandler = Callable[[str, str, int | None], None]


def resolve_source(mode: str) -> str | None:
    """``auto`` means udev when udevd runs, else raw kernel uevents."""
    if mode == "off":
        return None
    if mode == "auto":
        return "udev" if os.path.exists(UDEV_CONTROL) else "kernel"
    return mode


def udev_initialized(ifindex: int) -> bool:
    """Whether udevd has processed the link (its database entry exists)."""
    return os.path.exists(f"{UDEV_DATA}/n{ifindex}")


class UdevMonitor:
    """Feeds net-subsystem uevents to ``on_event``; resyncs after overflow."""

    def __init__(self, source: str, on_event: UeventHandler, on_overflow: Callable[[], None]) -> None:
        self.source = source
        self.on_event = on_event
        self.on_overflow = on_overflow
        self._monitor: pyudev.Monitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> UdevMonitor:
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
            monitor.filter_by("net")
            monitor.set_receive_buffer_size(4 * 1024 * 1024)
            monitor.start()
        except (OSError, ValueError, pyudev.DeviceNotFoundError) as exc:
            raise NetwatchError(f"cannot listen to {self.source} uevents: {exc}") from exc
        self._monitor = monitor
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(monitor.fileno(), self._drain)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        self._monitor = None

    def _drain(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:
                self._overflowed(exc)
                return
            if device is None:
                return
            try:
                # From the event itself: reading sysfs per event cost more than the rest of it.
                ifindex: int | None = int(device.properties["IFINDEX"])
            except (KeyError, ValueError):
                ifindex = None
            self.on_event(device.action or "", device.sys_name, ifindex)

    def _overflowed(self, exc: OSError) -> None:
        # The pending socket error must be consumed, or poll() raises forever.
        assert self._monitor is not None
        sock = socket.socket(fileno=os.dup(self._monitor.fileno()))
        try:
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        finally:
            sock.close()
        if exc.errno == errno.ENOBUFS:
            log.warning("uevent overflow: resynchronising")
        else:
            log.warning("uevent socket error: %s: resynchronising", exc)
        self.on_overflow()
