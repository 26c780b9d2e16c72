"""The link table stays right when the kernel drops events (ENOBUFS)."""

from __future__ import annotations

import asyncio
import json
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
