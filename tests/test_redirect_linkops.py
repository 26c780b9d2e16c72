"""Issue 22: the redirect wiring's kernel steps as netwatch does them, over
LinkOps' own netlink socket, against the real kernel in throwaway
namespaces: a silent macvlan, ingress qdiscs and u32 + mirred filters
(added, replaced, read back), the persistent tap made, adopted or refused,
and frames through the whole wiring both ways, across a lower flap."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import socket
import struct

import pytest

from netwatch.errors import LinkError
from netwatch.host import ptap, tc
from netwatch.host.linkops import LinkOps
from netwatch.sandbox.testbed import Netns, sh, unique, until, wait_until

from .test_redirect_primitives import GUEST_MAC, _round_trip
from .test_silent_backends import addresses, ipv6_on, router_advertisement, sniffing

pytestmark = pytest.mark.integration

ROUTER_MAC = "02:00:00:00:0a:01"
CONTROL_MAC = "02:00:00:00:0c:02"


def details(ns: Netns, name: str) -> dict[str, object]:
    found: list[dict[str, object]] = json.loads(ns.ip("-j", "-d", "link", "show", name))
    return found[0]


def sysctl(ns: Netns, key: str) -> str:
    return sh(*ns.exec_argv("sysctl", "-n", key)).strip()


def index_of(ns: Netns, name: str) -> int:
    return int(str(details(ns, name)["ifindex"]))


def test_a_macvlan_is_made_silent_allmulticast_and_at_the_lowers_mtu(netns: Netns) -> None:
    """No IPv6 address ever, not even from a router's advertisement, and no frame of the host's own."""
    ipv6_on(netns)
    netns.add_veth("mlow", "mwire")
    netns.ip("link", "set", "mlow", "mtu", "1400")
    lower = index_of(netns, "mlow")
    prefix = "2001:db8:88::"
    with sniffing(netns, "mwire") as sniffer:

        async def main() -> None:
            async with LinkOps() as ops:
                index = await ops.add_macvlan("mvx0", lower, GUEST_MAC, "bridge")
                other = await ops.add_macvlan("mvx1", lower, "52:54:00:3d:00:02", "private", up=False)
                made = details(netns, "mvx0")
                info = made["linkinfo"]
                assert isinstance(info, dict) and info["info_kind"] == "macvlan"
                assert info["info_data"]["mode"] == "bridge"
                flags = made["flags"]
                assert isinstance(flags, list) and "UP" in flags and "ALLMULTI" in flags, flags
                assert (made["ifindex"], made["address"], made["link"], made["mtu"]) == (index, GUEST_MAC,
                                                                                         "mlow", 1400)
                assert made["inet6_addr_gen_mode"] == "none"
                assert sysctl(netns, "net.ipv6.conf.mvx0.accept_ra") == "0"
                down = details(netns, "mvx1")
                assert down["ifindex"] == other and "UP" not in down["flags"]  # type: ignore[operator]
                assert "ALLMULTI" in down["flags"]  # type: ignore[operator]
                await ops.bring_up(other)
                assert "UP" in details(netns, "mvx1")["flags"]  # type: ignore[operator]
                with pytest.raises(LinkError) as taken:
                    await ops.add_macvlan("mvx0", lower, "52:54:00:3d:00:03", "bridge")
                assert taken.value.errno == errno.EEXIST
                assert str(taken.value).startswith("cannot create macvlan mvx0: "), taken.value

        with netns.entered():
            asyncio.run(main())

        # A macvlan as a host makes one: it takes the same advertisement and makes an address from it.
        netns.ip("link", "add", "link", "mlow", "name", "mvctl", "address", CONTROL_MAC, "type", "macvlan",
                 "mode", "bridge")
        netns.ip("link", "set", "mvctl", "up")
        with netns.entered():  # a packet socket belongs to the namespace it was made in
            wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            wire.bind(("mwire", 0))

            def control_took_it() -> bool:
                wire.send(router_advertisement(ROUTER_MAC, prefix))
                return any(a.startswith("2001:db8:88:") for a in addresses(netns, "mvctl"))
            wait_until(control_took_it, 20, "the control macvlan to take an address from the advertisement",
                       interval=0.2)
        finally:
            wire.close()
        wait_until(lambda: sniffer.sent_by(CONTROL_MAC), 20, "the control macvlan to speak (DAD, MLD, RS)")
        facts = {"addresses": addresses(netns, "mvx0") + addresses(netns, "mvx1"),
                 "frames from the guest's MAC": len(sniffer.sent_by(GUEST_MAC))}
        assert facts == {"addresses": [], "frames from the guest's MAC": 0}
    # What the redirect wiring must know: the kernel lowers a macvlan's MTU with its lower's, never raises it.
    netns.ip("link", "set", "mlow", "mtu", "1300")
    assert details(netns, "mvx0")["mtu"] == 1300
    netns.ip("link", "set", "mlow", "mtu", "1500")
    assert details(netns, "mvx0")["mtu"] == 1300


def test_filters_are_added_replaced_and_read_back_and_refusals_say_why(netns: Netns) -> None:
    netns.add_veth("flow", "fwire")
    netns.ip("link", "add", "link", "flow", "name", "fmv", "type", "macvlan", "mode", "bridge")
    netns.ip("link", "add", "fother", "type", "veth", "peer", "name", "fother2")
    netns.ip("link", "add", "fbare", "type", "veth", "peer", "name", "fbare2")
    # Another tool's clsact qdisc (in place of an ingress one) takes the filters as well.
    sh(*netns.exec_argv("tc", "qdisc", "add", "dev", "fother", "clsact"))
    low, mv, other, bare = (index_of(netns, name) for name in ("flow", "fmv", "fother", "fbare"))

    async def main() -> None:
        async with LinkOps() as ops:
            for index in (low, mv, low, other):  # twice is fine, and so is a clsact qdisc
                await ops.ensure_ingress(index)
            assert await ops.redirects(low) == []
            await ops.redirect(low, mv, replace=False)
            await ops.redirect(mv, low, replace=True)  # replace makes it when there is none
            await ops.redirect(other, low, replace=True)
            assert await ops.redirects(low) == [(tc.U32_FIRST_HANDLE, mv)]
            assert await ops.redirects(mv) == [(tc.U32_FIRST_HANDLE, low)]
            assert await ops.redirects(other) == [(tc.U32_FIRST_HANDLE, low)]
            await ops.redirect(low, other, replace=True)
            assert await ops.redirects(low) == [(tc.U32_FIRST_HANDLE, other)]
            # A target that unregisters reads 0: the filter is still there, and drops every frame.
            netns.ip("link", "del", "fother")
            assert await ops.redirects(low) == [(tc.U32_FIRST_HANDLE, 0)]
            assert await ops.redirects(999999) == []
            # Many at once (a lower with many NICs coming back): each answer reaches its own request.
            dumps = await asyncio.gather(*(ops.redirects(mv) for _ in range(40)),
                                         *(ops.redirect(mv, low, replace=True) for _ in range(40)))
            assert dumps[:40] == [[(tc.U32_FIRST_HANDLE, low)]] * 40
            # The kernel's own sentence reaches the error.
            with pytest.raises(LinkError) as no_qdisc:
                await ops.redirect(bare, low, replace=False)
            assert "Parent Qdisc doesn't exist" in str(no_qdisc.value), no_qdisc.value
            assert str(no_qdisc.value).startswith(f"cannot redirect link {bare} to link {low}: ")
            with pytest.raises(LinkError) as no_target:
                await ops.redirect(mv, 999999, replace=True)
            assert no_target.value.errno == errno.ENODEV, no_target.value
            with pytest.raises(LinkError) as no_link:
                await ops.ensure_ingress(999999)
            assert no_link.value.errno == errno.ENODEV and "ingress qdisc" in str(no_link.value)
            assert await ops.redirects(mv) == [(tc.U32_FIRST_HANDLE, low)]  # still serving

    with netns.entered():
        asyncio.run(main())


def test_a_lost_answer_fails_every_waiting_request_and_the_socket_serves_on(netns: Netns) -> None:
    """ENOBUFS (the socket's buffer overflowed): dumps and changes waiting are told, not left hanging."""
    netns.add_veth("blow", "bwire")
    low = index_of(netns, "blow")

    async def main() -> None:
        async with LinkOps() as ops:
            await ops.ensure_ingress(low)
            await ops.redirect(low, low, replace=True)
            assert ops.netlink._sock is not None
            ops.netlink._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
            # All sent before the loop reads an answer: most answers find the buffer full.
            outcomes = await asyncio.gather(*(ops.redirects(low) for _ in range(5)),
                                            *(ops.redirect(low, low, replace=True) for _ in range(200)),
                                            return_exceptions=True)
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert lost and all(isinstance(o, LinkError) and o.errno == errno.ENOBUFS for o in lost), \
                {str(o) for o in lost}
            assert all(o in (None, [(tc.U32_FIRST_HANDLE, low)]) for o in outcomes if o not in lost)
            ops.netlink._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            assert await ops.redirects(low) == [(tc.U32_FIRST_HANDLE, low)]
            assert not ops.netlink._pending

    with netns.entered():
        asyncio.run(main())


def _tap_fields(ns: Netns, name: str) -> dict[str, object]:
    made = details(ns, name)
    info = made["linkinfo"]
    assert isinstance(info, dict)
    return {"kind": info["info_kind"], "mac": made["address"], "up": "UP" in made["flags"],  # type: ignore[operator]
            "addr_gen": made.get("inet6_addr_gen_mode"), **info["info_data"]}


def _open_as_qemu(ns: Netns, name: str, queues: int) -> list[int]:
    fds = []
    for _ in range(queues):
        with ns.entered():  # a tun fd belongs to the namespace it was opened in
            fds.append(os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK))
        fcntl.ioctl(fds[-1], ptap.TUNSETIFF, struct.pack("16sH22x", name.encode(), ptap.tap_flags(queues)))
    return fds


def test_the_tap_is_made_adopted_or_refused_and_deleted_only_when_provably_ours(netns: Netns) -> None:
    ipv6_on(netns)
    tap_mac = ptap.tap_mac(GUEST_MAC)
    netns.ip("link", "add", "tveth", "type", "veth", "peer", "name", "tveth2")
    netns.ip("tuntap", "add", "dev", "tplain", "mode", "tap")  # persistent, no vnet header, another MAC
    netns.ip("tuntap", "add", "dev", "tsingle", "mode", "tap", "vnet_hdr")
    netns.ip("link", "set", "tsingle", "address", tap_mac)
    before = {name: details(netns, name) for name in ("tveth", "tplain", "tsingle")}
    qemu: list[int] = []

    async def main() -> None:
        async with LinkOps() as ops:
            index = await ops.ensure_tap("rtap0", 2, 65534, GUEST_MAC)
            made = _tap_fields(netns, "rtap0")
            assert made["kind"] == "tun"
            assert {k: made[k] for k in ("mac", "up", "addr_gen", "type", "pi", "vnet_hdr", "multi_queue",
                                         "persist", "user")} == {
                "mac": tap_mac, "up": True, "addr_gen": "none", "type": "tap", "pi": False, "vnet_hdr": True,
                "multi_queue": True, "persist": True, "user": "nobody"}
            assert sysctl(netns, "net.ipv6.conf.rtap0.accept_ra") == "0"
            assert index == index_of(netns, "rtap0")
            # Adopted as it is, again and while QEMU holds it (two queues).
            assert await ops.ensure_tap("rtap0", 2, 65534, GUEST_MAC) == index
            qemu.extend(_open_as_qemu(netns, "rtap0", 2))
            assert await ops.ensure_tap("rtap0", 2, 65534, GUEST_MAC) == index
            # Not netwatch's: refused, and left as it was.
            refusals = {
                ("tveth", 1, None): "it is a veth, not a tap",
                ("tplain", 1, None): "its flags are",
                ("tsingle", 2, None): "its flags are",  # multi-queue on one side only: QEMU would get EINVAL
                ("rtap0", 2, 0): "it is owned by uid 65534, not 0",
                ("rtap0", 2, None): "it is owned by uid 65534, not None",
            }
            for (name, queues, owner), why in refusals.items():
                with pytest.raises(LinkError) as refused:
                    await ops.ensure_tap(name, queues, owner, GUEST_MAC)
                assert str(refused.value).startswith(f"tap {name} exists and is not netwatch's ({why}"), refused.value
            with pytest.raises(LinkError, match="its MAC is fe:54:00:3d:00:01, not fe:54:00:3d:00:09"):
                await ops.ensure_tap("rtap0", 2, 65534, "52:54:00:3d:00:09")
            assert await ops.ensure_tap("tsingle", 1, None, GUEST_MAC) == index_of(netns, "tsingle")
            # Deleted only when provably ours, and never while QEMU holds it.
            for name, why in (("tveth", "it is a veth, not a tap"), ("tplain", "its MAC is")):
                with pytest.raises(LinkError, match=f"tap {name} exists and is not netwatch's \\({why}"):
                    await ops.delete_tap(name, GUEST_MAC)
            with pytest.raises(LinkError, match=r"tap rtap0 is still open \(2 queues attached\)"):
                await ops.delete_tap("rtap0", GUEST_MAC)
            assert index_of(netns, "rtap0") == index
            for fd in qemu:
                os.close(fd)
            qemu.clear()
            assert await ops.delete_tap("rtap0", GUEST_MAC) is True
            assert await ops.delete_tap("rtap0", GUEST_MAC) is False
            assert not netns.link_exists("rtap0")

    try:
        with netns.entered():
            asyncio.run(main())
    finally:
        for fd in qemu:
            os.close(fd)
    for name in ("tveth", "tplain"):
        assert details(netns, name) == before[name], name


def test_frames_cross_the_wiring_both_ways_across_a_lower_flap(netns: Netns) -> None:
    """The wiring as the redirect NIC will make it, all over LinkOps; QEMU never touched on the flap."""
    netns.add_veth("wlow", "wwire")
    wire = netns.packet_socket("wwire")
    qemu: list[int] = []

    async def wire_up(ops: LinkOps, tap: int) -> int:
        # Down until both filters are in place: no frame of the guest's reaches the host's own stack.
        mv = await ops.add_macvlan("wmv", index_of(netns, "wlow"), GUEST_MAC, "bridge", up=False)
        await ops.ensure_ingress(mv)
        await ops.redirect(mv, tap, replace=False)
        await ops.redirect(tap, mv, replace=True)
        await ops.bring_up(mv)
        return mv

    async def main() -> None:
        async with LinkOps() as ops:
            tap = await ops.ensure_tap("wtap", 1, None, GUEST_MAC)
            await ops.ensure_ingress(tap)
            qemu.extend(_open_as_qemu(netns, "wtap", 1))
            mv = await wire_up(ops, tap)
            _round_trip(qemu[0], wire, b"first")
            netns.ip("link", "del", "wlow")  # the macvlan goes with it
            await until(lambda: not netns.link_exists("wmv"), "the macvlan to go with its lower")
            assert await ops.redirects(tap) == [(tc.U32_FIRST_HANDLE, 0)]
            netns.add_veth("wlow", "wwire2")
            new_mv = await wire_up(ops, tap)
            assert await ops.redirects(tap) == [(tc.U32_FIRST_HANDLE, new_mv)] and new_mv != mv
            second = netns.packet_socket("wwire2")
            try:
                _round_trip(qemu[0], second, b"second")
            finally:
                second.close()
            assert await ops.ensure_tap("wtap", 1, None, GUEST_MAC) == tap

    try:
        with netns.entered():
            asyncio.run(main())
    finally:
        for fd in qemu:
            os.close(fd)
        wire.close()


def test_links_are_read_back_from_their_own_namespace_not_from_sysfs(netns: Netns) -> None:
    """In a namespace /sys shows the host's links: a host link of the same name is not taken for the new one."""
    host = sorted(name for name in os.listdir("/sys/class/net") if name != "lo")
    if not host:
        pytest.skip("the host has no link but lo")
    name = host[0]
    with open(f"/sys/class/net/{name}/ifindex") as handle:
        host_index = int(handle.read())
    netns.add_veth("slow", "swire")
    while max(int(str(link["ifindex"])) for link in json.loads(netns.ip("-j", "link", "show"))) < host_index:
        netns.add_veth(unique("sp"), unique("sq"))  # the next link's ifindex here is past the host's one

    async def main() -> None:
        async with LinkOps() as ops:
            index = await ops.add_macvlan(name, index_of(netns, "slow"), GUEST_MAC, "bridge")
            assert index == index_of(netns, name) and index != host_index
            await ops.ensure_ingress(index)
            await ops.redirect(index, index_of(netns, "swire"), replace=True)

    with netns.entered():
        asyncio.run(main())
