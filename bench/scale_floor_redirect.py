#!/usr/bin/env python3
"""The floor for bench/scale.py --wiring redirect: the same macvlans and filters made again, in a straight line.

Run by scale.py as a child (while netwatch is stopped, on netwatch's QMP
sockets), as bench/scale_floor.py is for the hub wiring, and spoken to the
same way. It reads a JSON list of NICs on stdin's first line (QMP socket,
NIC id, MAC, macvlan mode, the persistent tap QEMU holds), connects to every
QEMU, says "ready"; on "lost" (the lower is gone, and every macvlan with it)
does what netwatch does then: sets each guest NIC's link down (the carrier
follows the lower, SPEC), says "lost"; then on "go" does for every NIC at
once what a redirect reattach needs and nothing more, with the requests
netwatch makes (netwatch.host.linkops.LinkOps, over its own netlink socket):
a macvlan on the lower with the guest's MAC, down (add_macvlan(up=False)),
an ingress qdisc on it and its filter to the tap, the tap's ingress qdisc
(there already: EEXIST) and its filter replaced to point at the new
macvlan, the macvlan up (bring_up), then set_link up over QMP (netwatch's
client, netwatch.qemu.qmp.LeanClient); it says "done <its CPU seconds>
<seconds since go>". On "clean" it removes its macvlans and exits (the
taps' filters then point at nothing: netwatch replaces them when it starts
again). No events, records, hooks or announcements, no checks of what a
link is: what any manager has to do, at the least. With --bare, the guest
links are left alone (no carrier).

Usage (by scale.py): scale_floor_redirect.py LOWER [--bare] < NICS-JSON
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from typing import Any

from netwatch.host.linkops import LinkOps
from netwatch.qemu.qmp import LeanClient


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> int:
    nics: list[dict[str, Any]] = json.loads(sys.stdin.readline())
    lower = sys.argv[1]
    carrier = "--bare" not in sys.argv[2:]
    clients: dict[str, LeanClient] = {}
    if carrier:
        for nic in nics:
            if nic["qmp"] not in clients:
                client = LeanClient("floor")
                await client.connect(nic["qmp"])
                clients[nic["qmp"]] = client
    made: list[int] = []
    async with LinkOps() as ops:
        taps = [await ops.index_of(nic["tap"]) for nic in nics]
        # Warm, as a long-running netwatch is: one macvlan made, given a qdisc and a filter, and removed
        # before the clock starts (first use of each request's code path).
        warm = await ops.add_macvlan("flwarm", await ops.index_of(lower), "02:00:00:00:00:fe", "bridge", up=False)
        await ops.ensure_ingress(warm)
        await ops.redirect(warm, taps[0], replace=False)
        await ops.delete(warm)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # "lost": the lower is gone, the macvlans with it
        if carrier:
            await asyncio.gather(*(clients[nic["qmp"]].execute("set_link", {"name": nic["id"], "up": False})
                                   for nic in nics))
        print("lost", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "go"
        started, began = cpu(), time.monotonic()
        lower_index = await ops.index_of(lower)

        async def reattach(i: int, nic: dict[str, Any]) -> None:
            tap = taps[i]
            # The order netwatch's redirect wiring joins them in: down until both filters are in.
            index = await ops.add_macvlan(f"fl{i}", lower_index, nic["mac"], nic["mode"], up=False)
            made.append(index)
            await ops.ensure_ingress(index)
            await ops.redirect(index, tap, replace=False)
            await ops.ensure_ingress(tap)
            await ops.redirect(tap, index, replace=True)
            await ops.bring_up(index)
            if carrier:
                await clients[nic["qmp"]].execute("set_link", {"name": nic["id"], "up": True})

        await asyncio.gather(*(reattach(i, nic) for i, nic in enumerate(nics)))
        print(f"done {cpu() - started:.3f} {time.monotonic() - began:.3f}", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "clean"
        for index in made:
            with contextlib.suppress(Exception):
                await ops.delete(index)
    for client in clients.values():
        with contextlib.suppress(Exception):
            await client.disconnect()
    print("clean", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
