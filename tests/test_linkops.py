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
            # Silent: up without IPv6 address generation (issue 21 item 13).
            assert made["inet6_addr_gen_mode"] == "none"
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


def test_a_macvtap_where_ipv6_cannot_run_is_made_all_the_same(netns: Netns) -> None:
    """Under 1280 bytes of MTU a link has no IPv6 (the kernel refuses IFLA_AF_SPEC): as silent, and made."""
    netns.add_veth("slow", "swire")
    netns.ip("link", "set", "slow", "mtu", "1200")
    lower = int(str(details(netns, "slow")["ifindex"]))

    async def main() -> None:
        async with LinkOps() as ops:
            index = await ops.add_macvtap("smv0", lower, "52:54:00:12:34:5a", "bridge")
            made = details(netns, "smv0")
            assert made["ifindex"] == index and "UP" in made["flags"]  # type: ignore[operator]
            await ops.silence(index)  # as for a tap: nothing to silence is no error

    with netns.entered():
        asyncio.run(main())
