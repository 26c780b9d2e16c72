#!/usr/bin/env python3
"""Rebind under load: frames lost and time taken when a NIC moves to another lower.

The guest sends a paced stream (default 2000 frames at 1000 frames/s) while
netwatch rebinds its macvtap NIC from one veth lower to the other, back and
forth, N times. Frames are counted on both wires; the target is 0 lost.
The rebind time is the control request's round trip (what `netwatch rebind`
waits for, without the CLI's own start-up).

Usage (root; runs in its own network namespace): bench/rebind.py [-n N] [--frames F] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

from common import run_in_netns, summary

from netwatch import config as config_mod
from netwatch import control
from netwatch.sandbox import Netwatch, Qemu, exit_on_sigterm, veth_up, wait_until, write_config

MAC = "52:54:00:bf:00:01"
LOWERS = (("rb-l0", "rb-w0"), ("rb-l1", "rb-w1"))


def stream_once(observer_path: str, frames: int, rate: int, state: str, lower: str) -> tuple[dict[str, str], float]:
    tag = f"b{uuid.uuid4().hex[:7]}"
    counter = subprocess.Popen([sys.executable, "-m", "netwatch.streams", "count", tag, str(frames), "30",
                                *(wire for _, wire in LOWERS)], stdout=subprocess.PIPE, text=True)
    assert counter.stdout is not None
    assert counter.stdout.readline().strip() == "ready"
    sender = subprocess.Popen([sys.executable, "-m", "netwatch.streams", "send", observer_path, str(frames),
                               str(rate), MAC, tag])
    while not counter.stdout.readline().startswith(f"progress {frames // 4}"):
        pass
    started = time.monotonic()
    control.request(state, "rebind", vm="rbvm", nic="net0", lower=lower)
    took = time.monotonic() - started
    sender.wait(60)
    result = counter.stdout.read().splitlines()[-1]
    counter.wait(60)
    return json.loads(result), took


def inner(workdir: str, rebinds: int, frames: int, rate: int) -> int:
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [{"name": "rbvm", "qmp": os.path.join(workdir, "rbvm.qmp"), "nics": [
        {"id": "net0", "backend": "macvtap", "lower": LOWERS[0][0], "mac": MAC}]}])
    vm = config_mod.load(cfg_path).vms[0]
    for lower, wire in LOWERS:
        asyncio.run(veth_up(lower, wire))
    qemu = Qemu(vm, workdir)
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))
    try:
        qemu.start()
        service.start()
        wait_until(lambda: "-> attached" in service.log(), 30, "netwatch to attach", service.log)
        path = qemu.observers["net0"].theirs
        lost, dups, times = 0, 0, []
        for i in range(rebinds):
            target = LOWERS[(i + 1) % 2][0]
            result, took = stream_once(path, frames, rate, state, target)
            lost += int(result["lost"])
            dups += int(result["duplicates"])
            times.append(took * 1000)
            print(f"rebind {i + 1:2} to {target}: {result['received']}/{frames} frames arrived, "
                  f"{result['lost']} lost, {result['duplicates']} duplicates; rebind took {took * 1000:.1f} ms",
                  flush=True)
        print()
        print(f"{rebinds} rebinds under {rate} frames/s from the guest: {lost} of {rebinds * frames} frames lost "
              f"(target 0), {dups} duplicates while both paths were up")
        print(summary("rebind", times))
        return 0 if lost == 0 else 1
    finally:
        service.kill()
        qemu.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rebinds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        exit_on_sigterm()
        return inner(args.inner, args.rebinds, args.frames, args.rate)
    return run_in_netns(__file__, ["-n", str(args.rebinds), "--frames", str(args.frames), "--rate", str(args.rate)])


if __name__ == "__main__":
    sys.exit(main())
