"""Noticing a VM's QMP socket appear, so a starting QEMU is found at once.

netwatch connects to each VM's socket with a growing delay between tries
(up to 2 s); a QEMU started meanwhile (libvirt runs it paused for about
0.4 s before the guest starts) would otherwise wait out that delay with
its NICs unattached. An inotify watch on the socket's directory cuts the
delay short when a file of that name is created or moved there. Where
the directory does not exist (yet), the delay alone applies.
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

IN_CREATE, IN_MOVED_TO, IN_ATTRIB = 0x100, 0x80, 0x4
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class SocketWatch:
    """Sets ``appeared`` whenever something named like the socket shows up in its directory."""

    def __init__(self, path: str) -> None:
        self.directory, name = os.path.split(path)
        self.name = os.fsencode(name)
        self.appeared = asyncio.Event()
        self.appeared_at = float("-inf")
        self._fd: int | None = None

    def start(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.debug("inotify unavailable (%s): polling for %s", os.strerror(ctypes.get_errno()), self.directory)
            return
        if _libc.inotify_add_watch(fd, os.fsencode(self.directory), IN_CREATE | IN_MOVED_TO | IN_ATTRIB) < 0:
            log.debug("cannot watch %s (%s): polling", self.directory, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if name == self.name:
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
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
