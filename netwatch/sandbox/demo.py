"""``netwatch demo``: a sandboxed VM whose lower is flapped under netwatch.

With a real Linux guest (the default; see netwatch.sandbox.guest) the demo shows
the guest's pings to the far end of its lower surviving every flap; without
one (``--no-guest``, or when the guest cannot be built) it shows frames
reaching the guest NIC's hub again. The outer part makes a network
namespace and runs the inner part inside it (``ip netns exec``), so that
everything the demo touches, sysfs included, is the sandbox's own. Nothing
outside the namespace and a private directory under /run is created, and
both are removed at the end; the built guest stays cached for next time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from netwatch import config as config_mod
from netwatch.sandbox.guest import GuestError, Serial, build
from netwatch.sandbox.testbed import (
    QEMU_BINARY,
    Netns,
    Netwatch,
    Observer,
    Qemu,
    delete_link,
    exit_on_sigterm,
    frame_payload,
    test_frame,
    time_to_first_frame,
    veth_up,
    wait_until,
    wire_socket,
    write_config,
)
from netwatch.service import control

LOWER, WIRE = "demo-lower", "demo-wire"
GUEST_MAC = "52:54:00:de:40:01"
PEER_MAC = "02:00:00:00:00:01"
# The far end of the lower keeps its MAC across recreations, as a real
# switch port's neighbour would: the guest's ARP entry stays right.
WIRE_MAC = "02:00:00:de:40:fe"
GUEST_ADDRESS, WIRE_ADDRESS = "10.77.0.2", "10.77.0.1"
GUEST_BOOT_TIMEOUT = 120.0


def run_demo(flaps: int, guest: bool = True) -> int:
    if os.geteuid() != 0:
        print("netwatch: the demo needs root (network namespaces, macvtap)", file=sys.stderr)
        return 2
    if shutil.which(QEMU_BINARY) is None:
        print(f"netwatch: the demo needs {QEMU_BINARY} (apt-get install qemu-system-x86)", file=sys.stderr)
        return 1
    if guest:
        try:
            build(progress=print)
        except GuestError as exc:
            print(f"netwatch: {exc}; showing frames at the guest NIC instead of a booted guest")
            guest = False
    workdir = tempfile.mkdtemp(prefix="netwatch-demo-", dir="/run")
    try:
        with Netns("nwdemo") as ns:
            print(f"sandbox: network namespace {ns.name}, files in {workdir}")
            inner = ns.exec_argv(sys.executable, "-m", "netwatch.sandbox.demo", workdir, str(flaps),
                                 "guest" if guest else "")
            return subprocess.run(inner).returncode
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print("sandbox removed")


def _inner(workdir: str, flaps: int, with_guest: bool) -> int:
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [{"name": "demo", "qmp": os.path.join(workdir, "demo.qmp"), "nics": [
        {"id": "net0", "backend": "macvtap", "lower": LOWER, "mac": GUEST_MAC}]}])
    vm = config_mod.load(cfg_path).vms[0]
    image = build() if with_guest else None
    serial = Serial(Path(workdir) / "guest-serial.log")
    extra = image.qemu_args(serial.path, [f"{GUEST_ADDRESS}/24"], ping=WIRE_ADDRESS) if image else []
    qemu = Qemu(vm, workdir, extra_args=extra)
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))
    observer = qemu.observers["net0"]

    def nic_status() -> dict[str, object]:
        try:
            return dict(control.request(state, "status")["vms"][0]["nics"][0])
        except Exception:  # noqa: BLE001 - not up yet is the common case here
            return {}

    def dump() -> str:
        guest_log = "\n".join(serial.lines()[-5:]) + "\n" if image else ""
        return guest_log + json.dumps(nic_status(), indent=2) + "\n" + service.log()[-3000:]

    try:
        _lower_up(with_wire_address=image is not None)
        print(f"lower {LOWER} (a veth; {WIRE} is the wire side) is up")
        started = time.monotonic()
        qemu.start()
        print(f"QEMU pid {qemu.pid} runs with: {' '.join(qemu.argv()[1:])}")
        service.start()
        print(f"netwatch pid {service.pid} runs: netwatch run -c {cfg_path}")
        wait_until(lambda: nic_status().get("state") == "attached", 30, "the NIC to be attached", dump)
        status = nic_status()
        print(f"attached: {status['ifname']} -> QEMU netdev {status['netdev']}")
        if image is not None:
            return _guest_flaps(flaps, started, serial, observer, nic_status, dump)
        _show_both_ways(observer)
        results = []
        for flap in range(1, flaps + 1):
            asyncio.run(delete_link(LOWER))
            wait_until(lambda: nic_status().get("state") == "waiting-lower", 10, "netwatch to see the loss", dump)
            up_at = _lower_up(with_wire_address=False)
            observer.drain()
            took = time_to_first_frame(WIRE, observer, GUEST_MAC, up_at)
            results.append(took * 1000)
            swaps = nic_status().get("swaps")
            print(f"flap {flap}: lower deleted and recreated; frames reached the guest again after "
                  f"{took * 1000:.1f} ms (backends handed to QEMU so far: {swaps})")
        print(f"{flaps} flaps: median {statistics.median(results):.1f} ms, max {max(results):.1f} ms "
              "from the lower being up to the first frame at the guest; the guest NIC never changed")
        return 0
    finally:
        service.kill()
        qemu.close()


def _lower_up(with_wire_address: bool) -> float:
    """Create the lower (already up); the wire end gets the guest's peer address if asked."""
    up_at = asyncio.run(veth_up(LOWER, WIRE, WIRE_MAC))
    if with_wire_address:
        subprocess.run(["ip", "addr", "add", f"{WIRE_ADDRESS}/24", "dev", WIRE], check=True)
    return up_at


def _guest_flaps(flaps: int, started: float, serial: Serial, observer: Observer,
                 nic_status: Callable[[], dict[str, object]], dump: Callable[[], str]) -> int:
    """Flap the lower under a booted guest; 0 when its pings came back every time and its NIC never changed."""
    wait_until(lambda: serial.first("GUEST-READY"), GUEST_BOOT_TIMEOUT, "the guest to boot", dump)
    booted = time.monotonic() - started
    wait_until(lambda: serial.count("GUEST-PING ok") >= 3, 30, "the guest to reach its peer", dump)
    print(f"guest booted in {booted:.1f} s and pings {WIRE_ADDRESS}, the wire end of {LOWER}, every 0.2 s: "
          f"{serial.first('GUEST-READY')}")
    frames, resumed = [], []
    for flap in range(1, flaps + 1):
        serial.set_mark()
        asyncio.run(delete_link(LOWER))
        wait_until(lambda: serial.count("GUEST-CARRIER 0") >= 1, 10, "the guest to see its carrier go", dump)
        up_at = _lower_up(with_wire_address=True)
        observer.drain()
        frames.append(time_to_first_frame(WIRE, observer, GUEST_MAC, up_at) * 1000)
        wait_until(lambda: serial.count("GUEST-CARRIER 1") >= 1, 10, "the guest to see its carrier back", dump)
        wait_until(lambda: serial.count("GUEST-PING ok") >= 1, 30, "the guest's pings to resume", dump)
        resumed.append(time.monotonic() - up_at)
        failed = serial.count("GUEST-PING fail")
        print(f"flap {flap}: {LOWER} deleted (guest: carrier 0, {failed} pings failed meanwhile) and recreated; "
              f"frames reached the guest NIC after {frames[-1]:.1f} ms, carrier 1, pings answered again "
              f"{resumed[-1]:.2f} s after the lower came back "
              f"(backends handed to QEMU so far: {nic_status().get('swaps')})")
    whole = Serial(serial.path)
    boots = [line.split(" ", 1)[1] for line in whole.lines() if line.startswith("GUEST-READY")]
    rebooted = len(boots) != 1
    # eth0 gone from sysfs, even for a moment, would show as an empty carrier;
    # at every carrier change the guest says what its eth0 is then.
    unplugged = "GUEST-CARRIER" in whole.lines() or any(
        line.split(" ", 1)[1] != boots[0] for line in whole.lines() if line.startswith("GUEST-ETH0"))
    print(f"{flaps} flaps: frames back after median {statistics.median(frames):.1f} ms (max {max(frames):.1f}); "
          f"pings back after median {statistics.median(resumed):.2f} s (the guest pings every 0.2 s; a ping lost "
          "in the outage first waits out its 1 s timeout)")
    if rebooted or unplugged:
        print("FAILED: " + ("the guest rebooted" if rebooted else "the guest's eth0 went away or changed (an unplug)"))
        return 1
    print("the guest booted once and its eth0 never went away: same NIC, same MAC and PCI address throughout")
    return 0


def _show_both_ways(observer: Observer) -> None:
    observer.drain()
    since = time.monotonic()
    took = time_to_first_frame(WIRE, observer, GUEST_MAC, since)
    print(f"wire -> guest: a frame sent on {WIRE} reached the guest NIC's hub in {took * 1000:.1f} ms")
    sock = wire_socket(WIRE)
    sock.settimeout(5)
    try:
        observer.inject(test_frame(PEER_MAC, GUEST_MAC, b"from-the-guest"))
        while True:
            payload = frame_payload(sock.recv(2048))
            if payload is not None and payload.startswith(b"from-the-guest"):
                print(f"guest -> wire: a frame the guest sent arrived on {WIRE}")
                return
    finally:
        sock.close()


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(_inner(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "guest"))
