"""Traffic-control requests for the redirect wiring, encoded here.

A redirect NIC joins a persistent tap and a macvlan with two ingress
filters, one each way: u32 matching every frame (``match u8 0 0``) with a
mirred egress redirect to the other device (as Kata Containers' tcfilter
model does; this kernel has neither matchall nor flower). After a lower
flap the macvlan and its filter are made again and the tap's filter is
replaced in place: a mirred action whose target unregistered keeps a dead
target and drops every frame.

The requests are short and go out on every reattach, so they are encoded
by hand (as macvtaps are, netwatch/host/rtnl.py) rather than through
pyroute2's request chain; the layouts are the kernel's uapi
(linux/rtnetlink.h, pkt_sched.h, pkt_cls.h, tc_act/tc_mirred.h).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from netwatch.host.rtnl import (
    _NLMSGHDR,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    _attr,
    _attrs,
    _messages,
)

RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_GETQDISC = 38
RTM_NEWTFILTER = 44
RTM_GETTFILTER = 46
RTM_NEWACTION = 48
NLM_F_REPLACE = 0x100
NLM_F_DUMP = 0x300

TCA_KIND = 1
TCA_OPTIONS = 2
TC_H_INGRESS = 0xFFFFFFF1
INGRESS_HANDLE = 0xFFFF0000  # "ffff:", the ingress qdisc's handle
# The filters' parent: "ffff:fff2", what tc's "ingress" keyword means. An
# ingress qdisc takes it as well as "ffff:", and a clsact qdisc (which other
# tools add, and which takes the ingress qdisc's place) takes only this one.
FILTER_PARENT = 0xFFFFFFF2
ETH_P_ALL = 0x0003
# u32's first filter in its root table: tc's "800::800".
U32_FIRST_HANDLE = 0x80000800
FILTER_PRIO = 1

TCA_U32_SEL = 5
TCA_U32_ACT = 7
TC_U32_TERMINAL = 1

TCA_ACT_TAB = 1
TCA_ACT_KIND = 1
TCA_ACT_OPTIONS = 2
TCA_MIRRED_PARMS = 2
TC_ACT_STOLEN = 4
TCA_EGRESS_REDIR = 1

_TCMSG = struct.Struct("=BxHiIII")
_U32_SEL = struct.Struct("=BBBBHHhhI")  # tc_u32_sel without its keys
_U32_KEY = struct.Struct("=IIii")
_MIRRED = struct.Struct("=IIiiiiI")  # tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex


def _message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def add_ingress(seq: int, ifindex: int) -> bytes:
    """RTM_NEWQDISC adding the ingress qdisc to ``ifindex`` (create + exclusive: EEXIST when there)."""
    body = (_TCMSG.pack(0, 0, ifindex, INGRESS_HANDLE, TC_H_INGRESS, 0) + _attr(TCA_KIND, b"ingress\0")
            + _attr(TCA_OPTIONS, b""))
    return _message(RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def redirect_filter(seq: int, ifindex: int, target: int, *, replace: bool) -> bytes:
    """RTM_NEWTFILTER: every frame arriving on ``ifindex`` leaves on ``target``.

    ``replace`` puts it in place of the first u32 filter (800::800) there,
    so no frame meets a dead target between two requests (and makes it when
    there is none); otherwise it is added (the kernel gives the first one
    800::800).
    """
    return _u32_filter(seq, ifindex, _attr(1, _mirred(target)), replace=replace)


def match_all_filter(seq: int, ifindex: int) -> bytes:
    """RTM_NEWTFILTER: a u32 filter matching every frame, with no action (it tells whether u32 exists)."""
    return _u32_filter(seq, ifindex, None, replace=False)


def standalone_redirect(seq: int, target: int) -> bytes:
    """RTM_NEWACTION: a mirred redirect to ``target`` bound to no filter (it tells whether mirred exists)."""
    body = struct.pack("=Bxxx", 0) + _attr(TCA_ACT_TAB, _attr(1, _mirred(target)))
    return _message(RTM_NEWACTION, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def _mirred(target: int) -> bytes:
    parms = _MIRRED.pack(0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, target)
    return _attr(TCA_ACT_KIND, b"mirred\0") + _attr(TCA_ACT_OPTIONS, _attr(TCA_MIRRED_PARMS, parms))


def _u32_filter(seq: int, ifindex: int, actions: bytes | None, *, replace: bool) -> bytes:
    htons_all = struct.unpack("=H", struct.pack("!H", ETH_P_ALL))[0]
    info = (FILTER_PRIO << 16) | htons_all
    handle = U32_FIRST_HANDLE if replace else 0
    selector = _U32_SEL.pack(TC_U32_TERMINAL, 0, 1, 0, 0, 0, 0, 0, 0) + _U32_KEY.pack(0, 0, 0, 0)
    options = _attr(TCA_U32_SEL, selector) + (_attr(TCA_U32_ACT, actions) if actions is not None else b"")
    body = _TCMSG.pack(0, 0, ifindex, handle, FILTER_PARENT, info) + _attr(TCA_KIND, b"u32\0") \
        + _attr(TCA_OPTIONS, options)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    return _message(RTM_NEWTFILTER, flags, seq, body)


def dump_filters(seq: int, ifindex: int) -> bytes:
    """RTM_GETTFILTER dump of the ingress filters of ``ifindex``."""
    body = _TCMSG.pack(0, 0, ifindex, 0, FILTER_PARENT, 0)
    return _message(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def redirect_targets(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(ifindex, filter handle, mirred egress-redirect target) of each u32 redirect filter in a datagram.

    Only what the redirect wiring makes is read: prio 1, u32, a mirred
    action redirecting to egress. Anything else on the device yields nothing.
    """
    for msg_type, _flags, _seq, body, end in _messages(data):
        if msg_type != RTM_NEWTFILTER or body + _TCMSG.size > end:
            continue
        _family, _pad, ifindex, handle, _parent, info = _TCMSG.unpack_from(data, body)
        if info >> 16 != FILTER_PRIO or not handle:
            continue
        attrs = dict(_attrs(data, body + _TCMSG.size, end))
        if attrs.get(TCA_KIND, b"").rstrip(b"\0") != b"u32" or TCA_OPTIONS not in attrs:
            continue
        options = dict(_attrs(attrs[TCA_OPTIONS], 0, len(attrs[TCA_OPTIONS])))
        actions = options.get(TCA_U32_ACT, b"")
        for _order, action in _attrs(actions, 0, len(actions)):
            parts = dict(_attrs(action, 0, len(action)))
            if parts.get(TCA_ACT_KIND, b"").rstrip(b"\0") != b"mirred":
                continue
            opts = parts.get(TCA_ACT_OPTIONS, b"")
            parms = dict(_attrs(opts, 0, len(opts))).get(TCA_MIRRED_PARMS, b"")
            if len(parms) >= _MIRRED.size:
                *_gen, eaction, target = _MIRRED.unpack_from(parms)
                if eaction == TCA_EGRESS_REDIR:
                    yield ifindex, handle, target
