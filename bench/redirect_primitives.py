#!/usr/bin/env python3
"""The redirect wiring's re-wire, as netwatch does it over its own netlink socket, timed.

What a redirect NIC redoes when its lower comes back (issue 22): a macvlan
with the guest's MAC (made, silenced, allmulticast), an ingress qdisc on
it, its filter to the tap, and the tap's filter replaced to point at it.
Made down and brought up last, as the wiring should (no frame reaches the
host's stack before the filters are there); "up at once" is the variant
with the macvlan up before its filters. Beside it, in the same run, the
same steps through pyroute2's synchronous IPRoute (SPEC section 3d
measured 3.7-6.1 ms that way). Each round's macvlan is deleted untimed.

    sudo .venv/bin/python bench/redirect_primitives.py [--rounds 100]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from common import run_in_netns, summary

from netwatch.host.linkops import LinkOps
from netwatch.sandbox.testbed import sh

GUEST_MAC = "52:54:00:ab:00:01"


async def netwatch_rounds(rounds: int, up_first: bool) -> list[float]:
    times: list[float] = []
    async with LinkOps() as ops:
        lower = await ops.index_of("blow")
        tap = await ops.ensure_tap("btap", 1, None, GUEST_MAC)
        await ops.ensure_ingress(tap)
        for round_ in range(rounds + 1):
            started = time.perf_counter()
            mv = await ops.add_macvlan("bmv", lower, GUEST_MAC, "bridge", up=up_first)
            await ops.ensure_ingress(mv)
            await ops.redirect(mv, tap, replace=False)
            await ops.redirect(tap, mv, replace=True)
            if not up_first:
                await ops.bring_up(mv)
            elapsed = time.perf_counter() - started
            if round_:  # the first warms the code paths, as a long-running netwatch is warm
                times.append(elapsed * 1000)
            assert await ops.redirects(tap) == [(0x80000800, mv)]
            await ops.delete(mv)
        await ops.delete_tap("btap", GUEST_MAC)
    return times


def pyroute2_rounds(rounds: int) -> list[float]:
    """SPEC 3d's way: pyroute2's synchronous IPRoute, outside any event loop."""
    from pyroute2 import IPRoute

    times: list[float] = []
    with IPRoute() as ipr:
        lower = ipr.link_lookup(ifname="blow")[0]
        sh("ip", "tuntap", "add", "dev", "ptap", "mode", "tap", "vnet_hdr")
        tap = ipr.link_lookup(ifname="ptap")[0]
        ipr.link("set", index=tap, state="up")
        ipr.tc("add", "ingress", tap, "ffff:")
        try:
            for round_ in range(rounds + 1):
                started = time.perf_counter()
                ipr.link("add", ifname="pmv", kind="macvlan", link=lower, address=GUEST_MAC,
                         macvlan_mode="bridge")
                mv = ipr.link_lookup(ifname="pmv")[0]
                ipr.link("set", index=mv, state="up")
                ipr.tc("add", "ingress", mv, "ffff:")
                ipr.tc("add-filter", "u32", mv, parent=0xFFFF0000, prio=1, protocol=0x0003,
                       keys=["0x0/0x0+0"], target=0x10001,
                       action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": tap})
                ipr.tc("replace-filter", "u32", tap, parent=0xFFFF0000, prio=1, protocol=0x0003,
                       handle=0x80000800, keys=["0x0/0x0+0"], target=0x10001,
                       action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": mv})
                elapsed = time.perf_counter() - started
                if round_:
                    times.append(elapsed * 1000)
                ipr.link("del", index=mv)
        finally:
            ipr.link("del", index=tap)
    return times


def inner(rounds: int) -> int:
    sh("ip", "link", "add", "blow", "type", "veth", "peer", "name", "bwire")
    sh("ip", "link", "set", "blow", "up")
    sh("ip", "link", "set", "bwire", "up")
    down_first = asyncio.run(netwatch_rounds(rounds, up_first=False))
    up_at_once = asyncio.run(netwatch_rounds(rounds, up_first=True))
    pyroute2 = pyroute2_rounds(rounds)
    print(f"re-wire of one redirect NIC, {rounds} rounds each, one run:")
    print(summary("netwatch", down_first) + "   macvlan down, filters, then up (5 requests)")
    print(summary("up first", up_at_once) + "   macvlan up at once (4 requests)")
    print(summary("pyroute2", pyroute2) + "   synchronous IPRoute (SPEC 3d: 3.7-6.1 ms)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.rounds)
    return run_in_netns(__file__, ["--rounds", str(args.rounds)])


if __name__ == "__main__":
    sys.exit(main())
