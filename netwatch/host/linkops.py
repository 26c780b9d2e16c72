"""Actions out: changes to host links, over netlink.

Macvtaps, made on every reattach, go out as requests netwatch encodes
itself (netwatch/host/rtnl.py) on a socket of their own; everything else
through pyroute2.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import os
import socket
from collections.abc import Callable
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
        """Create macvtap ``name`` on ifindex ``lower``, silent (see :meth:`silence`), up; return its ifindex."""
        try:
            # The kernel does the whole change inside the send; the ack follows on the socket.
            made, = await self._exchange(lambda seq: rtnl.newlink_macvtap(seq, name, lower, mac, mode))
            if made is not None:
                raise made
            index = await self.index_of(name)
        except LinkError as exc:
            raise LinkError(f"cannot create macvtap {name}: {exc}", exc.errno) from exc
        try:
            # One datagram: the kernel runs the two in order, so the link is
            # up only once it makes no address of its own.
            silenced, up = await self._exchange(lambda seq: rtnl.setlink(seq, index, no_addr_gen=True),
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
        silenced, = await self._exchange(lambda seq: rtnl.setlink(seq, index, no_addr_gen=True))
        if silenced is not None and silenced.errno != errno.EAFNOSUPPORT:
            raise LinkError(f"cannot turn off IPv6 address generation on link {index}: {silenced}", silenced.errno)
        if generated_from is not None and silenced is None:
            address = str(eui64_link_local(generated_from))
            try:
                await self.ipr.addr("del", index=index, address=address, prefixlen=64)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                    raise LinkError(f"cannot remove {address} from link {index}: {exc}", exc.code) from exc

    async def _exchange(self, *requests: Callable[[int], bytes]) -> list[LinkError | None]:
        """Send requests (each built for its sequence number) in one datagram; each one's outcome.

        The kernel runs them in order, a refused one not stopping the next.
        """
        assert self._sock is not None and self._loop is not None, "LinkOps used outside its context"
        seqs = [next(self._seq) % 0xFFFFFFFF + 1 for _ in requests]
        outcomes: list[asyncio.Future[None]] = []
        for seq in seqs:
            outcomes.append(self._loop.create_future())
            self._acks[seq] = outcomes[-1]
        try:
            self._sock.send(b"".join(request(seq) for request, seq in zip(requests, seqs, strict=True)))
            async with asyncio.timeout(ACK_TIMEOUT):
                results = await asyncio.gather(*outcomes, return_exceptions=True)
        except OSError as exc:
            raise LinkError(exc.strerror or str(exc), exc.errno) from exc
        except TimeoutError as exc:
            raise LinkError(f"the kernel did not answer within {ACK_TIMEOUT:g} s", errno.ETIMEDOUT) from exc
        finally:
            for seq in seqs:
                self._acks.pop(seq, None)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, LinkError):
                raise result
        return [result if isinstance(result, LinkError) else None for result in results]

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


def eui64_link_local(mac: str) -> ipaddress.IPv6Address:
    """The link-local address the kernel makes from ``mac`` by default (addr_gen_mode eui64)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    interface_id = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + interface_id)
