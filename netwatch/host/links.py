"""Events in: the table of host links, kept current from netlink.

A netlink socket subscribed to link events is read on the event loop.
When the kernel drops events (ENOBUFS) the socket is replaced, subscribed
first, then the table is rebuilt from a dump before any queued event is
applied, so no event is ever assumed to have arrived.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute

from netwatch import events, tasks
from netwatch.host import rtnl

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_LOWER_UP = 0x10000
# The flags netwatch reads (up, loopback, carrier); only they are kept. A
# lower turning promiscuous as macvtaps join it is then no change, which
# had every NIC on it make a pass for nothing in the middle of a reattach.
FLAGS_READ = IFF_UP | IFF_LOOPBACK | IFF_LOWER_UP
SO_RCVBUFFORCE = 33
EVENT_RCVBUF = 8 * 1024 * 1024
NETLINK_ROUTE = 0


@dataclass(frozen=True)
class Link:
    """One host link as netlink last described it."""

    index: int
    name: str
    kind: str | None
    mac: str | None
    parent: int | None
    flags: int
    master: int | None = None

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def carrier(self) -> bool:
        return bool(self.flags & IFF_UP and self.flags & IFF_LOWER_UP)

    @classmethod
    def from_msg(cls, msg: Any) -> Link:
        """From a pyroute2 message (dumps), which gives a name that is not UTF-8 as bytes."""
        kind = msg.get(("linkinfo", "kind"))
        return cls(index=msg["index"], name=rtnl.name_of(msg.get("ifname") or ""),
                   kind=rtnl.name_of(kind) if kind is not None else None,
                   mac=(msg.get("address") or None), parent=msg.get("link") or None,
                   flags=msg["flags"] & FLAGS_READ,
                   master=msg.get("master") or None)


ChangeHandler = Callable[[Link | None, Link | None], None]


class LinkTable:
    """ifindex -> Link, with an index by name."""

    def __init__(self) -> None:
        self.by_index: dict[int, Link] = {}
        self._by_name: dict[str, int] = {}

    def get(self, index: int | None) -> Link | None:
        return self.by_index.get(index) if index is not None else None

    def named(self, name: str) -> Link | None:
        index = self._by_name.get(name)
        return self.by_index.get(index) if index is not None else None

    def __iter__(self) -> Any:
        return iter(list(self.by_index.values()))

    def __len__(self) -> int:
        return len(self.by_index)

    def apply(self, msg_type: int, fields: dict[str, Any]) -> tuple[Link | None, Link | None]:
        """Fold one decoded RTM_NEWLINK/RTM_DELLINK in; return (old, new)."""
        index = int(fields["index"])
        old = self.by_index.get(index)
        if old is not None and self._by_name.get(old.name) == index:
            del self._by_name[old.name]
        if msg_type == rtnl.RTM_DELLINK:
            self.by_index.pop(index, None)
            return old, None
        new = Link(index=index, name=fields["name"], kind=fields["kind"], mac=fields["mac"], parent=fields["parent"],
                   flags=fields["flags"] & FLAGS_READ, master=fields["master"])
        self.by_index[index] = new
        self._by_name[new.name] = index
        return old, new

    def replace(self, links: list[Link]) -> None:
        self.by_index = {link.index: link for link in links}
        self._by_name = {link.name: link.index for link in links}


class LinkMonitor:
    """Keeps a LinkTable current and reports every change.

    ``failed`` completes (with the error) only if following links became
    impossible; the service treats that as fatal.
    """

    def __init__(self, table: LinkTable, on_change: ChangeHandler, on_resync: Callable[[], None],
                 rcvbuf: int = EVENT_RCVBUF) -> None:
        self.table = table
        self.on_change = on_change
        self.on_resync = on_resync
        self.rcvbuf = rcvbuf
        self.resyncs = 0
        self.failed: asyncio.Future[None] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resync: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LinkMonitor:
        self._loop = asyncio.get_running_loop()
        self.failed = self._loop.create_future()
        self._subscribe()
        await self._dump()
        self._start_reading()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop([self._resync])
        self._close()

    def _subscribe(self) -> None:
        self._close()
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind((0, rtnl.RTMGRP_LINK))
        self._sock = sock

    def _start_reading(self) -> None:
        # Only after the dump: events queued meanwhile are newer than it.
        assert self._loop is not None and self._sock is not None
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    async def _dump(self) -> None:
        async with AsyncIPRoute() as dumper:
            links = [Link.from_msg(msg) async for msg in await dumper.link("dump")]
        self.table.replace(links)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._start_resync("netlink overflow (ENOBUFS): link events were lost")
                else:
                    self._fail(exc)
                return
            for msg_type, fields in rtnl.decode_links(data):
                old, new = self.table.apply(msg_type, fields)
                if old != new:
                    self.on_change(old, new)

    def _start_resync(self, why: str) -> None:
        assert self._loop is not None
        if self._resync is not None and not self._resync.done():
            return
        # The overflowed socket is useless: stop reading it before the dump.
        self._close()
        self._resync = self._loop.create_task(self._resubscribe(why), name="netwatch-links-resync")

    async def _resubscribe(self, why: str) -> None:
        try:
            self._subscribe()
            await self.refresh(why)
            self._start_reading()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._close()
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(exc)

    async def refresh(self, why: str) -> None:
        """Rebuild the table from a dump and have everything reconciled.

        Used after an overflow (with a fresh, not yet read socket) and after
        a uevent overflow (events keep flowing: they are complete link
        states in kernel order, so the table still converges).
        """
        self.resyncs += 1
        events.emit("resync", f"resynchronising links: {why}", reason=why)
        await self._dump()
        self.on_resync()
