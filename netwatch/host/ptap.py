"""Persistent taps for the redirect wiring: made by netwatch, opened by QEMU by name.

A redirect NIC's tap outlives every lower flap and every netwatch restart:
QEMU (or libvirt, with ``<target dev=... managed='no'/>``) opens it by name,
so it must exist before QEMU starts and must never be deleted while the NIC
is configured. Its flags must be what the opener asks for: with
``IFF_MULTI_QUEUE`` set on one side only, TUNSETIFF fails with EINVAL.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from netwatch.errors import DeviceError
from netwatch.host.rtnl import (
    _IFINFOMSG,
    _U32,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    RTM_NEWLINK,
    _attrs,
    _messages,
    decode_links,
)
from netwatch.host.rtnl import getlink as getlink  # read a tap back with it (moved to rtnl)

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_TUN_EXCL = 0x8000
# linux/if_link.h, a tun link's IFLA_INFO_DATA
IFLA_TUN_OWNER = 1
IFLA_TUN_TYPE = 3
IFLA_TUN_PI = 4
IFLA_TUN_VNET_HDR = 5
IFLA_TUN_PERSIST = 6
IFLA_TUN_MULTI_QUEUE = 7
IFLA_TUN_NUM_QUEUES = 8
IFLA_TUN_NUM_DISABLED_QUEUES = 9


def tap_mac(guest_mac: str) -> str:
    """The tap's own address: the guest MAC with 0xfe first.

    Never the guest's own MAC (the bridge would take frames for the guest
    as its own), and high enough that the bridge never adopts it as its
    address: the usual libvirt convention.
    """
    return "fe" + guest_mac[2:]


def tap_flags(queues: int) -> int:
    return IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)


@dataclass(frozen=True)
class TapInfo:
    """A tun/tap device as netlink shows it."""

    flags: int  # TUNSETIFF flags, IFF_PERSIST included
    owner: int | None  # None: anyone may attach
    attached: int = 0  # queues some process holds open (QEMU, once it runs), disabled ones included

    def problem(self, queues: int, owner: int | None) -> str | None:
        """Why this device is not the persistent tap a redirect NIC with ``queues`` and ``owner`` needs, or None."""
        want = tap_flags(queues)
        if not self.flags & IFF_PERSIST:
            return "it is not a persistent tap"
        if self.flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE) != want:
            return f"its flags are {self.flags:#x}, not {want | IFF_PERSIST:#x}"
        if self.owner != owner:
            return f"it is owned by uid {self.owner}, not {owner}"
        return None


def tap_info(data: bytes) -> TapInfo | None:
    """The tun/tap device in a link message (None when it is another kind of link).

    From netlink, not sysfs: /sys shows the links of the namespace it was
    mounted in, netlink those of the socket's.
    """
    for msg_type, _flags, _seq, body, end in _messages(data):
        if msg_type != RTM_NEWLINK:
            continue
        attrs = dict(_attrs(data, body + _IFINFOMSG.size, end))
        info = dict(_attrs(attrs.get(IFLA_LINKINFO, b""), 0, len(attrs.get(IFLA_LINKINFO, b""))))
        if info.get(IFLA_INFO_KIND, b"").rstrip(b"\0") != b"tun":
            return None
        tun = dict(_attrs(info.get(IFLA_INFO_DATA, b""), 0, len(info.get(IFLA_INFO_DATA, b""))))
        flags = 0
        for attr, flag in ((IFLA_TUN_PI, IFF_NO_PI), (IFLA_TUN_VNET_HDR, IFF_VNET_HDR),
                           (IFLA_TUN_PERSIST, IFF_PERSIST), (IFLA_TUN_MULTI_QUEUE, IFF_MULTI_QUEUE)):
            on = bool(tun.get(attr, b"\0")[0])
            # IFLA_TUN_PI says whether packet information is on; IFF_NO_PI says it is off.
            flags |= flag if on != (attr == IFLA_TUN_PI) else 0
        flags |= tun.get(IFLA_TUN_TYPE, b"\0")[0]
        owner = tun.get(IFLA_TUN_OWNER)
        attached = sum(_U32.unpack(value[:4])[0] for value in (tun.get(IFLA_TUN_NUM_QUEUES, b""),
                                                                tun.get(IFLA_TUN_NUM_DISABLED_QUEUES, b""))
                       if len(value) >= 4)
        return TapInfo(flags, _U32.unpack(owner[:4])[0] if owner and len(owner) >= 4 else None, attached)
    return None


def not_adoptable(data: bytes, queues: int, owner: int | None, mac: str) -> str | None:
    """Why the link in message ``data`` is not the tap netwatch makes (``queues``, ``owner``, tap MAC ``mac``),
    or None: only such a tap is adopted as a redirect NIC's."""
    info = tap_info(data)
    kind, found = _kind_and_mac(data)
    if info is None:
        return f"it is a {kind or 'link of no kind'}, not a tap"
    problem = info.problem(queues, owner)
    if problem is not None:
        return problem
    if found != mac:
        return f"its MAC is {found}, not {mac}"
    return None


def not_made_for(data: bytes, mac: str) -> str | None:
    """Why the link in message ``data`` cannot be a tap netwatch made with tap MAC ``mac``, or None.

    A persistent tap with that MAC, whatever its queues and owner: no
    other link is ever deleted as a NIC's tap.
    """
    info = tap_info(data)
    kind, found = _kind_and_mac(data)
    if info is None:
        return f"it is a {kind or 'link of no kind'}, not a tap"
    if not info.flags & IFF_PERSIST:
        return "it is not persistent"
    if found != mac:
        return f"its MAC is {found}, not {mac}"
    return None


def _kind_and_mac(data: bytes) -> tuple[object, object]:
    for _type, fields in decode_links(data):
        return fields["kind"], fields["mac"]
    return None, None


def make_persistent_tap(name: str, queues: int, owner: int | None, mac: str | None = None) -> None:
    """Create tap ``name`` (vnet header, one or more queues), persistent and owned by ``owner``, down.

    Fails with EBUSY when a link of that name exists: the caller decides
    whether an existing one is netwatch's (:func:`tap_info` and its record).
    ``mac`` is set before the tap is made persistent: a tap that outlives
    this call always has it (with a crash in between, the tap goes with
    the fd), so a tap left behind can be told to be netwatch's.
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"cannot open /dev/net/tun: {exc.strerror or exc}") from exc
    try:
        # IFF_TUN_EXCL: without it TUNSETIFF attaches to an existing tap of that name.
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), tap_flags(queues) | IFF_TUN_EXCL))
        if owner is not None:
            fcntl.ioctl(fd, TUNSETOWNER, owner)
        if mac is not None:
            fcntl.ioctl(fd, SIOCSIFHWADDR, struct.pack("16sH6s16x", name.encode(), ARPHRD_ETHER,
                                                       bytes.fromhex(mac.replace(":", ""))))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        raise DeviceError(f"cannot create tap {name}: {exc.strerror or exc}") from exc
    finally:
        # Closing detaches netwatch's queue; the tap stays (persistent) for QEMU to open.
        os.close(fd)
