"""Actions out: changes to host links, over netlink.

What a reattach does to links (macvtaps; for the redirect wiring macvlans
and persistent taps) goes out as requests netwatch encodes itself
(netwatch/host/rtnl.py) on its own socket (netwatch/host/nlsocket.py);
everything else through pyroute2. The redirect wiring's ingress qdiscs and
filters are netwatch/host/ingress.py's, on the same socket.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netwatch.errors import DeviceError, LinkError
from netwatch.host import ptap, rtnl
from netwatch.host.ingress import IngressFilters
from netwatch.host.nlsocket import NetlinkSocket


class LinkOps:
    """Creates and deletes netwatch's backend links (macvtaps, macvlans, persistent taps); an async context
    manager. The redirect wiring's filters between them are :attr:`filters`' (its methods are also here)."""

    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None
        # netwatch's own requests: links here, qdiscs and filters in IngressFilters.
        self.netlink = NetlinkSocket()
        self.filters = IngressFilters(self.netlink)

    async def __aenter__(self) -> LinkOps:
        self._ipr = AsyncIPRoute()
        try:
            # pyroute2 opens a helper socket on the first "set" and keeps it: open
            # it now (an empty change to lo) so that fd counts stay flat later.
            await self._request("cannot reach netlink", "set", index=1)
            self.netlink.open()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.netlink.close()
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
        """Create macvtap ``name`` on ifindex ``lower``, silent (see :meth:`silence`), up; return its ifindex."""
        try:
            # The kernel does the whole change inside the send; the ack follows on the socket.
            made, = await self.netlink.exchange(lambda seq: rtnl.newlink_macvtap(seq, name, lower, mac, mode))
            if made is not None:
                raise made
            index = await self.index_of(name)
        except LinkError as exc:
            raise LinkError(f"cannot create macvtap {name}: {exc}", exc.errno) from exc
        try:
            # One datagram: the kernel runs the two in order, so the link is
            # up only once it makes no address of its own.
            silenced, up = await self.netlink.exchange(lambda seq: rtnl.setlink(seq, index, no_addr_gen=True),
                                                       lambda seq: rtnl.setlink(seq, index, up=True))
            if silenced is not None and silenced.errno != errno.EAFNOSUPPORT:
                # It came up all the same: it goes before its timers (DAD, MLD) send anything.
                raise silenced
            if up is not None:
                raise up
        except BaseException as exc:
            with contextlib.suppress(LinkError, OSError):
                await self.delete(index)
            if isinstance(exc, LinkError):
                raise LinkError(f"cannot create macvtap {name}: {exc}", exc.errno) from exc
            raise
        return index

    async def silence(self, index: int, generated_from: str | None = None) -> None:
        """No IPv6 address generation on link ``index`` from now on (set before it goes up).

        A backend carries the guest's MAC (a tap, one derived from it): with
        the kernel's defaults the host would give it the guest's own
        link-local address and send router solicitations, MLD reports and
        DAD probes from it, onto the guest's network. EAFNOSUPPORT: the link
        has no IPv6 at all (IPv6 disabled at boot, an MTU under 1280),
        which is as silent. ``generated_from``: a MAC whose EUI-64
        link-local address the kernel may have made already (a link made
        before this rule) is removed too; other addresses (a hook's) stay.
        """
        silenced, = await self.netlink.exchange(lambda seq: rtnl.setlink(seq, index, no_addr_gen=True))
        if silenced is not None and silenced.errno != errno.EAFNOSUPPORT:
            raise LinkError(f"cannot turn off IPv6 address generation on link {index}: {silenced}", silenced.errno)
        if generated_from is not None and silenced is None:
            address = str(eui64_link_local(generated_from))
            try:
                await self.ipr.addr("del", index=index, address=address, prefixlen=64)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                    raise LinkError(f"cannot remove {address} from link {index}: {exc}", exc.code) from exc

    async def add_macvlan(self, name: str, lower: int, mac: str, mode: str, *, up: bool = True) -> int:
        """Create macvlan ``name`` on ifindex ``lower`` with ``mac`` in macvlan ``mode``; return its ifindex.

        For the redirect wiring: it takes the guest's frames off the lower
        as the NIC's macvtap would. Silent as a macvtap (:meth:`silence`) and
        deaf to router advertisements (SLAAC makes an address whatever the
        address generation mode, and the guest's router speaks on this
        link); allmulticast, or it would filter multicast by its own list
        (the guest's IPv6 neighbour discovery, mDNS, VRRP). Its MTU is the
        lower's, from the kernel. ``up=False`` leaves it down for
        :meth:`bring_up`: its filters can be in place before any frame
        arrives.
        """
        try:
            # One datagram: the link, then the link read back (its ifindex, from this namespace).
            made, found = await self.netlink.transact(lambda seq: rtnl.newlink_macvlan(seq, name, lower, mac, mode),
                                                     lambda seq: rtnl.getlink(seq, name))
            if isinstance(made, LinkError):
                raise made
            index = _index(found, name)
        except LinkError as exc:
            raise LinkError(f"cannot create macvlan {name}: {exc}", exc.errno) from exc
        try:
            refuse_router_advertisements(name)
            # The kernel runs the two in order: up only once it makes no address of its own.
            silenced, rest = await self.netlink.exchange(lambda seq: rtnl.setlink(seq, index, no_addr_gen=True),
                                                         lambda seq: rtnl.setlink(seq, index, allmulti=True, up=up))
            if silenced is not None and silenced.errno != errno.EAFNOSUPPORT:
                raise silenced
            if rest is not None:
                raise rest
        except BaseException as exc:
            with contextlib.suppress(LinkError):
                await self._dellink(index)
            if isinstance(exc, LinkError):
                raise LinkError(f"cannot create macvlan {name}: {exc}", exc.errno) from exc
            raise
        return index

    async def bring_up(self, index: int) -> None:
        """Set link ``index`` up (its other flags stay)."""
        outcome, = await self.netlink.exchange(lambda seq: rtnl.setlink(seq, index, up=True))
        if outcome is not None:
            raise LinkError(f"cannot set link {index} up: {outcome}", outcome.errno)

    # The redirect wiring's filters are IngressFilters'; its callers reach them through LinkOps.

    async def ensure_ingress(self, index: int) -> None:
        """:meth:`IngressFilters.ensure_ingress`."""
        await self.filters.ensure_ingress(index)

    async def redirect(self, index: int, target: int, replace: bool) -> None:
        """:meth:`IngressFilters.redirect`."""
        await self.filters.redirect(index, target, replace)

    async def redirects(self, index: int) -> list[tuple[int, int]]:
        """:meth:`IngressFilters.redirects`."""
        return await self.filters.redirects(index)

    async def ensure_tap(self, name: str, queues: int, owner: int | None, guest_mac: str) -> int:
        """The redirect wiring's persistent tap ``name``, up and silent; its ifindex.

        Made when no link has that name (``queues`` > 1: multi-queue; owned
        by uid ``owner``, None: any), with the tap form of ``guest_mac``
        (ptap.tap_mac) from the start. A link of that name is adopted only
        when it is such a tap already (flags, owner and MAC): then it is
        silenced and set up, and nothing else changes (QEMU may hold it).
        Anything else is refused, and left as it is.
        """
        mac = ptap.tap_mac(guest_mac)
        existing = await self.link(name)
        made = existing is None
        if existing is None:
            try:
                ptap.make_persistent_tap(name, queues, owner, mac)
            except DeviceError as exc:
                cause = exc.__cause__
                raise LinkError(str(exc), cause.errno if isinstance(cause, OSError) else None) from exc
            existing = await self.link(name)
            if existing is None:
                raise LinkError(f"tap {name} was deleted as it was made", errno.ENODEV)
        reply = existing
        fields = _fields(reply)
        index = int(str(fields["index"]))
        why = ptap.not_adoptable(reply, queues, owner, mac)
        if why is not None:
            raise LinkError(f"tap {name} exists and is not netwatch's ({why})", errno.EEXIST)
        try:
            refuse_router_advertisements(name)
            if not made:
                # Adopted: as one made now, without the link-local address a kernel default gave it.
                await self.silence(index, generated_from=mac)
                if not int(str(fields["flags"])) & rtnl.IFF_UP:
                    await self.bring_up(index)
                return index
            silenced, up = await self.netlink.exchange(lambda seq: rtnl.setlink(seq, index, no_addr_gen=True),
                                                       lambda seq: rtnl.setlink(seq, index, up=True))
            if silenced is not None and silenced.errno != errno.EAFNOSUPPORT:
                raise silenced
            if up is not None:
                raise up
        except BaseException as exc:
            if made:
                with contextlib.suppress(LinkError):
                    await self._dellink(index)
            if isinstance(exc, LinkError):
                raise LinkError(f"cannot set up tap {name}: {exc}", exc.errno) from exc
            raise
        return index

    async def delete_tap(self, name: str, guest_mac: str) -> bool:
        """Delete the persistent tap ``name`` netwatch made for ``guest_mac``; False if there is none.

        Only a link that proves itself netwatch's tap (a persistent tap with
        the tap form of ``guest_mac``) goes; anything else is refused, and so
        is a tap some process (QEMU) still holds: deleting it would cut a
        running guest's NIC for good.
        """
        reply = await self.link(name)
        if reply is None:
            return False
        index = int(str(_fields(reply)["index"]))
        why = ptap.not_made_for(reply, ptap.tap_mac(guest_mac))
        if why is not None:
            raise LinkError(f"tap {name} exists and is not netwatch's ({why}): left in place", errno.EEXIST)
        info = ptap.tap_info(reply)
        if info is not None and info.attached:
            raise LinkError(f"tap {name} is still open ({info.attached} queues attached): left in place",
                            errno.EBUSY)
        return await self._dellink(index)

    async def link(self, name: str) -> bytes | None:
        """The kernel's RTM_NEWLINK message for link ``name``; None when there is none.

        Over netlink, in the socket's namespace (/sys shows the links of the
        namespace it was mounted in).
        """
        reply, = await self.netlink.transact(lambda seq: rtnl.getlink(seq, name))
        if isinstance(reply, LinkError):
            if reply.errno == errno.ENODEV:
                return None
            raise LinkError(f"cannot read link {name}: {reply}", reply.errno)
        return reply[0] if reply else None

    async def _dellink(self, index: int) -> bool:
        outcome, = await self.netlink.exchange(lambda seq: rtnl.dellink(seq, index))
        if outcome is not None:
            if outcome.errno == errno.ENODEV:
                return False
            raise LinkError(f"cannot delete link {index}: {outcome}", outcome.errno)
        return True

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


def eui64_link_local(mac: str) -> ipaddress.IPv6Address:
    """The link-local address the kernel makes from ``mac`` by default (addr_gen_mode eui64)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    interface_id = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + interface_id)


def refuse_router_advertisements(name: str) -> None:
    """accept_ra 0 on link ``name`` (a tap, a macvlan).

    A link carrying a guest's frames to the host's own stack (a routed tap;
    a redirect NIC's macvlan, whenever its filter is not there) would take
    the router advertisements the guest or its router sends: with the
    kernel's default (accept_ra 1 where the host does not forward) that
    gave the host an address on the link (SLAAC, address generation off or
    not) and a default route through it.
    """
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as handle:
            handle.write("0")
    except FileNotFoundError:
        return  # no IPv6 on this link: nothing to refuse
    except OSError as exc:
        raise LinkError(f"cannot refuse router advertisements on {name}: {exc.strerror or exc}", exc.errno) from exc


def _fields(reply: bytes) -> dict[str, object]:
    for _type, fields in rtnl.decode_links(reply):
        return fields
    raise LinkError("the kernel's answer has no link in it")


def _index(found: list[bytes] | LinkError, name: str) -> int:
    if isinstance(found, LinkError):
        raise LinkError(f"made, but cannot be read back: {found}", found.errno)
    if not found:
        raise LinkError(f"{name} made, but the kernel did not show it")
    return int(str(_fields(found[0])["index"]))

