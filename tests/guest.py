"""A small Linux guest built from Debian packages: cloud kernel + busybox-static.

The initramfs loads the virtio-net driver, gives eth0 a static address and
reports over the serial console: its MAC and PCI address once, every
carrier change, and one line per ping to the peer. Built once and cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("NETWATCH_GUEST_CACHE", Path.home() / ".cache" / "netwatch-guest"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "failover",
           "net_failover", "virtio_net"]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
ip link set eth0 up
ip addr add {address}/24 dev eth0
echo "GUEST-READY mac=$(cat /sys/class/net/eth0/address) pci=$(basename $(readlink -f /sys/class/net/eth0/device/..))"
last=x
while true; do
  c=$(cat /sys/class/net/eth0/carrier 2>/dev/null)
  if [ "$c" != "$last" ]; then echo "GUEST-CARRIER $c"; last=$c; fi
  if ping -c1 -W1 {peer} >/dev/null 2>&1; then echo "GUEST-PING ok"; sleep 0.2; else echo "GUEST-PING fail"; fi
done
"""


def _download(workdir: Path, packages: list[str]) -> None:
    cmd = ["apt-get", "download", "-q", *packages]
    if subprocess.run(cmd, cwd=workdir, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(cmd, cwd=workdir, check=True, capture_output=True)


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive (newc) of (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(f"{value:08x}".encode() for value in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def build(address: str = "10.77.0.2", peer: str = "10.77.0.1") -> tuple[Path, Path]:
    """(kernel, initramfs) for a guest at ``address`` pinging ``peer``; cached."""
    tag = f"{address}-{peer}"
    kernel, initrd = CACHE / "vmlinuz", CACHE / f"initrd-{tag}.cpio"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        depends = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True).stdout
        image = next((line.split(":", 1)[1].strip() for line in depends.splitlines()
                      if line.strip().startswith("Depends: linux-image-")), KERNEL_PACKAGE)
        _download(work, [image, "busybox-static"])
        root = work / "root"
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        shutil.copy(next((root / "boot").glob("vmlinuz-*")), kernel)
        entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "lib",
                                                                            "lib/modules")]
        entries.append(("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()))
        for module in MODULES:
            path = next((root / "lib" / "modules").rglob(f"{module}.ko"))
            entries.append((f"lib/modules/{module}.ko", 0o100644, path.read_bytes()))
        init = INIT.format(modules=" ".join(MODULES), address=address, peer=peer)
        entries.append(("init", 0o100755, init.encode()))
        initrd.write_bytes(_newc(entries))
    return kernel, initrd


def guest_args(kernel: Path, initrd: Path, serial_log: str) -> list[str]:
    return ["-m", "256", "-kernel", str(kernel), "-initrd", str(initrd), "-no-reboot",
            "-append", "console=ttyS0 panic=-1 loglevel=3", "-serial", f"file:{serial_log}"]
