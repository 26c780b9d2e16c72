"""The redirect wiring's kernel primitives against the real kernel: a
persistent tap, and u32 + mirred filters made, replaced and read back."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from netwatch.errors import DeviceError
from netwatch.host import ptap, rtnl, tc
from netwatch.sandbox.testbed import Netns

GUEST_MAC = "52:54:00:3d:00:01"
VNET_HDR = 10  # struct virtio_net_hdr, the tap's default vnet header size


def _ask(sock: socket.socket, message: bytes) -> int:
    sock.send(message)
    ready, _, _ = select.select([sock], [], [], 5)
    assert ready, "the kernel did not answer"
    return next(error for _seq, error, _msg in rtnl.acks(sock.recv(65536)))


def _filters(sock: socket.socket, ifindex: int) -> list[tuple[int, int, int]]:
    sock.send(tc.dump_filters(7, ifindex))
    found: list[tuple[int, int, int]] = []
    while True:
        ready, _, _ = select.select([sock], [], [], 5)
        assert ready, "the filter dump did not end"
        data = sock.recv(65536)
        found += tc.redirect_targets(data)
        if any(msg_type == 3 for msg_type, *_ in rtnl._messages(data)):  # NLMSG_DONE
            return found


@pytest.fixture
def rtnl_sock(netns: Netns) -> Iterator[socket.socket]:
    with netns.entered():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, 0))
    try:
        yield sock
    finally:
        sock.close()


def _tap(sock: socket.socket, name: str) -> ptap.TapInfo | None:
    sock.send(ptap.getlink(8, name))
    ready, _, _ = select.select([sock], [], [], 5)
    assert ready, "the kernel did not answer"
    return ptap.tap_info(sock.recv(65536))


def _index(netns: Netns, name: str) -> int:
    return int(netns.ip("-o", "link", "show", name).split(":")[0])


@pytest.mark.integration
def test_persistent_tap_is_made_once_with_its_flags(netns: Netns, rtnl_sock: socket.socket) -> None:
    with netns.entered():
        ptap.make_persistent_tap("rtap0", 2, 65534)
        ptap.make_persistent_tap("rtap9", 1, None)
    info = _tap(rtnl_sock, "rtap0")
    assert info is not None and info.problem(2, 65534) is None, info
    assert info.problem(1, 65534) is not None  # multi_queue differs: QEMU would get EINVAL
    assert info.problem(2, None) is not None
    single = _tap(rtnl_sock, "rtap9")
    assert single is not None and single.problem(1, None) is None, single
    assert _tap(rtnl_sock, "lo") is None
    # A second make never attaches to the existing tap.
    with netns.entered(), pytest.raises(DeviceError, match="busy"):
        ptap.make_persistent_tap("rtap0", 2, 65534)
    assert "persist on" in netns.ip("-d", "link", "show", "rtap0")


@pytest.mark.integration
def test_frames_cross_both_ways_and_survive_a_replaced_target(netns: Netns, rtnl_sock: socket.socket) -> None:
    netns.add_veth("rlow", "rwire")
    netns.ip("link", "add", "link", "rlow", "name", "rmv", "address", GUEST_MAC, "type", "macvlan", "mode", "bridge")
    netns.ip("link", "set", "rmv", "up")
    with netns.entered():
        ptap.make_persistent_tap("rtap1", 1, None)
    netns.ip("link", "set", "rtap1", "up")
    tap, mv = _index(netns, "rtap1"), _index(netns, "rmv")
    for index in (tap, mv):
        assert _ask(rtnl_sock, tc.add_ingress(1, index)) == 0
    assert _ask(rtnl_sock, tc.add_ingress(2, tap)) != 0  # exclusive: already there
    assert _ask(rtnl_sock, tc.redirect_filter(3, mv, tap, replace=False)) == 0
    assert _ask(rtnl_sock, tc.redirect_filter(4, tap, mv, replace=False)) == 0
    assert _filters(rtnl_sock, tap) == [(tap, tc.U32_FIRST_HANDLE, mv)]
    assert _filters(rtnl_sock, mv) == [(mv, tc.U32_FIRST_HANDLE, tap)]

    # The "QEMU" side: the tap opened as QEMU opens it.
    with netns.entered():  # a tun fd's namespace is the one it was opened in
        qemu = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    wire = netns.packet_socket("rwire")
    try:
        fcntl.ioctl(qemu, ptap.TUNSETIFF, struct.pack("16sH22x", b"rtap1", ptap.tap_flags(1)))
        _round_trip(qemu, wire, b"first")

        # The lower's macvlan goes and comes back: the tap's filter is replaced, not left.
        netns.ip("link", "del", "rmv")
        netns.ip("link", "add", "link", "rlow", "name", "rmv", "address", GUEST_MAC, "type", "macvlan",
                 "mode", "bridge")
        netns.ip("link", "set", "rmv", "up")
        mv = _index(netns, "rmv")
        assert _ask(rtnl_sock, tc.add_ingress(5, mv)) == 0
        assert _ask(rtnl_sock, tc.redirect_filter(6, mv, tap, replace=False)) == 0
        assert _ask(rtnl_sock, tc.redirect_filter(7, tap, mv, replace=True)) == 0
        assert _filters(rtnl_sock, tap) == [(tap, tc.U32_FIRST_HANDLE, mv)]
        _round_trip(qemu, wire, b"second")
    finally:
        os.close(qemu)
        wire.close()


def _frame(dst: str, src: str, payload: bytes) -> bytes:
    return bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb5" + payload


def _round_trip(qemu: int, wire: socket.socket, tag: bytes) -> None:
    peer = "02:00:00:00:00:09"
    # Wire -> guest: the frame leaves the tap towards QEMU, behind a vnet header.
    assert _exchange(lambda: wire.send(_frame(GUEST_MAC, peer, b"to-guest-" + tag)),
                     lambda: os.read(qemu, 65536)[VNET_HDR:], qemu, b"to-guest-" + tag)
    # Guest -> wire: what QEMU writes into the tap leaves the lower.
    assert _exchange(lambda: os.write(qemu, bytes(VNET_HDR) + _frame(peer, GUEST_MAC, b"from-guest-" + tag)),
                     lambda: wire.recv(65536), wire.fileno(), b"from-guest-" + tag)


def _exchange(send: Callable[[], object], read: Callable[[], bytes], fd: int, payload: bytes,
              timeout: float = 10) -> bool:
    """Send until ``payload`` is read back (a link just made up may drop the first frames), within ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        send()
        ready, _, _ = select.select([fd], [], [], 0.1)
        while ready:
            if read().endswith(payload):
                return True
            ready, _, _ = select.select([fd], [], [], 0)
    return False
