"""The kernel side of a NIC's backend that is replaced under QEMU (hub and
direct wirings): the macvtap or tap link, made, proven netwatch's, deleted.

The driver (netwatch/host/backends.py) knows how each kind of link is made
and kept wired; this adds what a NIC needs of it: its names, what it is
making right now, and the rule that nothing is deleted or reused unless
the link itself proves it is netwatch's.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from netwatch.config import NicConfig
from netwatch.errors import LinkError
from netwatch.host.backends import DRIVERS, Created, LinkVanished, Placement, made_by_netwatch, provably_ours
from netwatch.host.links import Link
from netwatch.nic.env import NicEnv
from netwatch.nic.records import NicRecord

log = logging.getLogger(__name__)


class ForeignLink(LinkError):
    """A link has a NIC's backend name but is not netwatch's: nothing is done to it."""


class BackendLinks:
    """One NIC's backend links in the kernel."""

    def __init__(self, vm_name: str, nic: NicConfig, env: NicEnv) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.env = env
        # (name, lower ifindex) of the backend link being made, until it is recorded or given up.
        self.making: tuple[str, int] | None = None

    @property
    def driver(self) -> Any:
        return DRIVERS[self.nic.backend]

    def made(self, record: NicRecord) -> bool:
        """Whether the link ``record`` (this run's, or adopted) names is still the backend netwatch made."""
        link = self.env.links.get(record.ifindex)
        return (link is not None and link.name == record.ifname
                and made_by_netwatch(link, record.backend, record.mac))

    def proven(self, record: NicRecord) -> bool:
        """Whether a link is there that proves it is the backend an earlier run recorded for this NIC."""
        link = self.env.links.get(record.ifindex)
        return link is not None and provably_ours(link, record, self.nic.backend_names)

    async def clear_name(self, name: str) -> None:
        """Make room for a backend called ``name``: a stale one of netwatch's goes, any other link stays."""
        stale = self.env.links.named(name)
        if stale is None:
            return
        if not made_by_netwatch(stale, self.nic.backend, self.nic.mac):
            # A name is only a name: the admin's or another tool's link is never taken for netwatch's.
            raise ForeignLink(f"{name} (ifindex {stale.index}, {stale.kind or 'no kind'}, MAC {stale.mac or 'none'}) "
                              f"is not a backend netwatch made for this NIC: it is left alone", errno.EEXIST)
        await self.env.ops.delete(stale.index)

    async def create(self, name: str, placement: Placement) -> Created:
        """A new backend link ``name`` where ``placement`` says, with the fds QEMU gets."""
        await self.clear_name(name)
        self.making = (name, placement.lower.index if placement.lower else 0)
        try:
            return await self.driver.create(self.nic, name, placement, self.env.ops, self.env.node_dir)  # type: ignore[no-any-return]
        except LinkError as exc:
            self.making = None
            if exc.errno == errno.ENODEV and placement.lower is not None:
                raise LinkVanished(str(exc)) from exc
            raise
        except BaseException:
            self.making = None
            raise

    async def delete_recorded(self, record: NicRecord) -> bool:
        """Delete the link ``record`` names if it is provably the NIC's; whether the record describes what is there.

        False: a link of that name at that ifindex is not netwatch's: it is
        left alone, said once (its record is dropped by the caller).
        """
        link = self.env.links.get(record.ifindex)
        if link is None or link.name != record.ifname:
            return True  # gone already (a macvtap dies with its lower, a tap with its QEMU)
        if not provably_ours(link, record, self.nic.backend_names):
            log.warning("%s/%s: not removing %s (ifindex %d): the record names it, but it is not the %s netwatch "
                        "made for this NIC (%s, MAC %s)", self.vm_name, self.nic.id, link.name, link.index,
                        record.backend, link.kind or "no kind", link.mac or "none")
            return False
        try:
            await self.env.ops.delete(record.ifindex)
        except LinkError as exc:
            log.warning("%s/%s: removing %s failed: %s", self.vm_name, self.nic.id, record.ifname, exc)
        return True

    def expected(self, backend: NicRecord | None, old: Link | None, new: Link | None) -> bool:
        """Whether a link change only shows this NIC's own macvtap as it is being made or as recorded.

        Each new macvtap brings its NIC two to three events (link messages, a
        uevent) that would each cost a pass deciding nothing: at 256 NICs
        reattaching at once, a second pass for every NIC. A rename, a removal,
        another parent or MAC is never expected, nor any change of a tap (its
        flags and bridge are put back by a pass).
        """
        if new is None or self.driver.own_flags_matter or new.kind != "macvtap":
            return False
        if old is not None and (old.name, old.parent, old.kind, old.mac) != (new.name, new.parent, new.kind, new.mac):
            return False
        if backend is not None and new.index == backend.ifindex:
            return new.name == backend.ifname and new.parent == backend.lower_ifindex
        return self.making == (new.name, new.parent)
