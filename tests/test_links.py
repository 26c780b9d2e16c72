"""The link table stays right when the kernel drops events (ENOBUFS)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

import pytest

from netwatch.host.links import Link, LinkMonitor, LinkTable
from netwatch.sandbox.testbed import Netns

pytestmark = pytest.mark.integration


def kernel_links(ns: Netns) -> dict[int, str]:
    return {entry["ifindex"]: entry["ifname"] for entry in json.loads(ns.ip("-j", "link", "show"))}


def test_overflow_is_detected_and_the_table_rebuilt(netns: Netns) -> None:
    changes: list[tuple[Link | None, Link | None]] = []
    resyncs: list[int] = []

    async def main() -> None:
        table = LinkTable()
        monitor = LinkMonitor(table, lambda old, new: changes.append((old, new)), lambda: resyncs.append(1),
                              rcvbuf=4096)
        await monitor.__aenter__()
        try:
            # The loop is blocked while the kernel queues far more than 4 KiB of events.
            batch = "".join(f"link add ov{i} type veth peer name ow{i}\n" for i in range(150))
            subprocess.run(["ip", "-n", netns.name, "-batch", "-"], input=batch, text=True, check=True)
            async with asyncio.timeout(20):
                while not resyncs or {link.index: link.name for link in table} != kernel_links(netns):
                    await asyncio.sleep(0.05)
            assert monitor.resyncs >= 1
            # Events keep flowing on the new socket after the resync.
            netns.ip("link", "del", "ov7")
            async with asyncio.timeout(10):
                while table.named("ov7") is not None or table.named("ow7") is not None:
                    await asyncio.sleep(0.01)
        finally:
            await monitor.__aexit__(None, None, None)

    # The whole monitor lives in the namespace, as netwatch run would.
    with netns.entered():
        asyncio.run(main())


def test_uevents_name_the_link_and_its_ifindex(netns: Netns) -> None:
    """Kernel uevents are followed per namespace, each with the ifindex it carries (no sysfs read)."""
    from netwatch.host.udev import UdevMonitor

    seen: list[tuple[str, str, int | None]] = []

    async def main() -> None:
        async with UdevMonitor("kernel", lambda *event: seen.append(event), lambda: None):
            netns.ip("link", "add", "ue0", "type", "veth", "peer", "name", "ue1")
            index = json.loads(netns.ip("-j", "link", "show", "ue0"))[0]["ifindex"]
            netns.ip("link", "del", "ue0")
            async with asyncio.timeout(10):
                while ("remove", "ue0", index) not in seen:
                    await asyncio.sleep(0.01)
            assert ("add", "ue0", index) in seen, seen

    with netns.entered():
        asyncio.run(main())


def test_kernel_uevents_parsed_and_hostile_ones_dropped() -> None:
    """Only a network interface's uevent yields an event; other subsystems and malformed text do not."""
    from netwatch.host.udev import parse_kernel_uevent

    net = b"add@/devices/virtual/net/ue0\0ACTION=add\0DEVPATH=/devices/virtual/net/ue0\0SUBSYSTEM=net\0" \
          b"INTERFACE=ue0\0IFINDEX=7\0SEQNUM=1\0"
    assert parse_kernel_uevent(net) == ("add", "ue0", 7)
    assert parse_kernel_uevent(net.replace(b"IFINDEX=7", b"IFINDEX=x")) == ("add", "ue0", None)
    assert parse_kernel_uevent(b"add@/devices/virtual/macvtap/tap7\0ACTION=add\0SUBSYSTEM=macvtap\0") is None
    assert parse_kernel_uevent(b"add@/x\0ACTION=add\0SUBSYSTEM=network\0INTERFACE=a\0") is None
    assert parse_kernel_uevent(b"add@/x\0ACTION=add\0SUBSYSTEM=net\0") is None  # no interface
    # A name that is not UTF-8 is the str the link table holds for it (os.fsdecode).
    assert parse_kernel_uevent(b"\xff\xfe\0SUBSYSTEM=net\0INTERFACE=\xff\0") == ("", "\udcff", None)
    assert parse_kernel_uevent(b"") is None


def test_uevents_not_from_the_kernel_are_ignored(netns: Netns) -> None:
    """A uevent another process sends on the kernel's group is not believed; the kernel's still are."""
    from netwatch.host.udev import KERNEL_GROUP, NETLINK_KOBJECT_UEVENT, UdevMonitor

    seen: list[tuple[str, str, int | None]] = []

    async def main() -> None:
        async with UdevMonitor("kernel", lambda *event: seen.append(event), lambda: None):
            # Multicast from a process's own port (root may: CAP_NET_ADMIN), as libudev's
            # senders do; the kernel's come from port 0.
            forger = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
            try:
                forger.bind((0, 0))
                forger.sendto(b"remove@/devices/virtual/net/lo\0ACTION=remove\0SUBSYSTEM=net\0INTERFACE=fk0\0"
                              b"IFINDEX=1\0", (forger.getsockname()[0], KERNEL_GROUP))
            finally:
                forger.close()
            netns.ip("link", "add", "uf0", "type", "veth", "peer", "name", "uf1")
            async with asyncio.timeout(10):
                while not any(name == "uf0" for _action, name, _index in seen):
                    await asyncio.sleep(0.01)
            netns.ip("link", "del", "uf0")
            assert not any(name == "fk0" for _action, name, _index in seen), seen

    with netns.entered():
        asyncio.run(main())
