"""The command line as a user runs it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from netwatch.sandbox.testbed import Netns

from .test_config import BAD_CASES
from .world import run_netwatch

GOOD = """
[netwatch]
state_dir = "{state}"
udev = "off"
[[vm]]
name = "web1"
qmp = "/run/netwatch-test/web1.qmp"
  [[vm.nic]]
  id = "net0"
  backend = "macvtap"
  lower = "eth1"
  mac = "52:54:00:12:34:56"
  [[vm.nic]]
  id = "net1"
  backend = "macvtap"
  lower = "eth2"
  hub = 7
  model = "e1000"
  mac = "52:54:00:12:34:57"
"""


@pytest.fixture
def good(tmp_path: Path) -> str:
    path = tmp_path / "good.toml"
    path.write_text(GOOD.format(state=tmp_path / "state"))
    return str(path)


@pytest.fixture
def bad(tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.format(state=tmp_path / "state").replace("52:54:00:12:34:57", "ff:ff:ff:ff:ff:ff")
                    + "typo = 1\n")
    return str(path)


def assert_clean_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.strip(), "an error must say something"


def test_check_good(good: str) -> None:
    result = run_netwatch("check", "-c", good)
    assert result.returncode == 0
    assert "OK (1 VMs, 2 NICs)" in result.stdout


def test_check_bad_lists_each_problem(bad: str) -> None:
    result = run_netwatch("check", "-c", bad)
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("vm 'web1' nic 'net1': key 'mac': 'ff:ff:ff:ff:ff:ff' is a multicast address" in x for x in lines)
    assert any("vm 'web1' nic 'net1': key 'typo': is not a known key" in x for x in lines)


def test_check_uses_netwatch_config_env(good: str) -> None:
    result = run_netwatch("check", env={"NETWATCH_CONFIG": good})
    assert result.returncode == 0


def test_check_missing_file(tmp_path: Path) -> None:
    result = run_netwatch("check", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"


def test_qemu_args_shell_and_json(good: str) -> None:
    line = run_netwatch("qemu-args", "-c", good, "web1")
    as_json = run_netwatch("qemu-args", "-c", good, "--json", "web1")
    assert line.returncode == as_json.returncode == 0
    args = json.loads(as_json.stdout)
    assert shlex.split(line.stdout) == args
    assert args == [
        "-qmp", "unix:/run/netwatch-test/web1.qmp,server=on,wait=off",
        "-netdev", "hubport,id=nw-net0,hubid=0",
        "-device", "virtio-net-pci,id=net0,netdev=nw-net0,mac=52:54:00:12:34:56,addr=0x19",
        "-netdev", "hubport,id=nw-net1,hubid=7",
        "-device", "e1000,id=net1,netdev=nw-net1,mac=52:54:00:12:34:57,addr=0x18",
    ]


def test_qemu_args_libvirt_block(tmp_path: Path) -> None:
    path = tmp_path / "lv.toml"
    path.write_text('''
[[vm]]
name = "web1"
qmp = "/run/nw-qmp/web&1.qmp"
  [[vm.nic]]
  id = "ua-net0"
  backend = "macvtap"
  lower = "eth1"
  mac = "52:54:00:12:34:56"
  [[vm.nic]]
  id = "ua-net1"
  backend = "macvtap"
  lower = "eth2"
  mac = "52:54:00:12:34:57"
  guest_pci = "pci.1:0x05"
''')
    result = run_netwatch("qemu-args", "-c", str(path), "--libvirt", "web1")
    assert result.returncode == 0, result.stderr
    comment, block = result.stdout.split("\n", 1)
    assert "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" in comment
    assert comment.startswith("<!--") and comment.endswith("-->")
    import xml.etree.ElementTree as ET
    root = ET.fromstring(f"<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>{block}</domain>")
    ns = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    args = [arg.get("value") for arg in root.iter(f"{ns}arg")]
    as_json = json.loads(run_netwatch("qemu-args", "-c", str(path), "--json", "web1").stdout)
    assert args == as_json
    assert args[1] == "unix:/run/nw-qmp/web&1.qmp,server=on,wait=off"
    assert args[5].endswith(",addr=0x19") and args[9].endswith(",bus=pci.1,addr=0x05")


REDIRECT = """
[[vm]]
name = "web1"
qmp = "/run/nw-qmp/web1.qmp"
  [[vm.nic]]
  id = "net0"
  backend = "macvtap"
  wiring = "redirect"
  lower = "eth1"
  mac = "52:54:00:12:34:56"
  queues = 2
"""


def test_check_and_qemu_args_of_a_redirect_nic(tmp_path: Path) -> None:
    path = tmp_path / "rd.toml"
    path.write_text(REDIRECT)
    assert run_netwatch("check", "-c", str(path)).stdout.strip() == f"{path}: OK (1 VMs, 1 NICs)"
    line = run_netwatch("qemu-args", "-c", str(path), "web1")
    assert line.returncode == 0, line.stderr
    vhost = ",vhost=on" if Path("/dev/vhost-net").exists() else ""
    assert shlex.split(line.stdout) == [
        "-qmp", "unix:/run/nw-qmp/web1.qmp,server=on,wait=off",
        "-netdev", f"tap,id=nwr-net0,ifname=nw-web1-net0,script=no,downscript=no,vnet_hdr=on{vhost},queues=2",
        "-device", "virtio-net-pci,id=net0,netdev=nwr-net0,mac=52:54:00:12:34:56,addr=0x19,mq=on,vectors=6",
    ]
    # With qmp the admin asks for netwatch's monitor: it is the only thing in the block.
    monitored = run_netwatch("qemu-args", "-c", str(path), "--libvirt", "web1")
    assert monitored.returncode == 0, monitored.stderr
    block = ET.fromstring(f"<devices xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>{monitored.stdout}"
                          "</devices>")
    args = [arg.get("value") for arg in block.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert args == ["-qmp", "unix:/run/nw-qmp/web1.qmp,server=on,wait=off"]
    # The libvirt admin's form: no qmp, nothing but libvirt elements.
    bare = tmp_path / "bare.toml"
    bare.write_text("\n".join(line for line in REDIRECT.splitlines() if not line.startswith("qmp")))
    assert run_netwatch("check", "-c", str(bare)).returncode == 0
    libvirt = run_netwatch("qemu-args", "-c", str(bare), "--libvirt", "web1")
    assert libvirt.returncode == 0, libvirt.stderr
    assert "qemu:commandline" not in libvirt.stdout and "-qmp" not in libvirt.stdout
    bare_args = shlex.split(run_netwatch("qemu-args", "-c", str(bare), "web1").stdout)
    assert bare_args[:2] == [
        "-netdev", f"tap,id=nwr-net0,ifname=nw-web1-net0,script=no,downscript=no,vnet_hdr=on{vhost},queues=2"]
    [interface] = ET.fromstring(f"<devices>{libvirt.stdout}</devices>")
    assert interface.attrib == {"type": "ethernet"}
    assert [(child.tag, child.attrib) for child in interface] == [
        ("mac", {"address": "52:54:00:12:34:56"}), ("target", {"dev": "nw-web1-net0", "managed": "no"}),
        ("model", {"type": "virtio"}), ("driver", {"queues": "2"}),
        ("address", {"type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x19", "function": "0x0"})]


def test_check_refuses_a_redirect_tap_nic_and_libvirt_an_unknown_model(tmp_path: Path) -> None:
    path = tmp_path / "rd.toml"
    path.write_text(REDIRECT.replace('backend = "macvtap"', 'backend = "tap"\n  mode = "routed"')
                    .replace('  lower = "eth1"\n', ""))
    result = run_netwatch("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"{path}: vm 'web1' nic 'net0': key 'wiring': \"redirect\" is only for macvtap "
                                     "NICs (a tap NIC's own tap never dies with its lower: use \"direct\")")
    path.write_text(REDIRECT.replace("queues = 2", 'model = "i82559er"'))
    result = run_netwatch("qemu-args", "-c", str(path), "--libvirt", "web1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("netwatch: VM 'web1' NIC 'net0': libvirt has no <model type> for i82559er; "
                                     "under libvirt a redirect NIC's model is one of virtio-net-pci, e1000, e1000e, "
                                     "rtl8139")


@pytest.mark.parametrize("nic_id", ["net0", "hostnet3", "video0", "pci.1", "sata0-0-0", "virtio-disk2"])
def test_qemu_args_libvirt_refuses_libvirt_ids(tmp_path: Path, nic_id: str) -> None:
    path = tmp_path / "lv.toml"
    path.write_text(f'[[vm]]\nname = "web1"\nqmp = "/run/w.qmp"\n[[vm.nic]]\nid = "{nic_id}"\n'
                    'backend = "macvtap"\nlower = "eth1"\nmac = "52:54:00:12:34:56"\n')
    result = run_netwatch("qemu-args", "-c", str(path), "--libvirt", "web1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"netwatch: VM 'web1' NIC '{nic_id}': libvirt uses ids like '{nic_id}' for "
                                     f"its own devices ('Duplicate device ID'); use an id starting 'ua-', "
                                     f"such as 'ua-{nic_id}'")
    assert run_netwatch("qemu-args", "-c", str(path), "web1").returncode == 0, "plain QEMU has no such ids"


def test_qemu_args_unknown_vm(good: str) -> None:
    result = run_netwatch("qemu-args", "-c", good, "db9")
    assert result.returncode == 2
    assert result.stderr.strip() == f"netwatch: no VM named 'db9' in {good}"


def test_status_without_service_is_one_sentence(good: str, tmp_path: Path) -> None:
    result = run_netwatch("status", "-c", good)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"netwatch: netwatch is not running (no service on "
                                     f"{tmp_path / 'state' / 'control.sock'})")


@pytest.mark.parametrize("argv", [["bogus"], [], ["qemu-args"], ["status", "--nope"], ["demo", "--flaps", "x"]])
def test_bad_command_lines(argv: list[str]) -> None:
    result = run_netwatch(*argv)
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def shared_netns() -> Iterator[Netns]:
    with Netns("nwcli") as ns:
        ns.add_veth("eth1", "wire1")
        yield ns


@pytest.mark.integration
@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_every_bad_config_through_check_and_run(text: str, expected: str, tmp_path: Path,
                                                shared_netns: Netns) -> None:
    path = tmp_path / "netwatch.toml"
    path.write_text(text)
    before = shared_netns.ip("-d", "link")
    for command in ("check", "run"):
        result = run_netwatch(command, "-c", str(path), ns=shared_netns)
        assert result.returncode == 2, (command, result.stderr)
        assert_clean_error(result.stderr)
        lines = result.stderr.strip().splitlines()
        assert any(expected in line for line in lines), (command, lines)
        assert all(line.startswith(f"{path}: ") for line in lines), (command, lines)
    assert shared_netns.ip("-d", "link") == before


@pytest.mark.integration
def test_run_with_bad_config_touches_nothing(bad: str, tmp_path: Path, netns: Netns) -> None:
    netns.add_veth("eth1", "wire1")
    before = netns.ip("-d", "link")
    result = run_netwatch("run", "-c", bad, ns=netns)
    assert result.returncode == 2
    assert_clean_error(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 2
    assert netns.ip("-d", "link") == before
    assert not (tmp_path / "state").exists()


@pytest.mark.skipif(not Path("/proc/self/ns/net").exists(), reason="needs network namespaces")
def test_run_refuses_a_state_directory_others_can_write(tmp_path: Path) -> None:
    # Records there are acted on at the next start; the control socket lives there.
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    path = tmp_path / "netwatch.toml"
    path.write_text(f'[netwatch]\nstate_dir = "{state}"\nudev = "off"\n')
    with Netns("nwt") as ns:
        result = run_netwatch("run", "-c", str(path), ns=ns, env={"NETWATCH_JOURNAL_SOCKET": "/nonexistent"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"netwatch: the state directory {state} must be netwatch's own and writable by it alone (owner uid 0, "
        "mode 0777)")
    assert "Traceback" not in result.stderr


def test_output_cut_short_by_its_reader_is_no_traceback(good: str) -> None:
    """`netwatch qemu-args VM | head -c1` ended in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before netwatch writes
    try:
        done = subprocess.run([sys.executable, "-m", "netwatch", "qemu-args", "-c", good, "web1"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode != 0
