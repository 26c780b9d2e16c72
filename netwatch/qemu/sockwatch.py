"""Noticing a VM's QMP socket appear, so a starting QEMU is found at once.

netwatch connects to each VM's socket with a growing delay between tries
(up to 2 s); a QEMU started meanwhile (libvirt runs it paused for about
0.4 s before the guest starts) would otherwise wait out that delay with
its NICs unattached. An inotify watch on the socket's directory cuts the
delay short when a file of that name is created or moved there. Where
the directory does not exist (yet), the delay alone applies.

All VMs share one inotify instance (per event loop): instances count
against ``fs.inotify.max_user_instances`` (128 by default), shared by all
of root's processes, so one per VM would take systemd's, udevd's and
libvirtd's at about 128 VMs. Watches are per directory (the kernel gives
one directory one watch descriptor however often it is added) and events
are dispatched by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
import time

log = logging.getLogger(__name__)

# QEMU binds its socket (the file appears) a moment before it listens: a
# connection tried at once may be refused. For this long after the file
# appeared, retries come every FRESH_RETRY seconds instead of the backoff.
FRESH = 2.0
FRESH_RETRY = 0.02

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# Not IN_ATTRIB: whoever may touch the socket would otherwise end every backoff at will.
MASK = IN_CREATE | IN_MOVED_TO
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _Inotify:
    """The one inotify instance of an event loop, and which SocketWatches each of its watches serves."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        # watch descriptor -> the SocketWatches on that directory.
        self.watches: dict[int, set[SocketWatch]] = {}
        loop.add_reader(fd, self._read)

    def add(self, watch: SocketWatch) -> int | None:
        wd = int(_libc.inotify_add_watch(self.fd, os.fsencode(watch.directory), MASK))
        if wd < 0:
            log.debug("cannot watch %s (%s): polling", watch.directory, os.strerror(ctypes.get_errno()))
            return None
        self.watches.setdefault(wd, set()).add(watch)
        return wd

    def remove(self, watch: SocketWatch, wd: int) -> None:
        watchers = self.watches.get(wd)
        if watchers is None or watch not in watchers:
            return  # the directory went (IN_IGNORED): the kernel dropped the watch already
        watchers.discard(watch)
        if not watchers:
            del self.watches[wd]
            _libc.inotify_rm_watch(self.fd, wd)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                # Events were lost, whose is unknown: every sleeper tries its socket now.
                for watchers in list(self.watches.values()):
                    for watch in watchers:
                        watch.wake()
            elif mask & IN_IGNORED:
                # Its directory was removed (or unmounted): those VMs fall back to the delay.
                self.watches.pop(wd, None)
            else:
                for watch in list(self.watches.get(wd, ())):
                    if name == watch.name:
                        watch.wake()


# One instance per event loop (tests run several loops one after another),
# closed when its last SocketWatch closes.
_instances: dict[asyncio.AbstractEventLoop, _Inotify] = {}


def _instance(loop: asyncio.AbstractEventLoop) -> _Inotify | None:
    hub = _instances.get(loop)
    if hub is None:
        fd = int(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            log.debug("inotify unavailable (%s): polling for QMP sockets", os.strerror(ctypes.get_errno()))
            return None
        hub = _instances[loop] = _Inotify(loop, fd)
    return hub


def _release(loop: asyncio.AbstractEventLoop) -> None:
    hub = _instances.get(loop)
    if hub is not None and not hub.watches:
        del _instances[loop]
        hub.close()


class SocketWatch:
    """Sets ``appeared`` whenever something named like the socket shows up in its directory."""

    def __init__(self, path: str) -> None:
        self.directory, name = os.path.split(path)
        self.name = os.fsencode(name)
        self.appeared = asyncio.Event()
        self.appeared_at = float("-inf")
        self._wd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        hub = _instance(loop)
        if hub is None:
            return
        self._wd = hub.add(self)
        if self._wd is None:
            _release(loop)
            return
        self._loop = loop

    def wake(self) -> None:
        self.appeared_at = time.monotonic()
        self.appeared.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the socket appears meanwhile (tenacity's ``sleep``)."""
        if time.monotonic() - self.appeared_at < FRESH:
            seconds = min(seconds, FRESH_RETRY)
        self.appeared.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.appeared.wait()

    def close(self) -> None:
        if self._loop is None or self._wd is None:
            return
        hub = _instances.get(self._loop)
        if hub is not None:
            hub.remove(self, self._wd)
            _release(self._loop)
        self._loop = self._wd = None
