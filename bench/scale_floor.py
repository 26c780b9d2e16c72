#!/usr/bin/env python3
"""The floor for bench/scale.py: a straight-line program that reattaches the same NICs, as fast as it can.

Run by scale.py as a child (while netwatch is stopped, on netwatch's QMP
sockets). It reads a JSON list of NICs on stdin's first line, connects to
every QEMU, says "ready"; on "lost" (the lower is gone) does what netwatch
does then: takes the dead backends out of QEMU and sets each guest NIC's
link down (the carrier follows the lower, SPEC), says "lost"; then on "go"
does for every NIC at once what a reattach needs and nothing more,
with netwatch's own primitives: a macvtap on the lower
(netwatch.host.linkops), its character device opened, and over QMP (netwatch's
client, netwatch.qemu.qmp.LeanClient) getfd +
netdev_add tap + netdev_add hubport (the NIC's guest hubport already
exists) + set_link up, each awaited (with them sent back to back a QEMU 7.2
here once stopped answering its monitor); then it says "done <its CPU
seconds> <seconds since go>". On "clean" it removes what it made and exits. No events, no
records, no hooks, no checks of who QEMU is: what any manager has to do, at
the least. With --bare, the guest links are left alone (no carrier).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from typing import Any

from netwatch.host.chardev import open_macvtap
from netwatch.host.linkops import LinkOps
from netwatch.qemu.qmp import LeanClient, parse_info_network


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> int:
    nics: list[dict[str, Any]] = json.loads(sys.stdin.readline())
    node_dir, lower = sys.argv[1], sys.argv[2]
    carrier = "--bare" not in sys.argv[3:]
    clients: dict[str, LeanClient] = {}
    for nic in nics:
        if nic["qmp"] not in clients:
            client = LeanClient("floor")
            await client.connect(nic["qmp"])
            clients[nic["qmp"]] = client
    locks = {path: asyncio.Lock() for path in clients}
    async with LinkOps() as ops:
        # Warm, as a long-running netwatch is: one macvtap made and removed
        # before the clock starts (pyroute2 loads its macvtap code on first use).
        await ops.delete(await ops.add_macvtap("flwarm", await ops.index_of(lower), "02:00:00:00:00:fe", "bridge"))
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # "lost": the lower is gone
        # What netwatch does when a lower goes (untimed, like its own): the
        # dead backends leave QEMU, which would otherwise keep polling their
        # fds, and the guest links go down.
        for path, client in clients.items():
            network = parse_info_network(str(await client.execute("human-monitor-command",
                                                                  {"command-line": "info network"})))
            dead = [name for nic in nics if nic["qmp"] == path for name in network.netdevs
                    if name.startswith(f"nw-{nic['id']}-")]
            for name in sorted(dead, key=lambda n: "-up" not in n):  # hubports before their taps
                await client.execute("netdev_del", {"id": name})
        if carrier:
            await asyncio.gather(*(clients[nic["qmp"]].execute("set_link", {"name": nic["id"], "up": False})
                                   for nic in nics))
        print("lost", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "go"
        started, began = cpu(), time.monotonic()
        lower_index = await ops.index_of(lower)

        async def reattach(i: int, nic: dict[str, Any]) -> None:
            name = f"fl{i}"
            index = await ops.add_macvtap(name, lower_index, nic["mac"], "bridge")
            fd = open_macvtap(name, index, node_dir)
            client = clients[nic["qmp"]]
            try:
                async with locks[nic["qmp"]]:  # QEMU keeps only the last fd received
                    client.send_fd_scm(fd)
                    await client.execute("getfd", {"fdname": f"fl-fd{i}"})
                await client.execute("netdev_add", {"type": "tap", "id": f"fl-tap{i}", "fd": f"fl-fd{i}"})
                await client.execute("netdev_add", {"type": "hubport", "id": f"fl-up{i}", "hubid": nic["hub"],
                                                    "netdev": f"fl-tap{i}"})
                if carrier:
                    await client.execute("set_link", {"name": nic["id"], "up": True})
            finally:
                os.close(fd)

        await asyncio.gather(*(reattach(i, nic) for i, nic in enumerate(nics)))
        print(f"done {cpu() - started:.3f} {time.monotonic() - began:.3f}", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "clean"
        for i, nic in enumerate(nics):
            client = clients[nic["qmp"]]
            for netdev in (f"fl-up{i}", f"fl-tap{i}"):
                with contextlib.suppress(Exception):
                    await client.execute("netdev_del", {"id": netdev})
            with contextlib.suppress(Exception):
                await ops.delete(await ops.index_of(f"fl{i}"))
    for client in clients.values():
        with contextlib.suppress(Exception):
            await client.disconnect()
    print("clean", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
