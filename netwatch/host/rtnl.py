"""rtnetlink link messages on the reattach path: events decoded, macvtaps and macvlans requested.

pyroute2 decodes every attribute of every message (about 0.25 ms for a
1.5 KB RTM_NEWLINK here) and builds each request through its filter chain
(about 0.4 ms for a macvtap); link events and backend creations come in
bursts right on the reattach path, so both are done here in microseconds.
Link dumps and the other changes netwatch makes still go through pyroute2.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTMGRP_LINK = 1

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2  # one message of several answering a dump; NLMSG_DONE ends them
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: the request is not echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
IFF_UP = 0x1
IFF_ALLMULTI = 0x200
IFLA_INFO_DATA = 2
IFLA_MACVLAN_MODE = 1
# linux/if_link.h
MACVLAN_MODES = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8, "source": 16}

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_STATS64 = 23
IFLA_AF_SPEC = 26
AF_INET6 = 10
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFLA_INFO_KIND = 1
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
# rtnl_link_stats64 begins rx_packets, tx_packets, rx_bytes, tx_bytes (u64 each).
_STATS64 = struct.Struct("=QQQQ")


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    while start + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, start)
        if length < _RTATTR.size or start + length > end:
            return
        yield kind & NLA_TYPE_MASK, data[start + _RTATTR.size:start + length]
        start += _align(length)


def _cstring(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def name_of(value: bytes | str) -> str:
    """A link name (or kind) as netwatch holds it, from the kernel's bytes: os.fsdecode, which cannot fail.

    Not UTF-8 is allowed (``m\\xff0``): the bytes that do not decode become
    surrogate escapes, so dumps (pyroute2 gives such a name as bytes),
    events and uevents agree on one str, and os.fsencode gives the bytes back.
    """
    return value if isinstance(value, str) else os.fsdecode(value.split(b"\0", 1)[0])


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, sequence number, body offset, end offset) of each netlink message in a datagram; a
    malformed length ends the walk."""
    size = len(data)
    offset = 0
    while offset + _NLMSGHDR.size <= size:
        length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > size:
            return
        yield msg_type, flags, seq, offset + _NLMSGHDR.size, offset + length
        offset += _align(length)


def stats64(data: bytes, start: int, end: int) -> tuple[int, int, int, int] | None:
    """(rx_packets, tx_packets, rx_bytes, tx_bytes) from a link message's attributes, if it has them."""
    for kind, value in _attrs(data, start, end):
        if kind == IFLA_STATS64 and len(value) >= _STATS64.size:
            rx_packets, tx_packets, rx_bytes, tx_bytes = _STATS64.unpack_from(value)
            return rx_packets, tx_packets, rx_bytes, tx_bytes
    return None


def decode_links(data: bytes) -> Iterator[tuple[int, dict[str, object]]]:
    """(message type, fields) for each RTM_NEWLINK/RTM_DELLINK in a datagram."""
    # The attribute walk is written out, not _attrs(): a link message has
    # 40-50 attributes of which five are read, and at 256 NICs reattaching
    # this loop ran for every one of ~1000 messages a second.
    unpack_attr = _RTATTR.unpack_from
    for msg_type, _flags, _seq, body, end in _messages(data):
        if msg_type in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= end:
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            fields: dict[str, object] = {"index": index, "flags": flags, "name": "", "mac": None,
                                         "parent": None, "kind": None, "master": None}
            pos = body + _IFINFOMSG.size
            while pos + 4 <= end:
                attr_len, kind = unpack_attr(data, pos)
                if attr_len < 4 or pos + attr_len > end:
                    break
                kind &= NLA_TYPE_MASK
                if kind == IFLA_IFNAME:
                    fields["name"] = name_of(data[pos + 4:pos + attr_len])
                elif kind == IFLA_ADDRESS and attr_len == 10:
                    fields["mac"] = data[pos + 4:pos + 10].hex(":")
                elif kind == IFLA_LINK and attr_len >= 8:
                    fields["parent"] = _I32.unpack_from(data, pos + 4)[0] or None
                elif kind == IFLA_MASTER and attr_len >= 8:
                    fields["master"] = _I32.unpack_from(data, pos + 4)[0] or None
                elif kind == IFLA_LINKINFO:
                    value = data[pos + 4:pos + attr_len]
                    for sub, sub_value in _attrs(value, 0, len(value)):
                        if sub == IFLA_INFO_KIND:
                            fields["kind"] = name_of(sub_value)
                pos += (attr_len + 3) & ~3
            yield msg_type, fields


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def newlink_macvtap(seq: int, name: str, lower: int, mac: str, mode: str) -> bytes:
    """RTM_NEWLINK creating macvtap ``name`` on ifindex ``lower``, down, with ``mac`` (create + exclusive, acked).

    Down: the kernel refuses IFLA_AF_SPEC in a creation (EAFNOSUPPORT, no
    inet6 device yet), so IPv6 address generation is turned off by a
    :func:`setlink` before another one brings it up.
    """
    return newlink_macvlan(seq, name, lower, mac, mode, kind="macvtap")


def newlink_macvlan(seq: int, name: str, lower: int, mac: str, mode: str, *, kind: str = "macvlan") -> bytes:
    """RTM_NEWLINK creating a macvlan (or, with ``kind``, a macvtap) as :func:`newlink_macvtap` does.

    No IFLA_MTU: the kernel gives a new macvlan its lower's MTU (and lowers
    it with the lower's, never raising it again).
    """
    info = _attr(IFLA_INFO_KIND, kind.encode() + b"\0") + _attr(IFLA_INFO_DATA,
                                                              _attr(IFLA_MACVLAN_MODE, _U32.pack(MACVLAN_MODES[mode])))
    body = (_IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
            + _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", ""))) + _attr(IFLA_LINK, _I32.pack(lower))
            + _attr(IFLA_LINKINFO, info))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWLINK, flags, seq, 0) + body


def setlink(seq: int, index: int, *, up: bool = False, no_addr_gen: bool = False, allmulti: bool = False) -> bytes:
    """RTM_NEWLINK changing ifindex ``index`` (acked): IPv6 address generation off, allmulticast on, and/or
    the link up.

    Never ``up`` and ``no_addr_gen`` in one message: the kernel brings a
    link up before it reads IFLA_AF_SPEC, so the link-local address would
    already be made.
    """
    assert not (up and no_addr_gen), "address generation goes off in a message before the one bringing it up"
    flags = (IFF_UP if up else 0) | (IFF_ALLMULTI if allmulti else 0)
    body = _IFINFOMSG.pack(0, 0, index, flags, flags)
    if no_addr_gen:
        body += _attr(IFLA_AF_SPEC, _attr(AF_INET6, _attr(IFLA_INET6_ADDR_GEN_MODE,
                                                           bytes([IN6_ADDR_GEN_MODE_NONE]))))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def getlink(seq: int, name: str) -> bytes:
    """RTM_GETLINK for link ``name``: the answer is one RTM_NEWLINK, or an error (ENODEV: no such link)."""
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body


def dellink(seq: int, index: int) -> bytes:
    """RTM_DELLINK for ifindex ``index`` (acked)."""
    body = _IFINFOMSG.pack(0, 0, index, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class Answer(NamedTuple):
    """One message the kernel sent back for request ``seq``."""

    seq: int
    final: bool  # the last one for that request (an ack, an error, NLMSG_DONE or a lone reply)
    error: int  # errno, 0 when none
    message: str | None  # the kernel's extended-ack sentence, if it gave one
    data: bytes | None  # a reply (with its header): a dumped filter, a link


def answers(data: bytes) -> Iterator[Answer]:
    """Each netlink message in a datagram, as what it tells the request it answers."""
    for msg_type, flags, seq, body, end in _messages(data):
        if msg_type == NLMSG_ERROR:
            if body + 4 + _NLMSGHDR.size <= end:
                error, message = _error(data, flags, body, end)
                yield Answer(seq, True, error, message, None)
        elif msg_type == NLMSG_DONE:
            # A dump's end: an int, negative when the dump failed part way, then extended-ack attributes.
            error = -_I32.unpack_from(data, body)[0] if body + 4 <= end else 0
            message = None
            if flags & NLM_F_ACK_TLVS:
                message = _ack_message(data, body + 4, end)
            yield Answer(seq, True, error, message, None)
        else:
            yield Answer(seq, not flags & NLM_F_MULTI, 0, None, data[body - _NLMSGHDR.size:end])


def _ack_message(data: bytes, start: int, end: int) -> str | None:
    for kind, value in _attrs(data, start, end):
        if kind == NLMSGERR_ATTR_MSG:
            return _cstring(value) or None
    return None


def _error(data: bytes, flags: int, body: int, end: int) -> tuple[int, str | None]:
    error = -_I32.unpack_from(data, body)[0]
    message = None
    if flags & NLM_F_ACK_TLVS:
        echoed = _NLMSGHDR.size if flags & NLM_F_CAPPED else _NLMSGHDR.unpack_from(data, body + 4)[0]
        message = _ack_message(data, body + 4 + _align(echoed), end)
    return error, message


def acks(data: bytes) -> Iterator[tuple[int, int, str | None]]:
    """(sequence number, errno or 0, the kernel's extended-ack message) for each NLMSG_ERROR in a datagram."""
    for msg_type, flags, seq, body, end in _messages(data):
        if msg_type == NLMSG_ERROR and body + 4 + _NLMSGHDR.size <= end:
            yield seq, *_error(data, flags, body, end)
