"""Opening a char device through netwatch's own node: each way it can fail is one sentence naming the step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netwatch.host.chardev import open_chardev
from netwatch.sandbox.testbed import Netns

# /dev/null stands in for a macvtap: the node-making steps are the same.
OPEN_NULL = ("import os, sys\nfrom netwatch.host.chardev import open_chardev\nfrom netwatch.errors import DeviceError\n"
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


REUSED = """
import os, subprocess, sys
from netwatch.host.chardev import macvtap_devnum, open_chardev, open_macvtap, verify_macvtap
from netwatch.errors import DeviceError
def ip(*args):
    subprocess.run(["ip", *args], check=True)
def index(name):
    return int(open(f"/sys/class/net/{name}/ifindex").read())
ip("link", "add", "nwt-low", "type", "veth", "peer", "name", "nwt-wire")
ip("link", "add", "nwt-mva", "link", "nwt-low", "type", "macvtap")
a = index("nwt-mva")
stale = macvtap_devnum("nwt-mva", a)
ip("link", "del", "nwt-mva")
ip("link", "add", "nwt-mvb", "link", "nwt-low", "type", "macvtap")
b = index("nwt-mvb")
print("reused" if macvtap_devnum("nwt-mvb", b) == stale else "not reused")
fd = open_chardev(stale, sys.argv[1], "nwt-mva")  # what netwatch checked before: passes
try:
    verify_macvtap(fd, "nwt-mva", a)
except DeviceError as exc:
    print(exc)
os.close(fd)
os.close(open_macvtap("nwt-mvb", b, sys.argv[1]))
print("own opened")
"""


@root_only
@pytest.mark.integration
def test_a_reused_macvtap_number_is_refused(netns: Netns, tmp_path: Path) -> None:
    # Minors are global and reused at once: a number read for one macvtap
    # opens the next one made, which the device-number comparison let through.
    result = subprocess.run(netns.exec_argv(sys.executable, "-c", REUSED, str(tmp_path)), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "reused", "the device opened for nwt-mva belongs to nwt-mvb: its number was reused", "own opened"]
