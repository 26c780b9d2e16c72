#!/usr/bin/env python3
"""What the hub wiring costs a real guest, against a NIC wired straight to a tap.

One Linux guest (netwatch.sandbox.guest) with five virtio-net NICs, each on its own
host link and subnet, so the only difference between them is the wiring:

  hub       netwatch's wiring: NIC -> hubport -> hub -> hubport -> tap (a tap
            in a host bridge, managed by netwatch, swappable; the hub has no
            vnet header, so no offloads)
  direct    the usual setup: NIC -> tap with vnet_hdr=on (offloads; cannot be
            swapped under a running guest)
  nohdr     NIC -> tap with vnet_hdr=off: no hub, no offloads either; it
            separates what the hub's forwarding costs from what losing the
            offloads costs
  mvhub     netwatch's wiring on a macvtap (on a veth lower whose far end is
            the host's address)
  mvdirect  the same kind of macvtap, its fd given straight to a tap netdev
            (vnet header and offloads on, as libvirt does)

The host side measures everything with its own clock, interleaving the
paths round by round in the same run: TCP request/response round trips
(1 byte each way, TCP_NODELAY) against the guest's echo server, guest->host
throughput (reading the guest's stream of zeros) and host->guest throughput
(writing to its sink). The guest runs under TCG here (no KVM, no vhost-net
on these machines), so absolute numbers are low and the guest's CPU is the
bottleneck; the ratios are what to read.

Usage (root; runs in its own network namespace):
  bench/hubcost.py [--rounds R] [--seconds S] [--pings P]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import run_in_netns, summary

from netwatch import config as config_mod
from netwatch.errors import NetwatchError
from netwatch.host.chardev import open_macvtap
from netwatch.sandbox.guest import ECHO_PORT, SINK_PORT, SOURCE_PORT, Serial, build
from netwatch.sandbox.testbed import Netwatch, Qemu, exit_on_sigterm, wait_until, write_config
from netwatch.service import control


@dataclass(frozen=True)
class Wiring:
    name: str
    link: str  # the host link that holds the host's address: a bridge, or a veth lower's far end
    host: str
    guest: str
    mac: str
    ifname: str  # the guest's tap or macvtap


HUB = Wiring("hub", "hcbr-hub", "10.78.0.1", "10.78.0.2", "52:54:00:bc:00:01", "hc-hub")
MVHUB = Wiring("mvhub", "hcw-mvhub", "10.81.0.1", "10.81.0.2", "52:54:00:bc:00:04", "hc-mvhub")
DIRECT = Wiring("direct", "hcbr-direct", "10.79.0.1", "10.79.0.2", "52:54:00:bc:00:02", "hc-direct")
NOHDR = Wiring("nohdr", "hcbr-nohdr", "10.80.0.1", "10.80.0.2", "52:54:00:bc:00:03", "hc-nohdr")
MVDIRECT = Wiring("mvdirect", "hcw-mvdirect", "10.82.0.1", "10.82.0.2", "52:54:00:bc:00:05", "hc-mvdirect")
# In the guest's PCI order: netwatch's NICs come first on QEMU's command line.
PATHS = (HUB, MVHUB, DIRECT, NOHDR, MVDIRECT)
COMPARED = ((HUB, DIRECT), (HUB, NOHDR), (MVHUB, MVDIRECT))
CHUNK = 64 * 1024
SIOCOUTQ = 0x5411  # bytes in a TCP socket's send queue, not yet acknowledged


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def lower_of(path: Wiring) -> str:
    return path.link.replace("hcw-", "hcl-")


def straight_tap_args(path: Wiring, vnet_hdr: bool) -> list[str]:
    netdev = (f"tap,id={path.name},ifname={path.ifname},script=no,downscript=no,"
              f"vnet_hdr={'on' if vnet_hdr else 'off'}")
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={path.name},mac={path.mac}"]


def straight_macvtap(path: Wiring, workdir: str) -> tuple[int, list[str]]:
    """A macvtap on the path's lower, opened here; its fd wired straight to the guest's NIC."""
    ip("link", "add", "link", lower_of(path), "name", path.ifname, "address", path.mac, "type", "macvtap",
       "mode", "bridge")
    ip("link", "set", path.ifname, "up")
    index = socket.if_nametoindex(path.ifname)
    fd = open_macvtap(path.ifname, index, os.path.join(workdir, "nodes"))
    return fd, ["-netdev", f"tap,id={path.name},fd={fd}", "-device",
                f"virtio-net-pci,netdev={path.name},mac={path.mac}"]


def round_trips(path: Wiring, count: int) -> list[float]:
    with socket.create_connection((path.guest, ECHO_PORT), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError(f"{path.name}: the echo server closed")
            times.append((time.perf_counter() - start) * 1000)
        return times


def guest_to_host(path: Wiring, seconds: float) -> float:
    """Mbit/s read from the guest's stream; the first 0.5 s (slow start) are not counted."""
    with socket.create_connection((path.guest, SOURCE_PORT), timeout=10) as sock:
        buffer = bytearray(CHUNK)
        warm_until = time.perf_counter() + 0.5
        while time.perf_counter() < warm_until:
            sock.recv_into(buffer)
        received, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            got = sock.recv_into(buffer)
            if got == 0:
                raise RuntimeError(f"{path.name}: the guest's stream ended")
            received += got
        return received * 8 / elapsed / 1e6


def host_to_guest(path: Wiring, seconds: float) -> float:
    """Mbit/s written into the guest's sink (acknowledged by the guest's TCP), after 0.5 s warm-up."""
    with socket.create_connection((path.guest, SINK_PORT), timeout=10) as sock:
        data = bytes(CHUNK)
        warm_until = time.perf_counter() + 0.5
        while time.perf_counter() < warm_until:
            sock.sendall(data)
        # Acknowledged in the window: what was queued at its start, plus what
        # was written in it, minus what is still queued at its end.
        queued, start = _unacked_bytes(sock), time.perf_counter()
        while time.perf_counter() - start < seconds:
            sock.sendall(data)
            queued += len(data)
        queued -= _unacked_bytes(sock)
        return queued * 8 / (time.perf_counter() - start) / 1e6


def _unacked_bytes(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0])


def inner(workdir: str, rounds: int, seconds: float, pings: int) -> int:
    image = build(progress=print)
    for path in (HUB, DIRECT, NOHDR):
        ip("link", "add", path.link, "type", "bridge")
        ip("link", "set", path.link, "up")
    for path in (MVHUB, MVDIRECT):
        ip("link", "add", lower_of(path), "type", "veth", "peer", "name", path.link)
        ip("link", "set", lower_of(path), "up")
        ip("link", "set", path.link, "up")
    for path in PATHS:
        ip("addr", "add", f"{path.host}/24", "dev", path.link)
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [{"name": "hc", "qmp": os.path.join(workdir, "hc.qmp"), "nics": [
        {"id": "net0", "backend": "tap", "mode": "bridged", "bridge": HUB.link, "ifname": HUB.ifname,
         "mac": HUB.mac},
        {"id": "net1", "backend": "macvtap", "lower": lower_of(MVHUB), "ifname": MVHUB.ifname, "mac": MVHUB.mac}]}])
    vm = config_mod.load(cfg_path).vms[0]
    serial = Serial(Path(workdir) / "serial.log")
    guest = image.qemu_args(serial.path, [f"{p.guest}/24" for p in PATHS], serve=True)
    fd, macvtap_args = straight_macvtap(MVDIRECT, workdir)
    # No observer port: an unread one on the hub would only add work.
    qemu = Qemu(vm, workdir, observe=False, pass_fds=(fd,),
                extra_args=[*guest, *straight_tap_args(DIRECT, True), *straight_tap_args(NOHDR, False),
                            *macvtap_args])
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))

    def dump() -> str:
        return "\n".join(serial.lines()[-10:]) + "\n" + service.log()[-2000:]

    try:
        qemu.start()
        os.close(fd)
        for path in (DIRECT, NOHDR):
            # QEMU opens its QMP socket before it makes its netdevs.
            wait_until(lambda path=path: os.path.exists(f"/sys/class/net/{path.ifname}"), 30,
                       f"QEMU to create {path.ifname}", dump)
            ip("link", "set", path.ifname, "master", path.link, "up")
        service.start()
        wait_until(lambda: _nic_states(state) == ["attached", "attached"], 30, "netwatch to attach its NICs", dump)
        wait_until(lambda: serial.first("GUEST-READY"), 120, "the guest to boot", dump)
        nics = [line for line in serial.lines() if line.startswith("GUEST-NIC")]
        for index, path in enumerate(PATHS):
            expected = f"GUEST-NIC eth{index} mac={path.mac} addr={path.guest}/24"
            assert expected in nics, f"{expected!r} not in {nics}"
        for path in PATHS:
            wait_until(lambda path=path: _reachable(path), 60, f"the guest's servers on the {path.name} path", dump)
        print(f"guest up with {len(PATHS)} NICs ({', '.join(p.name for p in PATHS)}); {rounds} rounds, "
              f"{seconds:g} s per stream, {pings} round trips per path per round")
        rtt: dict[str, list[float]] = {p.name: [] for p in PATHS}
        out: dict[str, list[float]] = {p.name: [] for p in PATHS}
        into: dict[str, list[float]] = {p.name: [] for p in PATHS}
        for number in range(1, rounds + 1):
            order = random.sample(PATHS, len(PATHS))
            for path in order:
                rtt[path.name] += round_trips(path, pings)
                out[path.name].append(guest_to_host(path, seconds))
                into[path.name].append(host_to_guest(path, seconds))
            print(f"round {number}: " + ", ".join(
                f"{p.name} {statistics.median(rtt[p.name][-pings:]):.2f} ms "
                f"{out[p.name][-1]:.0f}/{into[p.name][-1]:.0f} Mbit/s" for p in PATHS))
        print()
        print("TCP round trip (1 byte each way):")
        for path in PATHS:
            print("  " + summary(path.name, rtt[path.name]))
        print("guest -> host throughput, per round:")
        for path in PATHS:
            print(f"  {path.name:<9} median {statistics.median(out[path.name]):7.0f} Mbit/s   "
                  f"min {min(out[path.name]):7.0f}   max {max(out[path.name]):7.0f}")
        print("host -> guest throughput, per round:")
        for path in PATHS:
            print(f"  {path.name:<9} median {statistics.median(into[path.name]):7.0f} Mbit/s   "
                  f"min {min(into[path.name]):7.0f}   max {max(into[path.name]):7.0f}")
        print()
        for a, b in COMPARED:
            print(f"{a.name} / {b.name}: round trip p50 x{_ratio(rtt, a, b):.2f}, "
                  f"guest->host x{_ratio(out, a, b):.2f}, host->guest x{_ratio(into, a, b):.2f}")
        return 0
    finally:
        service.kill()
        qemu.close()


def _ratio(values: dict[str, list[float]], a: Wiring, b: Wiring) -> float:
    return statistics.median(values[a.name]) / statistics.median(values[b.name])


def _nic_states(state_dir: str) -> list[str]:
    try:
        return [str(nic["state"]) for nic in control.request(state_dir, "status")["vms"][0]["nics"]]
    except NetwatchError:
        return []


def _reachable(path: Wiring) -> bool:
    try:
        round_trips(path, 1)
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        exit_on_sigterm()
        return inner(args.inner, args.rounds, args.seconds, args.pings)
    return run_in_netns(__file__, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
