"""Events in: the table of host links, kept current from netlink.

One AsyncIPRoute socket subscribes to link events only; when the kernel
drops events (ENOBUFS) the socket is replaced, subscribed first, then the
table is rebuilt from a dump, so no event is ever assumed to have arrived.
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
from pyroute2.netlink.rtnl import RTMGRP_LINK

from . import events, tasks

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
SO_RCVBUFFORCE = 33
EVENT_RCVBUF = 8 * 1024 * 1024


@dataclass(frozen=True)
class Link:
    """One host link as netlink last described it."""

    index: int
    name: str
    kind: str | None
    mac: str | None
    parent: int | None
    flags: int

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def carrier(self) -> bool:
        return bool(self.flags & IFF_UP and self.flags & IFF_LOWER_UP)

    @classmethod
    def from_msg(cls, msg: Any) -> Link:
        parent = msg.get("link")
        return cls(index=msg["index"], name=msg.get("ifname") or "", kind=msg.get(("linkinfo", "kind")),
                   mac=(msg.get("address") or None), parent=parent if parent else None,
                   flags=msg["flags"])


ChangeHandler = Callable[[Link | None, Link | None], None]


class LinkTable:
    """ifindex -> Link, with lookups by name."""

    def __init__(self) -> None:
        self.by_index: dict[int, Link] = {}

    def get(self, index: int | None) -> Link | None:
        return self.by_index.get(index) if index is not None else None

    def named(self, name: str) -> Link | None:
        return next((link for link in self.by_index.values() if link.name == name), None)

    def __iter__(self) -> Any:
        return iter(list(self.by_index.values()))

    def apply(self, msg: Any) -> tuple[Link | None, Link | None]:
        """Fold one RTM_NEWLINK/RTM_DELLINK message in; return (old, new)."""
        index = msg["index"]
        old = self.by_index.get(index)
        if msg["event"] == "RTM_DELLINK":
            self.by_index.pop(index, None)
            return old, None
        new = Link.from_msg(msg)
        self.by_index[index] = new
        return old, new

    def replace(self, links: list[Link]) -> None:
        self.by_index = {link.index: link for link in links}


class LinkMonitor:
    """Keeps a LinkTable current and reports every change; owns its task."""

    def __init__(self, table: LinkTable, on_change: ChangeHandler, on_resync: Callable[[], None],
                 rcvbuf: int = EVENT_RCVBUF) -> None:
        self.table = table
        self.on_change = on_change
        self.on_resync = on_resync
        self.rcvbuf = rcvbuf
        self.resyncs = 0
        self._sock: AsyncIPRoute | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LinkMonitor:
        await self._subscribe_and_dump()
        self._task = asyncio.create_task(self._run(), name="netwatch-links")
        return self

    @property
    def task(self) -> asyncio.Task[None]:
        """The event task: its end (other than cancellation) is a service failure."""
        assert self._task is not None
        return self._task

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop([self._task])
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _subscribe_and_dump(self) -> None:
        await self._subscribe()
        await self._dump()

    async def _subscribe(self) -> None:
        self._close()
        sock = AsyncIPRoute()
        try:
            sock.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except PermissionError:
            sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        # Subscribe before dumping: anything that changes during the dump is
        # queued as an event and folded in after it.
        await sock.bind(groups=RTMGRP_LINK)
        self._sock = sock

    async def _dump(self) -> None:
        async with AsyncIPRoute() as dumper:
            links = [Link.from_msg(msg) async for msg in await dumper.link("dump")]
        self.table.replace(links)

    async def _run(self) -> None:
        while True:
            try:
                assert self._sock is not None
                async for msg in self._sock.get():
                    if msg["event"] not in ("RTM_NEWLINK", "RTM_DELLINK"):
                        continue
                    old, new = self.table.apply(msg)
                    if old != new:
                        self.on_change(old, new)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The socket is unusable after ENOBUFS: replace it.
                await self._subscribe()
                await self.refresh("netlink overflow (ENOBUFS): link events were lost")

    async def refresh(self, why: str) -> None:
        """Rebuild the table from a dump and have everything reconciled.

        Safe beside the event task: events queued across the dump are
        complete link states applied in kernel order, so the table converges.
        """
        self.resyncs += 1
        events.emit("resync", f"resynchronising links: {why}", reason=why)
        await self._dump()
        self.on_resync()
