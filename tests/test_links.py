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
