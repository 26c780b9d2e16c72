"""netwatch on a real hypervisor host whose NICs leave the PCI bus and come back (issue 24).

tests/hotswap_host.py boots a Debian 12 VM under TCG (cached image; one
boot for the whole module): systemd, udevd, systemd-networkd, netwatch
installed inside as docs/service.md says and running as its service
(``udev = "udev"``: it uses a new link only once udevd has handled it),
three virtio-net NICs on pluggable slots (ens4, ens5, ens6) and an inner
QEMU (no guest OS, running) whose seven macvtap NICs netwatch keeps
attached (and three more on a veth, the baseline):

* nw0: lower ``ens4``, the host's first NIC by its predictable name;
* nw1: lower ``ens4.100``, a VLAN systemd-networkd makes on it;
* nw2: lower ``{ mac = <the second NIC's MAC> }``;
* nw3: lower ``{ pci = "0000:00:05.0" }``, the second NIC's slot;
* nw4: ``wiring = "redirect"``, lower ``ens4``;
* nw5: ``wiring = "redirect"``, lower ``{ pci = "0000:00:05.0" }``;
* nw6: lower ``bond0``, an active-backup bond networkd makes with ens6 (the
  third NIC, on a segment of its own) as its slave;

and a second inner QEMU, vm2, booting a real Linux guest (netwatch/sandbox/
guest.py: the cloud kernel and a busybox init, about 45 s nested under TCG,
begun during the set-up) with one NIC:

* nd0: ``wiring = "direct"``, lower ``ens4``: netwatch plugs the guest's
  virtio-net device itself and replugs it (device_del, device_add) when the
  lower comes back. The guest pings 10.77.0.1, which the switch answers on
  ens4's segment during the direct test only (answered, the guest pings
  every 0.2 s, and its QEMU takes most of a host VM CPU).

Each hub NIC's hub has an observer port (``-netdev dgram``) read by a small
program inside the host, which logs the first test frame after a silence
with the time it was sent (this machine's clock, carried in the frame) and
received (the host VM's); for a redirect NIC (no hub) it reads what leaves
the NIC's persistent tap towards QEMU (an AF_PACKET socket on the tap,
PACKET_OUTGOING). The switch (a process of the test) sends the frames on
the host's segments every 10 ms, VLAN-tagged for nw1, and records the
inner VMs' own frames (netwatch's announce-self after a reattach: RARP from
the guest's MAC) coming out of the host.

Scenarios (each a test, sharing the boot; NETWATCH_HOTSWAP_ROUNDS rounds,
1 by default; each leaves every NIC attached):

* the host's first NIC unplugged and plugged back under vm2's guest (first:
  it waits for the guest's boot): the guest loses its NIC, then gets the
  same one back (MAC, PCI address; no reboot), never on eth0, and its pings
  are answered again; from device_add to its first frame at the switch and
  to GUEST-PING ok on its console;
* the host's first NIC unplugged (``device_del`` on the outer QMP) and
  plugged back at the same slot with the same MAC: the kernel names it
  eth0, udev renames it ens4, networkd makes ens4.100 again; nw0, nw1 and
  nw4 are attached again, never on eth0, and their frames flow;
* the same for the second NIC: nw2 (MAC), nw3 and nw5 (PCI path) follow it;
* the VLAN deleted and made again by networkd (``networkctl reconfigure``);
* the driver reloaded: ``modprobe -r virtio_net && modprobe virtio_net``
  (nw6's bond stays, without its slave for a while);
* the bond deleted and made again by networkd with its slave;
* the bond's slave unplugged and plugged back (the bond stays);
* the second NIC replaced by a card with another MAC: nw3 and nw5 follow
  the slot, nw2 (lower by MAC) waits and netwatch says why, once; then the
  original card back;
* the second NIC gone for a while (NETWATCH_HOTSWAP_IDLE_SECONDS, 10 s by
  default): its NICs wait without a retry loop (netwatch's CPU time and
  journal over the window).

Each round prints the time from the event to the first frame through,
and splits it into the host's share (until udevd announced the lower:
hotplug, probe, rename, networkd) and netwatch's (from there to the first
frame at the inner VM's hub, or out of its tap), from udevadm monitor's and
the observer's timestamps (both the host VM's CLOCK_MONOTONIC).

    NETWATCH_HOTSWAP_ROUNDS=5 .venv/bin/pytest -s tests/test_hotswap.py

is the long form (5 rounds, p50 and max per scenario);
NETWATCH_HOTSWAP_IDLE_SECONDS=60 lengthens the absent lower's window.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netwatch.config import alt_ifname, macvlan_ifname
from netwatch.sandbox.guest import GuestError, GuestImage
from netwatch.sandbox.guest import build as build_guest
from netwatch.sandbox.testbed import wait_until

from .hotswap_host import NICS, HostNic, HotswapHost, Switch, booted, missing_tools
from .systemd_host import HostError, wheelhouse
from .test_real_systemd import readme_service_commands

REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("NETWATCH_HOTSWAP_ROUNDS", "1"))
IDLE_SECONDS = float(os.environ.get("NETWATCH_HOTSWAP_IDLE_SECONDS", "10"))
NIC_A, NIC_B, NIC_C = NICS
VLAN = 100
VLAN_LINK = f"{NIC_A.predictable}.{VLAN}"
BOND = "bond0"
SLAVE_NETWORK = f"/etc/systemd/network/10-nwt-{NIC_C.predictable}.network"
OTHER_CARD_MAC = "52:54:00:aa:01:05"  # the card that replaces the second NIC in its slot
QMP_DIR, OBS_DIR = "/run/nwt-qmp", "/run/nwt-obs"
FRAMES_LOG = f"{OBS_DIR}/frames.log"
UDEV_LOG = "/run/nwt-udev.log"
BACK = ("lower-back", "attached")  # netwatch's entries for a NIC's backend in QEMU again
REALTIME = "-p CPUSchedulingPolicy=fifo -p CPUSchedulingPriority=50"
PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/root/nwt/wheels", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@dataclass(frozen=True)
class InnerNic:
    id: str
    mac: str
    lower: str | dict[str, str]
    host_nic: HostNic | None  # the host NIC the lower is, or is on (a VLAN, a bond's slave); None: the veth
    vlan: int | None = None
    wiring: str = "hub"
    guest_pci: str | None = None  # past the seven default slots
    vm: str = "vm1"

    @property
    def lower_name(self) -> str:
        """The name the lower has on the host once udev and networkd are done."""
        if isinstance(self.lower, str):
            return self.lower
        assert self.host_nic is not None
        return self.host_nic.predictable

    @property
    def lower_described(self) -> str:
        """What names the lower in the config (a name, a MAC, a PCI address)."""
        return self.lower if isinstance(self.lower, str) else next(iter(self.lower.values()))

    @property
    def observer(self) -> str:
        return f"{self.vm}-{self.id}"

    @property
    def tap(self) -> str:
        """netwatch's name for the NIC's macvtap (hub, direct) or persistent tap (redirect)."""
        return f"nw-{self.vm}-{self.id}"

    @property
    def backend_names(self) -> tuple[str, ...]:
        """The names the link netwatch makes on the lower may have: the macvtap (hub), the macvlan (redirect)."""
        first = macvlan_ifname(self.tap) if self.wiring == "redirect" else self.tap
        return first, alt_ifname(first)


INNER = (InnerNic("nw0", "52:54:00:5e:00:01", NIC_A.predictable, NIC_A),
         InnerNic("nw1", "52:54:00:5e:00:02", VLAN_LINK, NIC_A, vlan=VLAN),
         InnerNic("nw2", "52:54:00:5e:00:03", {"mac": NIC_B.mac}, NIC_B),
         InnerNic("nw3", "52:54:00:5e:00:04", {"pci": NIC_B.pci}, NIC_B),
         InnerNic("nw4", "52:54:00:5e:00:05", NIC_A.predictable, NIC_A, wiring="redirect"),
         InnerNic("nw5", "52:54:00:5e:00:06", {"pci": NIC_B.pci}, NIC_B, wiring="redirect"),
         InnerNic("nw6", "52:54:00:5e:00:07", BOND, NIC_C))
# The baseline: the same three kinds of NIC as on the second NIC (two hub, one redirect) on a veth in the
# host VM, deleted and made again, as every other test does on this machine. Their frames come from a sender
# in the host VM, only during their round.
VETH, VETH_PEER = "vlow", "vlowp"
BASELINE = (InnerNic("nw7", "52:54:00:5e:00:08", VETH, None, guest_pci="0x0a"),
            InnerNic("nw8", "52:54:00:5e:00:09", VETH, None, guest_pci="0x0b"),
            InnerNic("nw9", "52:54:00:5e:00:0a", VETH, None, wiring="redirect", guest_pci="0x0c"))
ALL = INNER + BASELINE
# vm2: a real Linux guest (netwatch/sandbox/guest.py: a kernel and a busybox init) whose one NIC is wired
# direct, so that netwatch replugs it (device_del, device_add) when its lower comes back and the guest sees
# it leave and come back. Its lower is ens4 by name, like nw0: the first NIC is hot-swapped in two scenarios
# (its own and the driver reload), the second in four (those, another card in its slot and the long
# absence, whose window must stay free of netwatch's journal entries), and a lower by name is what udevd's
# rename is about.
DIRECT = InnerNic("nd0", "52:54:00:5e:01:01", NIC_A.predictable, NIC_A, wiring="direct", vm="vm2")
GUEST_DIR, VM2_DIR = "/root/nwt/guest", "/run/nwt-vm2"
GUEST_SERIAL = f"{VM2_DIR}/serial.log"
GUEST_ADDRESS, GUEST_MEMORY_MB = "10.77.0.2/24", 128
# The guest pings this host; the switch is it, on the guest's lower's segment only.
PEER = {"segment": NIC_A.segment, "ip": "10.77.0.1", "mac": "02:00:00:77:00:01"}


def _toml(value: str | dict[str, str]) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {json.dumps(item)}" for key, item in value.items()) + " }"
    return json.dumps(value)


CONFIG = "\n".join([
    "[netwatch]",
    # The point: udev mode against a real udevd (a link is used once udevd has renamed it).
    'udev = "udev"',
    "",
    "[[vm]]",
    'name = "vm1"',
    f'qmp = "{QMP_DIR}/vm1.qmp"',
    *(line for nic in ALL for line in (
        "", "  [[vm.nic]]", f'  id = "{nic.id}"', '  backend = "macvtap"', f"  lower = {_toml(nic.lower)}",
        f'  mac = "{nic.mac}"', f'  wiring = "{nic.wiring}"',
        *([f'  guest_pci = "{nic.guest_pci}"'] if nic.guest_pci else []))),
    "",
    "[[vm]]",
    'name = "vm2"',
    f'qmp = "{QMP_DIR}/vm2.qmp"',
    "",
    "  [[vm.nic]]",
    f'  id = "{DIRECT.id}"',
    '  backend = "macvtap"',
    f"  lower = {_toml(DIRECT.lower)}",
    f'  mac = "{DIRECT.mac}"',
    f'  wiring = "{DIRECT.wiring}"',
    ""])

# systemd-networkd: the NICs matched by name (a .network matching the first
# NIC's MAC would match its VLAN too: the same MAC), no addresses, no IPv6
# link-local (nothing on the segments but the test's frames), the VLAN on the
# first, the third enslaved to an active-backup bond (which takes a MAC of
# networkd's and gives it to its slave: hence not one of the first two).
NETWORKD = {
    f"/etc/systemd/network/10-nwt-{NIC_A.predictable}.network":
        f"[Match]\nName={NIC_A.predictable}\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\nVLAN={VLAN_LINK}\n",
    f"/etc/systemd/network/10-nwt-{VLAN_LINK}.netdev":
        f"[NetDev]\nName={VLAN_LINK}\nKind=vlan\n\n[VLAN]\nId={VLAN}\n",
    f"/etc/systemd/network/10-nwt-{VLAN_LINK}.network":
        f"[Match]\nName={VLAN_LINK}\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
    f"/etc/systemd/network/10-nwt-{NIC_B.predictable}.network":
        f"[Match]\nName={NIC_B.predictable}\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
    f"/etc/systemd/network/10-nwt-{BOND}.netdev":
        f"[NetDev]\nName={BOND}\nKind=bond\n\n[Bond]\nMode=active-backup\nMIIMonitorSec=100ms\n",
    f"/etc/systemd/network/10-nwt-{BOND}.network":
        f"[Match]\nName={BOND}\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
    SLAVE_NETWORK:
        f"[Match]\nName={NIC_C.predictable}\n\n[Network]\nBond={BOND}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
}

# Inside the host VM (its own python3): binds one observer socket per inner
# NIC (QEMU's dgram port on that NIC's hub sends to it; for a redirect NIC,
# given as NAME=TAP, a packet socket on its tap that keeps what the tap sends
# to QEMU: PACKET_OUTGOING, which only ETH_P_ALL sockets get) and logs, per NIC,
# the first test frame after a silence of GAP seconds (its sequence number,
# when the switch sent it, in this machine's clock, and when it arrived, in
# the host VM's) and, every CAL seconds while frames come, the least
# (arrival - sending) of them: the offset between the two clocks plus the
# shortest trip. A line per frame would cost the host VM's CPU under TCG.
# It also logs when udevd's database entry of a link appears
# (/run/udev/data/n<ifindex>): the moment netwatch, in udev mode, may use
# the link. udevd writes it before it runs RUN programs and tells anyone,
# so udevadm monitor's UDEV line comes later.
# And it logs every change of a link's up and carrier flags (rtnetlink): when
# networkd set a lower up and the lower could carry frames.
OBSERVER = """#!/usr/bin/python3
import ctypes, json, os, select, socket, struct, sys, time
GAP_NS, CAL_NS = 200_000_000, 500_000_000
IN_CREATE, IN_MOVED_TO = 0x100, 0x80
ETH_P_ALL, PACKET_OUTGOING = 3, 4
RTMGRP_LINK, RTM_NEWLINK, IFLA_IFNAME, IFF_UP, IFF_LOWER_UP = 1, 16, 3, 0x1, 0x10000
directory, names = sys.argv[1], sys.argv[2:]
socks = {}
for name in names:
    name, _, tap = name.partition("=")
    if tap:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.htons(ETH_P_ALL))
        sock.bind((tap, ETH_P_ALL))
    else:
        path = os.path.join(directory, name + ".obs")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        sock.bind(path)
    socks[sock] = name
libc = ctypes.CDLL(None, use_errno=True)
inotify = libc.inotify_init1(os.O_NONBLOCK)
if inotify < 0 or libc.inotify_add_watch(inotify, b"/run/udev/data", IN_CREATE | IN_MOVED_TO) < 0:
    raise SystemExit("inotify on /run/udev/data: errno %d" % ctypes.get_errno())
rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
rtnl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
rtnl.bind((0, RTMGRP_LINK))
log = open(os.path.join(directory, "frames.log"), "a", buffering=1)
last, least, since, flags_of = {}, {}, {}, {}
def links(data, now):
    while len(data) >= 16:
        size, kind = struct.unpack("IH", data[:6])
        if size < 16:
            return
        if kind == RTM_NEWLINK and size >= 32:
            index, flags = struct.unpack("iI", data[20:28])
            at, name = 32, ""
            while at + 4 <= size:
                length, attr = struct.unpack("HH", data[at:at + 4])
                if length < 4:
                    break
                if attr == IFLA_IFNAME:
                    name = data[at + 4:at + length].rstrip(b"\\0").decode(errors="replace")
                at += (length + 3) & ~3
            state = (name, bool(flags & IFF_UP), bool(flags & IFF_LOWER_UP))
            if flags_of.get(index) != state:
                flags_of[index] = state
                log.write(json.dumps({"link": name, "up": state[1], "carrier": state[2], "t": now}) + "\\n")
        data = data[(size + 3) & ~3:]
while True:
    ready, _, _ = select.select([inotify, rtnl, *socks], [], [], 5.0)
    if rtnl in ready:
        while True:
            try:
                data = rtnl.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: changes were lost; say so rather than guess
                log.write(json.dumps({"link": "", "lost": exc.errno, "t": time.monotonic_ns()}) + "\\n")
                break
            links(data, time.monotonic_ns())
    if inotify in ready:
        now = time.monotonic_ns()
        data = os.read(inotify, 65536)
        while data:
            _, _, _, size = struct.unpack("iIII", data[:16])
            entry = data[16:16 + size].rstrip(b"\\0").decode(errors="replace")
            data = data[16 + size:]
            if entry.startswith("n") and entry[1:].isdigit():
                log.write(json.dumps({"udevdb": entry, "t": now}) + "\\n")
    for sock in (r for r in ready if r not in (inotify, rtnl)):
        name = socks[sock]
        while True:
            try:
                frame, address = sock.recvfrom(65536)
            except BlockingIOError:
                break
            now = time.monotonic_ns()
            if sock.family == socket.AF_PACKET and address[2] != PACKET_OUTGOING:
                continue
            if frame[12:14] != b"\\x88\\xb5" or frame[14:18] != b"NWHS":
                continue
            seq, sent = struct.unpack("!QQ", frame[18:34])
            if now - last.get(name, 0) > GAP_NS:
                log.write(json.dumps({"nic": name, "seq": seq, "sent": sent, "recv": now}) + "\\n")
                least[name], since[name] = now - sent, now
            last[name] = now
            least[name] = min(least[name], now - sent)
            if now - since[name] > CAL_NS:
                log.write(json.dumps({"nic": name, "cal": least[name], "recv": now}) + "\\n")
                least[name], since[name] = now - sent, now
"""


# Inside the host VM, for the veth baseline: test frames to each MAC given, every 10 ms, out of the veth's
# peer (made again with the veth: the socket is bound again when it is back).
SENDER = """#!/usr/bin/python3
import socket, struct, sys, time
ETH_P_ALL = 3
ifname, macs = sys.argv[1], [bytes.fromhex(m.replace(":", "")) for m in sys.argv[2:]]
src, seq, sock = bytes.fromhex("020000000002"), 0, None
while True:
    try:
        if sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            sock.bind((ifname, ETH_P_ALL))
        for dst in macs:
            sock.send((dst + src + struct.pack("!H", 0x88B5) + b"NWHS" + struct.pack("!QQ", seq, time.monotonic_ns())
                       ).ljust(60, b"\\0"))
        seq += 1
    except OSError:
        if sock is not None:
            sock.close()
        sock = None
    time.sleep(0.01)
"""


@dataclass(frozen=True)
class UdevEvent:
    """One line of ``udevadm monitor``: who sent it, when (the host VM's CLOCK_MONOTONIC, ns), what."""

    source: str  # KERNEL (the uevent) or UDEV (udevd done with it)
    t: int
    action: str
    devpath: str
    subsystem: str

    @property
    def name(self) -> str:
        return self.devpath.rsplit("/", 1)[-1]


UDEV_LINE = re.compile(r"^(KERNEL|UDEV)\s*\[(\d+)\.(\d{6})\]\s+(\S+)\s+(\S+)\s+\((\S+)\)")


def parse_udev(text: str) -> list[UdevEvent]:
    events = []
    for line in text.splitlines():
        found = UDEV_LINE.match(line)
        if found:
            source, sec, usec, action, devpath, subsystem = found.groups()
            events.append(UdevEvent(source, int(sec) * 10**9 + int(usec) * 1000, action, devpath, subsystem))
    return events


@dataclass(frozen=True)
class FirstFrame:
    """The observer's line for the first test frame an inner NIC got after a silence."""

    nic: str
    seq: int
    sent: int  # the switch's clock (this machine's CLOCK_MONOTONIC), ns
    recv: int  # the host VM's CLOCK_MONOTONIC, ns


@dataclass(frozen=True)
class Round:
    """One round of a scenario, per inner NIC, in ms: from the event to its first frame through, and its
    parts. The host's runs until the lower is there for netwatch and for frames: udevd's event for it (what
    netwatch in udev mode waits for) and its carrier, whichever is later (hotplug, probe, rename, networkd).
    netwatch's is the rest: its backend made and in QEMU, and the first frame's trip through it."""

    scenario: str
    nic: str
    total_ms: float
    host_ms: float
    netwatch_ms: float
    detail: str


@dataclass(frozen=True)
class ConsoleLine:
    """A line of vm2's serial console and when the test first saw it, this machine's CLOCK_MONOTONIC (ns):
    it came between the start of the poll before (``after``) and the end of the poll that brought it
    (``seen``)."""

    text: str
    after: int
    seen: int


class GuestConsole:
    """vm2's serial console: a file QEMU writes in the host VM, read on by the test through the agent."""

    def __init__(self, host: HotswapHost, path: str) -> None:
        self.host, self.path = host, path
        self.offset, self.last_poll = 0, 0
        self.lines: list[ConsoleLine] = []

    def poll(self) -> list[ConsoleLine]:
        started = time.monotonic_ns()
        try:
            data = self.host.read(self.path, self.offset)
        except HostError:  # not there yet
            data = b""
        seen = time.monotonic_ns()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        self.lines += [ConsoleLine(line.strip(), self.last_poll, seen)
                       for line in complete.decode(errors="replace").splitlines() if line.strip()]
        self.last_poll = started
        return self.lines

    def wait(self, found: Any, timeout: float, what: str, dump: Any) -> Any:
        """Poll until ``found(lines)`` is truthy; its value."""
        value = wait_until(lambda: found(self.poll()), timeout, what,
                           lambda: "\n".join(line.text for line in self.lines[-15:]) + "\n" + dump(), interval=0.05)
        assert value
        return value

    @staticmethod
    def pinging(lines: list[ConsoleLine], count: int = 3) -> ConsoleLine | None:
        """The first of ``count`` GUEST-PING ok in a row in ``lines``."""
        pings = [line for line in lines if line.text.startswith("GUEST-PING ")]
        return next((pings[i] for i in range(len(pings) - count + 1)
                     if all(p.text == "GUEST-PING ok" for p in pings[i:i + count])), None)

    @staticmethod
    def nic(lines: list[ConsoleLine], eth: str = "eth0") -> list[str]:
        """The guest's GUEST-NIC lines for ``eth`` without the address: "GUEST-NIC eth0 mac=... pci=..."."""
        return [line.text.rsplit(" addr=", 1)[0] for line in lines if line.text.startswith(f"GUEST-NIC {eth} ")]


class Hotswap:
    """The booted host VM with netwatch and the inner VM, and what the scenarios ask of it."""

    def __init__(self, host: HotswapHost, switch: Switch) -> None:
        self.host, self.switch = host, switch
        self.console = GuestConsole(host, GUEST_SERIAL)
        self.guest_pid: str | None = None  # vm2's QEMU, once its guest was up
        self.direct: list[tuple[float, float, float]] = []  # per direct round: device_add -> RARP, frame, ping ok
        self.rounds: list[Round] = []
        self.frames_offset = 0
        self.frames: list[FirstFrame] = []
        self.calibrations: list[tuple[str, int, int]] = []  # (observer, least recv - sent, recv), ns
        self.udev_db: list[tuple[str, int]] = []  # (n<ifindex>, when its udev database entry appeared), ns
        self.link_flags: list[tuple[str, bool, int]] = []  # (link, up with carrier, since when), ns

    # -- setting up ---------------------------------------------------------------

    def setup(self, commands: list[str], start_at: int) -> None:
        host = self.host
        started = time.monotonic()
        host.unpack()
        # udevadm monitor from the start: every uevent of the links with its time, and udevd's own after it.
        # It and the observer stamp what they receive: at real-time priority they run as soon as it comes,
        # not when a busy TCG vCPU gets round to them (they do little work).
        host.run(f"systemd-run --quiet --unit=nwt-udevmon {REALTIME} -p StandardOutput=file:{UDEV_LOG} "
                 "udevadm monitor --kernel --udev --subsystem-match=net --subsystem-match=module")
        # The observer's sockets queue 10 datagrams by default; a full one makes QEMU's dgram port spin.
        host.run("sysctl -q -w net.unix.max_dgram_qlen=4096")
        script = "set -ex\n" + "\n".join(commands[:start_at])
        host.run(f"cd /root/nwt/src && {script}", env=PIP_ENV, timeout=900)
        installed = time.monotonic() - started
        host.run("cp /root/nwt/files/netwatch.toml /etc/netwatch/netwatch.toml")  # "then edit it"
        # vm2's guest boots (about 45 s, nested under TCG) while the rest is set up; the tests that need it
        # wait for it (guest_booted). netwatch plugs its NIC once it runs and the lower is there.
        self.start_guest_vm()
        for path, text in NETWORKD.items():
            host.write(path, text)
        host.run(f"ip link add {VETH} type veth peer name {VETH_PEER} && ip link set {VETH_PEER} up "
                 f"&& ip link set {VETH} up")
        # networkd reads .network files (ours, and netwatch's 00-netwatch.network) on a reload.
        host.run("networkctl reload")
        wait_until(lambda: self.links_up([NIC_A.predictable, NIC_B.predictable, VLAN_LINK, NIC_C.predictable, BOND])
                   and self.enslaved(), 60, "networkd to bring up the NICs, the VLAN and the bond",
                   lambda: host.out("ip -br link; networkctl"))
        script = "set -ex\n" + "\n".join(commands[start_at:])
        host.run(f"cd /root/nwt/src && {script}", timeout=120)
        wait_until(lambda: host.out("systemctl is-active netwatch", check=False).strip() == "active", 60,
                   "netwatch.service to be active", lambda: host.out("journalctl -u netwatch --no-pager -n 30"))
        # netwatch makes the redirect NICs' persistent taps at start, before QEMU opens them by name; the
        # observer binds a packet socket to each (first: the last hub socket bound says they were).
        redirect = [nic for nic in ALL if nic.wiring == "redirect"]
        hub = [nic for nic in ALL if nic.wiring == "hub"]
        wait_until(lambda: all(host.run(f"ip link show {nic.tap}", check=False).returncode == 0 for nic in redirect),
                   60, "netwatch's persistent taps", self.dump)
        names = " ".join([f"{nic.observer}={nic.tap}" for nic in redirect] + [nic.observer for nic in hub])
        host.run(f"mkdir -p {QMP_DIR} {OBS_DIR} && systemd-run --quiet --unit=nwt-observer {REALTIME} "
                 f"/usr/bin/python3 /root/nwt/files/observer.py {OBS_DIR} {names}")
        wait_until(lambda: host.run(f"test -S {OBS_DIR}/{hub[-1].observer}.obs", check=False).returncode == 0,
                   30, "the observer's sockets", lambda: host.out("journalctl -u nwt-observer --no-pager -n 20"))
        self.start_inner_vm()
        self.wait_states({nic.id: "attached" for nic in ALL}, 120)
        self.switch.send(self.targets(INNER))
        self.wait_frames(INNER, since_sent=0, timeout=60)
        print(f"[hotswap] set up in {time.monotonic() - started:.1f} s (docs/service.md's install "
              f"{installed:.1f} s of it); {self.status_line()}", flush=True)

    def links_up(self, names: list[str]) -> bool:
        out = self.host.out("ip -br link", check=False)
        up = {line.split()[0].split("@")[0] for line in out.splitlines() if "UP" in line.split()[1:2]
              or ",UP" in line}
        return all(name in up for name in names)

    def enslaved(self) -> bool:
        """Whether the bond has its slave."""
        return f" {NIC_C.predictable}:" in self.host.out(f"ip -o link show master {BOND}", check=False)

    def start_inner_vm(self) -> None:
        host = self.host
        args = json.loads(host.out("netwatch qemu-args --json vm1"))
        qemu = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults",
                "-no-user-config", "-m", "32", "-name", "vm1", "-global", "virtio-net-pci.romfile=", *args,
                "-qmp", f"unix:{QMP_DIR}/vm1.test.qmp,server=on,wait=off"]
        hubs = dict(re.findall(r"hubport,id=[^,]*?(nw\d+)[^,]*,hubid=(\d+)", " ".join(args)))
        # A redirect NIC's tap netdev names the tap netwatch made (QEMU opens it by name).
        for nic in ALL:
            if nic.wiring == "redirect":
                assert any(re.match(rf"tap,.*\bifname={nic.tap}(,|$)", arg) for arg in args), (nic.id, args)
        for index, nic in enumerate(ALL):
            if nic.wiring != "hub":
                continue
            hub = hubs.get(nic.id, str(index))
            qemu += ["-netdev", f"dgram,id=obs{index},local.type=unix,local.path={OBS_DIR}/{nic.observer}.qemu,"
                                f"remote.type=unix,remote.path={OBS_DIR}/{nic.observer}.obs",
                     "-netdev", f"hubport,id=obs{index}p,hubid={hub},netdev=obs{index}"]
        # A transient unit: the host's systemd owns the inner QEMU, as a VM manager's would.
        host.run(f"systemd-run --quiet --unit=nwt-vm1 {shlex.join(qemu)}")

    def start_guest_vm(self) -> None:
        """vm2: QEMU booting the real guest, its serial console to a file; it starts without its NIC
        (qemu-args has none for a direct NIC on ``pc``): netwatch plugs it."""
        args = json.loads(self.host.out("netwatch qemu-args --json vm2"))
        assert not any(DIRECT.id in arg for arg in args), f"a device for the direct NIC in qemu-args: {args}"
        guest = GuestImage(Path(GUEST_DIR) / "vmlinuz", Path(GUEST_DIR) / "initrd.cpio")
        qemu = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults",
                "-no-user-config", "-name", "vm2", "-global", "virtio-net-pci.romfile=", *args,
                *guest.qemu_args(Path(GUEST_SERIAL), [GUEST_ADDRESS], ping=PEER["ip"], memory_mb=GUEST_MEMORY_MB)]
        self.host.run(f"mkdir -p {QMP_DIR} {VM2_DIR} && systemd-run --quiet --unit=nwt-vm2 {shlex.join(qemu)}")

    # -- looking ------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        done = self.host.run("netwatch status --json", check=False, timeout=60)
        if done.returncode != 0:
            return {}
        return {nic["id"]: nic for vm in json.loads(done.stdout)["vms"] for nic in vm["nics"]}

    def status_line(self) -> str:
        return ", ".join(f"{nic_id} {entry['state']} on {entry.get('lower') or '-'}"
                         for nic_id, entry in sorted(self.status().items()))

    def wait_states(self, wanted: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
        def reached() -> dict[str, dict[str, Any]] | None:
            now = self.status()
            return now if all(now.get(nic, {}).get("state") == state for nic, state in wanted.items()) else None
        found = wait_until(reached, timeout, f"netwatch to report {wanted}", self.dump, interval=0.3)
        assert found is not None
        return found

    def dump(self) -> str:
        parts = []
        for command in ("netwatch status", "journalctl -u netwatch -n 40 --no-pager", "ip -br link",
                        "ip -o -d link show type macvlan | cut -c1-160",
                        "networkctl --no-pager", f"tail -n 30 {UDEV_LOG}", f"tail -n 20 {FRAMES_LOG}",
                        f"tail -n 12 {GUEST_SERIAL}",
                        "systemctl is-active nwt-vm1 nwt-vm2 nwt-observer nwt-udevmon nwt-sender"):
            done = self.host.run(command, check=False, timeout=60)
            parts.append(f"--- {command} (exit {done.returncode}) ---\n{done.stdout}{done.stderr}".rstrip())
        return "\n".join(parts)

    def targets(self, nics: tuple[InnerNic, ...] | list[InnerNic]) -> list[tuple[str, str, int | None]]:
        return [(nic.host_nic.segment, nic.mac, nic.vlan) for nic in nics if nic.host_nic is not None]

    def read_frames(self) -> list[FirstFrame]:
        """The observer's lines so far (read on from where the last call stopped)."""
        try:
            data = self.host.read(FRAMES_LOG, self.frames_offset)
        except HostError:
            return self.frames
        complete = data[:data.rfind(b"\n") + 1]
        self.frames_offset += len(complete)
        for line in complete.decode().splitlines():
            entry = json.loads(line)
            if "cal" in entry:
                self.calibrations.append((entry["nic"], entry["cal"], entry["recv"]))
            elif "udevdb" in entry:
                self.udev_db.append((entry["udevdb"], entry["t"]))
            elif "link" in entry:
                assert "lost" not in entry, f"the observer lost link changes (errno {entry['lost']})"
                self.link_flags.append((entry["link"], entry["up"] and entry["carrier"], entry["t"]))
            else:
                self.frames.append(FirstFrame(entry["nic"], entry["seq"], entry["sent"], entry["recv"]))
        return self.frames

    def wait_frames(self, nics: tuple[InnerNic, ...] | list[InnerNic], since_sent: int = 0, since_recv: int = 0,
                    timeout: float = 60) -> dict[str, FirstFrame]:
        """Per NIC, the first frame after a silence sent after ``since_sent`` (ns, switch's clock) and received
        after ``since_recv`` (ns, the host VM's clock)."""
        def first() -> dict[str, FirstFrame] | None:
            found: dict[str, FirstFrame] = {}
            for frame in self.read_frames():
                if frame.sent >= since_sent and frame.recv >= since_recv:
                    found.setdefault(frame.nic, frame)
            return found if all(nic.observer in found for nic in nics) else None
        found = wait_until(first, timeout, f"test frames to reach {[nic.id for nic in nics]}", self.dump,
                           interval=0.1)
        assert found is not None
        return {nic.id: found[nic.observer] for nic in nics}

    def udev(self, since: int = 0) -> list[UdevEvent]:
        return [event for event in parse_udev(self.host.read(UDEV_LOG).decode(errors="replace")) if event.t >= since]

    def journal(self, since: int = 0) -> list[dict[str, Any]]:
        out = self.host.out("journalctl -u netwatch -o json --no-pager", timeout=60)
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [entry for entry in entries if int(entry.get("__MONOTONIC_TIMESTAMP", 0)) * 1000 >= since]

    def vm_now(self) -> int:
        """The host VM's CLOCK_MONOTONIC now, ns (to 10 ms: marks where logs start, not measurements)."""
        return int(self.host.monotonic() * 1e9)

    # -- the scenarios' rounds -------------------------------------------------------

    def flowing(self, inner: list[InnerNic]) -> int:
        """Test frames sent to ``inner`` (only: each frame costs the host VM's CPU) and arriving now (the
        observer's calibration lines, written while frames come); the host VM's clock minus this machine's
        (ns), the least of those lines' (arrival - sending).

        The first frame through after an event may have been sent well before:
        the switch's frames wait in the outer QEMU while the new NIC has no
        receive buffers (its driver fills them when the link goes up), and
        reach the inner VM together when the path is whole. So an event on
        the outer QMP is timed to the first frame's arrival, in the host VM's
        clock, taken back to this machine's with this offset.
        """
        # Every timed round runs with vm2's guest up, whichever tests run: its nested boot takes most of a
        # host VM CPU for about 30 s and skews every round it overlaps.
        self.guest_booted()
        self.read_frames()
        known = len(self.calibrations)
        self.switch.send(self.targets(inner))

        def calibrated() -> list[int] | None:
            self.read_frames()
            observers = {nic.observer for nic in inner}
            found = [cal for observer, cal, _ in self.calibrations[known:] if observer in observers]
            got = {observer for observer, _, _ in self.calibrations[known:]}
            return found if observers <= got else None
        offsets = wait_until(calibrated, 60, f"test frames to reach {[nic.id for nic in inner]}", self.dump,
                             interval=0.2)
        assert offsets is not None
        return min(offsets)

    def split(self, scenario: str, inner: list[InnerNic], first: dict[str, FirstFrame], events: list[UdevEvent],
              total_ms: dict[str, float], since: int, extra: str = "") -> list[Round]:
        """Each NIC's round in its parts (Round), from udevd's event for its lower (udevadm monitor's UDEV
        line), the lower up with carrier (the observer's rtnetlink lines) and the first frame; printed with
        them, netwatch's journal entry for the backend back in QEMU (NETWATCH_MONOTONIC_USEC: when netwatch
        made it; journald's stamp comes later) and when udevd wrote the lower's database entry."""
        status = self.status()
        self.read_frames()
        said = self.journal(since)
        rounds = []
        for nic in inner:
            index = status[nic.id]["lower_ifindex"]
            entry = next((t for name, t in self.udev_db if name == f"n{index}" and t >= since), None)
            announced = next((e.t for e in events if e.source == "UDEV" and e.subsystem == "net"
                              and e.name == nic.lower_name and e.action in ("add", "move")), None)
            assert announced is not None, f"udevd never announced {nic.lower_name}: {events}"
            handed = next((int(e["NETWATCH_MONOTONIC_USEC"]) * 1000 for e in said
                           if e.get("NETWATCH_NIC") == nic.id and e.get("NETWATCH_EVENT") in BACK
                           and int(e["NETWATCH_MONOTONIC_USEC"]) * 1000 >= since), None)
            assert handed is not None, f"no {BACK} entry for {nic.id} in {said}"
            began = next((int(e["NETWATCH_MONOTONIC_USEC"]) * 1000 for e in said
                          if e.get("NETWATCH_NIC") == nic.id and e.get("NETWATCH_STATE") == "attaching"
                          and int(e["NETWATCH_MONOTONIC_USEC"]) * 1000 >= announced), None)
            carrier = next((t for name, on, t in self.link_flags if name == nic.lower_name and on and t >= since),
                           None)
            assert carrier is not None, f"{nic.lower_name} never up with carrier: {self.link_flags[-20:]}"
            recv = first[nic.id].recv
            # The path is whole once netwatch's backend is in QEMU and the lower has its carrier: frames
            # pass before netwatch's entry says so (it is written after the record and the hooks).
            netwatch_ms = max(0.0, (recv - max(announced, carrier)) / 1e6)
            own = status[nic.id].get("last_attach_seconds")
            where = "out of its tap" if nic.wiring == "redirect" else "at the inner VM"
            detail = (f"udevd's event for {nic.lower_name} -> frame {where} {(recv - announced) / 1e6:.0f} ms, "
                      f"lower's carrier {(carrier - announced) / 1e6:+.0f} ms, "
                      + (f"netwatch attaching {(began - announced) / 1e6:+.0f} ms, " if began is not None else "")
                      + f"netwatch's entry {BACK[0]}/"
                      f"{BACK[1]} {(handed - announced) / 1e6:+.0f} ms"
                      + (f" (its attach {own * 1000:.0f} ms)" if own is not None else "")
                      + (f"; udevd wrote its database entry {(announced - entry) / 1e6:.0f} ms before its event"
                         if entry is not None else "") + extra)
            rounds.append(Round(scenario, nic.id, total_ms[nic.id], total_ms[nic.id] - netwatch_ms, netwatch_ms,
                                detail))
        self.report(rounds)
        return rounds

    def report(self, rounds: list[Round]) -> None:
        self.rounds += rounds
        for entry in rounds:
            print(f"[hotswap] {entry.scenario} {entry.nic}: frames back after {entry.total_ms:.0f} ms = host "
                  f"{entry.host_ms:.0f} + netwatch {entry.netwatch_ms:.0f}; {entry.detail}", flush=True)

    def never_on_a_kernel_name(self, inner: list[InnerNic], events: list[UdevEvent], since: int) -> None:
        """No NIC gets its macvtap (or, redirect, its macvlan) before udevd renamed its lower's NIC, and
        netwatch never names a kernel name (eth0) as a lower, whether the lower is given by name, by MAC or
        by PCI address.

        Seen before netwatch waited for udevd's own event (its database entry
        came first): on a driver reload (both NICs registered at once, 2 of 8
        rounds) nw3, matched by PCI address, got its macvtap 17 ms before the
        kernel renamed eth1 to ens5, and netwatch logged "lower eth1 (ifindex 55)".
        """
        self.read_frames()
        wrong: list[str] = []
        for nic in inner:
            made = [e for e in events if e.source == "KERNEL" and e.action == "add" and e.name in nic.backend_names]
            assert made, f"no new macvtap or macvlan for {nic.id} in {events}"
            rename = [e for e in events if e.source == "KERNEL" and e.action == "move" and e.subsystem == "net"
                      and e.name == nic.host_nic.predictable]
            assert rename, f"{nic.host_nic.predictable} was not renamed from a kernel name: {events}"
            if made[0].t < rename[0].t:
                entries = [(entry, round((t - rename[0].t) / 1e6)) for entry, t in self.udev_db if t >= since]
                wrong.append(f"{nic.id}'s {made[0].name} was made {(rename[0].t - made[0].t) / 1e6:.0f} ms before "
                             f"{nic.host_nic.predictable} was renamed (udevd's entries since the event, ms after "
                             f"the rename: {entries})")
        for entry in self.journal(since):
            if entry.get("NETWATCH_NIC") in {nic.id for nic in inner} and \
                    re.fullmatch(r"eth\d+", entry.get("NETWATCH_LOWER", "")):
                wrong.append(f"{entry.get('NETWATCH_NIC')} {entry.get('NETWATCH_EVENT')}: {entry.get('MESSAGE')}")
        assert not wrong, "netwatch used a lower under its kernel name:\n" + "\n".join(wrong)

    def announced(self, inner: list[InnerNic], since_ns: int, timeout: float = 3) -> dict[str, tuple[int, float]]:
        """Per NIC: how many of netwatch's announce-self RARPs (3 rounds) from its guest MAC came out of the
        host after ``since_ns``, and the first one's ms after it (-1: none); rarps() asserts on it."""
        def count() -> dict[str, tuple[int, float]]:
            found: dict[str, tuple[int, float]] = {nic.id: (0, -1.0) for nic in inner}
            for frame in self.switch.seen(since_ns):
                for nic in inner:
                    if (frame.src == nic.mac and frame.type == 0x8035 and frame.segment == nic.host_nic.segment
                            and frame.vlan == nic.vlan):
                        seen, first = found[nic.id]
                        found[nic.id] = (seen + 1, first if seen else (frame.t - since_ns) / 1e6)
            return found
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(seen < 3 for seen, _ in count().values()):
            time.sleep(0.1)
        return count()

    def rarps(self, inner: list[InnerNic], since_ns: int) -> str:
        """At least one of each NIC's announce-self RARPs left the host after ``since_ns``: netwatch has the
        guest's MAC announced once the lower's carrier and the guest link are up (QEMU drops a RARP of a
        NIC whose link is down: before that, 0 of 3 came out for some NICs plugged back)."""
        found = self.announced(inner, since_ns)
        text = "; RARPs outside " + ", ".join(f"{k} {seen} of 3" + (f" (first {ms:.0f} ms)" if seen else "")
                                              for k, (seen, ms) in sorted(found.items()))
        missing = sorted(k for k, (seen, _) in found.items() if not seen)
        assert not missing, f"no RARP of {missing} left the host{text}"
        return text

    def redirect_kept(self, inner: list[InnerNic], before: dict[str, dict[str, Any]],
                      after: dict[str, dict[str, Any]], since: int) -> str:
        """A redirect NIC's persistent tap outlived the round (same ifindex), its new macvlan is on the lower
        its status names, and QEMU was told nothing but the guest's carrier: netwatch's journal has, for it,
        besides its state's changes, lower-lost, lower-back and set_link's link-down and link-up only (a
        hot-add, a netdev or a rebind would have their own entries; the announce-self netwatch asks QEMU
        for has none)."""
        redirect = [n for n in inner if n.wiring == "redirect"]
        if not redirect:
            return ""
        macvlans = self.host.out("ip -o link show type macvlan")
        said: dict[str, list[str]] = {n.id: [] for n in redirect}
        for entry in self.journal(since):
            if entry.get("NETWATCH_NIC") in said and "NETWATCH_STATE" not in entry:  # not a change of state
                said[entry["NETWATCH_NIC"]].append(entry.get("NETWATCH_EVENT") or f"({entry.get('MESSAGE')})")
        parts = []
        for n in redirect:
            now = after[n.id]
            assert now["ifindex"] == before[n.id]["ifindex"], f"{n.id}'s tap was made again: {before[n.id]} {now}"
            assert now["macvlan"] in n.backend_names and now["lower"] == n.lower_name, (n.id, now)
            assert re.search(rf"^\d+: {re.escape(now['macvlan'])}@{re.escape(n.lower_name)}:", macvlans, re.M), \
                f"{n.id}: no macvlan {now['macvlan']} on {n.lower_name}:\n{macvlans}"
            others = [kind for kind in said[n.id] if kind not in ("lower-lost", "lower-back", "link-down", "link-up")]
            assert not others, f"{n.id} (redirect): netwatch did more than set the guest's carrier: {said[n.id]}"
            parts.append(f"{n.id} {now['macvlan']}@{now['lower']}, tap {n.tap} kept, journal {'/'.join(said[n.id])}")
        return "; redirect " + ", ".join(parts)

    def back(self, scenario: str, nic: HostNic, inner: list[InnerNic], added: int, offset: int, mark: int,
             gone: float, before: dict[str, dict[str, Any]]) -> list[Round]:
        """After ``nic`` was device_add'ed (at ``added``, this machine's clock): ``inner`` attached again on
        their lowers, their frames through, never on a kernel name, their RARPs out; the round's figures."""
        first = self.wait_frames(inner, since_sent=added, timeout=90)
        after = self.wait_states({n.id: "attached" for n in inner}, 60)
        events = self.udev(mark)
        for n in inner:
            assert after[n.id]["lower"] == n.lower_name, (n.id, after[n.id])
            assert after[n.id]["swaps"] > before[n.id]["swaps"], (n.id, before[n.id], after[n.id])
        # The kernel registered the NIC under its own name first, and udevd renamed it.
        path = f"/{nic.pci}/"
        registered = next((e for e in events if e.source == "KERNEL" and e.action == "add" and path in e.devpath
                           and e.subsystem == "net"), None)
        assert registered is not None and re.fullmatch(r"eth\d+", registered.name), \
            f"no kernel name for {nic.id} in {events}"
        renamed = next(e for e in events if e.source == "KERNEL" and e.action == "move" and path in e.devpath)
        udev_done = next(e for e in events if e.source == "UDEV" and e.name == nic.predictable
                         and e.action in ("add", "move"))
        self.never_on_a_kernel_name(inner, events, mark)
        total = {n.id: (first[n.id].recv - offset - added) / 1e6 for n in inner}
        extra = (f"; unplug took {gone * 1000:.0f} ms; {registered.name} renamed {nic.predictable} "
                 f"{(renamed.t - registered.t) / 1e6:.0f} ms after the kernel registered it, udevd done "
                 f"{(udev_done.t - registered.t) / 1e6:.0f} ms after")
        vlan = next((e for e in events if e.source == "UDEV" and e.name == VLAN_LINK and e.action == "add"), None)
        if vlan is not None and any(n.vlan for n in inner):
            extra += f", {VLAN_LINK} made by networkd {(vlan.t - udev_done.t) / 1e6:.0f} ms after that"
        extra += self.redirect_kept(inner, before, after, mark) + self.rarps(inner, added)
        return self.split(scenario, inner, first, events, total, mark, extra)

    def hotswap_round(self, scenario: str, nic: HostNic) -> list[Round]:
        """device_del ``nic``, then device_add it back at its slot with its MAC."""
        inner = [n for n in INNER if n.host_nic is nic]
        before = self.wait_states({n.id: "attached" for n in inner}, 60)
        offset = self.flowing(inner)
        mark = self.vm_now()
        gone = self.host.unplug(nic)
        self.wait_states({n.id: "waiting-lower" for n in inner}, 60)
        added = self.host.plug(nic)
        return self.back(scenario, nic, inner, added, offset, mark, gone, before)

    def command_at(self, command: str) -> int:
        """Run ``command`` in the host VM; its CLOCK_MONOTONIC just before (ns, to 10 ms: /proc/uptime)."""
        out = self.host.out(f"cut -d' ' -f1 /proc/uptime && {command}")
        return int(float(out.split()[0]) * 1e9)

    def remade(self, inner: list[InnerNic], link: str, remake: str
               ) -> tuple[dict[str, FirstFrame], int, int, int, dict[str, dict[str, Any]]]:
        """``link`` deleted, then made again by ``remake`` (networkd): ``inner``'s NICs wait for it and are
        attached again. Their first frames, the host VM's clock before the deletion and at ``remake``, this
        machine's before it, and their status after."""
        before = self.wait_states({n.id: "attached" for n in inner}, 60)
        self.flowing(inner)
        mark = self.vm_now()
        self.host.run(f"ip link del {link}")
        self.wait_states({n.id: "waiting-lower" for n in inner}, 60)
        sent = time.monotonic_ns()
        at = self.command_at(remake)
        first = self.wait_frames(inner, since_recv=at, timeout=90)
        after = self.wait_states({n.id: "attached" for n in inner}, 60)
        for n in inner:
            assert after[n.id]["swaps"] > before[n.id]["swaps"], (n.id, before[n.id], after[n.id])
        return first, mark, sent, at, after

    def vlan_round(self, scenario: str) -> list[Round]:
        """The VLAN deleted and made again by networkd: ``networkctl reconfigure`` of the NIC under it."""
        inner = [nic for nic in INNER if nic.vlan]
        # networkd makes a missing VLAN of a .network when it configures the link; on bookworm (systemd
        # 252) neither a reload nor a reconfigure remakes one that exists (a changed .netdev takes this).
        first, mark, sent, at, _ = self.remade(inner, VLAN_LINK, f"networkctl reconfigure {NIC_A.predictable}")
        events = self.udev(mark)
        made = next(e for e in events if e.source == "KERNEL" and e.action == "add" and e.name == VLAN_LINK
                    and e.t >= at)
        total = {n.id: (first[n.id].recv - at) / 1e6 for n in inner}
        return self.split(scenario, inner, first, events, total, mark,
                          f"; networkd made {VLAN_LINK} {(made.t - at) / 1e6:.0f} ms after the reconfigure began"
                          + self.rarps(inner, sent))

    def driver_round(self, scenario: str) -> list[Round]:
        """``modprobe -r virtio_net``, then ``modprobe virtio_net``: the three NICs leave and come back.
        The bond stays (without its slave for a while): nw6 stays attached, its frames come back."""
        inner = [n for n in INNER if n.host_nic is not NIC_C]
        bonded = [n for n in INNER if n.host_nic is NIC_C]
        before = self.wait_states({n.id: "attached" for n in INNER}, 60)
        self.flowing(list(INNER))
        mark = self.vm_now()
        self.host.run("modprobe -r virtio_net")
        self.wait_states({n.id: "waiting-lower" for n in inner} | {n.id: "attached" for n in bonded}, 60)
        sent = time.monotonic_ns()
        at = self.command_at("modprobe virtio_net")
        first = self.wait_frames(list(INNER), since_recv=at, timeout=90)
        after = self.wait_states({n.id: "attached" for n in INNER}, 60)
        for n in inner:
            assert after[n.id]["lower"] == n.lower_name, (n.id, after[n.id])
            assert after[n.id]["swaps"] > before[n.id]["swaps"], (n.id, before[n.id], after[n.id])
        for n in bonded:
            assert after[n.id]["swaps"] == before[n.id]["swaps"], f"{n.id} reattached though {BOND} stayed: {after}"
        assert self.enslaved(), self.dump()
        events = self.udev(mark)
        self.never_on_a_kernel_name(inner, events, mark)
        loaded = next(e for e in events if e.source == "KERNEL" and e.action == "add" and e.name == "virtio_net")
        registered = [e for e in events if e.source == "KERNEL" and e.action == "add" and e.subsystem == "net"
                      and re.fullmatch(r"eth\d+", e.name)]
        assert len(registered) == len(NICS), f"the NICs did not come back under kernel names: {events}"
        total = {n.id: (first[n.id].recv - at) / 1e6 for n in INNER}
        extra = (f"; virtio_net loaded {(loaded.t - at) / 1e6:.0f} ms after modprobe began, "
                 f"{registered[0].name} registered {(registered[0].t - at) / 1e6:.0f} ms after"
                 + self.redirect_kept(inner, before, after, mark) + self.rarps(inner, sent))
        rounds = self.split(scenario, inner, first, events, total, mark, extra)
        return rounds + self.stayed(scenario, bonded, first, total, events, at)

    def stayed(self, scenario: str, bonded: list[InnerNic], first: dict[str, FirstFrame], total: dict[str, float],
               events: list[UdevEvent], at: int) -> list[Round]:
        """Rounds of NICs on the bond, which stayed while its slave left: netwatch had nothing to do (the
        macvtap on the bond never left), so all of the time is the host's (the slave back and enslaved)."""
        slave = next((e for e in events if e.source == "UDEV" and e.name == NIC_C.predictable and e.t >= at
                      and e.action in ("add", "move")), None)
        assert slave is not None, f"udevd never announced {NIC_C.predictable}: {events}"
        said = [f"{e.get('NETWATCH_NIC')} {e.get('NETWATCH_EVENT')}" for e in self.journal(at)
                if e.get("NETWATCH_NIC") in {n.id for n in bonded}]
        rounds = [Round(scenario, n.id, total[n.id], total[n.id], 0.0,
                        f"{BOND} stayed, its macvtap too; udevd's event for {NIC_C.predictable} -> frame at the inner "
                        f"VM {(first[n.id].recv - slave.t) / 1e6:.0f} ms (networkd enslaving it); netwatch's "
                        f"journal: {', '.join(said) or 'nothing'}") for n in bonded]
        self.report(rounds)
        return rounds

    def bond_round(self, scenario: str) -> list[Round]:
        """The bond deleted, then made again by networkd with its slave; nw6 attached again."""
        inner = [n for n in INNER if n.host_nic is NIC_C]
        # networkd 252 (bookworm) makes a missing bond again when it reloads its .netdev files (`networkctl
        # reload`; `networkctl reconfigure ens6` alone does not), but enslaves the slave again only if the
        # slave's .network changed: otherwise ens6 stays "configured" outside the bond (and a reconfigure
        # leaves it "configuring" for good: its .network still refers to the deleted bond). Touching the
        # slave's .network has networkd load it again and configure ens6 into the new bond.
        first, mark, sent, at, after = self.remade(inner, BOND, f"touch {SLAVE_NETWORK} && networkctl reload")
        for n in inner:
            assert after[n.id]["lower"] == BOND, (n.id, after[n.id])
        assert self.enslaved(), self.dump()
        events = self.udev(mark)
        made = next(e for e in events if e.source == "KERNEL" and e.action == "add" and e.name == BOND and e.t >= at)
        total = {n.id: (first[n.id].recv - at) / 1e6 for n in inner}
        extra = f"; networkd made {BOND} {(made.t - at) / 1e6:.0f} ms after the reload began"
        return self.split(scenario, inner, first, events, total, mark, extra + self.rarps(inner, sent))

    def bond_slave_round(self, scenario: str) -> list[Round]:
        """The bond's slave unplugged and plugged back: the bond stays, and so does nw6's macvtap on it."""
        inner = [n for n in INNER if n.host_nic is NIC_C]
        before = self.wait_states({n.id: "attached" for n in inner}, 60)
        offset = self.flowing(inner)
        mark = self.vm_now()
        gone = self.host.unplug(NIC_C)
        # DEVICE_DELETED came once the guest ejected it: ens6 has left the bond, which has no slave now.
        assert not self.enslaved() and self.host.run(f"ip link show {BOND}", check=False).returncode == 0, \
            self.dump()
        during = self.wait_states({n.id: "attached" for n in inner}, 60)
        added = self.host.plug(NIC_C)
        first = self.wait_frames(inner, since_sent=added, timeout=90)
        after = self.wait_states({n.id: "attached" for n in inner}, 60)
        assert self.enslaved(), self.dump()
        for n in inner:
            assert after[n.id]["swaps"] == before[n.id]["swaps"], f"{n.id} reattached though {BOND} stayed: {after}"
        events = self.udev(mark)
        total = {n.id: (first[n.id].recv - offset - added) / 1e6 for n in inner}
        print(f"[hotswap] {scenario}: unplug took {gone * 1000:.0f} ms; while {NIC_C.predictable} was away "
              + ", ".join(f"{n.id} {during[n.id]['state']} on {during[n.id]['lower']}" for n in inner), flush=True)
        return self.stayed(scenario, inner, first, total, events, mark)

    def replaced_round(self, scenario: str) -> list[Round]:
        """The second NIC unplugged and another card (another MAC) plugged at its slot: the NICs whose lower
        is given by PCI address follow the slot; the one given by MAC waits, and netwatch says why once.
        Then the original card back: all attached again."""
        nic = NIC_B
        inner = [n for n in INNER if n.host_nic is nic]
        by_mac = [n for n in inner if isinstance(n.lower, dict) and "mac" in n.lower]
        follow = [n for n in inner if n not in by_mac]
        before = self.wait_states({n.id: "attached" for n in inner}, 60)
        offset = self.flowing(follow)  # frames to the NICs that will have a path only
        mark = self.vm_now()
        gone = self.host.unplug(nic)
        self.wait_states({n.id: "waiting-lower" for n in inner}, 60)
        added = self.host.plug(nic, mac=OTHER_CARD_MAC)
        rounds = self.back(f"{scenario}: another card", nic, follow, added, offset, mark, gone, before)

        def said() -> list[dict[str, Any]]:
            return [e for e in self.journal(mark) if e.get("NETWATCH_EVENT") == "lower-replaced"]
        wait_until(lambda: {e.get("NETWATCH_NIC") for e in said()} >= {n.id for n in by_mac}, 30,
                   "netwatch's lower-replaced journal entry", self.dump)
        status = self.wait_states({n.id: "waiting-lower" for n in by_mac} | {n.id: "attached" for n in follow}, 30)
        for n in by_mac:
            cause = status[n.id].get("cause") or ""
            assert "has MAC" in cause and OTHER_CARD_MAC in cause, f"{n.id}'s cause: {cause!r}"
            print(f"[hotswap] {scenario}: {n.id} {status[n.id]['state']}: {cause}", flush=True)
        # Everything after the other card came is said by now: still one entry per NIC, none for the others.
        entries = said()
        for n in by_mac:
            mine = [e for e in entries if e.get("NETWATCH_NIC") == n.id]
            assert len(mine) == 1, f"{n.id}: {len(mine)} lower-replaced entries: {mine}"
            assert OTHER_CARD_MAC in mine[0].get("MESSAGE", "") and mine[0].get("NETWATCH_LOWER") == nic.predictable \
                and mine[0].get("NETWATCH_VM") == "vm1", mine[0]
            print(f"[hotswap] {scenario}: journal: {n.id} lower-replaced: {mine[0].get('MESSAGE')}", flush=True)
        assert {e.get("NETWATCH_NIC") for e in entries} == {n.id for n in by_mac}, entries
        # The original card back at the slot.
        before = self.status()
        offset = self.flowing(follow)
        self.switch.send(self.targets(inner))
        mark = self.vm_now()
        gone = self.host.unplug(nic)
        self.wait_states({n.id: "waiting-lower" for n in inner}, 60)
        added = self.host.plug(nic)
        return rounds + self.back(f"{scenario}: the original back", nic, inner, added, offset, mark, gone, before)

    def absent_round(self, scenario: str, seconds: float) -> list[Round]:
        """The second NIC unplugged and left out for ``seconds``: its NICs wait (state and cause), netwatch
        spends well under 5% of a CPU and writes no journal entry over that window (no retry loop); then
        it is plugged back and they attach again."""
        nic = NIC_B
        inner = [n for n in INNER if n.host_nic is nic]
        before = self.wait_states({n.id: "attached" for n in inner}, 60)
        offset = self.flowing(inner)
        mark = self.vm_now()
        gone = self.host.unplug(nic)
        self.wait_states({n.id: "waiting-lower" for n in inner}, 60)
        # What the loss itself makes: each NIC's lower-lost entry (and, around it, its link-down); then the
        # window starts once netwatch's journal has been quiet for a second (a retry loop never is).
        def settled() -> bool:
            entries = self.journal(mark)
            lost = {e.get("NETWATCH_NIC") for e in entries if e.get("NETWATCH_EVENT") == "lower-lost"}
            last = max(int(e.get("__MONOTONIC_TIMESTAMP", 0)) * 1000 for e in entries) if entries else 0
            return lost >= {n.id for n in inner} and self.vm_now() - last > 1_000_000_000
        wait_until(settled, 60, "netwatch's lower-lost entries, then a quiet journal", self.dump, interval=0.3)
        # The window, measured inside: netwatch's CPU time (its process's utime + stime, in clock ticks; and
        # its unit's cgroup) at both ends. Nothing else is asked of netwatch meanwhile.
        cpu = ("sed 's/^.*) //' /proc/$pid/stat | awk '{print $12 + $13}'; "
               "systemctl show -p CPUUsageNSec --value netwatch; cut -d' ' -f1 /proc/uptime")
        out = self.host.out(f"pid=$(systemctl show -p MainPID --value netwatch); echo $pid; getconf CLK_TCK; {cpu}; "
                            f"sleep {seconds:g}; {cpu}; echo $(systemctl show -p MainPID --value netwatch)",
                            timeout=seconds + 60).split()
        pid, hz, ticks0, nsec0, t0, ticks1, nsec1, t1, pid_after = out
        assert pid == pid_after, f"netwatch restarted during the window: {pid} -> {pid_after}"
        window = float(t1) - float(t0)
        cpu_ms = (int(ticks1) - int(ticks0)) * 1000 / int(hz)
        unit_ms = (int(nsec1) - int(nsec0)) / 1e6 if nsec0.isdigit() and nsec1.isdigit() else None
        start, end = int(float(t0) * 1e9), int(float(t1) * 1e9)
        during = [e for e in self.journal(mark) if start <= int(e.get("__MONOTONIC_TIMESTAMP", 0)) * 1000 <= end]
        print(f"[hotswap] {scenario}: netwatch's CPU {cpu_ms:.0f} ms over {window:.1f} s "
              f"({cpu_ms / window / 10:.2f}%)" + (f", its unit's {unit_ms:.1f} ms" if unit_ms is not None else "")
              + f"; {len(during)} journal entries in the window", flush=True)
        status = self.wait_states({n.id: "waiting-lower" for n in inner}, 10)
        for n in inner:
            cause = status[n.id].get("cause") or ""
            assert n.lower_described in cause or n.lower_name in cause, f"{n.id}'s cause: {cause!r}"
            print(f"[hotswap] {scenario}: {n.id} waiting-lower: {cause}", flush=True)
        assert not during, "netwatch's journal during the window:\n" + "\n".join(
            f"{e.get('NETWATCH_NIC')} {e.get('NETWATCH_EVENT')}: {e.get('MESSAGE')}" for e in during)
        assert cpu_ms < 0.05 * window * 1000, f"netwatch spent {cpu_ms:.0f} ms of CPU over {window:.1f} s"
        added = self.host.plug(nic)
        return self.back(scenario, nic, inner, added, offset, mark, gone, before)

    def baseline_round(self, scenario: str) -> list[Round]:
        """The veth under nw7-nw9 deleted and made again (`ip link`): what every other test does on this
        machine, here on the host VM, with udevd; the yardstick for netwatch's share in the other rounds."""
        self.guest_booted()  # as flowing() does
        inner = list(BASELINE)
        before = self.wait_states({n.id: "attached" for n in inner}, 60)
        since = self.vm_now()
        observers = {n.observer for n in inner}

        def flowing() -> bool:
            self.read_frames()
            return observers <= {observer for observer, _, recv in self.calibrations if recv >= since}
        wait_until(flowing, 60, f"test frames to reach {[n.id for n in inner]}", self.dump, interval=0.2)
        mark = self.vm_now()
        self.host.run(f"ip link del {VETH}")
        self.wait_states({n.id: "waiting-lower" for n in inner}, 60)
        at = self.command_at(f"ip link add {VETH} type veth peer name {VETH_PEER} && ip link set {VETH_PEER} up "
                             f"&& ip link set {VETH} up")
        first = self.wait_frames(inner, since_recv=at, timeout=90)
        after = self.wait_states({n.id: "attached" for n in inner}, 60)
        for n in inner:
            assert after[n.id]["lower"] == VETH and after[n.id]["swaps"] > before[n.id]["swaps"], \
                (n.id, before[n.id], after[n.id])
        total = {n.id: (first[n.id].recv - at) / 1e6 for n in inner}
        return self.split(scenario, inner, first, self.udev(mark), total, mark)

    @contextlib.contextmanager
    def sender(self) -> Iterator[None]:
        """The baseline NICs' frames, sent out of the veth's peer inside the host VM, while in the block."""
        macs = " ".join(n.mac for n in BASELINE)
        # Real-time like the observer, so that a frame leaves as soon as the path can take it. Its CPU does
        # not make the yardstick look worse: 5 rounds at SCHED_FIFO and 5 without, back to back, put
        # netwatch's share at p50 536-568 and 664-844 ms (another run without: 241-279; the host VM's
        # speed varies more than that between runs).
        self.host.run(f"systemd-run --quiet --collect --unit=nwt-sender {REALTIME} /usr/bin/python3 "
                      f"/root/nwt/files/sender.py {VETH_PEER} {macs}")
        try:
            yield
        finally:
            self.host.run("systemctl stop nwt-sender", check=False)

    def slowdown(self) -> str:
        """How much slower the host VM (TCG) does what netwatch's attach is made of than this machine:
        Python (a JSON round trip, as QMP is) and the kernel's netlink (a veth pair made and removed by `ip`)."""
        python = ("import json, time; t = time.perf_counter(); [json.loads(json.dumps({'netdev_add': i, 'id': 'x'}))"
                  " for i in range(20000)]; print(time.perf_counter() - t)")
        links = ("import subprocess, time; t = time.perf_counter(); [subprocess.run(['ip', 'link', a, 'nwtd0', *b],"
                 " check=True) for _ in range(20) for a, b in (('add', ['type', 'veth', 'peer', 'name', 'nwtd1']),"
                 " ('del', []))]; print(time.perf_counter() - t)")
        here_py = float(subprocess.run([sys.executable, "-c", python], capture_output=True, text=True,
                                       check=True).stdout)
        netns = f"nwthsb{os.getpid()}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            here_ip = float(subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", links],
                                           capture_output=True, text=True, check=True).stdout)
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False)
        vm_py = float(self.host.out(f"python3 -c {shlex.quote(python)}", timeout=120))
        vm_ip = float(self.host.out(f"python3 -c {shlex.quote(links)}", timeout=120))
        return (f"the host VM takes x{vm_py / here_py:.1f} this machine's time for Python ({vm_py * 1000:.0f} vs "
                f"{here_py * 1000:.0f} ms) and x{vm_ip / here_ip:.1f} for `ip link` add+del ({vm_ip * 50:.1f} vs "
                f"{here_ip * 50:.1f} ms a pair)")

    def guest_booted(self) -> None:
        """vm2's guest up (one GUEST-READY) and its NIC attached; checked once: a round that takes the NIC's
        lower away starts with a guest that can let go of its NIC."""
        if self.guest_pid is not None:
            return
        started = time.monotonic()
        self.console.wait(lambda lines: any(line.text.startswith("GUEST-READY") for line in lines), 300,
                          "vm2's guest to boot (GUEST-READY)", self.dump)
        booted = time.monotonic() - started
        status = self.wait_states({DIRECT.id: "attached"}, 60)[DIRECT.id]
        assert status["wiring"] == "direct" and status["lower"] == DIRECT.lower_name, status
        self.guest_pid = self.host.out("systemctl show -p MainPID --value nwt-vm2").strip()
        out = self.host.out(f"grep MemAvailable /proc/meminfo; ps -o rss= -p {self.guest_pid}").split()
        print(f"[hotswap] vm2's guest booted {time.monotonic() - started:.1f} s into this wait (GUEST-READY after "
              f"{booted:.1f} s of it), {DIRECT.id} attached at {status['guest_pci']}; vm2's QEMU {int(out[3]) // 1024}"
              f" MB resident, {self.guest_cpu():.0f}% of a host VM CPU with its pings unanswered; the host VM has "
              f"{int(out[1]) // 1024} MB available", flush=True)

    def guest_cpu(self, seconds: float = 3) -> float:
        """vm2's QEMU's share of a host VM CPU over ``seconds`` (%)."""
        ticks = f"awk '{{print $14 + $15}}' /proc/{self.guest_pid}/stat"
        hz, before, after = self.host.out(f"getconf CLK_TCK; {ticks}; sleep {seconds:g}; {ticks}").split()
        return (int(after) - int(before)) * 100 / int(hz) / seconds

    def vhost_ns(self, seconds: float) -> int:
        """How long vm2's vhost-net worker (the kernel thread vhost-<QEMU's pid>, made when QEMU takes the
        vhostfd netwatch opened) ran over ``seconds`` (ns, /proc/<tid>/schedstat); asserts QEMU holds
        /dev/vhost-net."""
        pid = self.guest_pid
        held = self.host.out(f"ls -l /proc/{pid}/fd | grep -c /dev/vhost-net || true").strip()
        assert held != "0", f"vm2's QEMU holds no /dev/vhost-net: {self.host.out(f'ls -l /proc/{pid}/fd')}"
        tid = self.host.out(f"ps -e -o pid=,comm= | awk '$2 == \"vhost-{pid}\" {{print $1}}'").split()
        assert tid, f"no vhost-{pid} kernel thread: {self.host.out('ps -e -o pid=,comm=')}"
        ran = f"cut -d' ' -f1 /proc/{tid[0]}/schedstat"
        before, after = self.host.out(f"{ran}; sleep {seconds:g}; {ran}").split()
        return int(after) - int(before)

    @contextlib.contextmanager
    def peer(self) -> Iterator[None]:
        """The switch answers the guest's pings while in the block (3 GUEST-PING ok in a row to begin with).
        Only then: a guest whose pings are answered pings every 0.2 s, which costs the host VM a CPU under
        TCG; unanswered, it tries once a second."""
        self.guest_booted()
        since = len(self.console.poll())
        self.switch.answer(True)
        try:
            self.console.wait(lambda lines: self.console.pinging(lines[since:]), 120,
                              "vm2's guest's pings answered (3 x GUEST-PING ok)", self.dump)
            cpu = self.guest_cpu()
            vhost = self.vhost_ns(3)
            # The host VM has /dev/vhost-net: the direct NIC's packets go through the kernel's vhost worker
            # (QEMU's vhost-<pid> thread), not QEMU's own virtio code, and its run time grows with the pings.
            assert vhost > 0, "vm2's vhost-net worker ran for 0 ns while its guest pinged"
            print(f"[hotswap] vm2's guest pings the switch: its QEMU uses {cpu:.0f}% of a host VM CPU; its vhost-net "
                  f"worker ran {vhost / 1000:.0f} us over 3 s (vhost-net carries the direct NIC)", flush=True)
            yield
        finally:
            self.switch.answer(False)

    def direct_round(self, scenario: str) -> None:
        """The host's first NIC unplugged and plugged back, as seen by vm2's guest through its direct NIC:
        it leaves the guest (netwatch's device_del once the lower went) and comes back, the same NIC (MAC,
        PCI address) with the guest still up, and the guest's pings are answered again. vm1's NICs on the
        same NIC (nw0, nw1, nw4) go and come back with it (their own test is the hot-swap round)."""
        nic, shared = NIC_A, [n for n in INNER if n.host_nic is NIC_A]
        self.switch.send([])  # no test frames: the guest's own traffic is what this round looks at
        before = self.wait_states({n.id: "attached" for n in (DIRECT, *shared)}, 60)
        start = len(self.console.poll())
        booted = GuestConsole.nic(self.console.lines[:start])
        assert booted and f"mac={DIRECT.mac}" in booted[0], booted
        mark = self.vm_now()
        unplugged = time.monotonic_ns()
        gone_ms = self.host.unplug(nic) * 1000
        left = self.console.wait(
            lambda lines: next((line for line in lines[start:] if line.text == "GUEST-NIC-GONE eth0"), None), 60,
            "the guest to lose its NIC (GUEST-NIC-GONE eth0)", self.dump)
        self.wait_states({n.id: "waiting-lower" for n in (DIRECT, *shared)}, 60)
        plugged = len(self.console.poll())
        added = self.host.plug(nic)
        ok = self.console.wait(lambda lines: self.console.pinging(lines[plugged:]), 120,
                               "the guest's pings answered again (3 x GUEST-PING ok)", self.dump)
        first_ok = next(line for line in self.console.lines[plugged:] if line.text == "GUEST-PING ok")
        back = next(line for line in self.console.lines[plugged:] if line.text.startswith("GUEST-NIC eth0 "))
        failed = sum(line.text == "GUEST-PING fail" for line in self.console.lines[start:plugged])
        after = self.wait_states({n.id: "attached" for n in (DIRECT, *shared)}, 60)
        events = self.udev(mark)
        # The same NIC back in the same guest: its MAC and PCI address, no second boot, QEMU the same process.
        lines = self.console.lines
        again = GuestConsole.nic(lines[start:])
        assert again == booted[:1], f"the guest's NIC before {booted[:1]}, after the round {again}"
        assert sum(line.text.startswith("GUEST-READY") for line in lines) == 1, "the guest booted again"
        assert self.host.out("systemctl show -p MainPID --value nwt-vm2").strip() == self.guest_pid, "vm2 restarted"
        now = after[DIRECT.id]
        assert now["lower"] == DIRECT.lower_name and now["wiring"] == "direct", now
        assert now["swaps"] > before[DIRECT.id]["swaps"], (before[DIRECT.id], now)
        for n in shared:
            assert after[n.id]["lower"] == n.lower_name, (n.id, after[n.id])
        self.never_on_a_kernel_name([DIRECT], events, mark)
        # The figures: the guest's frames at the switch (this machine's clock, exact) and its console (polled).
        mine = [f for f in self.switch.seen(added) if f.src == DIRECT.mac and f.segment == nic.segment]
        rarp = next((f.t for f in mine if f.type == 0x8035), None)
        own = next((f for f in mine if f.type in (0x0806, 0x0800)), None)
        echo = next((f.t for f in mine if f.answered == "icmp"), None)
        assert own is not None and echo is not None, f"no frame of the guest's at the switch after device_add: {mine}"
        udev_done = next(e.t for e in events if e.source == "UDEV" and e.name == nic.predictable
                         and e.action in ("add", "move"))
        said = [f"{e.get('NETWATCH_STATE') if e.get('NETWATCH_EVENT') == 'state' else e.get('NETWATCH_EVENT')} "
                f"{(int(e['NETWATCH_MONOTONIC_USEC']) * 1000 - udev_done) / 1e6:+.0f} ms"
                for e in self.journal(mark) if e.get("NETWATCH_NIC") == DIRECT.id and "NETWATCH_MONOTONIC_USEC" in e
                and int(e["NETWATCH_MONOTONIC_USEC"]) * 1000 >= udev_done]

        def ms(t: int) -> float:
            return (t - added) / 1e6
        kind = {0x0806: "ARP", 0x0800: "IPv4"}[own.type]
        self.direct.append((ms(rarp) if rarp is not None else -1, ms(own.t), ms(first_ok.seen)))
        print(f"[hotswap] {scenario} {DIRECT.id} (direct, vm2's guest): device_add -> "
              + (f"its RARP at the switch {ms(rarp):.0f} ms (netwatch's announce-self), " if rarp else "no RARP, ")
              + f"the guest's first frame at the switch {ms(own.t):.0f} ms ({kind}), its first ping answered "
              f"{ms(echo):.0f} ms; on its console (the test's poll of the serial log through the agent: when a "
              f"line was first seen, and not there yet) GUEST-NIC eth0 {ms(back.seen):.0f} ms ({ms(back.after):.0f}),"
              f" GUEST-PING ok {ms(first_ok.seen):.0f} ms ({ms(first_ok.after):.0f}), 3 in a row "
              f"{ms(ok.seen):.0f} ms. Unplug took {gone_ms:.0f} ms, GUEST-NIC-GONE seen "
              f"{(left.seen - unplugged) / 1e6:.0f} ms after device_del, {failed} failed pings while the NIC was away"
              f"; netwatch's entries for {DIRECT.id} from "
              f"udevd's event for {nic.predictable}: {', '.join(said) or 'none'}; the guest's NIC back as "
              f"{again[0].removeprefix('GUEST-NIC ')}", flush=True)

    def all_attached(self) -> None:
        """What each test leaves: every NIC attached, vm2's too."""
        self.wait_states({n.id: "attached" for n in (*ALL, DIRECT)}, 60)


def summary(rounds: list[Round]) -> str:
    """p50 and max per scenario and NIC: total, the host's share, netwatch's."""
    lines = []
    for key in dict.fromkeys((r.scenario, r.nic) for r in rounds):
        mine = [r for r in rounds if (r.scenario, r.nic) == key]

        def stat(values: list[float]) -> str:
            return f"p50 {statistics.median(values):.0f} max {max(values):.0f}"
        lines.append(f"  {key[0]} {key[1]} ({len(mine)} rounds): frames back {stat([r.total_ms for r in mine])} ms; "
                     f"host {stat([r.host_ms for r in mine])}; netwatch {stat([r.netwatch_ms for r in mine])}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def hotswap() -> Iterator[Hotswap]:
    missing = missing_tools()
    if missing:
        reason = f"needs a host VM image: apt-get install {' '.join(missing)}"
        print(f"\n[hotswap] SKIPPED: {reason}")
        pytest.skip(reason)
    commands = readme_service_commands((REPO / "docs" / "service.md").read_text())
    starts = [i for i, line in enumerate(commands) if re.search(r"systemctl\b.*\b(enable --now|start)\b", line)]
    assert starts, f"docs/service.md's install never starts netwatch: {commands}"
    started = time.monotonic()
    try:
        wheels = wheelhouse(REPO)
        guest = build_guest(progress=lambda line: print(f"[hotswap] {line}"))
        context = booted(wheels, {"src": REPO, "wheels": wheels},
                         {"files/observer.py": OBSERVER, "files/sender.py": SENDER, "files/netwatch.toml": CONFIG,
                          "guest/vmlinuz": guest.kernel, "guest/initrd.cpio": guest.initrd},
                         watch=[nic.mac for nic in (*INNER, DIRECT)], answer=PEER,
                         progress=lambda line: print(f"[hotswap] {line}"))
        host, switch = context.__enter__()
    except (HostError, GuestError) as exc:
        print(f"\n[hotswap] FAILED to build or boot the host VM: {exc}")
        pytest.fail(str(exc))
    try:
        print(f"[hotswap] host VM ({host.image.versions}) booted: agent answered after "
              f"{host.boot_seconds['agent']:.1f} s, systemd done after {host.boot_seconds['booted']:.1f} s "
              f"(systemd-analyze: {host.boot_seconds.get('systemd-analyze', 0):.1f} s; "
              f"{time.monotonic() - started:.1f} s with the image's build check)", flush=True)
        state = Hotswap(host, switch)
        state.setup(commands, starts[0])
        yield state
        if state.rounds:
            print(f"\n[hotswap] figures (TCG, {ROUNDS} round(s) per scenario):\n{summary(state.rounds)}", flush=True)
        if state.direct:
            def stat(values: list[float]) -> str:
                return f"p50 {statistics.median(values):.0f} max {max(values):.0f}"
            rarp, frame, ping = ([figures[i] for figures in state.direct] for i in range(3))
            print(f"  direct {DIRECT.id} (vm2's guest, {len(state.direct)} rounds): device_add -> its RARP "
                  f"{stat(rarp)} ms; -> the guest's first frame {stat(frame)} ms; -> GUEST-PING ok seen "
                  f"{stat(ping)} ms", flush=True)
    finally:
        context.__exit__(None, None, None)
        print(f"[hotswap] module done in {time.monotonic() - started:.1f} s", flush=True)


@pytest.mark.integration
@pytest.mark.timeout(1800)  # the first run builds the image (debootstrap: minutes on a slow mirror)
def test_direct_wiring_follows_the_hotswap(hotswap: Hotswap) -> None:
    """vm2's real guest, its NIC wired direct on ens4 (by name): the host's first NIC unplugged, the guest
    loses its NIC (netwatch's device_del), netwatch waits for the lower; plugged back, netwatch plugs the
    same NIC (MAC, PCI address) into the same running guest, never on eth0, and its pings are answered.
    First in the module: it waits for the guest's boot, begun during the set-up, before anything hot-swaps
    ens4 under it."""
    with hotswap.peer():
        for _ in range(ROUNDS):
            hotswap.direct_round("NIC unplugged and plugged back")
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_nic_hotswap_lower_by_name_and_vlan(hotswap: Hotswap) -> None:
    """device_del/device_add of the host's first NIC: eth0 renamed ens4 by udev, ens4.100 made again by
    networkd; nw0 (lower ens4), nw1 (lower ens4.100) and nw4 (redirect, lower ens4: a new macvlan, the same
    tap) attached again, never on eth0, frames flowing."""
    for _ in range(ROUNDS):
        hotswap.hotswap_round("NIC unplugged and plugged back", NIC_A)
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_nic_hotswap_lower_by_mac_and_pci(hotswap: Hotswap) -> None:
    """The same for the second NIC: nw2 (lower by MAC), nw3 and nw5 (redirect; lower by PCI address)
    follow it."""
    for _ in range(ROUNDS):
        hotswap.hotswap_round("NIC unplugged and plugged back", NIC_B)
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_vlan_rebuilt_by_networkd(hotswap: Hotswap) -> None:
    """ens4.100 deleted and made again by ``networkctl reconfigure ens4``: nw1 attached again."""
    for _ in range(ROUNDS):
        hotswap.vlan_round("VLAN made again by networkd")
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_driver_reload(hotswap: Hotswap) -> None:
    """``modprobe -r virtio_net && modprobe virtio_net``: the three NICs gone and back, every inner NIC on
    them attached again on the same lowers; nw6's bond stays, and so does its macvtap."""
    for _ in range(ROUNDS):
        hotswap.driver_round("virtio_net reloaded")
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_bond_rebuilt_by_networkd(hotswap: Hotswap) -> None:
    """bond0 deleted and made again by networkd with its slave ens6: nw6 (lower bond0) attached again."""
    for _ in range(ROUNDS):
        hotswap.bond_round("bond made again by networkd")
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_bond_slave_hotswap(hotswap: Hotswap) -> None:
    """The bond's only slave unplugged and plugged back: bond0 stays, nw6's macvtap on it too (no reattach),
    and its frames come back once networkd enslaved the NIC again."""
    for _ in range(ROUNDS):
        hotswap.bond_slave_round("bond's slave unplugged and plugged back")
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_nic_replaced_by_another_card(hotswap: Hotswap) -> None:
    """Another card (another MAC) at the second NIC's slot: nw3 and nw5 (lower by PCI address) follow it;
    nw2 (lower by MAC) waits, with one lower-replaced journal entry and its status cause naming the new MAC.
    Then the original card back: nw2, nw3 and nw5 attached again."""
    for _ in range(ROUNDS):
        hotswap.replaced_round("NIC replaced")
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_veth_baseline(hotswap: Hotswap) -> None:
    """The yardstick: a veth in the host VM under nw7, nw8 and nw9 (redirect) deleted and made again, as on
    this machine's namespaces in every other test: they attach again, and netwatch's share here is what the
    hot-swap rounds are read against (with how much slower the host VM is than this machine)."""
    with hotswap.sender():
        for _ in range(ROUNDS):
            hotswap.baseline_round("veth deleted and made again (baseline)")
    print(f"[hotswap] {hotswap.slowdown()}", flush=True)
    hotswap.all_attached()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_lower_that_stays_away(hotswap: Hotswap) -> None:
    """The second NIC unplugged and not plugged back for NETWATCH_HOTSWAP_IDLE_SECONDS (10 s): nw2, nw3
    and nw5 wait with a cause naming their lower, netwatch uses under 5% of a CPU and writes nothing to the
    journal over the window; plugged back, they attach again."""
    hotswap.absent_round(f"NIC back after {IDLE_SECONDS:g} s away", IDLE_SECONDS)
    hotswap.all_attached()
