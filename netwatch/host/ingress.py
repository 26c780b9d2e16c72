"""The redirect wiring's traffic control on host links: ingress qdiscs and redirect filters.

A redirect NIC's tap and macvlan are joined by one u32 + mirred filter on
each one's ingress (netwatch/host/tc.py encodes them and says why u32 and
why a filter is replaced in place). This is what netwatch does with those
requests on a link: put the qdisc there, aim a filter, read the filters
back. Links themselves (the macvlan, the tap) are netwatch/host/linkops.py's.
"""

from __future__ import annotations

import errno

from netwatch.errors import LinkError
from netwatch.host import tc
from netwatch.host.nlsocket import NetlinkSocket


class IngressFilters:
    """Ingress qdiscs and u32 + mirred redirect filters on links, over netwatch's own netlink socket."""

    def __init__(self, netlink: NetlinkSocket) -> None:
        self.netlink = netlink

    async def ensure_ingress(self, index: int) -> None:
        """An ingress qdisc on link ``index``: added, or already there (ingress or clsact, both take the filters)."""
        outcome, = await self.netlink.exchange(lambda seq: tc.add_ingress(seq, index))
        if outcome is not None and outcome.errno != errno.EEXIST:
            raise LinkError(f"cannot add an ingress qdisc to link {index}: {outcome}", outcome.errno)

    async def redirect(self, index: int, target: int, replace: bool) -> None:
        """Every frame arriving on link ``index`` leaves on link ``target`` (tc.redirect_filter).

        ``replace``: in place of the first u32 filter there, made if there is
        none; the only way to re-aim a filter whose target is gone.
        """
        outcome, = await self.netlink.exchange(lambda seq: tc.redirect_filter(seq, index, target, replace=replace))
        if outcome is not None:
            raise LinkError(f"cannot redirect link {index} to link {target}: {outcome}", outcome.errno)

    async def redirects(self, index: int) -> list[tuple[int, int]]:
        """(filter handle, target ifindex) of each redirect filter on link ``index`` (tc.redirect_targets).

        A target that unregistered reads 0. A link without an ingress qdisc,
        or no link at all, has none.
        """
        dump = await self.netlink.dump(lambda seq: tc.dump_filters(seq, index))
        if isinstance(dump, LinkError):
            raise LinkError(f"cannot read the filters of link {index}: {dump}", dump.errno)
        return [(handle, target) for reply in dump for _index_, handle, target in tc.redirect_targets(reply)]
