#!/usr/bin/env python3
"""Live migration: answers lost with netwatch, beside a VM whose NIC is wired straight, in the same run.

Two simulated hosts, A and B (network namespaces), each with a netwatch of
its own, and a switch namespace whose bridge holds the guests' peer
(10.78.0.1) and a lower of each host per VM. Two VMs boot the test guest:

  netwatch  one macvtap NIC managed by netwatch (default wiring: hub)
  straight  one macvtap made by this script and given to QEMU as an fd,
            as libvirt wires a type='direct' NIC; no netwatch

Each round migrates each VM A -> B and back, the two VMs in a new random
order each round, as an orchestrator does: QEMU on the target started with
``-incoming unix:...``, ``migrate`` on the source, the source's QEMU ended
once the migration completed (for the straight VM the script makes the
target's macvtap before its QEMU starts and deletes the source's after).
Throughout, the peer opens a TCP connection to the guest's echo server
every 10 ms (each given 50 ms to connect) and notes each answer; the
figure is the longest time without an answer from the migrate command to
3 s after it completed. The guests also ping the peer (busybox ping, one
a second or so, 1 s timeout): the failed ones are counted too.

Usage (root): bench/migrate.py [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import echo_answers, summary

from netwatch import config as config_mod
from netwatch.config import VmConfig
from netwatch.errors import NetwatchError
from netwatch.sandbox.guest import ECHO_PORT, Serial, build
from netwatch.sandbox.testbed import Netns, Netwatch, Qemu, exit_on_sigterm, wait_until, write_config
from netwatch.service import control

PEER = "10.78.0.1"
GUESTS = {"netwatch": ("10.78.0.2", "52:54:00:9d:00:01"), "straight": ("10.78.0.3", "52:54:00:9d:00:02")}
HOSTS = ("A", "B")
ATTEMPT_INTERVAL = 0.01
CONNECT_TIMEOUT = 0.05
AFTER = 3.0  # seconds watched after the migration completed

# Opens a macvtap's character device inside a host's namespace (its sysfs) and sends the fd back.
_OPENER = ("import socket, sys\n"
           "from netwatch.host.chardev import open_macvtap\n"
           "fd = open_macvtap(sys.argv[1], socket.if_nametoindex(sys.argv[1]), sys.argv[2])\n"
           "socket.send_fds(socket.socket(fileno=int(sys.argv[3])), [b'x'], [fd])\n")


def open_macvtap_in(ns: Netns, ifname: str, node_dir: str) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        subprocess.run(ns.exec_argv(sys.executable, "-c", _OPENER, ifname, node_dir, str(theirs.fileno())),
                       check=True, pass_fds=(theirs.fileno(),))
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


class Prober(threading.Thread):
    """From the switch namespace: a TCP echo attempt every 10 ms; the times of the answers."""

    def __init__(self, switch: Netns, address: str) -> None:
        super().__init__(daemon=True)
        self.switch, self.address = switch, address
        self.answers: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        answers = echo_answers(self.switch, self.address, ECHO_PORT, ATTEMPT_INTERVAL, CONNECT_TIMEOUT, 1.0,
                               stopped=self.done.is_set)
        with contextlib.closing(answers):
            self.answers.extend(answers)

    def stop(self) -> list[float]:
        self.done.set()
        self.join(5)
        return self.answers


def longest_silence(answers: list[float], start: float, end: float) -> float:
    """Seconds of the longest stretch in [start, end] without an answer."""
    inside = [t for t in answers if start <= t <= end]
    before = [t for t in answers if t < start]
    points = [before[-1] if before else start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(points))


class Bench:
    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir = workdir
        self.stack = stack
        self.image = build(progress=print)
        self.switch = stack.enter_context(Netns("nwmsw"))
        self.hosts = {host: stack.enter_context(Netns(f"nwm{host}")) for host in HOSTS}
        self.netwatch: dict[str, Netwatch] = {}
        self.configs: dict[str, VmConfig] = {}
        self.qemus: list[Qemu] = []
        self.serials = {(vm, host): Serial(workdir / host / f"{vm}.serial") for vm in GUESTS for host in HOSTS}

    def dir(self, host: str) -> Path:
        return self.workdir / host

    def build_network(self) -> None:
        sw = self.switch
        sw.ip("link", "add", "sw", "address", "02:00:00:78:00:01", "type", "bridge")
        sw.ip("link", "set", "sw", "up")
        sw.ip("addr", "add", f"{PEER}/24", "dev", "sw")
        # A port that stays: the bridge keeps its carrier (and the peer its ARP entries) whatever moves.
        sw.ip("link", "add", "swkeep", "type", "veth", "peer", "name", "swkeep2")
        sw.ip("link", "set", "swkeep2", "up")
        sw.ip("link", "set", "swkeep", "master", "sw", "up")
        for host, ns in self.hosts.items():
            for vm in GUESTS:
                lower, wire = f"l-{vm[:2]}", f"w{host}-{vm[:2]}"
                ns.ip("link", "add", lower, "type", "veth", "peer", "name", wire, "netns", sw.name)
                ns.ip("link", "set", lower, "up")
                sw.ip("link", "set", wire, "master", "sw", "up")

    def start_netwatch(self) -> None:
        for host, ns in self.hosts.items():
            hostdir = self.dir(host)
            hostdir.mkdir(parents=True)
            cfg = str(hostdir / "netwatch.toml")
            _address, mac = GUESTS["netwatch"]
            write_config(cfg, str(hostdir / "state"), [{"name": "netwatch", "qmp": str(hostdir / "netwatch.qmp"),
                                                       "nics": [{"id": "net0", "backend": "macvtap",
                                                                 "lower": "l-ne", "mac": mac}]}])
            vm = config_mod.load(cfg).vm("netwatch")
            assert vm is not None
            self.configs[host] = vm
            self.netwatch[host] = Netwatch(ns, cfg, str(hostdir / "netwatch.log")).start()
            self.stack.callback(self.netwatch[host].kill)

    def start_qemu(self, vm: str, host: str, incoming: str | None) -> Qemu:
        address, mac = GUESTS[vm]
        args = self.image.qemu_args(self.serials[(vm, host)].path, [f"{address}/24"], ping=PEER, serve=True)
        if incoming:
            args += ["-incoming", incoming]
        hostdir = self.dir(host)
        if vm == "netwatch":
            qemu = Qemu(self.configs[host], str(hostdir), observe=False, monitor=True, extra_args=args)
        else:
            ns = self.hosts[host]
            ns.ip("link", "add", "link", "l-st", "name", "mvst", "address", mac, "type", "macvtap", "mode", "bridge")
            ns.ip("link", "set", "mvst", "up")
            fd = open_macvtap_in(ns, "mvst", str(hostdir / "nodes"))
            qemu = Qemu(VmConfig("straight", str(hostdir / "straight.qmp")), str(hostdir), observe=False,
                        monitor=True, pass_fds=(fd,),
                        extra_args=[*args, "-netdev", f"tap,id=n0,fd={fd}", "-device",
                                    f"virtio-net-pci,netdev=n0,mac={mac},addr=0x19"])
        self.qemus.append(qemu)
        self.stack.callback(qemu.close)
        try:
            qemu.start()
        finally:
            if vm == "straight":
                os.close(fd)
        return qemu

    def echo(self, vm: str) -> bool:
        prober = Prober(self.switch, GUESTS[vm][0])
        prober.start()
        time.sleep(0.2)
        return bool(prober.stop())

    def dump(self) -> str:
        parts = [f"== {vm}@{host} serial\n" + "\n".join(serial.lines()[-6:]) for (vm, host), serial in
                 self.serials.items()]
        parts += [f"== netwatch {host}\n{nw.log()[-1500:]}" for host, nw in self.netwatch.items()]
        return "\n".join(parts)

    def nic_state(self, host: str) -> str | None:
        try:
            vms = control.request(str(self.dir(host) / "state"), "status", timeout=5)["vms"]
        except NetwatchError:
            return None
        return str(vms[0]["nics"][0]["state"]) if vms and vms[0]["nics"] else None

    def migrate(self, vm: str, src: Qemu, src_host: str, dst_host: str) -> tuple[Qemu, float, float, int]:
        """One migration as an orchestrator does it: (target QEMU, migration s, longest silence s, pings lost)."""
        uri = f"unix:{self.dir(dst_host) / (vm + '.mig')}"
        dst = self.start_qemu(vm, dst_host, uri)
        for key in ((vm, src_host), (vm, dst_host)):
            self.serials[key].set_mark()
        prober = Prober(self.switch, GUESTS[vm][0])
        prober.start()
        time.sleep(0.3)  # answers before the migration starts
        started = time.monotonic()
        src.qmp("migrate", uri=uri)

        def completed() -> bool:
            status = src.qmp("query-migrate").get("status")
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"{vm}: the migration {status}\n{self.dump()}")
            return status == "completed"
        wait_until(completed, 120, f"{vm}: the migration to complete", self.dump)
        finished = time.monotonic()
        time.sleep(AFTER)
        answers = prober.stop()
        with contextlib.suppress(EOFError, OSError):
            src.qmp("quit")
        src.close()
        if vm == "straight":
            self.hosts[src_host].ip("link", "del", "mvst")
        else:
            wait_until(lambda: self.nic_state(src_host) == "waiting-vm", 30, f"{src_host}'s netwatch to let go",
                       self.dump)
        lost = sum(self.serials[(vm, host)].count("GUEST-PING fail") for host in (src_host, dst_host))
        silence = longest_silence(answers, started, finished + AFTER)
        if silence > 0.8 and os.environ.get("NW_BENCH_DEBUG"):
            print(f"DEBUG {vm} {src_host}->{dst_host}: started {time.time() - time.monotonic() + started:.3f} "
                  f"completed +{(finished - started) * 1000:.0f} ms; answers at "
                  f"{[round((t - started) * 1000) for t in answers if started - 0.1 < t < finished + AFTER]}")
            if vm == "netwatch":
                for host in (src_host, dst_host):
                    print(f"DEBUG netwatch {host}:\n" + "\n".join(self.netwatch[host].log().splitlines()[-25:]))
        return dst, finished - started, silence, lost


def inner(workdir: Path, rounds: int) -> int:
    with contextlib.ExitStack() as stack:
        bench = Bench(workdir, stack)
        bench.build_network()
        bench.start_netwatch()
        where = dict.fromkeys(GUESTS, "A")
        qemus = {vm: bench.start_qemu(vm, "A", None) for vm in GUESTS}
        wait_until(lambda: bench.nic_state("A") == "attached", 30, "netwatch's NIC attached on A", bench.dump)
        for vm in GUESTS:
            wait_until(lambda vm=vm: bench.echo(vm), 180, f"{vm} to answer", bench.dump, interval=0.2)
        print(f"2 guests up on A; {rounds} rounds of A -> B -> A each, interleaved", flush=True)
        took: dict[str, list[float]] = {vm: [] for vm in GUESTS}
        silent: dict[str, list[float]] = {vm: [] for vm in GUESTS}
        lost: dict[str, int] = dict.fromkeys(GUESTS, 0)
        for number in range(1, rounds + 1):
            results = []
            for _leg in range(2):
                for vm in random.sample(list(GUESTS), len(GUESTS)):
                    src_host = where[vm]
                    dst_host = "B" if src_host == "A" else "A"
                    qemus[vm], seconds, silence, pings = bench.migrate(vm, qemus[vm], src_host, dst_host)
                    where[vm] = dst_host
                    took[vm].append(seconds * 1000)
                    silent[vm].append(silence * 1000)
                    lost[vm] += pings
                    results.append(f"{vm} {src_host}->{dst_host} {silence * 1000:.0f} ms silent, {pings} pings lost")
            print(f"round {number}: " + ", ".join(results), flush=True)
        print()
        print("migrate command -> 3 s after completion: longest time without a TCP echo answer:")
        for vm in GUESTS:
            print("  " + summary(vm, silent[vm]) + f"   guest pings lost: {lost[vm]}")
        print("migration time (migrate -> completed, as polled):")
        for vm in GUESTS:
            print("  " + summary(vm, took[vm]))
        ratio = statistics.median(silent["netwatch"]) / statistics.median(silent["straight"])
        print(f"netwatch / straight: silence p50 x{ratio:.2f}, max {max(silent['netwatch']):.0f} vs "
              f"{max(silent['straight']):.0f} ms; pings lost {lost['netwatch']} vs {lost['straight']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", "-n", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("migrate.py: needs root (network namespaces, macvtap)", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("migrate.py: --rounds must be at least 1", file=sys.stderr)
        return 2
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="nw-bench-"))
    started = time.monotonic()
    try:
        return inner(workdir, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"(bench took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
