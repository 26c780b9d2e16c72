"""Events in: udev (or raw kernel uevent) notices about network devices.

udevd's events come through pyudev, whose own observer is a thread: here
the monitor's socket is read from the event loop. Kernel uevents (no udevd)
are read from their netlink socket and parsed here. With udevd present, a new link is only used once udev has
finished with it (it may still be renamed), which the kernel source cannot
tell, so the link table consults :meth:`UdevGate.ready`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable

import pyudev

from netwatch.errors import NetwatchError
from netwatch.host import rtnl

log = logging.getLogger(__name__)

UDEV_CONTROL = "/run/udev/control"
UDEV_DATA = "/run/udev/data"

UeventHandler = Callable[[str, str, int | None], None]

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # the kernel's own uevents (udevd re-sends its own on group 2)
SO_RCVBUFFORCE = 33
RCVBUF = 4 * 1024 * 1024
UEVENT_BUFFER = 8192  # the kernel's UEVENT_BUFFER_SIZE is 2048


def parse_kernel_uevent(data: bytes) -> tuple[str, str, int | None] | None:
    """(action, interface name, ifindex) of a kernel uevent about a network interface, else None.

    The kernel sends ``action@devpath``, then ``KEY=value`` lines, NUL-separated.
    """
    if b"SUBSYSTEM=net" not in data:
        return None
    fields = dict(line.partition(b"=")[::2] for line in data.split(b"\0")[1:] if b"=" in line)
    if fields.get(b"SUBSYSTEM") != b"net" or not fields.get(b"INTERFACE"):
        return None
    try:
        ifindex: int | None = int(fields[b"IFINDEX"])
    except (KeyError, ValueError):
        ifindex = None
    name = rtnl.name_of(fields[b"INTERFACE"])  # as the link table holds it
    return fields.get(b"ACTION", b"").decode("ascii", "replace"), name, ifindex


def resolve_source(mode: str) -> str | None:
    """``auto`` means udev when udevd runs, else raw kernel uevents."""
    if mode == "off":
        return None
    if mode == "auto":
        return "udev" if os.path.exists(UDEV_CONTROL) else "kernel"
    return mode


def udev_initialized(ifindex: int, data_dir: str = UDEV_DATA) -> bool:
    """Whether udevd's database says it is done with the link: an entry, not marked as still being processed."""
    try:
        with open(f"{data_dir}/n{ifindex}", "rb") as entry:
            # A few hundred bytes; newer udevd marks an entry it rewrites while it processes the device.
            return b"E:ID_PROCESSING=1\n" not in entry.read(65536)
    except OSError:
        return False


class UdevReadiness:
    """Which links udevd is done with, so that netwatch uses a new link only under its final name.

    The proof is udevd's own event for the link: udevd sends it after the
    rename, the database entry and its RUN programs, and it names the link
    as it is then. Its database entry alone is not: on a Debian 12 host
    (systemd 252) whose two NICs came back together on a driver reload, the
    entry of the second one was there 36-89 ms before udevd renamed it from
    eth1, and a NIC whose lower was matched by MAC got its macvtap on eth1
    (issue 24). Links that were there before netwatch listened (``prime``:
    at start, and after missed uevents) have no event to come, and go by
    the database entry; once a link was ready it stays so (an admin's later
    rename moves nothing).
    """

    def __init__(self, data_dir: str = UDEV_DATA) -> None:
        self.data_dir = data_dir
        self._named: dict[int, str | None] = {}  # ifindex -> the name udevd's last event gave (None: unreadable)
        self._primed: set[int] = set()
        self._settled: set[int] = set()

    def prime(self, ifindexes: Iterable[int]) -> None:
        """These links may have been handled by udevd before netwatch listened: their database entry decides."""
        self._primed.update(ifindexes)

    def on_event(self, action: str, name: str, ifindex: int | None) -> None:
        if ifindex is None:
            return
        if action == "remove":
            self._named.pop(ifindex, None)
            self._primed.discard(ifindex)
            self._settled.discard(ifindex)
        else:
            self._named[ifindex] = name or None

    def __call__(self, index: int, name: str) -> bool:
        """Whether the link ``index``, named ``name`` in netwatch's table now, may be used."""
        if index in self._settled:
            return True
        if index in self._named:
            said = self._named[index]
            # A rename's netlink message may be read after udevd's event: until then the table's name is the old one.
            ready = said is None or said == name
        else:
            ready = index in self._primed and udev_initialized(index, self.data_dir)
        if ready:
            self._settled.add(index)
        return ready


class UdevMonitor:
    """Feeds net-subsystem uevents to ``on_event``; resyncs after overflow."""

    def __init__(self, source: str, on_event: UeventHandler, on_overflow: Callable[[], None]) -> None:
        self.source = source
        self.on_event = on_event
        self.on_overflow = on_overflow
        self._monitor: pyudev.Monitor | None = None
        self._kernel: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> UdevMonitor:
        self._loop = asyncio.get_running_loop()
        if self.source == "kernel":
            self._open_kernel()
            return self
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
            monitor.filter_by("net")
            monitor.set_receive_buffer_size(4 * 1024 * 1024)
            monitor.start()
        except (OSError, ValueError, pyudev.DeviceNotFoundError) as exc:
            raise NetwatchError(f"cannot listen to {self.source} uevents: {exc}") from exc
        self._monitor = monitor
        self._loop.add_reader(monitor.fileno(), self._drain)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        self._monitor = None
        if self._kernel is not None and self._loop is not None:
            self._loop.remove_reader(self._kernel.fileno())
            self._kernel.close()
        self._kernel = None

    # -- kernel uevents, read and parsed here --------------------------------

    def _open_kernel(self) -> None:
        # libudev through ctypes cost more per uevent than everything else
        # netwatch does with it; the kernel's format is a few NUL-separated lines.
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 NETLINK_KOBJECT_UEVENT)
        except OSError as exc:
            raise NetwatchError(f"cannot listen to kernel uevents: {exc.strerror or exc}") from exc
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, KERNEL_GROUP))
        except OSError as exc:
            sock.close()
            raise NetwatchError(f"cannot listen to kernel uevents: {exc.strerror or exc}") from exc
        self._kernel = sock
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._drain_kernel)

    def _drain_kernel(self) -> None:
        assert self._kernel is not None
        while True:
            try:
                data, (sender, _groups) = self._kernel.recvfrom(UEVENT_BUFFER)
            except BlockingIOError:
                return
            except OSError as exc:
                self._overflowed(exc)
                return
            if sender != 0:
                continue  # only the kernel speaks on this group; anything else is not believed
            event = parse_kernel_uevent(data)
            if event is not None:
                self.on_event(*event)

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
            try:
                name = device.sys_name
            except UnicodeDecodeError:  # pyudev decodes strictly; the ifindex names the link
                name = ""
            self.on_event(device.action or "", name, ifindex)

    def _overflowed(self, exc: OSError) -> None:
        if self._monitor is not None:
            # The pending socket error must be consumed, or poll() raises forever.
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
