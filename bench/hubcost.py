#!/usr/bin/env python3
"""What netwatch's wirings cost a real guest, against NICs wired straight to a tap.

One Linux guest (netwatch.sandbox.guest) with eight virtio-net NICs, each on its
own host link and subnet, so the only difference between them is the wiring:

  hub       netwatch's hub wiring: NIC -> hubport -> hub -> hubport -> tap (a
            tap in a host bridge, managed by netwatch, swappable; the hub has
            no vnet header, so no offloads; set as wiring = "hub", since a
            tap's default is direct)
  nwdirect  netwatch's direct wiring (wiring = "direct") on the same kind of
            bridged tap: the NIC peered straight with the tap netdev netwatch
            made (vnet header, offloads), plugged by netwatch with device_add
  direct    the usual setup: NIC -> tap with vnet_hdr=on (offloads; cannot be
            swapped under a running guest)
  nohdr     NIC -> tap with vnet_hdr=off: no hub, no offloads either; it
            separates what the hub's forwarding costs from what losing the
            offloads costs
  mvhub     netwatch's hub wiring on a macvtap (on a veth lower whose far
            end is the host's address)
  mvdirect  the same kind of macvtap, its fd given straight to a tap netdev
            (vnet header and offloads on, as libvirt does)
  mvnwdirect netwatch's direct wiring on the same kind of macvtap
  mvredirect netwatch's redirect wiring on the same kind of veth lower: the
            NIC on a persistent tap netwatch made (vnet header, offloads;
            QEMU opens it by name), joined by two tc u32 + mirred filters
            to a macvlan with the guest's MAC on the lower

nwdirect, mvnwdirect and mvredirect should cost nothing against direct and
mvdirect (target: >= 0.95x on round trip and both streams; for the round
trip the speed ratio, direct's p50 over nwdirect's, is what is held to it).

A direct NIC is not on QEMU's command line: netwatch plugs it at its
guest_pci once its backend exists. A redirect NIC is, but its tap must be
there before QEMU opens it by name: netwatch starts first and makes it. So
QEMU starts (after the tap is there) paused (-S), netwatch attaches every
NIC, and only then does the guest run: every NIC is there
when its kernel enumerates PCI, and eth0, eth1, ... follow the PCI slots,
which are all pinned (the addresses are handed out in slot order).

The host side measures everything with its own clock, interleaving the
paths round by round in the same run: TCP request/response round trips
(1 byte each way, TCP_NODELAY) against the guest's echo server, guest->host
throughput (reading the guest's stream of zeros) and host->guest throughput
(writing to its sink). The guest runs under TCG here (no KVM, no vhost-net
on these machines), so absolute numbers are low and the guest's CPU is the
bottleneck; the ratios are what to read.

Usage (root; runs in its own network namespace):
  bench/hubcost.py [--rounds R] [--seconds S] [--pings P]
The full form (on a quiet machine):
  bench/hubcost.py --rounds 10 --seconds 3 --pings 200
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
from netwatch.qemu.args import vhost_available
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
    slot: int  # its PCI slot in the guest (pc's root bus); the guest numbers its NICs in slot order


HUB = Wiring("hub", "hcbr-hub", "10.78.0.1", "10.78.0.2", "52:54:00:bc:00:01", "hc-hub", 0x03)
MVHUB = Wiring("mvhub", "hcw-mvhub", "10.81.0.1", "10.81.0.2", "52:54:00:bc:00:04", "hc-mvhub", 0x04)
NWDIRECT = Wiring("nwdirect", "hcbr-nwdirect", "10.83.0.1", "10.83.0.2", "52:54:00:bc:00:06", "hc-nwdirect", 0x05)
MVNWDIRECT = Wiring("mvnwdirect", "hcw-mvnwdirect", "10.84.0.1", "10.84.0.2", "52:54:00:bc:00:07", "hc-mvnwdirect",
                    0x06)
DIRECT = Wiring("direct", "hcbr-direct", "10.79.0.1", "10.79.0.2", "52:54:00:bc:00:02", "hc-direct", 0x07)
NOHDR = Wiring("nohdr", "hcbr-nohdr", "10.80.0.1", "10.80.0.2", "52:54:00:bc:00:03", "hc-nohdr", 0x08)
MVDIRECT = Wiring("mvdirect", "hcw-mvdirect", "10.82.0.1", "10.82.0.2", "52:54:00:bc:00:05", "hc-mvdirect", 0x09)
MVREDIRECT = Wiring("mvredirect", "hcw-mvredirect", "10.85.0.1", "10.85.0.2", "52:54:00:bc:00:08", "hc-mvredirect",
                    0x0A)
PATHS = (HUB, MVHUB, NWDIRECT, MVNWDIRECT, DIRECT, NOHDR, MVDIRECT, MVREDIRECT)
NETWATCH = (HUB, MVHUB, NWDIRECT, MVNWDIRECT, MVREDIRECT)  # the NICs netwatch manages, in its config's order
WIRING = {NWDIRECT: "direct", MVNWDIRECT: "direct", MVREDIRECT: "redirect"}  # the others: hub
BRIDGED = (HUB, NWDIRECT, DIRECT, NOHDR)  # on a host bridge; the others on a veth lower
COMPARED = ((HUB, DIRECT), (HUB, NOHDR), (MVHUB, MVDIRECT), (NWDIRECT, DIRECT), (MVNWDIRECT, MVDIRECT),
            (MVREDIRECT, MVDIRECT), (MVREDIRECT, MVHUB), (MVREDIRECT, MVNWDIRECT))
AT_FULL_SPEED = ((NWDIRECT, DIRECT), (MVNWDIRECT, MVDIRECT), (MVREDIRECT, MVDIRECT))  # held to DIRECT_TARGET
DIRECT_TARGET = 0.95  # netwatch's direct and redirect wirings against the straight path, on all three figures
CHUNK = 64 * 1024
SIOCOUTQ = 0x5411  # bytes in a TCP socket's send queue, not yet acknowledged


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def lower_of(path: Wiring) -> str:
    return path.link.replace("hcw-", "hcl-")


def vhost() -> str:
    """As netwatch's own netdevs have it (its direct and redirect wirings): vhost-net where the host has it."""
    return ",vhost=on" if vhost_available() else ""


def straight_tap_args(path: Wiring, vnet_hdr: bool) -> list[str]:
    netdev = (f"tap,id={path.name},ifname={path.ifname},script=no,downscript=no,"
              f"vnet_hdr={'on' if vnet_hdr else 'off'}{vhost() if vnet_hdr else ''}")
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={path.name},mac={path.mac},addr={path.slot:#04x}"]


def straight_macvtap(path: Wiring, workdir: str) -> tuple[int, list[str]]:
    """A macvtap on the path's lower, opened here; its fd wired straight to the guest's NIC."""
    ip("link", "add", "link", lower_of(path), "name", path.ifname, "address", path.mac, "type", "macvtap",
       "mode", "bridge")
    ip("link", "set", path.ifname, "up")
    index = socket.if_nametoindex(path.ifname)
    fd = open_macvtap(path.ifname, index, os.path.join(workdir, "nodes"))
    return fd, ["-netdev", f"tap,id={path.name},fd={fd}{vhost()}", "-device",
                f"virtio-net-pci,netdev={path.name},mac={path.mac},addr={path.slot:#04x}"]


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
    for path in BRIDGED:
        ip("link", "add", path.link, "type", "bridge")
        ip("link", "set", path.link, "up")
    for path in PATHS:
        if path not in BRIDGED:
            ip("link", "add", lower_of(path), "type", "veth", "peer", "name", path.link)
            ip("link", "set", lower_of(path), "up")
            ip("link", "set", path.link, "up")
    for path in PATHS:
        ip("addr", "add", f"{path.host}/24", "dev", path.link)
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    nics: list[dict[str, object]] = []
    for index, path in enumerate(NETWATCH):
        nic: dict[str, object] = {"id": f"net{index}", "ifname": path.ifname, "mac": path.mac,
                                  "guest_pci": f"{path.slot:#04x}", "wiring": WIRING.get(path, "hub")}
        if path in BRIDGED:
            nic.update(backend="tap", mode="bridged", bridge=path.link)
        else:
            nic.update(backend="macvtap", lower=lower_of(path))
        nics.append(nic)
    write_config(cfg_path, state, [{"name": "hc", "qmp": os.path.join(workdir, "hc.qmp"), "nics": nics}])
    vm = config_mod.load(cfg_path).vms[0]
    serial = Serial(Path(workdir) / "serial.log")
    # The guest gives eth0, eth1, ... the addresses in order, and names its NICs in PCI slot order.
    in_slot_order = sorted(PATHS, key=lambda p: p.slot)
    guest = image.qemu_args(serial.path, [f"{p.guest}/24" for p in in_slot_order], serve=True)
    fd, macvtap_args = straight_macvtap(MVDIRECT, workdir)
    # No observer port: an unread one on the hub would only add work. Paused
    # (-S) until netwatch has plugged its direct NICs.
    qemu = Qemu(vm, workdir, observe=False, monitor=True, pass_fds=(fd,),
                extra_args=["-S", *guest, *straight_tap_args(DIRECT, True), *straight_tap_args(NOHDR, False),
                            *macvtap_args])
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))

    def dump() -> str:
        return "\n".join(serial.lines()[-10:]) + "\n" + service.log()[-2000:]

    try:
        # The redirect NIC's tap first: QEMU opens it by name (one it made itself would be QEMU's, not netwatch's).
        service.start()
        wait_until(lambda: os.path.exists(f"/sys/class/net/{MVREDIRECT.ifname}"), 30,
                   f"netwatch to make the tap {MVREDIRECT.ifname}", dump)
        qemu.start()
        os.close(fd)
        for path in (DIRECT, NOHDR):
            # QEMU opens its QMP socket before it makes its netdevs.
            wait_until(lambda path=path: os.path.exists(f"/sys/class/net/{path.ifname}"), 30,
                       f"QEMU to create {path.ifname}", dump)
            ip("link", "set", path.ifname, "master", path.link, "up")
        wait_until(lambda: _nic_states(state) == ["attached"] * len(NETWATCH), 30, "netwatch to attach its NICs",
                   dump)
        qemu.qmp("cont")
        wait_until(lambda: serial.first("GUEST-READY"), 120, "the guest to boot", dump)
        seen = {line.split()[1]: line for line in serial.lines() if line.startswith("GUEST-NIC ")}
        for index, path in enumerate(in_slot_order):
            line = seen.get(f"eth{index}", "")
            assert f" mac={path.mac} " in line and f" pci=0000:00:{path.slot:02x}.0 " in line \
                and f" addr={path.guest}/24" in line, f"eth{index} should be {path.name}: {sorted(seen.values())}"
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
            print(f"  {path.name:<10} median {statistics.median(out[path.name]):7.0f} Mbit/s   "
                  f"min {min(out[path.name]):7.0f}   max {max(out[path.name]):7.0f}")
        print("host -> guest throughput, per round:")
        for path in PATHS:
            print(f"  {path.name:<10} median {statistics.median(into[path.name]):7.0f} Mbit/s   "
                  f"min {min(into[path.name]):7.0f}   max {max(into[path.name]):7.0f}")
        print()
        for a, b in COMPARED:
            print(f"{a.name} / {b.name}: round trip p50 x{_ratio(rtt, a, b):.2f}, "
                  f"guest->host x{_ratio(out, a, b):.2f}, host->guest x{_ratio(into, a, b):.2f}")
        for a, b in AT_FULL_SPEED:
            # As speeds (higher is better): for the round trip that is b's p50 over a's.
            speeds = (_ratio(rtt, b, a), _ratio(out, a, b), _ratio(into, a, b))
            verdict = "met" if min(speeds) >= DIRECT_TARGET else "NOT met"
            print(f"{a.name} vs {b.name} as speed: round trip x{speeds[0]:.2f}, guest->host x{speeds[1]:.2f}, "
                  f"host->guest x{speeds[2]:.2f} (target >= {DIRECT_TARGET} on all three: {verdict})")
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
