"""Opening a macvtap's character device without trusting /dev/tap<N>.

Device node names are global but ifindexes are per network namespace, so
/dev/tap<ifindex> may belong to another namespace's macvtap. The device
number comes from sysfs (which shows our namespace), and the node opened is
one netwatch creates itself in its state directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import DeviceError


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
        os.mknod(node, 0o600 | stat.S_IFCHR, devnum)
        try:
            fd = os.open(node, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        finally:
            _remove(node)
    except OSError as exc:
        raise DeviceError(f"cannot open the device of {label} in {node_dir}: {exc.strerror or exc}") from exc
    if os.fstat(fd).st_rdev != devnum:
        os.close(fd)
        raise DeviceError(f"the device opened for {label} is not the one sysfs names")
    return fd


def _remove(node: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node)
