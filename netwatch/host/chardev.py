"""Opening a macvtap's character device without trusting /dev/tap<N>.

Device node names are global but ifindexes are per network namespace, so
/dev/tap<ifindex> may belong to another namespace's macvtap. The device
number comes from sysfs (which shows our namespace), and the node opened is
one netwatch creates itself in its state directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from netwatch.errors import DeviceError
from netwatch.untrusted import clean


def macvtap_devnum(name: str, index: int, sysfs: str = "/sys/class/net") -> int:
    path = Path(sysfs) / name / "macvtap" / f"tap{index}" / "dev"
    try:
        major, minor = path.read_text().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError) as exc:
        raise DeviceError(f"cannot read the device number of {name} from {path}: {exc}") from exc


def open_chardev(devnum: int, node_dir: str, label: str) -> int:
    """Open char device ``devnum`` through a private node; return the fd.

    The node is removed at once: the fd is all that is needed, and nothing
    is left behind if netwatch dies.
    """
    node = os.path.join(node_dir, f"{label}.{os.getpid()}")
    try:
        os.makedirs(node_dir, mode=0o700, exist_ok=True)
        _remove(node)
    except OSError as exc:
        raise DeviceError(f"cannot prepare the device-node directory {node_dir} for {label}: "
                          f"{exc.strerror or exc}") from exc
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, devnum)
    except OSError as exc:
        # Under systemd: DeviceAllow= without "m", or no CAP_MKNOD.
        raise DeviceError(f"cannot create the device node of {label} in {node_dir} (mknod failed: "
                          f"{exc.strerror or exc})") from exc
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError as exc:
        raise DeviceError(f"cannot open the device node of {label} in {node_dir} (open failed: "
                          f"{exc.strerror or exc}){_nodev_hint(node_dir, exc)}") from exc
    finally:
        _remove(node)
    if os.fstat(fd).st_rdev != devnum:
        os.close(fd)
        raise DeviceError(f"the device opened for {label} is not the one sysfs names")
    return fd


# TUNGETIFF = _IOR('T', 210, unsigned int): a tap or macvtap fd's interface name and flags.
TUNGETIFF = 0x800454D2


def open_macvtap(name: str, index: int, node_dir: str, sysfs: str = "/sys/class/net") -> int:
    """Open the character device of macvtap ``name`` (ifindex ``index``) and prove the fd is it.

    Macvtap minors are global and reused at once: the number read from
    sysfs may, by the time the node is opened, belong to another macvtap
    (another namespace's, another tenant's). The fd is kept only when the
    device itself names ``name`` (TUNGETIFF) and sysfs still gives ``name``
    that ifindex and the fd's device number.
    """
    devnum = macvtap_devnum(name, index, sysfs)
    fd = open_chardev(devnum, node_dir, name)
    try:
        verify_macvtap(fd, name, index, sysfs)
    except BaseException:
        os.close(fd)
        raise
    return fd


def verify_macvtap(fd: int, name: str, index: int, sysfs: str = "/sys/class/net") -> None:
    try:
        ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as exc:
        raise DeviceError(f"the device opened for {name} is not a macvtap (TUNGETIFF: {exc.strerror or exc})") from exc
    named = ifreq[:16].split(b"\0", 1)[0].decode(errors="replace")
    if named != name:
        raise DeviceError(f"the device opened for {name} belongs to {clean(named, 16)}: its number was reused")
    try:
        same_index = int((Path(sysfs) / name / "ifindex").read_text()) == index
        same_dev = macvtap_devnum(name, index, sysfs) == os.fstat(fd).st_rdev
    except (OSError, ValueError, DeviceError):
        same_index = same_dev = False
    if not (same_index and same_dev):
        raise DeviceError(f"the device opened for {name} is not the macvtap with ifindex {index} any more")


def _nodev_hint(node_dir: str, exc: OSError) -> str:
    # /run is mounted nodev by systemd and Debian's initramfs: a node made
    # there cannot be opened, which says nothing about the device itself.
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    try:
        nodev = bool(os.statvfs(node_dir).f_flag & os.ST_NODEV)
    except OSError:
        return ""
    return (f"; {node_dir} is on a filesystem mounted nodev: set device_dir to a directory on one without nodev"
            if nodev else "")


def _remove(node: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node)
