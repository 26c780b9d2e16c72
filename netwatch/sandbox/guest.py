"""A small Linux guest built from Debian packages: cloud kernel + busybox-static.

Used by the demo, the tests and the hub-cost bench to show what a real
guest sees. The initramfs loads the virtio-net driver, gives eth0, eth1, ...
the static addresses named on the kernel command line and reports over the
serial console: each NIC's MAC and PCI address once, every eth0 carrier
change (with eth0's MAC and PCI address as they are then) and, when asked,
one line per ping to a peer. It can also serve TCP for measurements: an
echo on port 5001, an endless stream of zeros on 5002 and a sink on 5003.
Nothing is downloaded but Debian packages (through apt); the result is
cached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from netwatch.errors import NetwatchError

CACHE = Path(os.environ.get("NETWATCH_GUEST_CACHE", Path.home() / ".cache" / "netwatch-guest"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "failover",
           "net_failover", "virtio_net")
ECHO_PORT, SOURCE_PORT, SINK_PORT = 5001, 5002, 5003

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mkdir -p /tmp
for m in {modules}; do insmod /lib/modules/$m.ko; done
addrs=; peer=; serve=
for arg in $(cat /proc/cmdline); do
  case $arg in
    nw.addrs=*) addrs=$(echo ${{arg#nw.addrs=}} | tr , ' ');;
    nw.ping=*) peer=${{arg#nw.ping=}};;
    nw.serve=1) serve=1;;
  esac
done
nics() {{
  # Each ethN with an address given: set up when it appears (at boot, hot-added,
  # or back after a replug), reported when it goes.
  i=0
  for a in $addrs; do
    # By ifindex: a NIC replaced between two looks is a new one too.
    now=$(cat /sys/class/net/eth$i/ifindex 2>/dev/null); was=$(cat /tmp/up.eth$i 2>/dev/null)
    if [ -n "$was" ] && [ "$now" != "$was" ]; then
      rm /tmp/up.eth$i; echo "GUEST-NIC-GONE eth$i"
    fi
    if [ -n "$now" ] && [ "$now" != "$was" ]; then
      ip link set eth$i up; ip addr add $a dev eth$i; echo $now > /tmp/up.eth$i
      rxq=$(ls -d /sys/class/net/eth$i/queues/rx-* | wc -l)
      echo "GUEST-NIC eth$i mac=$(cat /sys/class/net/eth$i/address) pci=$(pci eth$i) addr=$a rxq=$rxq"
    fi
    i=$((i+1))
  done
}}
pci() {{ basename $(readlink -f /sys/class/net/$1/device/..); }}
nics
if [ -n "$serve" ]; then
  nc -ll -p {echo} -e cat &
  nc -ll -p {source} -e cat /dev/zero &
  nc -ll -p {sink} -e dd of=/dev/null &
fi
eth0() {{ echo "mac=$(cat /sys/class/net/eth0/address) pci=$(pci eth0)"; }}
echo "GUEST-READY $(eth0)"
last=x
while true; do
  nics
  c=$(cat /sys/class/net/eth0/carrier 2>/dev/null)
  if [ "$c" != "$last" ]; then echo "GUEST-CARRIER $c"; [ -n "$c" ] && echo "GUEST-ETH0 $(eth0)"; last=$c; fi
  if [ -z "$peer" ]; then sleep 0.2
  elif ping -c1 -W1 $peer >/dev/null 2>&1; then echo "GUEST-PING ok"; sleep 0.2
  else echo "GUEST-PING fail"; fi
done
"""


class GuestError(NetwatchError):
    """The guest could not be built (no apt, no package, no network to the mirror)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path

    def qemu_args(self, serial_log: Path, addresses: Sequence[str], ping: str | None = None,
                  serve: bool = False, memory_mb: int = 256) -> list[str]:
        """QEMU arguments that boot this guest; ``addresses`` go to eth0, eth1, ... in order."""
        append = ["console=ttyS0", "panic=-1", "loglevel=3", f"nw.addrs={','.join(addresses)}"]
        if ping:
            append.append(f"nw.ping={ping}")
        if serve:
            append.append("nw.serve=1")
        return ["-m", str(memory_mb), "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-no-reboot",
                "-append", " ".join(append), "-serial", f"file:{serial_log}"]


def _run(argv: list[str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise GuestError(f"cannot build the guest: {argv[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GuestError(f"cannot build the guest: {' '.join(argv[:3])} failed: {tail}")


def _download(workdir: Path, packages: list[str]) -> None:
    cmd = ["apt-get", "download", "-q", *packages]
    try:
        _run(cmd, workdir)
    except GuestError:
        _run(["apt-get", "update", "-q"])
        _run(cmd, workdir)


def _kernel_image_package() -> str:
    """The versioned package the cloud kernel metapackage points at."""
    try:
        depends = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True).stdout
    except OSError as exc:
        raise GuestError(f"cannot build the guest: apt-cache: {exc.strerror}") from exc
    return next((line.split(":", 1)[1].strip() for line in depends.splitlines()
                 if line.strip().startswith("Depends: linux-image-")), KERNEL_PACKAGE)


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive (newc) of (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(f"{value:08x}".encode() for value in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def _init_script() -> str:
    return INIT.format(modules=" ".join(MODULES), echo=ECHO_PORT, source=SOURCE_PORT, sink=SINK_PORT)


def build(cache: Path = CACHE, progress: Callable[[str], None] = lambda _: None) -> GuestImage:
    """The guest's kernel and initramfs, built on first use and cached in ``cache``."""
    init = _init_script()
    tag = hashlib.sha256((init + "\n".join(MODULES)).encode()).hexdigest()[:12]
    image = GuestImage(cache / "vmlinuz", cache / f"initrd-{tag}.cpio")
    if image.kernel.exists() and image.initrd.exists():
        return image
    progress(f"building the guest from Debian packages ({KERNEL_PACKAGE}, busybox-static) into {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _download(work, [_kernel_image_package(), "busybox-static"])
        root = work / "root"
        for deb in work.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = next((root / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise GuestError(f"cannot build the guest: no kernel in {KERNEL_PACKAGE}")
        entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "lib",
                                                                            "lib/modules")]
        entries.append(("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()))
        for module in MODULES:
            path = next((root / "lib" / "modules").rglob(f"{module}.ko"), None)
            if path is None:
                raise GuestError(f"cannot build the guest: module {module} is not in {KERNEL_PACKAGE}")
            entries.append((f"lib/modules/{module}.ko", 0o100644, path.read_bytes()))
        entries.append(("init", 0o100755, init.encode()))
        # Written aside and renamed: a concurrent or interrupted build never leaves half a file.
        for final, data in ((image.kernel, vmlinuz.read_bytes()), (image.initrd, _newc(entries))):
            partial = final.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(data)
            partial.rename(final)
    for old in cache.glob("initrd-*.cpio"):
        if old != image.initrd:  # from an older init script
            old.unlink(missing_ok=True)
    return image


class Serial:
    """The guest's console log, read from a mark onwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mark = 0

    def _text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def lines(self) -> list[str]:
        return [line.strip() for line in self._text()[self.mark:].splitlines()]

    def set_mark(self) -> None:
        self.mark = len(self._text())

    def count(self, line: str) -> int:
        return sum(1 for seen in self.lines() if seen == line)

    def first(self, prefix: str) -> str | None:
        return next((line for line in self.lines() if line.startswith(prefix)), None)
