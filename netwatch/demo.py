"""``netwatch demo``: a sandboxed VM whose lower is flapped under netwatch.

The outer part makes a network namespace and runs the inner part inside it
(``ip netns exec``), so that everything the demo touches, sysfs included,
is the sandbox's own. Nothing outside the namespace and a private
directory under /run is created, and both are removed at the end.
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

from . import config as config_mod
from . import control
from .sandbox import (
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

LOWER, WIRE = "demo-lower", "demo-wire"
GUEST_MAC = "52:54:00:de:40:01"
PEER_MAC = "02:00:00:00:00:01"


def run_demo(flaps: int) -> int:
    if os.geteuid() != 0:
        print("netwatch: the demo needs root (network namespaces, macvtap)", file=sys.stderr)
        return 2
    if shutil.which(QEMU_BINARY) is None:
        print(f"netwatch: the demo needs {QEMU_BINARY} (apt-get install qemu-system-x86)", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="netwatch-demo-", dir="/run")
    try:
        with Netns("nwdemo") as ns:
            print(f"sandbox: network namespace {ns.name}, files in {workdir}")
            inner = ns.exec_argv(sys.executable, "-m", "netwatch.demo", workdir, str(flaps))
            return subprocess.run(inner).returncode
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print("sandbox removed")


def _inner(workdir: str, flaps: int) -> int:
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [{"name": "demo", "qmp": os.path.join(workdir, "demo.qmp"), "nics": [
        {"id": "net0", "backend": "macvtap", "lower": LOWER, "mac": GUEST_MAC}]}])
    vm = config_mod.load(cfg_path).vms[0]
    qemu = Qemu(vm, workdir)
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))
    observer = qemu.observers["net0"]

    def nic_status() -> dict[str, object]:
        try:
            return dict(control.request(state, "status")["vms"][0]["nics"][0])
        except Exception:  # noqa: BLE001 - not up yet is the common case here
            return {}

    def dump() -> str:
        return json.dumps(nic_status(), indent=2) + "\n" + service.log()[-3000:]

    try:
        asyncio.run(veth_up(LOWER, WIRE))
        print(f"lower {LOWER} (a veth; {WIRE} is the wire side) is up")
        qemu.start()
        print(f"QEMU pid {qemu.pid} runs with: {' '.join(qemu.argv()[1:])}")
        service.start()
        print(f"netwatch pid {service.pid} runs: netwatch run -c {cfg_path}")
        wait_until(lambda: nic_status().get("state") == "attached", 30, "the NIC to be attached", dump)
        status = nic_status()
        print(f"attached: {status['ifname']} -> QEMU netdev {status['netdev']}")
        _show_both_ways(observer)
        results = []
        for flap in range(1, flaps + 1):
            asyncio.run(delete_link(LOWER))
            wait_until(lambda: nic_status().get("state") == "waiting-lower", 10, "netwatch to see the loss", dump)
            up_at = asyncio.run(veth_up(LOWER, WIRE))
            observer.drain()
            took = time_to_first_frame(WIRE, observer, GUEST_MAC, up_at)
            results.append(took * 1000)
            swaps = nic_status().get("swaps")
            print(f"flap {flap}: lower deleted and recreated; frames reached the guest again after "
                  f"{took * 1000:.1f} ms (backend swaps so far: {swaps})")
        print(f"{flaps} flaps: median {statistics.median(results):.1f} ms, max {max(results):.1f} ms "
              "from the lower being up to the first frame at the guest; the guest NIC never changed")
        return 0
    finally:
        service.kill()
        qemu.close()


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
    sys.exit(_inner(sys.argv[1], int(sys.argv[2])))
