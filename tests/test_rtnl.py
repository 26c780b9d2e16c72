"""The link-event decoder agrees with pyroute2 on real kernel messages."""

from __future__ import annotations

import socket
import subprocess

import pytest

from netwatch.host import rtnl
from netwatch.sandbox.testbed import Netns


@pytest.mark.integration
def test_decoder_matches_kernel_messages(netns: Netns) -> None:
    with netns.entered():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        sock.bind((0, rtnl.RTMGRP_LINK))
    sock.settimeout(2)
    try:
        netns.add_veth("dlow", "dwire")
        netns.ip("link", "add", "link", "dlow", "name", "dmvt", "type", "macvtap", "mode", "bridge")
        netns.ip("link", "set", "dmvt", "address", "52:54:00:aa:bb:cc")
        netns.ip("link", "del", "dmvt")
        netns.ip("link", "add", "dbr", "type", "bridge")
        netns.ip("link", "set", "dwire", "master", "dbr")
        seen: list[tuple[int, dict[str, object]]] = []
        while not (any(t == rtnl.RTM_DELLINK and f["name"] == "dmvt" for t, f in seen)
                   and any(f["name"] == "dwire" and f["master"] for _t, f in seen)):
            seen += list(rtnl.decode_links(sock.recv(65536)))
    finally:
        sock.close()
    index = int(subprocess.run(["ip", "-n", netns.name, "-o", "link", "show", "dlow"], capture_output=True,
                               text=True).stdout.split(":")[0])
    mvt = [f for t, f in seen if t == rtnl.RTM_NEWLINK and f["name"] == "dmvt"][-1]
    assert mvt["kind"] == "macvtap" and mvt["parent"] == index and mvt["mac"] == "52:54:00:aa:bb:cc"
    veth = [f for t, f in seen if f["name"] == "dlow"][-1]
    assert veth["kind"] == "veth" and veth["index"] == index and int(str(veth["flags"])) & 1
    bridge = [f for _t, f in seen if f["name"] == "dbr"][-1]
    assert [f for _t, f in seen if f["name"] == "dwire"][-1]["master"] == bridge["index"]


def test_decoder_ignores_truncated_and_foreign_messages() -> None:
    assert list(rtnl.decode_links(b"")) == []
    assert list(rtnl.decode_links(b"\x10\x00\x00\x00")) == []
    # an NLMSG_DONE message
    assert list(rtnl.decode_links(b"\x14\x00\x00\x00\x03\x00\x02\x00" + b"\x00" * 12)) == []
