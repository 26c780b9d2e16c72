"""Actions out: changes to host links, over one command netlink socket."""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netwatch.errors import LinkError


class LinkOps:
    """Creates and deletes netwatch's backend links; an async context manager."""

    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None

    async def __aenter__(self) -> LinkOps:
        self._ipr = AsyncIPRoute()
        # pyroute2 opens a helper socket on the first "set" and keeps it: open
        # it now (an empty change to lo) so that fd counts stay flat later.
        await self._request("cannot reach netlink", "set", index=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
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
        await self._request(f"cannot create macvtap {name}", "add", ifname=name, kind="macvtap",
                            link=lower, macvtap_mode=mode, address=mac, state="up")
        return await self.index_of(name)

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

