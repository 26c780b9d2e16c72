"""Issue 21 item 13: the host never speaks on a guest's network through a
backend. With the kernel's defaults a macvtap carrying the guest's MAC got
the guest's own link-local address and sent router solicitations, MLD and
DAD from it, onto the guest's VLAN. Against the real kernel and a real
QEMU, in a namespace with IPv6 on: through attach, flaps and a rebind, a
backend has no address and sends only what the guest sent."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from netwatch.host.backends import tap_mac
from netwatch.sandbox import testbed
from netwatch.sandbox.testbed import ETH_P_TEST, Netns, sh, unique, wait_until

from .world import PEER_MAC, World

pytestmark = pytest.mark.integration

MAC = "52:54:00:77:00:01"
ETH_P_ALL = 0x0003
ETH_P_IPV6 = 0x86DD
ETH_P_RARP = 0x8035
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
ICMPV6_ROUTER_SOLICIT = 133


def ipv6_on(ns: Netns) -> None:
    """IPv6 as a host has it by default, whatever this machine's namespaces start with."""
    for key in ("all", "default"):
        sh(*ns.exec_argv("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=0",
                         f"net.ipv6.conf.{key}.addr_gen_mode=0"))  # 0: eui64, the kernel's default


@dataclass
class Sniffer:
    """Every frame arriving on some links of a namespace, kept per link."""

    ns: Netns
    links: tuple[str, ...]
    socks: dict[str, socket.socket] = field(default_factory=dict)
    frames: dict[str, list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for link in self.links:
            self.frames[link] = []
            self.listen(link)

    def listen(self, link: str) -> None:
        """Listen on ``link`` (again: a link deleted and made anew is another link)."""
        old = self.socks.pop(link, None)
        if old is not None:
            self._drain(link, old)
            old.close()
        with self.ns.entered():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with contextlib.suppress(OSError):  # what the test itself sends is not wanted here
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
        sock.setblocking(False)
        with self.ns.entered():
            sock.bind((link, ETH_P_ALL))
        self.socks[link] = sock

    def _drain(self, link: str, sock: socket.socket) -> None:
        while True:
            try:
                frame, address = sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENETDOWN:
                    continue  # reported once when the link went; what it queued before is still read
                raise
            if address[2] != PACKET_OUTGOING:
                self.frames[link].append(frame)

    def collect(self) -> None:
        for link, sock in self.socks.items():
            self._drain(link, sock)

    def sent_by(self, mac: str, link: str | None = None) -> list[bytes]:
        self.collect()
        src = bytes.fromhex(mac.replace(":", ""))
        links = [link] if link else list(self.links)
        return [frame for name in links for frame in self.frames[name] if frame[6:12] == src]

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


@contextlib.contextmanager
def sniffing(ns: Netns, *links: str) -> Iterator[Sniffer]:
    sniffer = Sniffer(ns, links)
    try:
        yield sniffer
    finally:
        sniffer.close()


def describe(frames: list[bytes]) -> list[str]:
    """What a frame is, in a few words: ethertype and, for IPv6, the ICMPv6 type."""
    out = []
    for frame in frames:
        ethertype = struct.unpack("!H", frame[12:14])[0]
        what = f"ethertype {ethertype:#06x}"
        if ethertype == ETH_P_IPV6 and len(frame) > 54:
            src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
            dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
            what += f" {src} -> {dst} next header {frame[20]}"
        out.append(what)
    return out


def is_router_solicitation(frame: bytes) -> bool:
    # No extension headers here but the hop-by-hop one MLD has: RS comes plain.
    return (len(frame) > 54 and struct.unpack("!H", frame[12:14])[0] == ETH_P_IPV6 and frame[20] == 58
            and frame[54] == ICMPV6_ROUTER_SOLICIT)


def addresses(ns: Netns, link: str) -> list[str]:
    found = json.loads(ns.ip("-j", "addr", "show", "dev", link))
    return [f"{a['local']}/{a['prefixlen']}" for entry in found for a in entry.get("addr_info", [])]


def stats(ns: Netns, link: str) -> dict[str, int]:
    found = json.loads(ns.ip("-s", "-j", "link", "show", link))[0]["stats64"]
    return {"tx": int(found["tx"]["packets"]), "rx": int(found["rx"]["packets"])}


def kernel_had_its_chance(ns: Netns, lower: str, sniffer: Sniffer) -> None:
    """Make a macvtap the way a host makes one (defaults) on ``lower`` and wait for its router solicitation.

    It is made after netwatch's last backend, and a router solicitation
    comes after DAD, which comes after the MLD report: by then netwatch's
    backend, had it not been silent, would have spoken too. That the control
    does speak shows this namespace is one where a careless backend would.
    """
    control, mac = unique("ctl"), "02:00:00:00:0c:01"
    ns.ip("link", "add", "link", lower, "name", control, "address", mac, "type", "macvtap", "mode", "bridge")
    try:
        ns.ip("link", "set", control, "up")
        wait_until(lambda: any(is_router_solicitation(f) for f in sniffer.sent_by(mac)), 20,
                   f"the control macvtap {control} to send a router solicitation")
        assert any(a.startswith("fe80::") for a in addresses(ns, control))
    finally:
        ns.ip("link", "del", control, check=False)


def eui64_link_local(mac: str) -> str:
    """fe80:: and the modified EUI-64 of ``mac``: the kernel's default link-local address for it."""
    octets = bytes.fromhex(mac.replace(":", ""))
    interface_id = bytes([octets[0] ^ 2]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return socket.inet_ntop(socket.AF_INET6, b"\xfe\x80" + b"\0" * 6 + interface_id)


def guest_frames(frames: list[bytes]) -> list[bytes]:
    """What came from QEMU's side: the test's guest frames and QEMU's announce-self for the guest (RARP)."""
    return [frame for frame in frames if struct.unpack("!H", frame[12:14])[0] in (ETH_P_TEST, ETH_P_RARP)]


def test_a_macvtap_backend_has_no_address_and_sends_only_the_guests_frames(world: World) -> None:
    ipv6_on(world.ns)
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")
    with sniffing(world.ns, "wi0", "wi1") as sniffer:
        world.start_qemu("vm1")
        world.start_netwatch()
        seen: dict[str, list[str]] = {}  # backend (netdev) -> its addresses just after it was attached
        nic = world.wait_state("vm1", "net0", "attached", guest_link=True)
        seen[nic["netdev"]] = addresses(world.ns, nic["ifname"])
        world.frame_reaches_wire("vm1", "net0", "wi0")
        for flap in range(2):
            sniffer.collect()
            world.delete_link("lo0")
            world.wait_state("vm1", "net0", "waiting-lower")
            world.lower("lo0", "wi0")
            sniffer.listen("wi0")
            nic = world.wait_state("vm1", "net0", "attached", guest_link=True, netdev=f"nw-net0-tap{flap + 2}")
            seen[nic["netdev"]] = addresses(world.ns, nic["ifname"])
            world.frame_reaches_wire("vm1", "net0", "wi0")
        result = world.cli("rebind", "vm1", "net0", "lo1")
        assert result.returncode == 0, result.stderr
        nic = world.wait_state("vm1", "net0", "attached", guest_link=True, lower="lo1", netdev="nw-net0-tap4")
        backend = nic["ifname"]
        seen[nic["netdev"]] = addresses(world.ns, backend)
        world.frame_reaches_wire("vm1", "net0", "wi1")
        kernel_had_its_chance(world.ns, "lo1", sniffer)

        stray = [frame for frame in sniffer.sent_by(MAC) if frame not in guest_frames([frame])]
        from_qemu = len(guest_frames(sniffer.sent_by(MAC, "wi1")))
        seen["now"] = addresses(world.ns, backend)
        # All at once, so that a failure shows each: the addresses each
        # backend had, the frames with the guest's MAC that the guest did not
        # send, and the last backend's transmit counter against what came
        # from QEMU's side (the guest's frames, QEMU's announcements).
        facts = {"addresses": seen, "stray frames": describe(stray), "tx": stats(world.ns, backend)["tx"]}
        assert facts == {"addresses": {name: [] for name in seen}, "stray frames": [], "tx": from_qemu}
        assert from_qemu > 0


def test_a_tap_backend_has_no_address_and_sends_the_guest_nothing_of_its_own(world: World) -> None:
    ipv6_on(world.ns)
    tap = "nw-vm1-net0"
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "routed", "lower": "up0", "mac": MAC})
    world.lower("up0", "uw0")
    world.lower("up1", "uw1")
    with sniffing(world.ns, "uw1") as sniffer:
        world.start_qemu("vm1")
        world.start_netwatch()
        observer = world.qemus["vm1"].observers["net0"]
        heard: list[bytes] = []  # every frame the guest's hub got

        def listen() -> None:
            while (frame := observer.recv(0.0)) is not None:
                heard.append(frame)
        seen: dict[str, list[str]] = {}
        nic = world.wait_state("vm1", "net0", "attached", guest_link=True)
        seen[nic["netdev"]] = addresses(world.ns, tap)
        for generation in (2, 3):
            world.delete_link(tap)
            nic = world.wait_state("vm1", "net0", "attached", guest_link=True, netdev=f"nw-net0-tap{generation}")
            seen[nic["netdev"]] = addresses(world.ns, tap)
            listen()
        result = world.cli("rebind", "vm1", "net0", "up1")
        assert result.returncode == 0, result.stderr
        world.wait_state("vm1", "net0", "attached", guest_link=True, lower="up1")
        # The guest's frames reach the tap (its receive side, towards the host).
        for n in range(5):
            observer.inject(testbed.test_frame(PEER_MAC, MAC, b"guest %d" % n))
        wait_until(lambda: stats(world.ns, tap)["rx"] >= 5, 10, "the guest's 5 frames on the tap", world.dump)
        kernel_had_its_chance(world.ns, "up1", sniffer)
        listen()
        ours = [frame for frame in heard if frame[6:12] == bytes.fromhex(tap_mac(MAC).replace(":", ""))]
        seen["now"] = addresses(world.ns, tap)
        # Routed, with no route to the guest: nothing at all went towards it.
        facts = {"addresses": seen, "frames from the tap": describe(ours), "tx": stats(world.ns, tap)["tx"]}
        assert facts == {"addresses": {name: [] for name in seen}, "frames from the tap": [], "tx": 0}


def test_an_adopted_backend_loses_the_link_local_the_kernel_made(world: World) -> None:
    """A backend made before this fix (or by a kernel default) is silenced when netwatch adopts it."""
    ipv6_on(world.ns)
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.lower("lo0", "wi0")
    world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    before = world.wait_state("vm1", "net0", "attached", guest_link=True)
    netwatch.kill(signal.SIGKILL)
    # What the kernel gave such a link: the guest's own link-local address.
    backend = before["ifname"]
    world.ns.ip("link", "set", "dev", backend, "addrgenmode", "eui64")
    guest_ll = f"{eui64_link_local(MAC)}/64"
    world.ns.ip("addr", "replace", guest_ll, "dev", backend)
    assert addresses(world.ns, backend) == [guest_ll]
    world.start_netwatch()
    after = world.wait_state("vm1", "net0", "attached", guest_link=True)
    assert (after["netdev"], after["ifindex"]) == (before["netdev"], before["ifindex"]), "adopted, not rebuilt"
    wait_until(lambda: addresses(world.ns, backend) == [], 10, f"{guest_ll} to go from {backend}", world.dump)
    details = json.loads(world.ns.ip("-d", "-j", "link", "show", backend))[0]
    assert details.get("inet6_addr_gen_mode") == "none", details


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data.ljust(len(data) + len(data) % 2, b"\0")))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def router_advertisement(src_mac: str, prefix: str) -> bytes:
    """A router advertisement to all nodes from ``src_mac``'s link-local address: ``prefix``/64 for SLAAC."""
    src = socket.inet_pton(socket.AF_INET6, eui64_link_local(src_mac))
    dst = socket.inet_pton(socket.AF_INET6, "ff02::1")
    # Type 134, hop limit 64, router lifetime 1800 s; a prefix option: on-link and autonomous.
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    body += struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, prefix)
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
    return testbed.mac_bytes("33:33:00:00:00:01") + testbed.mac_bytes(src_mac) + struct.pack("!H", ETH_P_IPV6) + \
        ipv6 + body


def arp_request(src_mac: str, sender: str, target: str) -> bytes:
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + testbed.mac_bytes(src_mac) + socket.inet_aton(sender)
    arp += b"\0" * 6 + socket.inet_aton(target)
    return b"\xff" * 6 + testbed.mac_bytes(src_mac) + struct.pack("!H", 0x0806) + arp


def test_a_guests_router_advertisement_gives_the_host_no_address_and_no_route(world: World) -> None:
    """A routed tap hands the guest's frames to the host's stack: a router advertisement must change nothing."""
    ipv6_on(world.ns)
    sh(*world.ns.exec_argv("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"))  # the kernel's default
    world.ns.ip("addr", "add", "192.0.2.1/32", "dev", "lo")  # for the ARP that tells the guest's frames were read
    tap = "nw-vm1-net0"
    world.vm("vm1", {"id": "net0", "backend": "tap", "wiring": "hub", "mode": "routed", "mac": MAC})
    world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached", guest_link=True)
    observer = world.qemus["vm1"].observers["net0"]
    observer.inject(router_advertisement(MAC, "2001:db8:77::"))
    # The host answers an ARP request sent after the advertisement: by then it has read that too.
    observer.inject(arp_request(MAC, "192.0.2.99", "192.0.2.1"))

    def answered() -> bool:
        while (frame := observer.recv(0.0)) is not None:
            if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                return True
        return False
    wait_until(answered, 10, "the host's ARP reply to the guest", world.dump)
    routes = [line for line in world.ns.ip("-6", "route", "show", "dev", tap).splitlines()
              if "2001:db8:77" in line or line.startswith("default")]
    assert {"addresses": addresses(world.ns, tap), "routes": routes} == {"addresses": [], "routes": []}
