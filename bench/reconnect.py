#!/usr/bin/env python3
"""Reconnect latency: how long after a lower comes back do frames reach the guest?

macvtap: for each of N flaps of a veth lower, the time from the lower being
created (already up) to the first frame sent on the wire reaching the guest
NIC's hub. Measured, interleaved in the same run, for a VM managed by
netwatch and for a floor: a second QEMU whose backend is swapped by
straight-line code (no daemon, no events: it knows when the lower is up
because it made it).

tap (bridged): the time from the bridge being recreated, and separately
from the uplink being recreated, to the first wire frame at the guest's hub
(netwatch re-enslaves tap and uplink; QEMU is not touched).

Usage (root; runs in its own network namespace): bench/reconnect.py [-n N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time

from common import run_in_netns, summary
from pyroute2 import AsyncIPRoute
from qemu.qmp import QMPClient

from netwatch import config as config_mod
from netwatch.config import NicConfig, VmConfig
from netwatch.host.chardev import open_macvtap
from netwatch.sandbox.testbed import (
    Netwatch,
    Qemu,
    delete_link,
    exit_on_sigterm,
    time_to_first_frame,
    veth_up,
    wait_until,
    write_config,
)
from netwatch.service import control

NW_LOWER, NW_WIRE, NW_MAC = "bl-nw", "bw-nw", "52:54:00:be:00:01"
FL_LOWER, FL_WIRE, FL_MAC = "bl-fl", "bw-fl", "52:54:00:be:00:02"
TAP_BRIDGE, TAP_UPLINK, TAP_WIRE, TAP_MAC = "tbr0", "bl-tap", "bw-tap", "52:54:00:be:00:03"


class StraightSwap:
    """The floor: the same kernel and QMP steps as netwatch, in a straight line."""

    def __init__(self, qmp_path: str, node_dir: str) -> None:
        self.qmp_path = qmp_path
        self.node_dir = node_dir
        self.gen = 0
        self.ipr = AsyncIPRoute()
        self.qmp = QMPClient("floor")

    async def connect(self) -> None:
        await self.qmp.connect(self.qmp_path)

    async def drop_old(self) -> None:
        """After the lower is gone (off the clock): remove the dead pair."""
        if self.gen:
            await self.qmp.execute("netdev_del", {"id": f"fl-up{self.gen}"})
            await self.qmp.execute("netdev_del", {"id": f"fl-tap{self.gen}"})

    async def swap(self, lower: str) -> None:
        self.gen += 1
        lower_index = (await self.ipr.link_lookup(ifname=lower))[0]
        await self.ipr.link("add", ifname="fl-mvtap", kind="macvtap", link=lower_index, macvtap_mode="bridge",
                            address=FL_MAC, state="up")
        index = (await self.ipr.link_lookup(ifname="fl-mvtap"))[0]
        fd = open_macvtap("fl-mvtap", index, self.node_dir)
        try:
            self.qmp.send_fd_scm(fd)
            await self.qmp.execute("getfd", {"fdname": f"fl-fd{self.gen}"})
            await self.qmp.execute("netdev_add", {"type": "tap", "id": f"fl-tap{self.gen}", "fd": f"fl-fd{self.gen}"})
            await self.qmp.execute("netdev_add", {"type": "hubport", "id": f"fl-up{self.gen}", "hubid": 0,
                                                  "netdev": f"fl-tap{self.gen}"})
        finally:
            os.close(fd)

    async def close(self) -> None:
        self.ipr.close()
        with contextlib.suppress(EOFError, OSError):
            await self.qmp.disconnect()


async def bridge_up(name: str) -> float:
    """Create bridge ``name``, up in the same request; return that moment."""
    async with AsyncIPRoute() as ipr:
        await ipr.link("add", ifname=name, kind="bridge", state="up")
        return time.monotonic()


async def inner(workdir: str, flaps: int) -> int:
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [
        {"name": "nwvm", "qmp": os.path.join(workdir, "nwvm.qmp"), "nics": [
            {"id": "net0", "backend": "macvtap", "lower": NW_LOWER, "mac": NW_MAC}]},
        {"name": "tapvm", "qmp": os.path.join(workdir, "tapvm.qmp"), "nics": [
            {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "bridged", "bridge": TAP_BRIDGE,
             "lower": TAP_UPLINK,
             "mac": TAP_MAC}]}])
    nw_vm, tap_vm = config_mod.load(cfg_path).vms
    floor_vm = VmConfig("floorvm", os.path.join(workdir, "floorvm.qmp"), (
        NicConfig(id="net0", backend="macvtap", mac=FL_MAC, hub=0, model="virtio-net-pci", ifname="fl-mvtap"),))
    await veth_up(NW_LOWER, NW_WIRE)
    await veth_up(FL_LOWER, FL_WIRE)
    await veth_up(TAP_UPLINK, TAP_WIRE)
    await bridge_up(TAP_BRIDGE)
    nw_qemu, fl_qemu, tap_qemu = Qemu(nw_vm, workdir), Qemu(floor_vm, workdir), Qemu(tap_vm, workdir)
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))
    floor = StraightSwap(floor_vm.qmp, os.path.join(workdir, "floor-dev"))

    def nic(vm: int = 0) -> dict[str, object]:
        try:
            return dict(control.request(state, "status")["vms"][vm]["nics"][0])
        except Exception:  # noqa: BLE001 - not up yet
            return {}

    def nic_state() -> str:
        return str(nic().get("state", ""))

    try:
        nw_qemu.start()
        fl_qemu.start()
        tap_qemu.start()
        service.start()
        await floor.connect()
        await floor.swap(FL_LOWER)
        wait_until(lambda: nic_state() == "attached" and nic(1).get("state") == "attached", 30,
                   "netwatch to attach", service.log)
        nw_obs, fl_obs = nw_qemu.observers["net0"], fl_qemu.observers["net0"]
        tap_obs = tap_qemu.observers["net0"]
        results: dict[str, list[float]] = {"netwatch": [], "floor": [], "bridge": [], "uplink": []}
        for flap in range(flaps):
            await delete_link(NW_LOWER)
            wait_until(lambda: nic_state() == "waiting-lower", 10, "netwatch to see the loss", service.log)
            nw_obs.drain()
            up = await veth_up(NW_LOWER, NW_WIRE)
            results["netwatch"].append(1000 * time_to_first_frame(NW_WIRE, nw_obs, NW_MAC, up))

            await delete_link(FL_LOWER)
            await floor.drop_old()
            fl_obs.drain()
            up = await veth_up(FL_LOWER, FL_WIRE)
            await floor.swap(FL_LOWER)
            results["floor"].append(1000 * time_to_first_frame(FL_WIRE, fl_obs, FL_MAC, up))

            await delete_link(TAP_BRIDGE)
            wait_until(lambda: nic(1).get("bridge_present") is False, 10, "netwatch to see the bridge go",
                       service.log)
            tap_obs.drain()
            up = await bridge_up(TAP_BRIDGE)
            results["bridge"].append(1000 * time_to_first_frame(TAP_WIRE, tap_obs, TAP_MAC, up))

            await delete_link(TAP_UPLINK)
            wait_until(lambda: nic(1).get("lower_present") is False, 10, "netwatch to see the uplink go",
                       service.log)
            tap_obs.drain()
            up = await veth_up(TAP_UPLINK, TAP_WIRE)
            results["uplink"].append(1000 * time_to_first_frame(TAP_WIRE, tap_obs, TAP_MAC, up))
            print(f"flap {flap + 1:3}: macvtap netwatch {results['netwatch'][-1]:6.2f} ms, "
                  f"floor {results['floor'][-1]:6.2f} ms; tap bridge {results['bridge'][-1]:6.2f} ms, "
                  f"uplink {results['uplink'][-1]:6.2f} ms", flush=True)
        print()
        print("macvtap: time from the lower being created (up) to the first wire frame at the guest's hub")
        print(summary("netwatch", results["netwatch"]))
        print(summary("floor", results["floor"]))
        ratio = statistics.median(results["netwatch"]) / statistics.median(results["floor"])
        print(f"p50 ratio netwatch/floor: {ratio:.2f} (target <= 1.3)")
        print("tap, bridged: time from the bridge / the uplink being recreated (up) to the first wire frame "
              "at the guest's hub")
        print(summary("bridge", results["bridge"]))
        print(summary("uplink", results["uplink"]))
        return 0
    finally:
        await floor.close()
        service.kill()
        for qemu in (nw_qemu, fl_qemu, tap_qemu):
            qemu.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--flaps", type=int, default=50)
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        exit_on_sigterm()
        return asyncio.run(inner(args.inner, args.flaps))
    return run_in_netns(__file__, ["-n", str(args.flaps)])


if __name__ == "__main__":
    sys.exit(main())
