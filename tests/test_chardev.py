"""Opening a char device through netwatch's own node: each way it can fail is one sentence naming the step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netwatch.chardev import open_chardev

# /dev/null stands in for a macvtap: the node-making steps are the same.
OPEN_NULL = ("import os, sys\nfrom netwatch.chardev import open_chardev\nfrom netwatch.errors import DeviceError\n"
             "try:\n    os.close(open_chardev(os.stat('/dev/null').st_rdev, sys.argv[1], 'nw-x'))\n"
             "except DeviceError as exc:\n    print(exc)\nelse:\n    print('opened')\n")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, mount namespaces)")


@root_only
def test_opens_through_a_private_node_and_leaves_nothing(tmp_path: Path) -> None:
    fd = open_chardev(os.stat("/dev/null").st_rdev, str(tmp_path / "dev"), "nw-x")
    try:
        assert os.fstat(fd).st_rdev == os.stat("/dev/null").st_rdev
    finally:
        os.close(fd)
    assert os.listdir(tmp_path / "dev") == []


@root_only
def test_mknod_refused_says_mknod(tmp_path: Path) -> None:
    # What DeviceAllow= without "m" or a missing CAP_MKNOD does to netwatch.
    result = subprocess.run(["setpriv", "--inh-caps=-mknod", "--bounding-set=-mknod", sys.executable, "-c",
                             OPEN_NULL, str(tmp_path)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (f"cannot create the device node of nw-x in {tmp_path} (mknod failed: "
                                     "Operation not permitted)")


@root_only
def test_a_nodev_directory_says_open_and_why(tmp_path: Path) -> None:
    # systemd and Debian's initramfs mount /run nodev: the node is made but cannot be opened.
    script = f"mount -t tmpfs -o nodev,mode=0700 nwt-nodev {tmp_path} && exec {sys.executable} -c \"$0\" {tmp_path}"
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, OPEN_NULL],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (
        f"cannot open the device node of nw-x in {tmp_path} (open failed: Permission denied); {tmp_path} is on a "
        "filesystem mounted nodev: set device_dir to a directory on one without nodev")
