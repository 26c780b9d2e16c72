"""A redirect NIC's traffic: status and the metrics count it on the tap, and a netwatch restart loses none.

Frames from the wire are counted where they leave the tap towards QEMU, with
an ETH_P_ALL packet socket (a device's transmitted frames reach only those),
so no guest is needed for the restart; the counters are a real guest's.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from netwatch.sandbox.guest import Serial, build
from netwatch.sandbox.testbed import frame_payload, wait_until

from .test_guest import cable, peer_network, wait_line
from .test_metrics import parse
from .test_redirect import MAC, TAP, frame_reaches_tap, redirect_nic
from .world import World

pytestmark = pytest.mark.integration

SO_RCVBUFFORCE = 33  # not in Python's socket module
SOL_PACKET, PACKET_STATISTICS = 263, 6
KEYS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")

# A paced sender in the world's namespace: COUNT frames to the guest's MAC on WIRE at RATE a second.
SENDER = """
import socket, struct, sys, time
from netwatch.sandbox.testbed import test_frame
wire, count, rate, mac, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5].encode()
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
sock.bind((wire, 0))
print("ready", flush=True)
start = time.monotonic()
for seq in range(count):
    delay = start + seq / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    sock.send(test_frame(mac, "02:00:00:00:00:01", tag + struct.pack("!I", seq)))
print("done", flush=True)
"""


def kernel_counters(world: World, ifname: str) -> dict[str, int]:
    stats = json.loads(world.ns.ip("-s", "-j", "link", "show", ifname))[0]["stats64"]
    return {"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"]}


def test_status_and_metrics_count_the_taps_traffic(world: World) -> None:
    metrics = world.tmp / "prom" / "netwatch.prom"
    metrics.parent.mkdir()
    world.settings["metrics_file"] = str(metrics)
    world.vm("vm1", redirect_nic())
    peer = peer_network(world)
    cable(world, peer, "lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    serial = Serial(world.tmp / "guest-serial.log")
    world.start_qemu("vm1", build().qemu_args(serial.path, ["10.77.0.2/24"], ping="10.77.0.1"))
    first = world.wait_state("vm1", "net0", "attached", timeout=60)
    wait_line(serial, "GUEST-PING ok", world, timeout=120, count=3)

    def counted(floor: dict[str, int]) -> dict[str, Any]:
        """status's counters once they are at least ``floor`` (status reads them at most once a second)."""
        def ready() -> dict[str, Any] | None:
            nic = world.nic("vm1", "net0")
            return nic if all(isinstance(nic.get(key), int) and nic[key] >= floor[key] for key in KEYS) else None
        return wait_until(ready, 10, f"status counters at least {floor}", world.dump)

    before = counted(kernel_counters(world, TAP))
    # Traffic both ways through the tap: the guest's pings (rx, from the guest) and 300 frames to it (tx).
    serial.set_mark()
    wait_line(serial, "GUEST-PING ok", world, count=3)
    subprocess.run(["ip", "netns", "exec", peer, sys.executable, "-c",
                    "import socket, struct\n"
                    "from netwatch.sandbox.testbed import test_frame\n"
                    "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0); s.bind(('peerbr', 0))\n"
                    f"[s.send(test_frame('{MAC}', '02:00:00:00:00:01', struct.pack('!I', i))) for i in range(300)]\n"],
                   check=True, cwd=Path(__file__).parent.parent)
    low = kernel_counters(world, TAP)
    grown = counted(low)
    high = kernel_counters(world, TAP)
    for key in KEYS:
        assert before[key] < low[key] <= grown[key] <= high[key], (key, before, low, grown, high)
    assert grown["tx_packets"] - before["tx_packets"] >= 300, (before, grown)
    # They are the tap's, not the macvlan's (whose receive is the tap's transmit).
    macvlan = kernel_counters(world, first["macvlan"])
    assert grown["rx_packets"] != macvlan["rx_packets"] or grown["tx_packets"] != macvlan["tx_packets"]
    # A flap: the same tap, so its counters go on from where they were (a macvtap's would start again).
    world.delete_link("lo0")
    world.wait_state("vm1", "net0", "waiting-lower")
    kept = kernel_counters(world, TAP)
    cable(world, peer, "lo0", "wi0")
    back = world.wait_state("vm1", "net0", "attached", swaps=first["swaps"] + 1)
    assert back["ifindex"] == first["ifindex"]
    again = counted(kept)
    # The metrics file shows the tap's counters too, labelled with its name (read at most a second before
    # it was written: at least what the kernel counted before the flap).
    families_of = {"tx_bytes": "netwatch_backend_transmit_bytes", "rx_bytes": "netwatch_backend_receive_bytes",
                   "tx_packets": "netwatch_backend_transmit_packets", "rx_packets": "netwatch_backend_receive_packets"}

    def from_metrics() -> dict[str, float] | None:
        families = parse(metrics.read_text()) if metrics.exists() else {}
        found = {key: [s.value for s in families[family].samples if s.labels.get("ifname") == TAP]
                 for key, family in families_of.items() if family in families}
        values = {key: found[key][0] for key in KEYS if len(found.get(key, [])) == 1}
        return values if len(values) == len(KEYS) and all(values[key] >= low[key] for key in KEYS) else None
    shown = wait_until(from_metrics, 20, "the metrics file with the tap's counters",
                       lambda: (metrics.read_text() if metrics.exists() else "no file") + world.dump())
    top = kernel_counters(world, TAP)
    assert all(shown[key] <= top[key] for key in KEYS), (shown, top)
    print(f"\nstatus counters of {TAP}: before {[before[k] for k in KEYS]}, after pings and 300 frames "
          f"{[grown[k] for k in KEYS]} (kernel {[low[k] for k in KEYS]}..{[high[k] for k in KEYS]}), "
          f"after a flap {[again[k] for k in KEYS]}, metrics file {[int(shown[k]) for k in KEYS]} "
          "(rx_bytes, tx_bytes, rx_packets, tx_packets)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_restart_mid_stream_loses_no_frame(world: World, sig: signal.Signals) -> None:
    count, rate = 4000, 1000
    world.vm("vm1", redirect_nic())
    world.lower("lo0", "wi0")
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    world.start_qemu("vm1")
    before = world.wait_state("vm1", "net0", "attached")
    frame_reaches_tap(world, "wi0")
    with world.ns.entered():
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    tap.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # holds the whole stream: read after
    tap.bind((TAP, 0))
    tag = uuid.uuid4().hex[:8].encode()
    sender = subprocess.Popen(world.ns.exec_argv(sys.executable, "-c", SENDER, "wi0", str(count), str(rate), MAC,
                                                 tag.decode()),
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    seen: set[int] = set()
    frames = 0
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        started = time.monotonic()
        time.sleep(0.5)  # a stream under way (about 500 frames) before netwatch goes
        assert world.netwatch is not None
        world.netwatch.kill(sig)
        stopped = time.monotonic()
        world.start_netwatch()
        after = world.wait_state("vm1", "net0", "attached")
        back = time.monotonic()
        assert sender.stdout.readline().strip() == "done"
        ended = time.monotonic()
        sender.wait(10)
        time.sleep(0.2)  # the last frames in flight
        tap.setblocking(False)
        while True:
            try:
                payload = frame_payload(tap.recv(2048))
            except BlockingIOError:
                break
            if payload is not None and payload.startswith(tag):
                frames += 1
                seen.add(struct.unpack_from("!I", payload, len(tag))[0])
        packets, drops = struct.unpack("II", tap.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    finally:
        tap.close()
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
    missing = sorted(set(range(count)) - seen)
    print(f"\n{sig.name} + start of netwatch {stopped - started:.2f} s into a {count}-frame stream at {rate}/s "
          f"(back attached {back - started:.2f} s in, stream ended {ended - started:.2f} s in): sent {count}, "
          f"received at the tap {len(seen)}, lost {len(missing)} {missing[:20]}, duplicates {frames - len(seen)}; "
          f"receiver drops {drops} of {packets}")
    assert drops == 0, "the test's own socket dropped frames: the count means nothing"
    assert back < ended, "netwatch was back before the stream ended: the restart was mid-stream"
    assert (len(seen), frames) == (count, count), missing[:20]
    assert (after["macvlan_ifindex"], after["ifindex"], after["swaps"]) == (
        before["macvlan_ifindex"], before["ifindex"], before["swaps"]), (before, after)
