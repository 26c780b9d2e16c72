"""A hypervisor host that is a real machine to netwatch: a Debian 12 VM under TCG.

Every other test swaps veths in namespaces. What a production host does
when a NIC is hot-swapped (the PCI device leaves the bus and comes back,
the driver probes it, the kernel names it eth0 and udevd renames it a
moment later, systemd-networkd rebuilds the VLAN on top) only happens on a
machine with a PCI bus, udevd and networkd. So this boots one: a bookworm
tree (debootstrap, Debian packages only: systemd, udev, systemd-networkd,
qemu-system-x86 for the inner VMs, qemu-guest-agent, the cloud kernel)
as an ext4 image, cached in ``~/.cache/netwatch-hotswap-host/<hash>`` and
never written (each boot writes to a throwaway overlay: ``snapshot=on``).

The outer QEMU (TCG, ``-machine pc``: ACPI PCI hotplug on any slot) gives it:

* three virtio-net NICs on fixed, pluggable slots (4, 5, 6), whose backends are
  ``-netdev dgram`` unix sockets: the test's end of each is the "switch"
  (a child process of the test, :class:`Switch`), which sends tagged frames
  to the inner VMs' MACs and records what the host sends out. No link is
  made on this machine and no frame leaves these sockets;
* a QMP socket of its own for the test (``device_del``/``device_add``);
* the guest agent on a virtio-serial port: the test runs commands inside
  (``guest-exec``) and reads files (``guest-file-*``). Chosen over a serial
  getty (a shell on a console needs a framing protocol and is slow under
  TCG) and ssh (a third NIC and a key; the agent is one Debian package,
  answers as soon as its port appears, and sees no network at all);
* the serial console, captured to a file;
* netwatch's source tree, the wheelhouse and the test's files as a second,
  read-only disk made per run (a tar archive, extracted inside): edits to
  netwatch are tested without rebuilding the image, and nothing needs 9p
  (the cloud kernel has 9p only as modules, and a tar needs no filesystem).

The kernel is linux-image-cloud-amd64: its ``virtio_net``, ``macvtap``,
``8021q``, ``bonding``, ``tun`` are modules, so a driver can be unloaded and
loaded again; it has no e1000 (hence virtio-net NICs; the root disk is
virtio-blk, another driver, so ``modprobe -r virtio_net`` leaves it alone).

Needs root, ``debootstrap``, ``e2fsprogs`` (mkfs.ext4 -d), QEMU and, for the
first build, the Debian mirror apt uses (systemd_host's debian_mirror()).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netwatch.sandbox.testbed import QEMU_BINARY, Deadline, Netns, wait_until

from .systemd_host import HostError, _apt_proxy, _remove_tree, debian_mirror

CACHE = Path(os.environ.get("NETWATCH_HOTSWAP_HOST_CACHE", Path.home() / ".cache" / "netwatch-hotswap-host"))
SUITE = "bookworm"
# A Debian 12 KVM host, as small as it can be: systemd with udevd and networkd
# (both in the systemd and udev packages), QEMU for the inner VMs, python3-venv
# for docs/service.md's install, the guest agent the test talks to, and the
# cloud kernel with its initramfs. debootstrap installs Depends only.
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "procps", "python3", "python3-venv",
            "qemu-system-x86", "qemu-guest-agent", "linux-image-cloud-amd64", "initramfs-tools")
# Units a test host has no use for: gettys (the test talks to the agent),
# apt's and e2fsprogs' timers (no network, a throwaway disk), and
# wait-online (the NICs have no addresses to wait for; it would hold the boot).
MASKED = ("serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer", "apt-daily-upgrade.timer",
          "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "systemd-networkd-wait-online.service")
ENABLED = ("systemd-networkd.service",)
# Only what the boot needs in the initramfs: a smaller one unpacks faster under TCG.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
IMAGE_SIZE = "3G"  # sparse: the tree takes about a third
RECIPE = 1  # bump when the build below changes in a way the lists above do not show
NEEDED_TOOLS = {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs"}


def missing_tools() -> list[str]:
    """Debian packages to install for this environment (empty: all there)."""
    return sorted({package for tool, package in NEEDED_TOOLS.items() if shutil.which(tool) is None})


@dataclass(frozen=True)
class HostImage:
    """The cached image: a kernel and initramfs to boot with -kernel/-initrd, and the root filesystem."""

    kernel: Path
    initrd: Path
    rootfs: Path
    versions: str  # "kernel 6.1.0-.. / systemd 252.. / qemu 7.2..": what the image holds


def _key(wheels: Path) -> str:
    recipe = "\n".join([SUITE, *PACKAGES, *MASKED, *ENABLED, *INITRAMFS_MODULES, IMAGE_SIZE, str(RECIPE),
                        *sorted(wheel.name for wheel in wheels.glob("*.whl"))])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _image_at(directory: Path) -> HostImage:
    return HostImage(directory / "vmlinuz", directory / "initrd.img", directory / "rootfs.ext4",
                     (directory / "versions").read_text().strip() if (directory / "versions").exists() else "")


def build_image(wheels: Path, cache: Path = CACHE, progress: Callable[[str], None] = print) -> HostImage:
    """The host VM's image, built on first use (a few minutes) and cached in ``cache``.

    ``wheels`` (systemd_host.wheelhouse()) are netwatch's dependencies: the
    image has /opt/netwatch made and holding them, so that docs/service.md's
    install, run inside at test time, finds them there (pip's own work under
    TCG, a fresh venv and five packages, took 106 s of the boot's CPU; with
    them there, about 50 s).
    """
    done = cache / _key(wheels)
    if (done / "versions").exists():
        return _image_at(done)
    missing = missing_tools()
    if missing:
        raise HostError(f"cannot build the hotswap host: apt-get install {' '.join(missing)}")
    mirror, keyring = debian_mirror()
    cache.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed: an interrupted build never looks complete.
    partial = Path(tempfile.mkdtemp(prefix=f"{done.name}.partial.", dir=cache))
    log = cache / f"{done.name}.build.log"
    tree = partial / "tree"
    progress(f"building a Debian {SUITE} host VM image into {done} (debootstrap from {mirror}; once)")
    started = time.monotonic()
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    if keyring and os.path.exists(keyring):
        argv.append(f"--keyring={keyring}")
    argv += [SUITE, str(tree), mirror]
    try:
        with open(log, "w") as out:
            ran = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **_apt_proxy()})
        if ran.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise HostError(f"cannot build the hotswap host: debootstrap failed ({' | '.join(tail)}; full log: {log})")
        progress(f"  debootstrap done in {time.monotonic() - started:.0f} s")
        _customize(tree, log)
        _venv(tree, wheels, log)
        _export(tree, partial)
        _remove_tree(tree)
        try:
            partial.rename(done)
        except OSError:
            if not (done / "versions").exists():
                raise
            # A concurrent run finished the same build first: use its image.
    finally:
        if partial.exists():
            _remove_tree(partial)
    progress(f"built {done} in {time.monotonic() - started:.0f} s")
    for old in cache.iterdir():  # images from older recipes, and their build logs
        if old.is_dir() and old != done and re.fullmatch(r"[0-9a-f]{12}", old.name):
            _remove_tree(old)
        elif old.name.endswith(".build.log") and old.name != log.name:
            old.unlink(missing_ok=True)
    return _image_at(done)


def _chroot(tree: Path, command: str, log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ chroot {tree} {command}\n")
        out.flush()
        ran = subprocess.run(["chroot", str(tree), "/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    if ran.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise HostError(f"cannot build the hotswap host: {command} failed ({' | '.join(tail)}; full log: {log})")


def _customize(tree: Path, log: Path) -> None:
    etc = tree / "etc"
    for unit in MASKED:
        link = etc / "systemd" / "system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (etc / "hostname").write_text("nwhost\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 nwhost\n")
    (etc / "fstab").write_text("/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1\n")
    # The journal in memory: nothing to flush to a disk that is thrown away.
    (etc / "systemd" / "journald.conf.d").mkdir(exist_ok=True)
    (etc / "systemd" / "journald.conf.d" / "volatile.conf").write_text("[Journal]\nStorage=volatile\n")
    # Each boot gets a fresh machine id: no two runs share a journal.
    (etc / "machine-id").write_text("")
    (etc / "initramfs-tools" / "conf.d" / "nwt.conf").write_text("MODULES=list\n")
    with open(etc / "initramfs-tools" / "modules", "a") as modules:
        modules.write("\n".join(INITRAMFS_MODULES) + "\n")
    for unit in ENABLED:
        _chroot(tree, f"systemctl enable {unit}", log)
    _chroot(tree, "update-initramfs -u -k all", log)
    for deb in (tree / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()


def _venv(tree: Path, wheels: Path, log: Path) -> None:
    """/opt/netwatch as docs/service.md's first line makes it, with every wheel but netwatch's own installed."""
    inside = tree / "tmp" / "wheels"
    shutil.copytree(wheels, inside)
    try:
        names = " ".join(shlex.quote(wheel.name.split("-")[0]) for wheel in sorted(inside.glob("*.whl")))
        _chroot(tree, f"python3 -m venv /opt/netwatch && /opt/netwatch/bin/pip install -q --no-index "
                      f"--disable-pip-version-check --find-links /tmp/wheels {names}", log)
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def _export(tree: Path, into: Path) -> None:
    boot = tree / "boot"
    kernel = sorted(boot.glob("vmlinuz-*"))
    initrd = sorted(boot.glob("initrd.img-*"))
    if not kernel or not initrd:
        raise HostError(f"cannot build the hotswap host: no kernel or initramfs in {boot}")
    shutil.copyfile(kernel[-1], into / "vmlinuz")
    shutil.copyfile(initrd[-1], into / "initrd.img")
    rootfs = into / "rootfs.ext4"
    ran = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "nwhost", "-d", str(tree), str(rootfs), IMAGE_SIZE],
                         capture_output=True, text=True)
    if ran.returncode != 0:
        raise HostError(f"cannot build the hotswap host: mkfs.ext4 -d failed: {ran.stderr.strip()}")
    versions = [f"kernel {kernel[-1].name.removeprefix('vmlinuz-')}"]
    status = (tree / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
    for package in ("systemd", "udev", "qemu-system-x86", "python3"):
        found = re.search(rf"^Package: {re.escape(package)}\n(?:[^\n]+\n)*?Version: (\S+)", status, re.M)
        versions.append(f"{package} {found.group(1) if found else '?'}")
    (into / "versions").write_text(" / ".join(versions) + "\n")


# -- talking to the host VM ---------------------------------------------------


@dataclass(frozen=True)
class Ran:
    """A command's outcome inside the host VM."""

    command: str
    returncode: int
    stdout: str
    stderr: str


class AgentError(HostError):
    """The guest agent did not answer in time or refused a request."""


class Agent:
    """A client of the host VM's guest agent (qemu-ga), on the outer QEMU's unix socket.

    The agent has no greeting and answers requests in order; a request sent
    before it runs waits in the port and is answered later, so every
    exchange starts with guest-sync-delimited and a fresh id (answers to
    older requests are read and dropped).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def _read_json(self, deadline: float) -> dict[str, Any]:
        sock = self._connect()
        while True:
            # 0xff: the agent's delimiter before a guest-sync-delimited answer.
            self.buffer = self.buffer.lstrip(b"\xff\r\n ")
            if b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                try:
                    value = json.loads(line.lstrip(b"\xff"))
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return value
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(1 << 20)
            if not chunk:
                self.close()
                raise ConnectionError("the agent's socket closed")
            self.buffer += chunk

    def sync(self, timeout: float = 5.0) -> None:
        """Wait for the agent to answer a fresh guest-sync-delimited (drops every older answer)."""
        token = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        sock = self._connect()
        sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
                     + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_json(deadline)
            if answer.get("return") == token:
                return

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        try:
            self.sync(min(timeout, 10.0))
            request: dict[str, Any] = {"execute": command}
            if arguments is not None:
                request["arguments"] = arguments
            self._connect().sendall(json.dumps(request).encode() + b"\n")
            answer = self._read_json(time.monotonic() + timeout)
        except (TimeoutError, OSError) as exc:
            self.close()
            raise AgentError(f"the guest agent did not answer {command} within {timeout:g} s ({exc!r})") from exc
        if "error" in answer:
            raise AgentError(f"the guest agent refused {command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    def answers(self, timeout: float) -> bool:
        """Whether the agent answers a sync within ``timeout`` (False while the VM boots)."""
        try:
            self.sync(timeout)
        except (TimeoutError, OSError):
            self.close()
            return False
        return True

    def run(self, command: str, timeout: float = 60.0, input: str | None = None,
            env: dict[str, str] | None = None) -> Ran:
        """Run ``command`` with /bin/sh inside and wait for it (output captured)."""
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
                       **(env or {})}
        arguments: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True,
                                     "env": [f"{key}={value}" for key, value in environment.items()]}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input.encode()).decode()
        deadline = time.monotonic() + timeout
        pid = self.call("guest-exec", arguments, timeout=min(timeout, 30.0))["pid"]
        interval = 0.005
        while True:
            status = self.call("guest-exec-status", {"pid": pid}, timeout=max(1.0, deadline - time.monotonic()))
            if status.get("exited"):
                code = status["exitcode"] if "exitcode" in status else 128 + int(status.get("signal", 127))
                return Ran(command, int(code), _b64text(status.get("out-data", "")),
                           _b64text(status.get("err-data", "")))
            if time.monotonic() > deadline:
                raise Deadline(f"timed out after {timeout:g} s in the host VM: {command}")
            time.sleep(interval)
            interval = min(interval * 2, 0.1)

    def read_file(self, path: str, offset: int = 0, timeout: float = 10.0) -> bytes:
        """The file's bytes from ``offset`` on, read by the agent itself (no process is started)."""
        handle = self.call("guest-file-open", {"path": path, "mode": "r"}, timeout=timeout)
        try:
            if offset:
                self.call("guest-file-seek", {"handle": handle, "offset": offset, "whence": "set"}, timeout=timeout)
            data = b""
            while True:
                chunk = self.call("guest-file-read", {"handle": handle, "count": 1 << 20}, timeout=timeout)
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    return data
        finally:
            self.call("guest-file-close", {"handle": handle}, timeout=timeout)


def _b64text(data: str) -> str:
    return base64.b64decode(data).decode(errors="replace")


PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- the host VM's NICs and the switch outside ---------------------------------


@dataclass(frozen=True)
class HostNic:
    """One of the host VM's NICs: a virtio-net device on a pluggable slot of the outer QEMU."""

    id: str  # the outer QEMU's device id
    mac: str
    slot: int
    segment: str  # the switch's name for its wire

    @property
    def netdev(self) -> str:
        return f"seg-{self.segment}"

    @property
    def pci(self) -> str:
        return f"0000:00:{self.slot:02x}.0"

    @property
    def predictable(self) -> str:
        """What udev's 99-default.link names it on ``pc``: the slot number the ACPI tables give (_SUN)."""
        return f"ens{self.slot}"

    def device(self, mac: str | None = None) -> dict[str, Any]:
        """device_add arguments: the same slot (and MAC, unless another is given) every time."""
        return {"driver": "virtio-net-pci", "id": self.id, "netdev": self.netdev, "mac": mac or self.mac,
                "addr": f"0x{self.slot:x}", "romfile": ""}


# The first two are the lowers of the inner VMs' NICs by name, VLAN, MAC and PCI address; the third is a
# bond's slave (a bond rewrites its slaves' MAC: never one of the first two, whose MAC a lower names).
NICS = (HostNic("hsnic0", "52:54:00:aa:00:04", 4, "a"), HostNic("hsnic1", "52:54:00:aa:00:05", 5, "b"),
        HostNic("hsnic2", "52:54:00:aa:00:06", 6, "c"))
SERIAL_SLOT = 0x10  # the guest agent's virtio-serial: clear of the NICs' slots
SWITCH_MAC = "02:00:00:00:00:01"
# Test frames to the inner VMs: "NWHS", a sequence number and the switch's
# CLOCK_MONOTONIC at sending (ns), so that the first frame an inner VM gets
# after an event says when the path was whole again, in this machine's clock.
MAGIC = b"NWHS"
ETH_P_TEST = 0x88B5


def segment_paths(workdir: Path, segment: str) -> tuple[Path, Path]:
    """(the outer QEMU's end, the switch's end) of a segment's unix datagram sockets."""
    return workdir / f"{segment}.qemu", workdir / f"{segment}.switch"


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer_frame(frame: bytes, ip: bytes, mac: bytes) -> tuple[str, bytes] | None:
    """The switch's answer as the host ``ip`` (4 bytes) with ``mac`` (6) to an untagged ``frame``: an ARP
    reply to a request for ``ip``, an ICMP echo reply to an echo request to it; None for anything else."""
    import struct

    kind = frame[12:14]
    if kind == b"\x08\x06" and len(frame) >= 42:
        htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
        sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
        if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, 1) or tpa != ip:
            return None
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + ip + sha + spa
        return "arp", sha + mac + b"\x08\x06" + arp
    if kind == b"\x08\x00" and len(frame) >= 34 and frame[14] >> 4 == 4:
        header = (frame[14] & 0xF) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        packet = frame[14:14 + total]
        if (header < 20 or len(packet) != total or total < header + 8 or packet[9] != 1 or packet[16:20] != ip
                or packet[header] != 8 or _checksum(packet[:header]) != 0):
            return None
        icmp = b"\0\0\0\0" + packet[header + 4:]
        icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
        head = packet[:8] + b"\x40" + packet[9:10] + b"\0\0" + ip + packet[12:16] + packet[20:header]
        head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
        return "icmp", frame[6:12] + mac + b"\x08\x00" + head + icmp
    return None


def switch_main(config_json: str) -> None:
    """The switch (a child process in the test's namespace): sends and records frames on each segment.

    Commands arrive as JSON lines on stdin: {"send": [{"segment", "dst", "vlan"}...], "interval": s}
    replaces what is sent (an empty list stops it); EOF ends it. Every frame
    the host VM sends from a MAC in "watch" is logged (JSON lines, flushed) with
    this machine's CLOCK_MONOTONIC: the inner VMs' frames seen on the outside.
    With "answer": {"segment", "ip", "mac"}, it is also a host with that IPv4
    address and MAC on that segment (only), once told {"answer": true} (and
    until {"answer": false}): it answers ARP requests for the address and ICMP
    echo requests to it (the log line of a frame it answered says "answered":
    "arp" or "icmp"), the peer a real guest pings.
    """
    import select
    import struct

    config = json.loads(config_json)
    answer, answering = config.get("answer"), False
    if answer:
        answer_segment, answer_ip = answer["segment"], socket.inet_aton(answer["ip"])
        answer_mac = bytes.fromhex(answer["mac"].replace(":", ""))
    socks: dict[socket.socket, str] = {}
    theirs: dict[str, str] = {}
    for segment, (qemu_end, ours) in config["segments"].items():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ours)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        sock.bind(ours)
        socks[sock] = segment
        theirs[segment] = qemu_end
    out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    watch = {bytes.fromhex(mac.replace(":", "")) for mac in config["watch"]}
    log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - open until the process ends
    os.set_blocking(sys.stdin.fileno(), False)
    pending = b""
    targets: list[tuple[str, bytes]] = []
    interval, seq, next_send = 0.01, 0, 0.0
    src = bytes.fromhex(SWITCH_MAC.replace(":", ""))
    while True:
        now = time.monotonic()
        wait = max(0.0, next_send - now) if targets else 1.0
        ready, _, _ = select.select([sys.stdin, *socks], [], [], wait)
        for sock in (r for r in ready if isinstance(r, socket.socket)):
            while True:
                try:
                    frame = sock.recv(65536)
                except BlockingIOError:
                    break
                at = time.monotonic_ns()
                answered = None
                if answering and socks[sock] == answer_segment:
                    reply = answer_frame(frame, answer_ip, answer_mac)
                    if reply is not None:
                        answered, data = reply
                        with contextlib.suppress(OSError):
                            out.sendto(data.ljust(60, b"\0"), theirs[answer_segment])
                if frame[6:12] not in watch:
                    continue
                kind, vlan = struct.unpack("!H", frame[12:14])[0], None
                if kind == 0x8100:
                    vlan, kind = struct.unpack("!H", frame[14:16])[0] & 0xFFF, struct.unpack("!H", frame[16:18])[0]
                entry = {"segment": socks[sock], "t": at, "src": frame[6:12].hex(":"), "type": kind, "vlan": vlan}
                if answered:
                    entry["answered"] = answered
                log.write(json.dumps(entry) + "\n")
        if sys.stdin in ready:
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                command = json.loads(line)
                answering = bool(answer) and bool(command.get("answer", answering))
                if "send" not in command:
                    continue
                interval = float(command.get("interval", interval))
                targets = []
                for target in command["send"]:
                    header = bytes.fromhex(target["dst"].replace(":", "")) + src
                    if target.get("vlan") is not None:
                        header += struct.pack("!HH", 0x8100, int(target["vlan"]))
                    targets.append((theirs[target["segment"]], header + struct.pack("!H", ETH_P_TEST) + MAGIC))
                next_send = time.monotonic()
        if targets and time.monotonic() >= next_send:
            for path, head in targets:
                frame = head + struct.pack("!QQ", seq, time.monotonic_ns())
                # Nobody there (the NIC unplugged and its netdev not reading) or a full queue: the frame is lost,
                # as on a wire.
                with contextlib.suppress(OSError):
                    out.sendto(frame.ljust(60, b"\0"), path)
            seq += 1
            next_send = max(next_send + interval, time.monotonic())


@dataclass(frozen=True)
class Seen:
    """A frame the host VM sent from a watched MAC, as the switch saw it."""

    segment: str
    t: int  # this machine's CLOCK_MONOTONIC, ns
    src: str
    type: int
    vlan: int | None
    answered: str | None = None  # "arp" or "icmp": the switch answered it (switch_main's "answer")


class Switch:
    """The test's end of every segment, in the test's namespace: a child process (switch_main)."""

    def __init__(self, netns: Netns, workdir: Path, segments: Sequence[str], watch: Sequence[str],
                 answer: dict[str, str] | None = None) -> None:
        self.log = workdir / "switch.log"
        config = {"segments": {segment: [str(path) for path in segment_paths(workdir, segment)]
                               for segment in segments},
                  "watch": list(watch), "log": str(self.log), "answer": answer}
        with open(workdir / "switch.err", "wb") as errors:
            self.proc = subprocess.Popen(
                netns.exec_argv(sys.executable, "-c", "import sys; from tests.hotswap_host import switch_main; "
                                "switch_main(sys.argv[1])", json.dumps(config)),
                cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=errors, preexec_fn=_die_with_parent)
        self.segments = list(segments)
        wait_until(lambda: all(segment_paths(workdir, s)[1].exists() for s in segments)
                   or self.proc.poll() is not None, 20, "the switch to bind its sockets")
        if self.proc.poll() is not None:
            raise HostError(f"the switch exited: {(workdir / 'switch.err').read_text(errors='replace')[-2000:]}")

    def send(self, targets: Sequence[tuple[str, str, int | None]], interval: float = 0.01) -> None:
        """Send a test frame to each (segment, destination MAC, VLAN or None) every ``interval`` s."""
        assert self.proc.stdin is not None
        command = {"send": [{"segment": s, "dst": d, "vlan": v} for s, d, v in targets], "interval": interval}
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, on: bool) -> None:
        """Answer ARP and pings as the host given by ``answer`` (True), or no longer (False)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"answer": on}).encode() + b"\n")
        self.proc.stdin.flush()

    def seen(self, since_ns: int = 0) -> list[Seen]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line)
                if entry["t"] >= since_ns:
                    found.append(Seen(entry["segment"], entry["t"], entry["src"], entry["type"], entry["vlan"],
                                      entry.get("answered")))
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _die_with_parent() -> None:
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# -- the booted host VM ---------------------------------------------------------


def payload_tar(dest: Path, trees: dict[str, Path], files: dict[str, str | Path]) -> Path:
    """A tar archive of ``trees`` (name inside -> directory here) and ``files`` (path inside -> text, or a
    file here to copy), the host VM's second disk. Version control, venvs and caches are left out."""
    skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "dist"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = set(Path(info.name).parts)
        if parts & skip or any(part.endswith(".egg-info") for part in parts):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, directory in trees.items():
            tar.add(directory, arcname=name, filter=keep)
        for name, text in files.items():
            if isinstance(text, Path):
                tar.add(text, arcname=name, filter=keep)
                continue
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755 if text.startswith("#!") else 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return dest


class HotswapHost:
    """One boot of the cached image under TCG, in a namespace of the test's with no link but lo.

    ``payload`` (a tar from payload_tar) is the second disk, extracted to
    /root/nwt inside by :meth:`unpack`. Everything is removed on exit: QEMU
    is ended by its pid (the disk overlay goes with it), the namespace and
    the work directory deleted.
    """

    def __init__(self, image: HostImage, payload: Path, workdir: Path, nics: Sequence[HostNic] = NICS,
                 memory_mb: int = 1024, cpus: int = 2, boot_timeout: float = 240) -> None:
        self.image, self.payload, self.workdir, self.nics = image, payload, workdir, list(nics)
        self.memory_mb, self.cpus, self.boot_timeout = memory_mb, cpus, boot_timeout
        self.netns: Netns | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp_path, self.agent_path = workdir / "qmp.sock", workdir / "qga.sock"
        self.console_path = workdir / "console.log"
        self.agent = Agent(self.agent_path)
        self.qmp_client: Any = None
        self.boot_seconds: dict[str, float] = {}

    def argv(self) -> list[str]:
        append = "root=/dev/vda rw console=ttyS0 loglevel=4 panic=-1 systemd.show_status=false"
        argv = [QEMU_BINARY, "-machine", "pc", "-accel", "tcg", "-smp", str(self.cpus), "-m", str(self.memory_mb),
                "-nodefaults", "-no-user-config", "-display", "none", "-name", "nwt-hotswap-host", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", append,
                # snapshot=on: the boot writes to a temporary file of QEMU's (in TMPDIR, the work directory).
                "-drive", f"file={self.image.rootfs},format=raw,if=none,id=root,snapshot=on",
                "-device", "virtio-blk-pci,drive=root,addr=0x2",
                "-drive", f"file={self.payload},format=raw,if=none,id=payload,readonly=on",
                "-device", "virtio-blk-pci,drive=payload,serial=nwpayload,addr=0x3",
                "-serial", f"file:{self.console_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-chardev", f"socket,id=qga0,path={self.agent_path},server=on,wait=off",
                "-device", f"virtio-serial-pci,addr={SERIAL_SLOT:#x}",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        for nic in self.nics:
            qemu_end, switch_end = segment_paths(self.workdir, nic.segment)
            argv += ["-netdev", f"dgram,id={nic.netdev},local.type=unix,local.path={qemu_end},"
                                f"remote.type=unix,remote.path={switch_end}",
                     "-device", ",".join(f"{key}={value}" for key, value in nic.device().items() if key != "driver")
                     .join(("virtio-net-pci,", ""))]
        return argv

    def __enter__(self) -> HotswapHost:
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_netns(self) -> Netns:
        """The namespace the outer QEMU and the switch share (made on first use)."""
        if self.netns is None:
            self.netns = Netns("nwths").__enter__()
        return self.netns

    def _boot(self) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        netns = self.start_netns()
        started = time.monotonic()
        with open(self.workdir / "qemu.log", "ab") as log:
            self.proc = subprocess.Popen(netns.exec_argv(*self.argv()), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env={**os.environ, "TMPDIR": str(self.workdir)},
                                         preexec_fn=_die_with_parent)
        wait_until(lambda: self.qmp_path.exists() or self._exited(), 30, "the outer QEMU's QMP socket")
        if self._exited():
            raise HostError(f"the outer QEMU exited: {self.qemu_log()}")
        self.qmp_client = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp_client.connect()
        wait_until(lambda: self._exited() or self.agent.answers(2.0), self.boot_timeout,
                   "the host VM's guest agent to answer", self.console, interval=0.5)
        if self._exited():
            raise HostError(f"the outer QEMU exited while the host booted: {self.qemu_log()}\n{self.console()}")
        self.boot_seconds["agent"] = time.monotonic() - started
        wait_until(lambda: self.run("systemctl is-system-running", check=False).stdout.strip()
                   in ("running", "degraded"), self.boot_timeout, "the host VM's systemd to finish booting",
                   lambda: self.console() + self.run("systemctl list-jobs --no-pager", check=False).stdout,
                   interval=0.5)
        self.boot_seconds["booted"] = time.monotonic() - started
        analyze = self.run("systemd-analyze", check=False).stdout
        found = re.search(r"= ([0-9.]+)s", analyze)
        if found:
            self.boot_seconds["systemd-analyze"] = float(found.group(1))

    def _exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def close(self) -> None:
        self.agent.close()
        if self.qmp_client is not None:
            with contextlib.suppress(Exception):
                self.qmp_client.close()
            self.qmp_client = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()  # ip netns exec execs QEMU: this is QEMU's pid
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        if self.netns is not None:
            self.netns.__exit__(None, None, None)
            self.netns = None

    def qemu_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "qemu.log").read_text(errors="replace")[-2000:]
        return ""

    def console(self) -> str:
        """The tail of the host VM's serial console."""
        try:
            text = self.console_path.read_text(errors="replace")
        except OSError:
            return ""
        return "--- host VM console (tail) ---\n" + "\n".join(text.splitlines()[-40:])

    # -- inside ------------------------------------------------------------------

    def run(self, command: str, check: bool = True, timeout: float = 60, input: str | None = None,
            env: dict[str, str] | None = None) -> Ran:
        ran = self.agent.run(command, timeout=timeout, input=input, env=env)
        if check and ran.returncode != 0:
            raise AssertionError(f"in the host VM: {command}\nexit {ran.returncode}\nstdout: {ran.stdout.strip()}\n"
                                 f"stderr: {ran.stderr.strip()}")
        return ran

    def out(self, command: str, check: bool = True, timeout: float = 60) -> str:
        return self.run(command, check=check, timeout=timeout).stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)} && "
                 f"chmod {mode:o} {shlex.quote(path)}", input=text)

    def read(self, path: str, offset: int = 0) -> bytes:
        return self.agent.read_file(path, offset)

    def monotonic(self) -> float:
        """The host VM's CLOCK_MONOTONIC now (s; /proc/uptime's 10 ms resolution: a mark, not a measurement)."""
        return float(self.out("cut -d' ' -f1 /proc/uptime").strip())

    def unpack(self, dest: str = "/root/nwt") -> None:
        self.run(f"mkdir -p {dest} && tar -C {dest} -xf /dev/disk/by-id/virtio-nwpayload", timeout=120)

    # -- the outer QEMU ------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        return self.qmp_client.cmd(command, **arguments)

    def unplug(self, nic: HostNic, timeout: float = 30) -> float:
        """device_del ``nic``; seconds until QEMU says it is gone (the guest ejected it: DEVICE_DELETED)."""
        self.qmp_client.clear_events()
        started = time.monotonic()
        self.qmp("device_del", id=nic.id)
        while True:
            left = started + timeout - time.monotonic()
            if left <= 0:
                raise Deadline(f"{nic.id} not deleted {timeout:g} s after device_del\n{self.console()}")
            event = self.qmp_client.pull_event(wait=left)
            if event and event.get("event") == "DEVICE_DELETED" and event.get("data", {}).get("device") == nic.id:
                return time.monotonic() - started

    def plug(self, nic: HostNic, mac: str | None = None) -> int:
        """device_add ``nic`` at its slot; this machine's CLOCK_MONOTONIC (ns) just before."""
        at = time.monotonic_ns()
        self.qmp("device_add", **nic.device(mac))
        return at


@contextlib.contextmanager
def booted(wheels: Path, payload_trees: dict[str, Path], payload_files: dict[str, str | Path],
           watch: Sequence[str] = (), answer: dict[str, str] | None = None, memory_mb: int = 1024,
           progress: Callable[[str], None] = print) -> Iterator[tuple[HotswapHost, Switch]]:
    """Build (or reuse) the image, boot it with the payload disk, the switch on its segments (``watch``
    and ``answer``: switch_main's)."""
    image = build_image(wheels, progress=progress)
    workdir = Path(tempfile.mkdtemp(prefix="nwt-hs-"))
    try:
        payload = payload_tar(workdir / "payload.tar", payload_trees, payload_files)
        host = HotswapHost(image, payload, workdir, memory_mb=memory_mb)
        try:
            switch = Switch(host.start_netns(), workdir, sorted({nic.segment for nic in host.nics}), watch, answer)
            try:
                with host:
                    yield host, switch
            finally:
                switch.close()
        finally:
            host.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
