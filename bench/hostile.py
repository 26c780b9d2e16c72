#!/usr/bin/env python3
"""A hostile QEMU next door: another VM's reattach time, quiet and while a QMP peer floods netwatch.

One VM has a real QEMU and a macvtap NIC on a veth lower; a second VM's QMP
socket is served by tests/hostile_peer.py. For each phase (quiet, then each
flood: 9 MB lines, a stream of events) the first VM's lower is deleted and
recreated N times and the time from the lower being up to the first wire
frame at its guest's hub is taken. Also netwatch's resident memory before
and after the floods, and how often the hostile peer got a session.
Targets (issue 11): p50 under a flood <= 1.5x quiet, RSS growth < 30 MB.

Usage (root; runs in its own network namespace): bench/hostile.py [-n N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import run_in_netns, summary

from netwatch import config as config_mod
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

ROOT = Path(__file__).resolve().parent.parent
MAC, LOWER, WIRE = "52:54:00:b5:00:01", "hs-l0", "hs-w0"
FLOODS = ("giant-lines", "event-flood")


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match
    return int(match.group(1)) / 1024


async def inner(workdir: str, flaps: int, seconds: float) -> int:
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    bad_qmp = os.path.join(workdir, "bad.qmp")
    write_config(cfg_path, state, [
        {"name": "good", "qmp": os.path.join(workdir, "good.qmp"), "nics": [
            {"id": "net0", "backend": "macvtap", "lower": LOWER, "mac": MAC}]},
        {"name": "bad", "qmp": bad_qmp, "nics": [
            {"id": "net0", "backend": "macvtap", "lower": "hs-none", "mac": "52:54:00:b5:00:02"}]}])
    good_vm = config_mod.load(cfg_path).vms[0]
    await veth_up(LOWER, WIRE)
    qemu = Qemu(good_vm, workdir)
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))

    def state_of() -> str:
        try:
            return str(control.request(state, "status")["vms"][0]["nics"][0]["state"])
        except Exception:  # noqa: BLE001 - not up yet
            return ""

    async def measure() -> list[float]:
        times = []
        observer = qemu.observers["net0"]
        for _ in range(flaps):
            await delete_link(LOWER)
            wait_until(lambda: state_of() == "waiting-lower", 10, "netwatch to see the loss", service.log)
            observer.drain()
            up = await veth_up(LOWER, WIRE)
            times.append(1000 * time_to_first_frame(WIRE, observer, MAC, up))
        return times

    try:
        qemu.start()
        service.start()
        wait_until(lambda: state_of() == "attached", 30, "netwatch to attach", service.log)
        rss_before = rss_mb(service.pid)
        results = {"quiet": await measure()}
        sessions = {}
        for mode in FLOODS:
            peer = subprocess.Popen([sys.executable, "-m", "tests.hostile_peer", mode, bad_qmp], cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert peer.stdout is not None and peer.stdout.readline().strip() == "listening"
                flood_started = time.monotonic()
                results[mode] = await measure()
                # Keep flooding for the rest of the window: memory must stay bounded over time too.
                until = flood_started + seconds
                wait_until(lambda until=until: time.monotonic() >= until, seconds + 5, "the flood window")
            finally:
                peer.kill()
                out, _ = peer.communicate(timeout=10)
            sessions[mode] = out.count("accepted")
        rss_after = rss_mb(service.pid)
        print("another VM's reattach: lower up -> first wire frame at its guest's hub")
        for name, times in results.items():
            print(summary(name, times))
        worst = 0.0
        for mode in FLOODS:
            ratio = statistics.median(results[mode]) / statistics.median(results["quiet"])
            worst = max(worst, ratio)
            print(f"{mode}: p50 x{ratio:.2f} of quiet (target <= 1.5); the hostile peer was connected "
                  f"{sessions[mode]} times in {max(seconds, 0):.0f}+ s")
        grown = rss_after - rss_before
        print(f"netwatch RSS {rss_before:.1f} MB -> {rss_after:.1f} MB: +{grown:.1f} MB (target < 30 MB)")
        return 0 if worst <= 1.5 and grown < 30 else 1
    finally:
        service.kill()
        qemu.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--flaps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each flood lasts at least")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        exit_on_sigterm()
        return asyncio.run(inner(args.inner, args.flaps, args.seconds))
    return run_in_netns(__file__, ["-n", str(args.flaps), "--seconds", str(args.seconds)])


if __name__ == "__main__":
    sys.exit(main())
