"""One QEMU process is one VM's for as long as it runs (issue 21 item 1), and libvirt_domain names one domain.

Found in review: VMs va and vb with qemu_user = "nobody", sockets in a
directory owned by nobody; one process running as nobody served va.qmp,
closed it and bound vb.qmp. netwatch connected it as vb (the pid in va's
record) and the process held both VMs' macvtaps: the claim of a QEMU was
dropped with its session, and other VMs' records were not consulted.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netwatch import config
from netwatch.errors import ConfigError
from netwatch.qemu import peer as peer_mod
from netwatch.qemu.peer import QemuClaims, libvirt_cgroups, libvirt_problem, start_time
from netwatch.sandbox.testbed import write_config

from .libvirt_host import LibvirtHost, LibvirtUnavailable
from .peer_process import PeerProcess, hostile
from .world import World

NOBODY = 65534
MAC_A, MAC_B = "52:54:00:c1:00:01", "52:54:00:c1:00:02"


# -- claims ---------------------------------------------------------------------


def test_a_claim_lasts_while_the_process_runs_and_ends_with_it() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        claims = QemuClaims()
        claims.claim(child.pid, "va")
        assert claims.other_than(child.pid, "vb") == "va"
        assert claims.other_than(child.pid, "va") is None
        child.kill()
        child.wait(10)
        assert claims.other_than(child.pid, "vb") is None, "an exited QEMU claims nothing"
    finally:
        child.kill()
        child.wait(10)


def test_a_reused_pid_inherits_no_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        claims = QemuClaims()
        claims.claim(child.pid, "va")
        started = start_time(child.pid)
        assert started is not None
        # The pid is another process's now: same number, another start time.
        monkeypatch.setattr(peer_mod, "start_time", lambda pid: started + 1)
        assert claims.other_than(child.pid, "vb") is None
    finally:
        child.kill()
        child.wait(10)


def test_a_record_claims_its_qemu_only_while_that_process_runs() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = start_time(child.pid)
        assert started is not None
        claims = QemuClaims()
        claims.recorded(child.pid, started + 1, "stale")  # the pid of a process gone since
        assert claims.other_than(child.pid, "vb") is None
        claims.recorded(child.pid, started, "va")
        assert claims.other_than(child.pid, "vb") == "va"
    finally:
        child.kill()
        child.wait(10)


# -- libvirt_domain ---------------------------------------------------------------

SCOPE_WEB1 = "/machine.slice/machine-qemu\\x2d7\\x2dweb1.scope/libvirt/emulator"


@pytest.mark.parametrize(("group", "domain", "ok"), [
    (SCOPE_WEB1, "web1", True),
    ("/machine.slice/machine-qemu\\x2d7\\x2dweb1.scope", "web1", True),  # cgroup v1's name=systemd
    ("/machine.slice/machine-qemu\\x2d12\\x2dstaging\\x2dweb1.scope/libvirt/emulator", "web1", False),
    ("/machine.slice/machine-qemu\\x2d12\\x2dnotweb1.scope/libvirt/emulator", "web1", False),
    ("/machine.slice/machine-qemu\\x2d12\\x2dweb10.scope/libvirt/emulator", "web1", False),
    ("/machine.slice/machine-qemu\\x2d12\\x2dstaging\\x2dweb1.scope/libvirt/emulator", "staging-web1", True),
    ("/machine.slice/machine-qemu\\x2d3\\x2dweb1.scope/../x", "web1", True),  # below the scope: the scope decides
    # A user's own cgroup subtree may hold a group of any name: only /machine.slice counts.
    ("/user.slice/user-1000.slice/user@1000.service/machine-qemu\\x2d7\\x2dweb1.scope", "web1", False),
    ("/machine.slice/machine-qemu\\x2d7\\x2dweb1.scope.evil/x", "web1", False),
    # libvirt without systemd: its own "machine" partition.
    ("/machine/qemu-7-web1.libvirt-qemu/emulator", "web1", True),
    ("/machine/qemu-7-staging-web1.libvirt-qemu/emulator", "web1", False),
    # libvirt keeps letters, digits and single "-"/"." of the name, and 64 characters in all.
    ("/machine.slice/machine-qemu\\x2d7\\x2dweb.1.scope", "web..1_", True),
    ("/machine.slice/machine-qemu\\x2d7\\x2d" + "a" * 57 + ".scope", "a" * 80, True),
    ("/machine.slice/machine-qemu\\x2d17\\x2d" + "a" * 56 + ".scope", "a" * 80, True),
    ("/machine.slice/machine-qemu\\x2d17\\x2d" + "a" * 57 + ".scope", "a" * 80, False),
])
def test_libvirt_domain_matches_exactly_one_domain(monkeypatch: pytest.MonkeyPatch, group: str, domain: str,
                                                    ok: bool) -> None:
    monkeypatch.setattr(peer_mod, "cgroup_of", lambda pid: group)
    problem = libvirt_problem(4242, domain)
    assert (problem is None) == ok, problem


def test_the_readmes_glob_matched_other_domains_too() -> None:
    """Why libvirt_domain exists: no glob names one domain whatever its id."""
    glob = "/machine.slice/machine-qemu*web1.scope/*"
    for other in ("staging\\x2dweb1", "notweb1"):
        assert fnmatch.fnmatchcase(f"/machine.slice/machine-qemu\\x2d12\\x2d{other}.scope/libvirt/emulator", glob)
    assert libvirt_cgroups(12, "web1")[0] == "/machine.slice/machine-qemu\\x2d12\\x2dweb1.scope"


def test_libvirt_domain_is_read_from_the_config(short_tmp: Path) -> None:
    path = str(short_tmp / "netwatch.toml")
    vm = {"name": "web1", "qmp": "/run/libvirt/qemu/web1.qmp", "libvirt_domain": "web1", "nics": []}
    write_config(path, str(short_tmp / "state"), [vm])
    loaded = config.load(path).vm("web1")
    assert loaded is not None and loaded.identity.libvirt_domain == "web1"
    write_config(path, str(short_tmp / "state"), [{**vm, "libvirt_domain": "--"}])
    with pytest.raises(ConfigError, match="libvirt_domain"):
        config.load(path)


# -- one process, two VMs' sockets (the review's reproduction) ------------------------


def nobodys_vms(world: World) -> tuple[str, str]:
    """VMs va and vb whose QEMU user is nobody, sockets in a directory nobody owns; their socket paths."""
    os.chmod(world.tmp, 0o755)  # nobody reaches its directory inside
    sockets = world.tmp / "q"
    sockets.mkdir()
    os.chown(sockets, NOBODY, NOBODY)
    world.vm("va", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC_A})
    world.vm("vb", {"id": "net0", "backend": "macvtap", "lower": "lo1", "mac": MAC_B})
    for name in ("va", "vb"):
        world.vm_dict(name).update(qmp=str(sockets / f"{name}.qmp"), qemu_user="nobody")
    world.write_config()
    world.lower("lo0", "wi0")
    world.lower("lo1", "wi1")
    return str(sockets / "va.qmp"), str(sockets / "vb.qmp")


def fds_on(peer: PeerProcess, path: str) -> list[str]:
    """The fds netwatch handed the peer over ``path`` (it reports each one it receives)."""
    return [line for line in peer.lines() if line.startswith(f"fd {path} ")]


def holds_no_fd_of(peer: PeerProcess, world: World, vm: str) -> None:
    """Nothing of ``vm``'s reached the process: no fd received on its socket, and its NIC is not attached."""
    assert fds_on(peer, str(world.vm_dict(vm)["qmp"])) == [], peer.lines()
    assert world.nic(vm, "net0").get("state") != "attached", world.dump()


def refused_as_vas(world: World, peer: PeerProcess) -> None:
    nic = world.wait_state("vb", "net0", "failed")
    assert nic["cause"] == f"QMP peer refused: pid {peer.pid} is the QEMU of VM 'va'", nic


@pytest.mark.integration
def test_a_qemu_that_leaves_one_vms_socket_for_anothers_is_refused_there(world: World) -> None:
    va_path, vb_path = nobodys_vms(world)
    with hostile("hop", va_path, vb_path, output=world.tmp / "peer.out", user=NOBODY) as peer:
        world.start_netwatch()
        world.wait_state("va", "net0", "attached")
        assert fds_on(peer, va_path), peer.lines()
        os.kill(peer.pid, signal.SIGUSR1)  # closes va.qmp, binds vb.qmp
        peer.wait_for(f"accepted {vb_path}")
        # Before the fix: "connected to QEMU (pid P...)" for vb, its NIC attached and vb's fd in the process.
        refused_as_vas(world, peer)
        holds_no_fd_of(peer, world, "vb")


@pytest.mark.integration
def test_another_vms_record_claims_its_qemu_across_a_restart(world: World) -> None:
    va_path, vb_path = nobodys_vms(world)
    with hostile("hop", va_path, vb_path, output=world.tmp / "peer.out", user=NOBODY) as peer:
        netwatch = world.start_netwatch()
        world.wait_state("va", "net0", "attached")
        netwatch.kill(signal.SIGTERM)  # va's record names the process; no session remembers it
        os.kill(peer.pid, signal.SIGUSR1)
        peer.wait_for(f"listening {vb_path}")
        world.start_netwatch()
        # Before the fix: admitted as vb, since only va's own records were consulted.
        refused_as_vas(world, peer)
        holds_no_fd_of(peer, world, "vb")
        assert Path(world.state, "nics", "va", "net0.json").exists()


# -- libvirt_domain against a real libvirt --------------------------------------------


def bare_domain(name: str) -> str:
    """A domain with nothing to boot, kept paused: only its QEMU process and cgroup are looked at."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


@pytest.fixture
def libvirt(world: World) -> Iterator[LibvirtHost]:
    os.chmod(world.tmp, 0o711)
    host = LibvirtHost(world.tmp / "libvirt", world.ns)
    try:
        host.start()
    except LibvirtUnavailable as exc:
        problems = host.close()
        pytest.fail(f"libvirt unavailable: {exc} {problems}", pytrace=False)
    try:
        yield host
    finally:
        problems = host.close()
        assert not problems, "left behind (now removed):\n" + "\n".join(problems)


def qemu_of(libvirt: LibvirtHost, name: str) -> int:
    for pid in libvirt.qemu_pids():
        if any(arg.startswith(f"guest={name},".encode())
               for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")):
            return pid
    raise AssertionError(f"no QEMU for domain {name}\n{libvirt.dump(name)}")


@pytest.mark.integration
def test_libvirt_domain_tells_web1_from_staging_web1_under_libvirt(libvirt: LibvirtHost) -> None:
    for name in ("web1", "staging-web1"):
        libvirt.define(name, bare_domain(name))
        libvirt.virsh("start", "--paused", name)
    web1, staging = qemu_of(libvirt, "web1"), qemu_of(libvirt, "staging-web1")
    assert libvirt_problem(web1, "web1") is None, peer_mod.cgroup_of(web1)
    assert libvirt_problem(staging, "staging-web1") is None, peer_mod.cgroup_of(staging)
    assert libvirt_problem(staging, "web1") is not None
    assert libvirt_problem(web1, "staging-web1") is not None
