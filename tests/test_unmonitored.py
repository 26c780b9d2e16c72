"""A VM netwatch has no monitor for (no ``qmp``; every NIC redirect-wired): its taps are joined to their
lowers all the same, nothing is ever sent to QEMU, and, for a libvirt domain, libvirt's hook says when its
QEMU starts, stops and migrates away (netwatch/qemu/unmonitored.py, netwatch/service/libvirthook.py).

The libvirt domain's QEMU is a plain QEMU put in the cgroup libvirt would give it: what netwatch checks a
hook's pid against. tests/test_libvirt*.py do the same with a real libvirtd."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch.qemu.peer import cgroup_of
from netwatch.sandbox.testbed import Qemu, wait_until
from netwatch.service import control
from netwatch.service.control import ControlServer
from netwatch.service.libvirthook import _pid_file, run_hook

from .test_redirect import TAP, frame_reaches_tap, redirect_nic
from .world import World

pytestmark = pytest.mark.integration


def unmonitored_vm(world: World, name: str, **keys: Any) -> dict[str, Any]:
    vm = world.vm(name, redirect_nic())
    del vm["qmp"]
    vm.update(keys)
    world.write_config()
    return vm


def vm_status(world: World, name: str) -> dict[str, Any]:
    return next(vm for vm in world.status()["vms"] if vm["name"] == name)


def hook(world: World, domain: str, op: str, subop: str, **more: Any) -> dict[str, Any]:
    """One call of libvirt's hook as `netwatch libvirt-hook` sends it."""
    return dict(control.request(world.state, "libvirt-hook", timeout=15, domain=domain, op=op, subop=subop, **more))


@contextlib.contextmanager
def libvirt_cgroup(domain: str, domain_id: int = 7) -> Iterator[Path]:
    """The cgroup libvirt (without systemd) makes for a domain, in the hierarchy netwatch reads."""
    unified = Path("/sys/fs/cgroup/unified")
    root = unified if unified.is_dir() and os.path.ismount(unified) else Path("/sys/fs/cgroup")
    machine = root / "machine"
    made_machine = not machine.exists()
    group = machine / f"qemu-{domain_id}-{domain}.libvirt-qemu"
    group.mkdir(parents=True)
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(pid)
        group.rmdir()
        if made_machine:
            with contextlib.suppress(OSError):
                machine.rmdir()


def libvirt_starts(world: World, domain: str, domain_uuid: str, group: Path, incoming: bool = False) -> Qemu:
    """What libvirt does and tells its hook: (migrate,) prepare, QEMU started in the domain's cgroup, started."""
    if incoming:
        hook(world, domain, "migrate", "begin", uuid=domain_uuid)
    hook(world, domain, "prepare", "begin", uuid=domain_uuid)
    world.wait_state("vm1", "net0", "attached")  # joined before QEMU opens the tap
    qemu = world.start_qemu("vm1")
    (group / "cgroup.procs").write_text(str(qemu.pid))
    hook(world, domain, "started", "begin", uuid=domain_uuid, pid=qemu.pid)
    return qemu


def libvirt_stops(world: World, domain: str, domain_uuid: str, qemu: Qemu, migration: str | None = None) -> None:
    """libvirt ends QEMU, then calls its hook's stopped (with the migration its status file says)."""
    qemu.close()
    hook(world, domain, "stopped", "end", uuid=domain_uuid, migration=migration)
    world.wait_state("vm1", "net0", "waiting-vm")


def test_a_vm_without_monitor_is_wired_and_never_spoken_to(world: World) -> None:
    unmonitored_vm(world, "vm1")
    world.lower("lo0", "wi0")
    world.start_netwatch()
    # Nothing says whether its QEMU runs: its tap is joined whenever the lower is there.
    first = world.wait_state("vm1", "net0", "attached")
    vm = vm_status(world, "vm1")
    assert (vm["monitor"], vm["qmp"], vm["connected"], vm["libvirt_domain"]) == (False, None, False, None), vm
    qemu = world.start_qemu("vm1")
    argv = qemu.argv()
    assert argv.count("-qmp") == 1 and "vm1.test.qmp," in argv[argv.index("-qmp") + 1], "the test's alone"
    frame_reaches_tap(world, "wi0")
    network = qemu.info_network()
    for flap in range(2):
        world.delete_link("lo0")
        world.wait_state("vm1", "net0", "waiting-lower")
        world.lower("lo0", "wi0")
        world.wait_state("vm1", "net0", "attached", swaps=first["swaps"] + flap + 1)
        frame_reaches_tap(world, "wi0")
    # QEMU was told nothing: the same networks, the guest's link never set.
    assert qemu.info_network() == network
    assert world.netwatch is not None
    assert not [line for line in world.netwatch.log().splitlines() if "guest link" in line]


def test_libvirt_hook_starts_stops_and_migrates_a_domain_out(world: World) -> None:
    domain = f"nwt{uuid.uuid4().hex[:8]}"
    domain_uuid = str(uuid.uuid4())
    unmonitored_vm(world, "vm1", libvirt_domain=domain, uuid=domain_uuid)
    world.lower("lo0", "wi0")
    world.recording_hooks()
    world.start_netwatch()
    wait_until(lambda: world.ns.link_exists(TAP), 10, "the persistent tap", world.dump)
    # The domain does not run: no macvlan on the lower.
    world.wait_state("vm1", "net0", "waiting-vm")
    wait_until(lambda: f"libvirt domain {domain} is not running" in world.nic("vm1", "net0")["cause"], 10,
               "the cause to name the domain", world.dump)
    # Another domain's hook, and this one's with another UUID, change nothing.
    assert hook(world, "other", "prepare", "begin") == {"vms": [], "refused": [], "missing": []}
    wrong = hook(world, domain, "prepare", "begin", uuid=str(uuid.uuid4()))
    assert wrong["vms"] == [] and "not vm1" not in str(wrong) and "UUID" in wrong["refused"][0], wrong
    assert world.nic("vm1", "net0")["state"] == "waiting-vm"
    # prepare: the answer comes with the tap there; the macvlan is joined before QEMU opens the tap.
    assert hook(world, domain, "prepare", "begin", uuid=domain_uuid) == {"vms": ["vm1"], "refused": [],
                                                                          "missing": []}
    world.wait_state("vm1", "net0", "attached")
    with libvirt_cgroup(domain) as group:
        qemu = world.start_qemu("vm1")
        # A pid that is not in the domain's cgroup is refused, and named.
        refused = hook(world, domain, "started", "begin", uuid=domain_uuid, pid=qemu.pid)
        assert refused["vms"] == [] and "is not libvirt's QEMU of that domain" in refused["refused"][0], refused
        (group / "cgroup.procs").write_text(str(qemu.pid))
        assert cgroup_of(qemu.pid) == f"/machine/{group.name}"
        assert hook(world, domain, "started", "begin", uuid=domain_uuid, pid=qemu.pid)["vms"] == ["vm1"]
        wait_until(lambda: vm_status(world, "vm1")["qemu_pid"] == qemu.pid, 10, "the QEMU adopted", world.dump)
        frame_reaches_tap(world, "wi0")
        # A netwatch restart finds the running domain's QEMU by its cgroup (no hook comes).
        assert world.netwatch is not None
        world.netwatch.kill()
        world.start_netwatch()
        world.wait_state("vm1", "net0", "attached")
        assert vm_status(world, "vm1")["qemu_pid"] == qemu.pid
        # libvirt stops it: QEMU exits, then "stopped end".
        libvirt_stops(world, domain, domain_uuid, qemu)
        assert world.ns.links("macvlan") == [] and world.ns.link_exists(TAP)
        # Started again, then migrated away: its NIC goes down as migrate-out, not stop.
        qemu = libvirt_starts(world, domain, domain_uuid, group)
        libvirt_stops(world, domain, domain_uuid, qemu, migration="out")
        # And back: libvirt's migrate hook comes first on the target, so the NIC comes up as migrate-in.
        qemu = libvirt_starts(world, domain, domain_uuid, group, incoming=True)
        frame_reaches_tap(world, "wi0")
        libvirt_stops(world, domain, domain_uuid, qemu)
        # An incoming migration that failed: libvirt's status file said "migration in" at stopped.
        qemu = libvirt_starts(world, domain, domain_uuid, group, incoming=True)
        libvirt_stops(world, domain, domain_uuid, qemu, migration="in")
    wait_until(lambda: len(world.hook_runs()) >= 8, 10, "the hooks to run", world.dump)
    # Up at prepare (kept when QEMU came, and across the restart), down at each stop, as the hook said.
    contexts = [run["argv"][1] for run in world.hook_runs()]
    assert contexts == ["start", "stop", "start", "migrate-out", "migrate-in", "stop", "migrate-in",
                        "migrate-failed"], contexts


def test_only_root_may_send_libvirt_hook_events(tmp_path: Path) -> None:
    async def handler(request: dict[str, Any]) -> Any:
        return "done"

    server = ControlServer(str(tmp_path), {"libvirt-hook": handler, "status": handler}, root_only={"libvirt-hook"})
    import asyncio
    line = json.dumps({"cmd": "libvirt-hook"}).encode() + b"\n"
    assert asyncio.run(server._answer(line, 1000)) == {
        "ok": False, "error": "permission denied: only root may send libvirt-hook"}
    assert asyncio.run(server._answer(line, 0)) == {"ok": True, "result": "done"}
    assert asyncio.run(server._answer(json.dumps({"cmd": "status"}).encode(), 1000))["ok"]


def test_the_hook_reads_only_a_pid_file_root_owns_and_never_fails_libvirt(tmp_path: Path) -> None:
    (tmp_path / "web1.pid").write_text("4242\n")
    assert _pid_file("web1", str(tmp_path)) == 4242
    (tmp_path / "link.pid").symlink_to(tmp_path / "web1.pid")
    assert _pid_file("link", str(tmp_path)) is None, "a symlink is not followed"
    (tmp_path / "junk.pid").write_text("12ab")
    assert _pid_file("junk", str(tmp_path)) is None
    os.chown(tmp_path / "web1.pid", 65534, 65534)
    assert _pid_file("web1", str(tmp_path)) is None, "a pid file another account owns is not believed"
    # No netwatch: one line for libvirt's log, and libvirt goes on.
    line = run_hook(str(tmp_path / "nowhere"), ["web1", "prepare", "begin", "-"],
                    b"<domain><name>web1</name><uuid>6f1a2b3c-0d4e-4f5a-8b6c-7d8e9f0a1b2c</uuid></domain>")
    assert line is not None and "netwatch is not running" in line
    assert run_hook(str(tmp_path), ["web1", "reboot-of-some-kind", "begin", "-"], b"") is None
    mismatch = run_hook(str(tmp_path), ["web1", "started", "begin", "-"], b"<domain><name>web2</name></domain>")
    assert mismatch is not None and "names domain web2" in mismatch


def test_qemu_args_of_a_vm_without_monitor(world: World) -> None:
    unmonitored_vm(world, "vm1")
    args = world.cli("qemu-args", "vm1")
    assert args.returncode == 0 and "-qmp" not in args.stdout and "ifname=nw-vm1-net0" in args.stdout, args


def test_the_hook_reads_the_migration_from_libvirts_status_file(tmp_path: Path) -> None:
    from netwatch.service.libvirthook import _migration_job
    status = "<domstatus state='{}' reason='{}' pid='42'><job type='none' async='{}' phase='x'/>" \
             "<domain type='qemu'><name>web1</name></domain></domstatus>"
    for state, reason, job, expected in (("paused", "migration", "migration out", "out"),
                                         ("paused", "migration", "migration in", "in"),
                                         ("paused", "save", "save", None), ("running", "booted", "none", None)):
        (tmp_path / "web1.xml").write_text(status.format(state, reason, job))
        assert _migration_job("web1", str(tmp_path)) == expected, job
    aborted = "<domstatus state='paused' reason='migration' pid='42'><job type='destroy' async='none'/></domstatus>"
    (tmp_path / "web1.xml").write_text(aborted)
    assert _migration_job("web1", str(tmp_path)) == "in", "an aborted incoming migration"
    destroyed = "<domstatus state='shutdown' reason='unknown' pid='42'><job type='destroy' async='none'/></domstatus>"
    (tmp_path / "web1.xml").write_text(destroyed)
    assert _migration_job("web1", str(tmp_path)) is None
    assert _migration_job("gone", str(tmp_path)) is None
    (tmp_path / "web1.xml").write_text(status.format("paused", "migration", "migration out"))
    os.chown(tmp_path / "web1.xml", 65534, 65534)
    assert _migration_job("web1", str(tmp_path)) is None, "a status file another account owns is not believed"
