"""Macvtaps made with netwatch's own RTM_NEWLINK: what the kernel made, and its refusals in one line."""

from __future__ import annotations

import asyncio
import errno
import json

import pytest

from netwatch.errors import LinkError
from netwatch.host.linkops import LinkOps
from netwatch.sandbox.testbed import Netns

pytestmark = pytest.mark.integration


def details(ns: Netns, name: str) -> dict[str, object]:
    found: list[dict[str, object]] = json.loads(ns.ip("-j", "-d", "link", "show", name))
    return found[0]


def test_macvtaps_are_made_as_asked_and_refusals_say_why(netns: Netns) -> None:
    netns.add_veth("olow", "owire")
    lower = int(str(details(netns, "olow")["ifindex"]))

    async def main() -> None:
        async with LinkOps() as ops:
            index = await ops.add_macvtap("omv0", lower, "52:54:00:12:34:56", "vepa")
            made = details(netns, "omv0")
            assert made["ifindex"] == index and made["address"] == "52:54:00:12:34:56"
            flags = made["flags"]
            assert made["link"] == "olow" and isinstance(flags, list) and "UP" in flags
            info = made["linkinfo"]
            assert isinstance(info, dict) and info["info_kind"] == "macvtap" and info["info_data"]["mode"] == "vepa"
            # Many at once, as when a lower with many NICs comes back: each ack reaches its own request.
            names = [f"omb{i}" for i in range(32)]
            indexes = await asyncio.gather(*(ops.add_macvtap(name, lower, f"52:54:00:00:01:{i:02x}", "bridge")
                                             for i, name in enumerate(names)))
            assert [details(netns, name)["ifindex"] for name in names] == indexes
            with pytest.raises(LinkError) as taken:
                await ops.add_macvtap("omv0", lower, "52:54:00:12:34:57", "bridge")
            assert taken.value.errno == errno.EEXIST
            assert str(taken.value).startswith("cannot create macvtap omv0: ") and "\n" not in str(taken.value)
            with pytest.raises(LinkError) as gone:
                await ops.add_macvtap("omv1", 999999, "52:54:00:12:34:58", "bridge")
            assert gone.value.errno == errno.ENODEV, gone.value
            # The socket still serves after refusals.
            assert await ops.add_macvtap("omv2", lower, "52:54:00:12:34:59", "private") > 0
            assert details(netns, "omv2")["linkinfo"]["info_data"]["mode"] == "private"  # type: ignore[index]

    with netns.entered():
        asyncio.run(main())
