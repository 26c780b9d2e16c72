#!/usr/bin/env python3
"""Rebind under load: frames lost and time taken when a NIC moves to another lower.

The guest sends a paced stream (default 2000 frames at 1000 frames/s) while
netwatch rebinds its macvtap NIC from one veth lower to the other, back and
forth, N times. Frames are counted on both wires (target: at most 2 lost per
rebind, none twice). Meanwhile each lower's wire sends 2000 broadcasts a
second and the other wire counts those that crossed the guest's hub into
its network (target: 0). The rebind time is the control request's round
trip (what `netwatch rebind` waits for, without the CLI's own start-up).

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
from netwatch.sandbox.testbed import Netwatch, Qemu, exit_on_sigterm, veth_up, wait_until, write_config
from netwatch.service import control

MAC = "52:54:00:bf:00:01"
LOWERS = (("rb-l0", "rb-w0"), ("rb-l1", "rb-w1"))


def crosser(src: str, dst: str, frames: int, rate: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "netwatch.sandbox.streams", "cross", src, dst, str(frames * 2),
                             str(rate * 2), f"x{uuid.uuid4().hex[:7]}"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stream_once(observer_path: str, frames: int, rate: int, state: str,
                lower: str) -> tuple[dict[str, str], float, int]:
    tag = f"b{uuid.uuid4().hex[:7]}"
    crossers = [crosser(LOWERS[0][1], LOWERS[1][1], frames, rate), crosser(LOWERS[1][1], LOWERS[0][1], frames, rate)]
    counter = subprocess.Popen([sys.executable, "-m", "netwatch.sandbox.streams", "count", tag, str(frames), "30",
                                *(wire for _, wire in LOWERS)], stdout=subprocess.PIPE, text=True)
    assert counter.stdout is not None
    assert counter.stdout.readline().strip() == "ready"
    sender = subprocess.Popen([sys.executable, "-m", "netwatch.sandbox.streams", "send", observer_path, str(frames),
                               str(rate), MAC, tag])
    while not counter.stdout.readline().startswith(f"progress {frames // 4}"):
        pass
    started = time.monotonic()
    control.request(state, "rebind", vm="rbvm", nic="net0", lower=lower)
    took = time.monotonic() - started
    sender.wait(60)
    result = counter.stdout.read().splitlines()[-1]
    counter.wait(60)
    crossed = 0
    for proc in crossers:
        assert proc.stdout is not None
        crossed += int(json.loads(proc.stdout.read().splitlines()[-1])["crossed"])
        proc.wait(60)
    return json.loads(result), took, crossed


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
        lost, dups, crossings, worst, times = 0, 0, 0, 0, []
        for i in range(rebinds):
            target = LOWERS[(i + 1) % 2][0]
            result, took, crossed = stream_once(path, frames, rate, state, target)
            lost += int(result["lost"])
            worst = max(worst, int(result["lost"]))
            dups += int(result["duplicates"])
            crossings += crossed
            times.append(took * 1000)
            print(f"rebind {i + 1:2} to {target}: {result['received']}/{frames} frames arrived, "
                  f"{result['lost']} lost, {result['duplicates']} duplicates, {crossed} of {4 * frames} broadcasts "
                  f"crossed between the lowers; rebind took {took * 1000:.1f} ms", flush=True)
        print()
        print(f"{rebinds} rebinds under {rate} frames/s from the guest: {lost} of {rebinds * frames} frames lost "
              f"(at most {worst} in one rebind; target <= 2), {dups} duplicates (target 0)")
        print(f"broadcasts crossed from one lower's network into the other's: {crossings} of "
              f"{rebinds * 4 * frames} (target 0)")
        print(summary("rebind", times))
        return 0 if worst <= 2 and dups == 0 and crossings == 0 else 1
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
