#!/usr/bin/env python3
"""Lower back -> guest answers: hub, direct and redirect wirings, on pc and q35.

Six VMs boot the test guest (netwatch.sandbox.guest), three per machine type
(pc, q35), each with one macvtap NIC managed by netwatch on a veth lower of
its own: one with wiring = "hub" (a new backend is a carrier blip to the
guest), one with wiring = "direct" (every new backend is a replug: the
guest's NIC leaves, comes back at the same PCI address with the same MAC,
and the guest sets it up again) and one with wiring = "redirect" (QEMU and
its tap are never touched: netwatch makes a new macvlan and its two tc
filters, and the guest sees a carrier blip). A redirect NIC's tap is made
by netwatch before its QEMU starts (QEMU opens it by name), so netwatch
starts first here. The far end of each lower is cabled into
a bridge of its own in a peer namespace, which holds the guest's peer
(10.77.N.1 on the bridge; the guest is 10.77.N.2 and pings it). Each bridge
has a second port (a veth to nowhere) that stays, as a switch has other
hosts: so the peer keeps its carrier, and its ARP entry for the guest,
across a flap.

Each flap, one VM at a time (the six in a new random order each round,
so the wirings and both machine types share the run's conditions): the
lower is deleted and, off the clock, netwatch reports the NIC waiting for
its lower (for a direct NIC, the guest has reported its NIC gone too);
then the lower is created again and cabled into the peer's bridge. From
that moment the peer opens a TCP connection to the guest's echo server
every 5 ms (each given 50 ms to connect, so a SYN lost to a path not yet
there costs 5 ms, not TCP's 1 s retransmission) and the first one that
connects does a round trip; the time to that answer is the figure. The
cabling itself (lower created -> far end in the bridge, a few ms, during
which netwatch is already at work) is not counted.

A VM's next flap comes 1.5 s or more after its last answer, so that TCP
retransmissions left from its last flap's abandoned attempts (a SYN-ACK is
retried 1 s on) do not fall into the next outage. In the hub and redirect
wirings the guest keeps its NIC and sees its carrier go down, which empties its ARP
table; a packet it sends to its peer then leaves the peer's entry pending,
and once the path is back its answers wait for ARP's next try, up to 1 s
on (seen in a capture: netwatch attached at +5 ms, the guest's SYN-ACKs
went out at +1030 ms right behind its ARP request). Its pings can do the
same, so with them the hub's tail may show it: that is a real guest's lot
too if it sends during the outage.

The guest runs under TCG (no KVM here) and is no real distribution: it
sets up a NIC that (re)appears from a shell loop that also pings its peer
(busybox ping, whole-second timeouts) and otherwise sleeps 0.2 s, where a
real guest's udev would react at once; --no-guest-ping leaves the pings out
(the loop then runs every 0.2 s). The direct figures include that loop.

Usage (root; runs in its own network namespace):
  bench/replug.py [--flaps N] [--no-guest-ping]
The full form (on a quiet machine):
  bench/replug.py --flaps 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import echo, echo_answers, run_in_netns, summary

from netwatch import config as config_mod
from netwatch.errors import NetwatchError
from netwatch.sandbox.guest import ECHO_PORT, Serial, build
from netwatch.sandbox.testbed import Deadline, Netns, Netwatch, Qemu, exit_on_sigterm, wait_until, write_config
from netwatch.service import control

CONNECT_TIMEOUT = 0.05  # per connection attempt
ATTEMPT_INTERVAL = 0.005  # a new attempt this often, while earlier ones are still pending
ECHO_TIMEOUT = 2.0  # once connected
ANSWER_TIMEOUT = 60.0  # per flap
QUIET = 1.5  # seconds from a VM's last answer to its next flap
MACHINES = ("pc", "q35")
WIRINGS = ("hub", "direct", "redirect")
KEEPS_ITS_NIC = ("hub", "redirect")  # the guest's NIC never leaves; its carrier blips


@dataclass(frozen=True)
class Guest:
    index: int
    machine: str
    wiring: str

    @property
    def name(self) -> str:
        return f"{self.machine}-{self.wiring}"

    @property
    def label(self) -> str:
        return f"{self.machine} {self.wiring}"

    @property
    def lower(self) -> str:
        return f"rpl{self.index}"

    @property
    def ifname(self) -> str:
        return f"rpm{self.index}"  # its macvtap, or its persistent tap (redirect)

    @property
    def wire(self) -> str:
        return f"rpw{self.index}"  # the lower's far end, in the peer's namespace

    @property
    def bridge(self) -> str:
        return f"rpbr{self.index}"

    @property
    def peer(self) -> str:
        return f"10.77.{self.index}.1"

    @property
    def address(self) -> str:
        return f"10.77.{self.index}.2"

    @property
    def mac(self) -> str:
        return f"52:54:00:c0:00:{self.index + 1:02x}"


GUESTS = tuple(Guest(index, machine, wiring) for index, (machine, wiring) in
               enumerate((m, w) for m in MACHINES for w in WIRINGS))


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def cable(guest: Guest, peer: Netns) -> None:
    """The lower, created up here, its far end straight into the peer's namespace and bridge."""
    sh("ip", "link", "add", guest.lower, "up", "type", "veth", "peer", "name", guest.wire, "netns", peer.name)
    sh("ip", "-n", peer.name, "link", "set", guest.wire, "master", guest.bridge, "up")


def echo_once(guest: Guest, peer: Netns) -> bool:
    """One TCP round trip from the peer to the guest's echo server."""
    with peer.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect((guest.address, ECHO_PORT))
        return echo(sock, ECHO_TIMEOUT)
    except OSError:
        return False
    finally:
        sock.close()


def time_to_answer(guest: Guest, peer: Netns, since: float) -> float:
    """Seconds from ``since`` to the first completed echo (attempts every ATTEMPT_INTERVAL)."""
    answers = echo_answers(peer, guest.address, ECHO_PORT, ATTEMPT_INTERVAL, CONNECT_TIMEOUT, ECHO_TIMEOUT,
                           deadline=since + ANSWER_TIMEOUT)
    with contextlib.closing(answers):
        first = next(answers, None)
    if first is None:
        raise RuntimeError(f"{guest.name}: no answer from {guest.address} within {ANSWER_TIMEOUT:g} s")
    return first - since


def nic_status(state: str, guest: Guest) -> dict[str, Any]:
    try:
        vms = control.request(state, "status", timeout=5)["vms"]
    except NetwatchError:
        return {}
    for vm in vms:
        if vm["name"] == guest.name:
            return dict(vm["nics"][0])
    return {}


def inner(workdir: str, flaps: int, guest_ping: bool) -> int:
    image = build(progress=print)
    cfg_path = os.path.join(workdir, "netwatch.toml")
    state = os.path.join(workdir, "state")
    write_config(cfg_path, state, [
        {"name": g.name, "qmp": os.path.join(workdir, f"{g.name}.qmp"), "machine": g.machine, "nics": [
            {"id": "net0", "backend": "macvtap", "lower": g.lower, "ifname": g.ifname, "mac": g.mac,
             "wiring": g.wiring}]} for g in GUESTS])
    config = config_mod.load(cfg_path)
    serials = {g.name: Serial(Path(workdir) / f"{g.name}.serial.log") for g in GUESTS}
    service = Netwatch(None, cfg_path, os.path.join(workdir, "netwatch.log"))
    qemus: dict[str, Qemu] = {}

    def dump() -> str:
        parts = [f"== {name} serial (tail)\n" + "\n".join(serial.lines()[-8:]) for name, serial in serials.items()]
        return "\n".join([*parts, "== netwatch log (tail)", service.log()[-3000:]])

    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(Netns("nwpeer"))
        stack.callback(service.kill)  # after the QEMUs' callbacks: they run last-in first-out
        for g in GUESTS:
            # A fixed bridge MAC: the guest's ARP entry for its peer stays good across cables.
            peer.ip("link", "add", g.bridge, "address", f"02:00:00:77:{g.index:02x}:01", "type", "bridge")
            peer.ip("link", "set", g.bridge, "up")
            peer.ip("addr", "add", f"{g.peer}/24", "dev", g.bridge)
            # A second port that never goes: a bridge whose only port leaves loses its carrier, and
            # with it the peer's ARP entries (the answer would then wait for ARP's 1 s retries).
            peer.ip("link", "add", f"rps{g.index}", "type", "veth", "peer", "name", f"rpt{g.index}")
            peer.ip("link", "set", f"rpt{g.index}", "up")
            peer.ip("link", "set", f"rps{g.index}", "master", g.bridge, "up")
            cable(g, peer)
        for g in GUESTS:
            vm = config.vm(g.name)
            assert vm is not None
            args = image.qemu_args(serials[g.name].path, [f"{g.address}/24"], ping=g.peer if guest_ping else None,
                                   serve=True)
            # Paused until netwatch has plugged the direct NICs: all six boot alike.
            qemus[g.name] = Qemu(vm, workdir, observe=False, monitor=True, extra_args=["-S", *args])
            stack.callback(qemus[g.name].close)
        # First: the redirect NICs' taps must be there before their QEMUs open them by name.
        service.start()
        for g in GUESTS:
            if g.wiring == "redirect":
                wait_until(lambda g=g: os.path.exists(f"/sys/class/net/{g.ifname}"), 30, f"{g.name}'s tap", dump)
        for g in GUESTS:
            qemus[g.name].start()
        for g in GUESTS:
            wait_until(lambda g=g: nic_status(state, g).get("state") == "attached", 30, f"{g.name} attached", dump)
        for g in GUESTS:
            qemus[g.name].qmp("cont")
        for g in GUESTS:
            wait_until(lambda g=g: echo_once(g, peer), 180, f"{g.name} to answer at {g.address}", dump, interval=0.2)
        print(f"{len(GUESTS)} guests up ({', '.join(g.name for g in GUESTS)}); {flaps} flaps each, interleaved; "
              f"guest pings {'on' if guest_ping else 'off'}", flush=True)

        answered: dict[str, list[float]] = {g.name: [] for g in GUESTS}
        last_answer = {g.name: time.monotonic() for g in GUESTS}
        cabling: list[float] = []
        problems: list[str] = []
        for number in range(1, flaps + 1):
            results = []
            for g in random.sample(GUESTS, len(GUESTS)):
                serial = serials[g.name]
                wait_until(lambda g=g: nic_status(state, g).get("state") == "attached", 30,
                           f"{g.name} attached before flap {number}", dump, interval=0.05)
                # Quiet first: what the last flap's abandoned attempts left in the guest's TCP
                # (SYN-ACKs retransmitted 1 s on) must not fall into this flap's outage.
                time.sleep(max(0.0, last_answer[g.name] + QUIET - time.monotonic()))
                serial.set_mark()
                sh("ip", "link", "del", g.lower)
                # Off the clock: the old backend is gone, and a direct NIC out of the guest.
                wait_until(lambda g=g: nic_status(state, g).get("state") == "waiting-lower", 30,
                           f"{g.name} waiting for its lower", dump, interval=0.02)
                if g.wiring == "direct":
                    wait_until(lambda serial=serial: serial.count("GUEST-NIC-GONE eth0") >= 1, 30,
                               f"{g.name}: the guest to let its NIC go", dump, interval=0.02)
                created = time.monotonic()
                cable(g, peer)
                since = time.monotonic()
                cabling.append((since - created) * 1000)
                took = time_to_answer(g, peer, since) * 1000
                last_answer[g.name] = time.monotonic()
                answered[g.name].append(took)
                results.append(f"{g.name} {took:.0f} ms")
                # What the guest saw: a replug (direct) or nothing but a carrier blip (hub, redirect).
                if g.wiring == "direct":
                    with contextlib.suppress(Deadline):  # its console may lag its network a little
                        wait_until(lambda serial=serial: serial.first("GUEST-NIC eth0 "), 5, "", interval=0.05)
                gone = serial.count("GUEST-NIC-GONE eth0")
                back = [line for line in serial.lines() if line.startswith("GUEST-NIC eth0 ")]
                if g.wiring == "direct" and not (gone == 1 and len(back) == 1 and f"mac={g.mac}" in back[0]):
                    problems.append(f"flap {number} {g.name}: expected one replug, the guest said {serial.lines()}")
                if g.wiring in KEEPS_ITS_NIC and (gone or back):
                    problems.append(f"flap {number} {g.name}: the {g.wiring} NIC left the guest: {serial.lines()}")
            print(f"flap {number}: " + ", ".join(results), flush=True)
        for g in GUESTS:
            if len([line for line in Serial(serials[g.name].path).lines() if line.startswith("GUEST-READY")]) != 1:
                problems.append(f"{g.name}: the guest rebooted")

        print()
        print("lower back and cabled -> first TCP echo from the peer answered:")
        for g in GUESTS:
            print("  " + summary(f"{g.label:<12}", answered[g.name]))
        for machine in MACHINES:
            hub, direct, redirect = (statistics.median(answered[f"{machine}-{wiring}"]) for wiring in WIRINGS)
            print(f"{machine}: direct / hub p50 x{direct / hub:.1f} ({direct - hub:+.0f} ms), "
                  f"redirect / hub p50 x{redirect / hub:.2f} ({redirect - hub:+.0f} ms; target: at or below the hub)")
        print("  " + summary("cabling", cabling) + "  (not counted)")
        for problem in problems:
            print(f"PROBLEM: {problem}")
        return 1 if problems else 0
    return 1  # not reached: the block returns or raises


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flaps", "-n", type=int, default=10)
    parser.add_argument("--no-guest-ping", dest="guest_ping", action="store_false",
                        help="boot the guests without their pings to the peer")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        exit_on_sigterm()
        return inner(args.inner, args.flaps, args.guest_ping)
    return run_in_netns(__file__, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
