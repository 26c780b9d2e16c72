"""Actions out: changes to host links, over netlink.

Macvtaps, made on every reattach, go out as requests netwatch encodes
itself (netwatch/host/rtnl.py) on a socket of their own; everything else
through pyroute2.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netwatch.errors import LinkError
from netwatch.host import rtnl

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11  # the kernel says why a request failed, not just the errno
ACK_TIMEOUT = 10.0
ACK_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = 33


class LinkOps:
    """Creates and deletes netwatch's backend links; an async context manager."""

    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}  # sequence number -> its request's outcome
        self._seq = itertools.count(1)

    async def __aenter__(self) -> LinkOps:
        self._ipr = AsyncIPRoute()
        try:
            # pyroute2 opens a helper socket on the first "set" and keeps it: open
            # it now (an empty change to lo) so that fd counts stay flat later.
            await self._request("cannot reach netlink", "set", index=1)
            self._sock = socket.socket(socket.AF_NETLINK,
                                       socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                       socket.NETLINK_ROUTE)
            with contextlib.suppress(OSError):  # an old kernel: errors come without the kernel's sentence
                self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            # Room for the acks of every NIC reattaching at once while the loop is busy elsewhere
            # (an ack's skb takes ~800 bytes of the buffer: the default holds ~260).
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ACK_BUFFER)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ACK_BUFFER)
            self._sock.bind((0, 0))
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._readable)
        except OSError as exc:
            await self.__aexit__()
            raise LinkError(f"cannot open a netlink socket: {exc.strerror or exc}", exc.errno) from exc
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._fail_pending(LinkError("netwatch is stopping"))
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> AsyncIPRoute:
        assert self._ipr is not None, "LinkOps used outside its context"
        return self._ipr

    async def _request(self, what: str, command: str, **kwargs: Any) -> Any:
        try:
            return await self.ipr.link(command, **kwargs)
        except NetlinkError as exc:
            raise LinkError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}", exc.code) from exc
        except OSError as exc:
            raise LinkError(f"{what}: {exc.strerror or exc}", exc.errno) from exc

    async def add_macvtap(self, name: str, lower: int, mac: str, mode: str) -> int:
        """Create macvtap ``name`` on ifindex ``lower``, up; return its ifindex."""
        assert self._sock is not None and self._loop is not None, "LinkOps used outside its context"
        seq = next(self._seq) % 0xFFFFFFFF + 1
        outcome = self._loop.create_future()
        self._acks[seq] = outcome
        try:
            # The kernel does the whole change inside this call; the ack follows on the socket.
            self._sock.send(rtnl.newlink_macvtap(seq, name, lower, mac, mode))
            async with asyncio.timeout(ACK_TIMEOUT):
                await outcome
        except LinkError as exc:
            raise LinkError(f"cannot create macvtap {name}: {exc}", exc.errno) from exc
        except OSError as exc:
            raise LinkError(f"cannot create macvtap {name}: {exc.strerror or exc}", exc.errno) from exc
        except TimeoutError as exc:
            raise LinkError(f"cannot create macvtap {name}: the kernel did not answer within {ACK_TIMEOUT:g} s",
                            errno.ETIMEDOUT) from exc
        finally:
            self._acks.pop(seq, None)
        return await self.index_of(name)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                # Acks were lost (ENOBUFS): whoever waits is told, and retries.
                self._fail_pending(LinkError(f"netlink: {exc.strerror or exc}", exc.errno))
                return
            for seq, error, message in rtnl.acks(data):
                outcome = self._acks.pop(seq, None)
                if outcome is None or outcome.done():
                    continue
                if error:
                    outcome.set_exception(LinkError(message or os.strerror(error), error))
                else:
                    outcome.set_result(None)

    def _fail_pending(self, error: LinkError) -> None:
        pending, self._acks = self._acks, {}
        for outcome in pending.values():
            if not outcome.done():
                outcome.set_exception(error)

    async def index_of(self, name: str) -> int:
        """A link's ifindex: from sysfs (cheap), else over netlink."""
        try:
            with open(f"/sys/class/net/{name}/ifindex") as handle:
                return int(handle.read())
        except (OSError, ValueError):
            return await self._index_of(name)

    async def configure(self, index: int, what: str, **changes: Any) -> None:
        """Change a link (address, state, master, ...)."""
        await self._request(f"cannot {what}", "set", index=index, **changes)

    async def _index_of(self, name: str) -> int:
        reply = await self._request(f"cannot find {name}", "get", ifname=name)
        return int(reply[0]["index"])

    async def delete(self, index: int) -> bool:
        """Delete a link; False if it was already gone."""
        try:
            await self.ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise LinkError(f"cannot delete link {index}: {exc}") from exc
        return True

