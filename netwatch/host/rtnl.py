"""Decoding rtnetlink link messages: just the fields netwatch reads.

pyroute2 decodes every attribute of every message (about 0.25 ms for a
1.5 KB RTM_NEWLINK here); link events arrive in bursts right on the
reattach path, so events are decoded here in a few microseconds instead.
Dumps and every change netwatch makes still go through pyroute2.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

RTM_NEWLINK = 16
RTM_DELLINK = 17
NLMSG_ERROR = 2
RTMGRP_LINK = 1

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_STATS64 = 23
IFLA_INFO_KIND = 1
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
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


def stats64(data: bytes, start: int, end: int) -> tuple[int, int, int, int] | None:
    """(rx_packets, tx_packets, rx_bytes, tx_bytes) from a link message's attributes, if it has them."""
    for kind, value in _attrs(data, start, end):
        if kind == IFLA_STATS64 and len(value) >= _STATS64.size:
            rx_packets, tx_packets, rx_bytes, tx_bytes = _STATS64.unpack_from(value)
            return rx_packets, tx_packets, rx_bytes, tx_bytes
    return None


def decode_links(data: bytes) -> Iterator[tuple[int, dict[str, object]]]:
    """(message type, fields) for each RTM_NEWLINK/RTM_DELLINK in a datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        body = offset + _NLMSGHDR.size
        if msg_type in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= offset + length:
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            fields: dict[str, object] = {"index": index, "flags": flags, "name": "", "mac": None,
                                         "parent": None, "kind": None, "master": None}
            for kind, value in _attrs(data, body + _IFINFOMSG.size, offset + length):
                if kind == IFLA_IFNAME:
                    fields["name"] = _cstring(value)
                elif kind == IFLA_ADDRESS and len(value) == 6:
                    fields["mac"] = ":".join(f"{byte:02x}" for byte in value)
                elif kind == IFLA_LINK and len(value) >= 4:
                    fields["parent"] = struct.unpack_from("=i", value)[0] or None
                elif kind == IFLA_MASTER and len(value) >= 4:
                    fields["master"] = struct.unpack_from("=i", value)[0] or None
                elif kind == IFLA_LINKINFO:
                    for sub, sub_value in _attrs(value, 0, len(value)):
                        if sub == IFLA_INFO_KIND:
                            fields["kind"] = _cstring(sub_value)
            yield msg_type, fields
        offset += _align(length)
