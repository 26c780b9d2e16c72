#!/usr/bin/env python3
"""Scale: 32 QEMUs x 8 NICs = 256 macvtap NICs on one lower, and that lower flaps.

Reports, per flap, the time from the lower being recreated (already up) until
every NIC passes a frame from the wire to its hub again (p50/max over NICs,
and the total); netwatch's CPU seconds for the flap and its peak RSS; and
netwatch's CPU use over an idle minute (it must not poll).
Targets: all 256 back within 1.5 s; idle under 0.5 % of a core; RSS under 80 MB.

Usage (root; runs in its own network namespace):
  bench/scale.py [--vms 32] [--nics 8] [--flaps 3] [--idle 60] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import statistics
import sys
import time
from pathlib import Path

from common import run_in_netns

from netwatch import config as config_mod
from netwatch.sandbox.testbed import (
    Netwatch,
    Observer,
    Qemu,
    delete_link,
    exit_on_sigterm,
    frame_payload,
    sender_socket,
    test_frame,
    veth_up,
    wait_until,
    write_config,
)
from netwatch.service import control

LOWER, WIRE = "sc-lower", "sc-wire"
TICKS = os.sysconf("SC_CLK_TCK")


def mac(vm: int, nic: int) -> str:
    return f"52:54:00:{0x10 + vm:02x}:{nic:02x}:01"


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settle(qemus: list[Qemu]) -> None:
    """Wait until the QEMUs are done booting SeaBIOS (their CPU use drops)."""
    def busy() -> float:
        return sum(cpu_seconds(qemu.pid) for qemu in qemus)
    # An idle QEMU here uses about 1 % of a core; booting, 32 of them fill both.
    quiet = 0.2 + 0.02 * len(qemus)
    started = time.monotonic()
    for _ in range(300):
        before = busy()
        time.sleep(1)
        rate = busy() - before
        if rate < quiet:
            print(f"QEMUs settled after {time.monotonic() - started:.0f} s: together they use {rate:.2f} CPU s/s",
                  flush=True)
            return
    print(f"QEMUs never settled ({rate:.2f} CPU s/s); measuring anyway", flush=True)


def all_attached(state: str, count: int) -> bool:
    try:
        status = control.request(state, "status")
    except Exception:  # noqa: BLE001 - not up yet
        return False
    states = [nic["state"] for vm in status["vms"] for nic in vm["nics"]]
    return len(states) == count and all(s == "attached" for s in states)


def none_attached(state: str) -> bool:
    status = control.request(state, "status")
    return all(nic["state"] == "waiting-lower" for vm in status["vms"] for nic in vm["nics"])


def time_until_all_pass(observers: dict[str, Observer], since: float, timeout: float = 30) -> dict[str, float]:
    """Send a frame to every NIC not yet seen, until each hub got one; seconds per MAC."""
    sock = sender_socket()
    by_fd = {obs.sock.fileno(): (nic_mac, obs) for nic_mac, obs in observers.items()}
    for obs in observers.values():
        obs.sock.setblocking(False)
    seen: dict[str, float] = {}
    tag = os.urandom(8)
    frames = {nic_mac: test_frame(nic_mac, "02:00:00:00:00:01", tag) for nic_mac in observers}
    next_round = 0.0
    while len(seen) < len(observers):
        now = time.monotonic()
        if now - since > timeout:
            break
        if now >= next_round:
            for nic_mac, frame in frames.items():
                if nic_mac not in seen:
                    with contextlib.suppress(OSError):
                        sock.sendto(frame, (WIRE, 0))
            next_round = now + 0.01
        # Gently: the bench shares two cores with netwatch and 32 QEMUs.
        readable, _, _ = select.select(list(by_fd), [], [], 0.005)
        for fd in readable:
            nic_mac, obs = by_fd[fd]
            while True:
                try:
                    data = obs.sock.recv(65536)
                except BlockingIOError:
                    break
                payload = frame_payload(data)
                if payload is not None and payload.startswith(tag) and nic_mac not in seen:
                    seen[nic_mac] = time.monotonic() - since
    return seen


def inner(workdir: str, vms: int, nics: int, flaps: int, idle: float, profile: bool) -> int:
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [
        {"name": f"sc{v:02d}", "qmp": os.path.join(workdir, f"sc{v:02d}.qmp"),
         # More NICs than netwatch has default slots for: pinned in a row, as an admin would.
         "nics": [{"id": f"net{n}", "backend": "macvtap", "lower": LOWER, "mac": mac(v, n), "guest_pci": 0x08 + n}
                  for n in range(nics)]}
        for v in range(vms)])
    config = config_mod.load(cfg_path)
    asyncio.run(veth_up(LOWER, WIRE))
    qemus = [Qemu(vm, workdir) for vm in config.vms]
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))
    total = vms * nics
    observers = {mac(v, n): qemus[v].observers[f"net{n}"] for v in range(vms) for n in range(nics)}
    spy = None
    try:
        for qemu in qemus:
            qemu.start()
        service.start()
        wait_until(lambda: all_attached(state, total), 120, f"all {total} NICs to attach",
                   lambda: service.log()[-3000:], interval=0.2)
        settle(qemus)
        if profile:
            import subprocess
            spy = subprocess.Popen(["py-spy", "record", "-o", os.path.join(workdir, "..", "scale-profile.txt"),
                                    "-f", "raw", "-p", str(service.pid)])
        print(f"{vms} QEMUs x {nics} NICs = {total} macvtap NICs attached on {LOWER}", flush=True)
        totals = []
        for flap in range(1, flaps + 1):
            asyncio.run(delete_link(LOWER))
            wait_until(lambda: none_attached(state), 60, "every NIC to see the loss", lambda: service.log()[-3000:],
                       interval=0.2)
            for obs in observers.values():
                obs.drain()
            cpu_before = cpu_times(service.pid)
            up = asyncio.run(veth_up(LOWER, WIRE))
            seen = time_until_all_pass(observers, up)
            wait_until(lambda: all_attached(state, total), 60, "all NICs attached", lambda: service.log()[-3000:],
                       interval=0.2)
            user, system = (after - before for after, before in zip(cpu_times(service.pid), cpu_before, strict=True))
            times = sorted(t * 1000 for t in seen.values())
            if len(times) < total:
                print(f"flap {flap}: only {len(times)} of {total} NICs passed a frame within 30 s")
                return 1
            totals.append(times[-1])
            print(f"flap {flap}: all {total} NICs pass frames again after {times[-1]:.0f} ms "
                  f"(per NIC p50 {statistics.median(times):.0f} ms, max {times[-1]:.0f} ms); "
                  f"netwatch used {user + system:.2f} CPU s ({user:.2f} user, {system:.2f} system)", flush=True)
        print(f"netwatch peak RSS: {peak_rss_mb(service.pid):.1f} MB (target < 80 MB)")
        print(f"all {total} back: worst of {flaps} flaps {max(totals):.0f} ms (target <= 1500 ms)")
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        before, started = cpu_seconds(service.pid), time.monotonic()
        time.sleep(idle)  # the measurement itself: a quiet minute
        used = cpu_seconds(service.pid) - before
        share = 100 * used / (time.monotonic() - started)
        print(f"idle: netwatch used {used:.2f} CPU s in {idle:.0f} s = {share:.2f} % of a core (target < 0.5 %)")
        return 0
    finally:
        service.kill()
        for qemu in qemus:
            qemu.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=32)
    parser.add_argument("--nics", type=int, default=8)
    parser.add_argument("--flaps", type=int, default=3)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--profile", action="store_true", help="record a py-spy profile of the flaps")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        exit_on_sigterm()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return inner(args.inner, args.vms, args.nics, args.flaps, args.idle, args.profile)
    return run_in_netns(__file__, ["--vms", str(args.vms), "--nics", str(args.nics), "--flaps", str(args.flaps),
                                   "--idle", str(args.idle)] + (["--profile"] if args.profile else []))


if __name__ == "__main__":
    sys.exit(main())
